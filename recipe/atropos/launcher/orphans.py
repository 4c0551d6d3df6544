"""A watchdog that stops a run's services once its launcher is gone, however it went.

Signals the launcher can catch (SIGINT, SIGTERM, SIGHUP) and its exceptions end in its own
teardown; a SIGKILL, or a crash of the interpreter, does not. For those the launcher starts
this watchdog, in a session of its own (a closed terminal does not reach it), and appends the
session id of every service it starts to a file. The watchdog polls the launcher's pid (its
start time guards against a reused pid); once the launcher is gone it sends SIGTERM to every
process of those sessions (the trainer's Ray daemons included: they stay in its session),
waits ``--grace-s``, kills what is left, and exits.

    python -m recipe.atropos.launcher.orphans --launcher PID --sessions FILE
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def session_processes(sessions: set[int]) -> list[psutil.Process]:
    """Every live process whose session is one of ``sessions``."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) in sessions and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def stop_sessions(sessions: set[int], grace_s: float) -> int:
    """SIGTERM every process of ``sessions``, SIGKILL what is left after ``grace_s``; how many there were."""
    left = session_processes(sessions)
    for process in left:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for process in alive + session_processes(sessions):
        try:
            process.kill()
        except psutil.Error:
            pass
    return len(left)


def read_sessions(path: Path) -> set[int]:
    try:
        return {int(line) for line in path.read_text().split() if line.strip().isdigit()}
    except FileNotFoundError:
        return set()


def watch(launcher_pid: int, sessions_file: Path, poll_s: float = 0.5, grace_s: float = 5.0) -> int:
    try:
        launcher = psutil.Process(launcher_pid)
        while launcher.is_running() and launcher.status() != psutil.STATUS_ZOMBIE:
            time.sleep(poll_s)
    except psutil.NoSuchProcess:
        pass
    sessions = read_sessions(sessions_file)
    stopped = stop_sessions(sessions, grace_s)
    if stopped:
        print(f"[watchdog] launcher {launcher_pid} is gone: stopped {stopped} process(es) of its services", flush=True)
    return 0


class Watchdog:
    """The launcher's side: start the watchdog, record each service's session, stop it at a clean end."""

    def __init__(self, run_dir: Path):
        self.sessions_file = run_dir / "sessions"
        self.log_path = run_dir / "watchdog.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.sessions_file.write_text("")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "recipe.atropos.launcher.orphans",
                    "--launcher", str(os.getpid()), "--sessions", str(self.sessions_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def record(self, session_id: int) -> None:
        with open(self.sessions_file, "a") as sessions:
            sessions.write(f"{session_id}\n")

    def stop(self) -> None:
        """After the launcher's own teardown: nothing is left to watch."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launcher", type=int, required=True, help="pid of the launcher to watch")
    parser.add_argument("--sessions", type=Path, required=True, help="file of session ids, one a line")
    parser.add_argument("--grace-s", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    # a closed terminal or a Ctrl-C meant for the launcher is not the watchdog's to act on
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return watch(args.launcher, args.sessions, grace_s=args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
