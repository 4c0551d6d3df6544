"""Processes the launcher starts, checks and stops: one service = one session of processes.

Each service runs in a new session (``start_new_session``), so the launcher can
find every process it started, however deep (Ray puts its workers in process
groups of their own, but they stay in the session), and stop exactly those.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil


def answers(check: Callable[[], bool]) -> bool:
    """Run a health check; a connection error or an unreadable answer means not (yet) ready."""
    try:
        return bool(check())
    except (httpx.HTTPError, ValueError, KeyError, OSError):
        return False


@dataclass
class Service:
    """A named command with its own log file and health check."""

    name: str
    command: list[str]
    log_path: Path
    # True once the service answers a real request (checked while starting)
    ready: Callable[[], bool] | None = None
    stop_signal: int = signal.SIGTERM
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        log.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def is_ready(self) -> bool:
        return self.ready is None or answers(self.ready)

    def last_lines(self, count: int = 20) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-count:])

    def session_processes(self) -> list[psutil.Process]:
        """Every live process of this service's session: the ones it started, however deep."""
        if self.process is None:
            return []
        found = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == self.process.pid:
                    found.append(process)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def stop(self, grace_s: float = 20.0) -> None:
        """Ask the service to stop, wait ``grace_s``, then kill whatever of its session is left."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, self.stop_signal)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + grace_s
        while self.session_processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self.session_processes()
        for process in left:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=5)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
