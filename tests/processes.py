"""The one way tests start and stop a subprocess: the launcher's own :class:`Service`.

Each process runs in a session of its own with its own log file; it is ready when
its health check answers, and stopping it stops its whole session (every process it
started, however deep) and nothing else.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from recipe.atropos.launcher.service_process import Service, answers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(ready: Callable[[], bool], what: str, timeout: float, watch: Iterable[Service] = ()) -> None:
    """Poll ``ready`` (a connection error counts as not yet); fail naming any watched service that died."""
    deadline = time.monotonic() + timeout
    while not answers(ready):
        for service in watch:
            code = service.exit_code()
            if code is not None:
                raise AssertionError(f"{service.name} exited with {code} before {what}:\n{service.last_lines(60)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready within {timeout} s")
        time.sleep(0.2)


def start_service(
    name: str,
    command: list[str],
    log_dir: Path,
    ready: Callable[[], bool] | None = None,
    timeout: float = 60,
    stop_signal: int = signal.SIGTERM,
    env: dict[str, str] | None = None,
) -> Service:
    """Start ``command`` as service ``name`` (log: ``log_dir/name.log``) and wait for ``ready``, if given."""
    service = Service(name, command, Path(log_dir) / f"{name}.log", ready=ready, stop_signal=stop_signal)
    service.start(env)
    if ready is not None:
        try:
            wait_until(service.is_ready, name, timeout, watch=[service])
        except BaseException:
            service.stop(5)
            raise
    return service
