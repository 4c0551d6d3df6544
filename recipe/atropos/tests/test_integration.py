"""The launcher end to end on a CPU: every service from one YAML, training, and clean teardown.

    python recipe/atropos/tests/test_integration.py      # or: python -m pytest recipe/atropos/tests

Runs ``launch_atropos_verl_services.py`` with ``atropos_grpo_cpu.yaml`` on a tiny local
model and offline GSM8K-format data: the trajectory API, the trainer (verl workers,
CPU replicas, gateway) and two environments (GSM8K, and GSM8K with token-level
credit, weights 1:1). Then a killed environment and a Ctrl-C.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[3]
LAUNCHER = REPO / "recipe" / "atropos" / "launch_atropos_verl_services.py"
CONFIG = REPO / "recipe" / "atropos" / "config" / "atropos_grpo_cpu.yaml"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from recipe.atropos.data.prepare_gsm8k import prepare
    from recipe.atropos.models.make_tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("integration")
    model = write_tiny_model(str(root / "tiny-qwen2"))
    prepare("synthetic", str(root / "gsm8k"), train_size=200, test_size=20)
    return {"model": model, "train": str(root / "gsm8k" / "train.parquet")}


class LauncherRun:
    """The launcher as a user runs it, with every process it starts recorded while it runs."""

    def __init__(self, assets, run_dir: Path, *overrides: str):
        self.run_dir = run_dir
        self.process = subprocess.Popen(
            [
                sys.executable, str(LAUNCHER), "--config", str(CONFIG), "--run-dir", str(run_dir),
                f"actor_rollout_ref.model.path={assets['model']}",
                f"data.train_files={assets['train']}",
                f"trainer.atropos.api_url=http://127.0.0.1:{free_port()}",
                f"trainer.atropos.gateway_port={free_port()}",
                "services.status_interval_s=5",
                *overrides,
            ],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        self.lines: list[str] = []
        self.started: dict[int, float] = {}  # pid -> create time, of every descendant seen
        self._read = 0  # lines already matched against
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()

    def _read_console(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def _record_descendants(self) -> None:
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                try:
                    self.started.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def read_until(self, pattern: str, timeout: float) -> str:
        """Wait for a console line matching ``pattern``, recording the launcher's processes meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._record_descendants()
            while self._read < len(self.lines):
                line = self.lines[self._read]
                self._read += 1
                if re.search(pattern, line):
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; console:\n" + "\n".join(self.lines[-60:]))

    def finish(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._record_descendants()
            time.sleep(0.2)
        code = self.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        self._reader.join(timeout=10)
        return code

    @property
    def console(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> list[str]:
        left = []
        for pid, created in self.started.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(process.cmdline())[:120]}")
            except psutil.Error:
                continue
        return left

    def kill_all(self) -> None:
        for pid, created in self.started.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created:
                    process.kill()
            except psutil.Error:
                pass
        if self.process.poll() is None:
            self.process.kill()


@pytest.fixture
def launch(assets, tmp_path):
    runs = []

    def start(*overrides):
        run = LauncherRun(assets, tmp_path / f"run{len(runs)}", *overrides)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill_all()


def test_launcher_trains_three_steps_with_two_environments(launch):
    run = launch("trainer.total_training_steps=3")
    run.read_until(r"\[trainer\] step 3/3", timeout=420)
    assert run.finish() == 0, run.console
    assert "training finished; every service was stopped" in run.console
    for name in ("api", "trainer", "gsm8k_0", "gsm8k_answer_credit_0"):
        assert (run.run_dir / f"{name}.log").is_file()
    steps = [line for line in run.lines if line.startswith("[trainer] step ")]
    assert len(steps) == 3
    # the first batch cannot be stale: nothing older than the initial weights exists
    assert "rejected 0" in steps[0], steps[0]
    for line in steps:
        assert re.search(r"score_mean \d", line), line
        envs = re.findall(r"env \d+ \d", line)
        if int(re.search(r"rejected (\d+)", line).group(1)) > 0:
            # groups over the staleness bound were left out; what trained still has its env's score
            assert envs, line
            continue
        # both environments (min_batch_allocation 0.5 each) in the batch, with their mean scores
        assert len(envs) == 2, line
        # the credit environment's token-level advantages were trained on: half the sequences
        assert float(re.search(r"override_fraction ([\d.]+)", line).group(1)) == 0.5, line
    assert run.alive() == []


def test_an_environment_killed_mid_run_is_named_and_everything_stops(launch):
    run = launch("trainer.total_training_steps=200")
    run.read_until(r"\[trainer\] step 1/", timeout=420)
    victim = next(
        psutil.Process(pid) for pid in run.started
        if psutil.pid_exists(pid) and "recipe.atropos.envs.gsm8k_answer_credit" in " ".join(psutil.Process(pid).cmdline())
    )
    victim.kill()
    assert run.finish() == 1, run.console
    assert re.search(r"FAILED: gsm8k_answer_credit_0 exited with -9", run.console), run.console
    assert run.alive() == []


def test_ctrl_c_stops_everything_cleanly(launch):
    run = launch("trainer.total_training_steps=200")
    run.read_until(r"\[trainer\] step 1/", timeout=420)
    run.process.send_signal(signal.SIGINT)
    assert run.finish(timeout=120) == 0, run.console
    assert "stopped on SIGINT; every service was stopped" in run.console
    assert run.alive() == []


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
