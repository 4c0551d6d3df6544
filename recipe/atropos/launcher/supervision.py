"""Which dead services the launcher starts again, when, and how often before it gives up.

A service that may be restarted (an environment; this project's API, whose queue is on disk)
is started again after a pause that doubles with each restart, at most ``restarts`` times;
one more death fails the run, naming the service and why. Every restart is counted in
``<run dir>/restarts.json`` (``{"env_restarts": N, "api_restarts": N, "by_service": {...}}``)
and in the launcher's status line.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RestartPolicy:
    """At most ``restarts`` restarts; the first after ``backoff_s``, each next one twice as late."""

    restarts: int
    backoff_s: float

    def delay(self, restarts_so_far: int) -> float:
        return self.backoff_s * (2**restarts_so_far)


class Supervisor:
    """Restarts due and done, per service name, with their counts written to ``counts_file``."""

    def __init__(self, counts_file: Path):
        self.counts_file = counts_file
        self.restarts: Counter[str] = Counter()
        self.kinds: dict[str, str] = {}  # service name -> "env" or "api", for the counts file
        self._due: dict[str, float] = {}  # service name -> monotonic time of its restart

    def on_death(self, name: str, kind: str, policy: RestartPolicy, code: int) -> str | None:
        """Schedule a restart of ``name``; returns why the run must fail instead, if it must."""
        done = self.restarts[name]
        if done >= policy.restarts:
            return (
                f"{name} kept dying: exited with {code} after {done} restart(s) "
                f"(services.{kind}_restarts={policy.restarts})"
            )
        delay = policy.delay(done)
        self._due[name] = time.monotonic() + delay
        self.kinds[name] = kind
        print(
            f"[launcher] {name} exited with {code}; restart {done + 1} of {policy.restarts} in {delay:.1f} s",
            flush=True,
        )
        return None

    def pending(self, name: str) -> bool:
        return name in self._due

    def due_now(self) -> list[str]:
        """The services whose restart is due; each is counted as restarted."""
        now = time.monotonic()
        names = [name for name, when in self._due.items() if when <= now]
        for name in names:
            del self._due[name]
            self.restarts[name] += 1
        if names:
            self._write()
        return names

    def total(self, kind: str) -> int:
        return sum(count for name, count in self.restarts.items() if self.kinds.get(name) == kind)

    def summary(self) -> str:
        return ", ".join(f"{name} x{count}" for name, count in sorted(self.restarts.items()))

    def _write(self) -> None:
        counts = {
            "env_restarts": self.total("env"),
            "api_restarts": self.total("api"),
            "by_service": dict(sorted(self.restarts.items())),
        }
        self.counts_file.write_text(json.dumps(counts, indent=1) + "\n")
