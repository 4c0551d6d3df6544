"""Runs one Atropos environment, unmodified, the way the launcher wires it; reports what it did.

    python env_runner.py --script ENV.py [--status-file F] serve --env.* ... --openai.* ...
    python env_runner.py --module PACKAGE.MODULE [--status-file F] serve ...

The launcher starts every environment through this file, with the interpreter of
``services.envs[].python``. It is run by path and imports nothing but the standard library
and atroposlib, so it works in any interpreter that can run the environment itself.

It does two things around the environment's own ``Env.cli()``:

* **One form of server config.** atroposlib applies ``--openai.*`` only when ``config_init()``
  returns a list of one ``APIServerConfig``: a bare ``APIServerConfig`` or ``ServerBaseline`` is
  silently replaced by servers on localhost:9004-9007, and a list of two or more refuses CLI
  overrides. The runner hands atroposlib a list of one, built from what ``config_init`` gave
  (the first entry of a longer list: the run has one gateway, which balances over the
  replicas); anything else stops the environment at start-up naming the value.
* **A status file** (``--status-file``), rewritten at most once a second: the ``env_id`` the
  trajectory API gave it, the groups it posted, and the errors atroposlib logged (which it
  otherwise swallows: a group that cannot be serialised, a refused request), with the last one.
  The launcher reads it to say what an environment that trains nothing is doing.
"""

from __future__ import annotations

import json
import logging
import os
import runpy
import sys
import threading
import time

STATUS_INTERVAL_S = 1.0


