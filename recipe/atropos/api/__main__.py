"""``python -m recipe.atropos.api``: serve the trajectory API (see the package docstring)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

import uvicorn

from .app import ENV_SILENCE_S, create_app
from .store import BUFFERED, QUEUED, Store

TOKEN_ENV = "ATROPOS_API_TOKEN"
logger = logging.getLogger("recipe.atropos.api")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(token_file: Path | None) -> str | None:
    """The shared token: from ``--token-file`` (first line), else $ATROPOS_API_TOKEN; None if neither."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise SystemExit(f"--token-file {token_file}: the file is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipe.atropos.api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=9001, help="port to bind (default 9001)")
    parser.add_argument(
        "--db",
        type=Path,
        default=Path("atropos_api.sqlite3"),
        help="SQLite file holding the queue, the step and the registrations; reopened as it was after a restart "
        "(default ./atropos_api.sqlite3)",
    )
    parser.add_argument("--fresh", action="store_true", help="forget whatever --db holds and start empty")
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding a shared token every request must present (else ${TOKEN_ENV}; neither: no token)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        help="refuse groups with token ids >= this (the model's vocabulary); /register may also send vocab_size",
    )
    parser.add_argument(
        "--env-silence-s",
        type=float,
        default=ENV_SILENCE_S,
        help="an environment that has not asked /status-env for this long (it died) no longer holds batches "
        f"back with its min_batch_allocation (default {ENV_SILENCE_S:g})",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = read_token(args.token_file)
    if not is_loopback(args.host) and token is None:
        logger.warning(
            "binding %s without a token: anyone who can reach this port can read and write the queue; "
            "set %s or --token-file",
            args.host,
            TOKEN_ENV,
        )
    store = Store(args.db)
    if args.fresh:
        with store.transaction():
            store.clear()
    queued, buffered = store.count(QUEUED), store.count(BUFFERED)
    if store.get("registration") is not None or queued or buffered:
        logger.info(
            "resuming from %s: step %d, %d groups queued, %d buffered, %d environments",
            args.db,
            store.get("step", 0),
            queued,
            buffered,
            len(store.envs()),
        )
    app = create_app(store, token=token, vocab_size=args.vocab_size, env_silence_s=args.env_silence_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
