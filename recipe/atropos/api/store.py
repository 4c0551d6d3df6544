"""The API's state in one SQLite file (WAL mode): a restart loses nothing it accepted.

Every change is one transaction, committed before the HTTP answer goes out: a group
answered 200 is on disk, and a batch leaves the queue in the same transaction that
advances the step. After a crash (even SIGKILL) the next start finds the
registration, the step, the environments, the queue and the counters as they were.

``synchronous=FULL`` makes each commit durable against power loss too, at the price
of one fsync per accepted group; the queue is small and the rate is a few groups a
second, so that price is not felt.

One connection, used from the server's event loop only (the routes are ``async``
and never await while they hold it), so every request sees and leaves a
consistent state without locks.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .batching import QueuedGroup

QUEUED = "queued"
BUFFERED = "buffered"  # smaller than its environment's group size: waits for partners

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS envs (
    env_id INTEGER PRIMARY KEY,
    config TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS groups (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    state TEXT NOT NULL CHECK (state IN ('queued', 'buffered')),
    env_id INTEGER,
    size INTEGER NOT NULL,
    policy_version INTEGER,
    arrival_step INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS groups_by_state ON groups (state, env_id);
CREATE TABLE IF NOT EXISTS counters (
    env TEXT NOT NULL,
    name TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (env, name)
);
"""


def dumps(value: Any) -> str:
    # allow_nan=False: what cannot be sent back as JSON is never stored
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


class Store:
    """Durable state of one trajectory API."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: transactions are opened explicitly by `transaction()`
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- key/value state: registration, step, started, latest example --------------------

    def get(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, dumps(value)))

    def put_raw(self, key: str, json_text: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json_text))

    def get_raw(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # -- environments -------------------------------------------------------------------

    def envs(self) -> list[dict[str, Any]]:
        return [json.loads(row[0]) for row in self._db.execute("SELECT config FROM envs ORDER BY env_id")]

    def add_env(self, config: dict[str, Any]) -> None:
        self._db.execute("INSERT INTO envs (env_id, config) VALUES (?, ?)", (config["registered_id"], dumps(config)))

    def update_env(self, config: dict[str, Any]) -> None:
        self._db.execute("UPDATE envs SET config = ? WHERE env_id = ?", (dumps(config), config["registered_id"]))

    # -- groups ---------------------------------------------------------------------------

    def add_group(self, state: str, group: dict[str, Any], body: str, arrival_step: int) -> int:
        cursor = self._db.execute(
            "INSERT INTO groups (state, env_id, size, policy_version, arrival_step, body) VALUES (?, ?, ?, ?, ?, ?)",
            (state, group.get("env_id"), len(group["tokens"]), group.get("policy_version"), arrival_step, body),
        )
        return cursor.lastrowid

    def set_state(self, seqs: list[int], state: str) -> None:
        self._db.executemany("UPDATE groups SET state = ? WHERE seq = ?", [(state, seq) for seq in seqs])

    def index(self, state: str, env_id: int | None = None) -> list[QueuedGroup]:
        """The groups in ``state`` (of one environment if given), in arrival order, without their bodies."""
        query = "SELECT seq, size, env_id, policy_version, arrival_step FROM groups WHERE state = ?"
        params: tuple = (state,)
        if env_id is not None:
            query += " AND env_id = ?"
            params += (env_id,)
        rows = self._db.execute(query + " ORDER BY seq", params)
        return [QueuedGroup(*row) for row in rows]

    def bodies(self, seqs: list[int]) -> list[str]:
        """The stored JSON of these groups, in the order given."""
        found = {}
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT seq, body FROM groups WHERE seq IN ({marks})", chunk))
        return [found[seq] for seq in seqs]

    def remove(self, seqs: list[int]) -> None:
        self._db.executemany("DELETE FROM groups WHERE seq = ?", [(seq,) for seq in seqs])

    def count(self, state: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM groups WHERE state = ?", (state,)).fetchone()[0]

    # -- counters (accepted, served, refused/<reason>), per environment -------------------

    def bump(self, env: str, name: str, by: int = 1) -> None:
        self._db.execute(
            "INSERT INTO counters (env, name, count) VALUES (?, ?, ?) "
            "ON CONFLICT (env, name) DO UPDATE SET count = count + excluded.count",
            (env, name, by),
        )

    def counters(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for env, name, count in self._db.execute("SELECT env, name, count FROM counters ORDER BY env, name"):
            table.setdefault(env, {})[name] = count
        return table

    # -- everything ------------------------------------------------------------------------

    def clear(self) -> None:
        for table in ("meta", "envs", "groups", "counters"):
            self._db.execute(f"DELETE FROM {table}")