class StatusFile:
    """What the environment did so far, as JSON in one file (written whole, then renamed into place)."""

    def __init__(self, path: str | None):
        self.path = path
        self.state = {
            "env_id": None, "groups_posted": 0, "errors_logged": 0, "last_error": None,
            "warnings_logged": 0, "last_warning": None, "pid": os.getpid(),
        }
        self._lock = threading.Lock()
        self._written_at = 0.0

    def update(self, force: bool = False, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                self.state[key] = value
            self._write(force)

    def add(self, key: str, amount: int = 1, **changes) -> None:
        with self._lock:
            self.state[key] += amount
            self.state.update(changes)
            self._write(force=False)

    def _write(self, force: bool) -> None:
        now = time.monotonic()
        if self.path is None or (not force and now - self._written_at < STATUS_INTERVAL_S):
            return
        self._written_at = now
        self.state["updated_at"] = time.time()
        partial = f"{self.path}.tmp"
        with open(partial, "w") as handle:
            json.dump(self.state, handle)
        os.replace(partial, self.path)

    def flush(self) -> None:
        with self._lock:
            self._write(force=True)


class ErrorCounter(logging.Handler):
    """Counts WARNING and ERROR records from any logger.

    atroposlib logs and swallows the errors of its loop, and drops groups with only a warning
    ("Scores are the same in a group, skipping...").
    """

    def __init__(self, status: StatusFile):
        super().__init__(level=logging.WARNING)
        self.status = status

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format is still counted
            message = str(record.msg)
        cause = root_cause(record)
        if cause:
            message = f"{message} (cause: {cause})"
        if record.levelno >= logging.ERROR:
            self.status.add("errors_logged", last_error=message[:500])
        else:
            self.status.add("warnings_logged", last_warning=message[:500])


def root_cause(record: logging.LogRecord) -> str | None:
    """What an exception logged as a mere argument hides: atroposlib logs a failed send as
    ``RetryError[<Future ... raised TypeError>]``, the TypeError's message (say, ``Object of type
    BatchEncoding is not JSON serializable``) inside tenacity's last attempt."""
    for arg in record.args if isinstance(record.args, tuple) else ():
        if not isinstance(arg, BaseException):
            continue
        error = arg
        for _ in range(10):  # tenacity's last attempt, then explicit causes (``raise ... from``)
            attempt = getattr(error, "last_attempt", None)
            inner = attempt.exception() if attempt is not None and hasattr(attempt, "exception") else None
            inner = inner or error.__cause__
            if not isinstance(inner, BaseException):
                break
            error = inner
        if error is not arg:
            return f"{type(error).__name__}: {error}"
    return None


def as_server_list(servers, where: str):
    """``config_init``'s server configs as the list of one ``APIServerConfig`` atroposlib wires ``--openai.*`` into."""
    from atroposlib.envs.base import APIServerConfig, ServerBaseline

    if isinstance(servers, list):
        if not servers:
            return [APIServerConfig()]
        first = servers[0]
        if not isinstance(first, ServerBaseline):
            raise SystemExit(
                f"{where}: config_init() returned a list whose first server config is a {type(first).__name__}; "
                "expected APIServerConfig"
            )
        if len(servers) > 1:
            logging.getLogger(__name__).warning(
                "%s: config_init() names %d servers; the run's gateway is the one server (it balances over the "
                "replicas), configured from the first", where, len(servers),
            )
        servers = first
    if isinstance(servers, APIServerConfig):
        return [servers]
    if isinstance(servers, ServerBaseline):
        return [APIServerConfig(**servers.model_dump())]
    raise SystemExit(
        f"{where}: config_init() returned server configs of type {type(servers).__name__}; expected an "
        "APIServerConfig, a ServerBaseline or a list of APIServerConfig"
    )


def install_hooks(where: str, status: StatusFile) -> None:
    """Patch atroposlib's ``BaseEnv`` (in this process only) so the environment's own ``cli()`` is wired and watched."""
    from atroposlib.envs.base import BaseEnv

    original_cli = BaseEnv.cli.__func__

    def cli(cls):
        own_config_init = cls.config_init

        def config_init(klass):
            env_config, servers = own_config_init()
            return env_config, as_server_list(servers, f"{where} ({klass.__name__})")

        cls.config_init = classmethod(config_init)
        return original_cli(cls)

    BaseEnv.cli = classmethod(cli)

    original_register = BaseEnv.register_env

    async def register_env(self):
        await original_register(self)
        status.update(force=True, env_id=self.env_id)

    BaseEnv.register_env = register_env

    original_send = BaseEnv._send_scored_data_to_api

    async def send_scored_data(self, scored_data):
        await original_send(self, scored_data)
        status.add("groups_posted", len(scored_data) if isinstance(scored_data, list) else 1)

    BaseEnv._send_scored_data_to_api = send_scored_data


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """The runner's own options (before the first argument that is not one of them), and the env's arguments."""
    options = {"script": None, "module": None, "status_file": None}
    names = {"--script": "script", "--module": "module", "--status-file": "status_file"}
    rest = list(argv)
    while rest and rest[0] in names:
        if len(rest) < 2:
            raise SystemExit(f"{rest[0]} needs a value")
        options[names[rest[0]]] = rest[1]
        rest = rest[2:]
    if bool(options["script"]) == bool(options["module"]):
        raise SystemExit("env_runner: give exactly one of --script PATH or --module NAME, then the env's arguments")
    return options, rest


def main(argv: list[str] | None = None) -> None:
    options, env_args = parse_args(sys.argv[1:] if argv is None else argv)
    # this file's folder is not the environment's: leave it off the import path
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    status = StatusFile(options["status_file"])
    status.flush()
    logging.getLogger().addHandler(ErrorCounter(status))
    where = options["script"] or options["module"]
    install_hooks(where, status)
    try:
        if options["script"]:
            script = os.path.abspath(options["script"])
            sys.path.insert(0, os.path.dirname(script))
            sys.argv = [script, *env_args]
            runpy.run_path(script, run_name="__main__")
        else:
            sys.path.insert(0, os.getcwd())  # as ``python -m`` does
            sys.argv = [options["module"], *env_args]
            runpy.run_module(options["module"], run_name="__main__", alter_sys=True)
    finally:
        status.flush()


if __name__ == "__main__":
    main()
