"""The launcher end to end on a CPU: every service from one YAML, training, and clean teardown.

    python recipe/atropos/tests/test_integration.py      # or: python -m pytest recipe/atropos/tests

Runs ``launch_atropos_verl_services.py`` with ``atropos_grpo_cpu.yaml`` on a tiny local
model and offline GSM8K-format data: the trajectory API, the trainer (verl workers,
CPU replicas, gateway) and two environments (GSM8K, and GSM8K with token-level
credit, weights 1:1). Then faults: an environment and the API killed mid-run (both
restarted, nothing accepted lost, nothing listening beyond loopback), an environment that
keeps dying, Ctrl-C, SIGHUP, SIGTERM and SIGKILL of the launcher (nothing of the run left).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest

REPO = Path(__file__).resolve().parents[3]
LAUNCHER = REPO / "recipe" / "atropos" / "launch_atropos_verl_services.py"
CONFIG = REPO / "recipe" / "atropos" / "config" / "atropos_grpo_cpu.yaml"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recipe.atropos.launcher.metrics_file import read_step_metrics  # noqa: E402
from tests.processes import free_port, start_service, wait_until  # noqa: E402

pytestmark = pytest.mark.slow


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
        self.api_url = f"http://127.0.0.1:{free_port()}"
        self.service = start_service(
            f"launcher-{run_dir.name}",
            [
                sys.executable, str(LAUNCHER), "--config", str(CONFIG), "--run-dir", str(run_dir),
                f"actor_rollout_ref.model.path={assets['model']}",
                f"data.train_files={assets['train']}",
                f"trainer.atropos.api_url={self.api_url}",
                # any free port: the trainer reports the one it bound, the launcher wires the environments to it
                "trainer.atropos.gateway_port=0",
                "services.status_interval_s=5",
                *overrides,
            ],
            run_dir.parent,
        )
        self.process = self.service.process
        self.started: dict[int, float] = {}  # pid -> create time, of every descendant seen

    @property
    def lines(self) -> list[str]:
        return self.service.log_path.read_text(errors="replace").splitlines()

    def gateway_url(self) -> str:
        return (self.run_dir / "gateway_url").read_text().strip()

    def steps(self) -> dict[int, dict[str, float]]:
        """The trainer's metrics so far, from the run's metrics file."""
        path = self.run_dir / "metrics.jsonl"
        return read_step_metrics(path) if path.is_file() else {}

    def wait_steps(self, count: int, timeout: float) -> None:
        """Wait until the trainer has logged ``count`` steps, recording the launcher's processes meanwhile."""

        def done() -> bool:
            self._record_descendants()
            return len(self.steps()) >= count

        try:
            wait_until(done, f"{count} training step(s)", timeout, watch=[self.service])
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nconsole:\n" + "\n".join(self.lines[-60:])) from None

    def wait_console(self, text: str, timeout: float) -> None:
        """Wait until the launcher has printed ``text``, recording its processes meanwhile."""

        def printed() -> bool:
            self._record_descendants()
            return text in self.console

        try:
            wait_until(printed, repr(text), timeout, watch=[self.service])
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nconsole:\n" + "\n".join(self.lines[-60:])) from None

    def process_running(self, *argv: str) -> psutil.Process:
        """The live process of the run whose command line holds ``argv`` in that order."""
        self._record_descendants()
        for pid in self.started:
            try:
                cmdline = psutil.Process(pid).cmdline()
            except psutil.Error:
                continue
            if any(cmdline[i:i + len(argv)] == list(argv) for i in range(len(cmdline))):
                return psutil.Process(pid)
        raise AssertionError(f"no process of the run runs {' '.join(argv)}")

    def listening_beyond_loopback(self) -> list[str]:
        """What the run's processes listen on other than 127.0.0.1 (as ``ss -ltn`` would show it)."""
        self._record_descendants()
        found = []
        for pid in self.started:
            try:
                process = psutil.Process(pid)
                for conn in process.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr.ip not in ("127.0.0.1", "::1"):
                        # the whole command line: Ray's paths sit deep under site-packages, and a cut
                        # one no longer shows whose process it is
                        command = " ".join(process.cmdline())
                        found.append(f"{conn.laddr.ip}:{conn.laddr.port} {process.name()}: {command}")
            except psutil.Error:
                continue
        return found

    def _record_descendants(self) -> None:
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                try:
                    self.started.setdefault(child.pid, child.create_time())
                except psutil.Error:
                    pass
        except psutil.Error:
            pass

    def finish(self, timeout: float = 300) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            self._record_descendants()
            time.sleep(0.2)
        return self.process.wait(timeout=max(1.0, deadline - time.monotonic()))

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
        self.service.stop(5)


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
    assert run.finish(timeout=480) == 0, run.console
    assert "training finished; every service was stopped" in run.console
    for name in ("api", "trainer", "gsm8k_0", "gsm8k_answer_credit_0"):
        assert (run.run_dir / f"{name}.log").is_file()
    # the gateway took a free port, and the environments were started on it
    gateway = (run.run_dir / "gateway_url").read_text().strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", gateway) and not gateway.endswith(":0")
    assert f"--openai.base_url {gateway}/v1" in run.console
    # the launcher's step line for each step the trainer logged
    assert len([line for line in run.lines if line.startswith("[trainer] step ")]) == 3

    steps = run.steps()
    assert sorted(steps) == [1, 2, 3]
    # the first batch cannot be stale: nothing older than the initial weights exists
    assert steps[1]["atropos/groups_rejected"] == 0
    for step, metrics in steps.items():
        envs = {name for name in metrics if name.startswith("atropos/env/") and name.endswith("/score_mean")}
        assert "atropos/score_mean" in metrics, step
        if metrics["atropos/groups_rejected"] > 0:
            # groups over the staleness bound were left out; what trained still has its env's score
            assert envs, metrics
            continue
        # both environments (min_batch_allocation 0.5 each) in the batch, with their mean scores
        assert len(envs) == 2, metrics
        # the credit environment's token-level advantages were trained on: half the sequences
        assert metrics["atropos/override_fraction"] == 0.5, metrics

    # where every group went: arrived = trained + rejected + refused + queued + fetched ahead, up to
    # one batch in transit, and exactly at the end (nothing is fetched for a step that never comes)
    def unaccounted(metrics: dict) -> float:
        a = "atropos/accounting/"
        return metrics[a + "arrived_groups"] - sum(
            metrics[a + name] for name in
            ("trained_groups", "rejected_groups", "refused_groups", "queued_groups", "fetched_ahead_groups")
        )

    for step, metrics in steps.items():
        assert 0 <= unaccounted(metrics) <= 2, (step, metrics)
    assert unaccounted(steps[3]) == 0 and steps[3]["atropos/accounting/fetched_ahead_groups"] == 0, steps[3]
    # generation paced to one batch a step (the window is not split into fixed shares by
    # environment, so a group one environment generated beyond its half of a batch may still wait
    # and go stale)
    assert steps[3]["atropos/generation/window_sequences"] == 8
    assert run.alive() == []


RAY_GRPC_SERVER = re.compile(r"^(:::\d+ (gcs_server|raylet|python[\d.]*)|\S+ ray::\S+): ")


def is_rays_own(entry: str) -> bool:
    """A listener of Ray's own: its gRPC servers, or a process running Ray's code (workers, dashboard agent)."""
    return bool(RAY_GRPC_SERVER.search(entry)) or "/ray/" in entry or " ray::" in entry


def test_a_killed_environment_and_api_are_restarted_and_nothing_accepted_is_lost(launch):
    run = launch("trainer.total_training_steps=4", "services.env_restart_backoff_s=0.5")
    run.wait_steps(1, timeout=900)
    # Ray 2.60's gRPC servers (GCS, raylet, and one in every Ray worker and driver) bind the IPv6
    # wildcard whatever the node address, and its dashboard agent still one port on 0.0.0.0; no
    # setting changes it. Nothing else listens beyond loopback: the run's own servers are on
    # 127.0.0.1 only.
    beyond = run.listening_beyond_loopback()
    assert [entry for entry in beyond if not is_rays_own(entry)] == [], beyond
    own_ports = {urlparse(run.gateway_url()).port, urlparse(run.api_url).port}
    assert [entry for entry in beyond if int(entry.split(" ")[0].rsplit(":", 1)[1]) in own_ports] == [], beyond

    # the API first: on its restart every environment gets a fresh env_silence_s
    run.process_running("-m", "recipe.atropos.api").kill()
    run.wait_console("restarting api", timeout=60)
    # environments run under the launcher's env runner: ``env_runner.py --module MODULE``
    run.process_running("--module", "recipe.atropos.envs.gsm8k").kill()
    run.wait_console("restarting gsm8k_0", timeout=60)
    assert run.finish(timeout=600) == 0, run.console
    assert "training finished; every service was stopped" in run.console
    steps = run.steps()
    assert sorted(steps) == [1, 2, 3, 4]
    restarts = json.loads((run.run_dir / "restarts.json").read_text())
    assert restarts["api_restarts"] == 1 and restarts["by_service"]["gsm8k_0"] >= 1, restarts

    # posted and accepted = served + still queued, from the API's own file; served = trained + rejected
    # by the trainer, but for at most one batch fetched ahead of a step that never came
    from recipe.atropos.api.store import BUFFERED, QUEUED, Store

    store = Store(run.run_dir / "api.sqlite3")
    counters, queued, buffered = store.counters(), store.count(QUEUED), store.count(BUFFERED)
    store.close()
    accepted = sum(c.get("accepted", 0) for c in counters.values())
    served = sum(c.get("served", 0) for c in counters.values())
    assert accepted == served + queued + buffered, counters
    taken = sum(m["atropos/groups"] + m["atropos/groups_rejected"] for m in steps.values())
    assert 0 <= served - taken <= 4, (served, taken)  # train_batch_size groups fetched ahead, at most
    assert run.alive() == []


def test_an_environment_that_keeps_dying_is_named_and_everything_stops(launch):
    run = launch("trainer.total_training_steps=200", "services.env_restarts=0")
    run.wait_steps(1, timeout=420)
    credit_env = "recipe.atropos.envs.gsm8k_answer_credit"
    victim = next(
        psutil.Process(pid) for pid in run.started
        if psutil.pid_exists(pid) and credit_env in " ".join(psutil.Process(pid).cmdline())
    )
    victim.kill()
    assert run.finish() == 1, run.console
    assert re.search(
        r"FAILED: gsm8k_answer_credit_0 kept dying: exited with -9 after 0 restart\(s\) \(services.env_restarts=0\)",
        run.console,
    ), run.console
    assert run.alive() == []


def test_ctrl_c_stops_everything_cleanly(launch):
    run = launch("trainer.total_training_steps=200")
    run.wait_steps(1, timeout=420)
    run.process.send_signal(signal.SIGINT)
    assert run.finish(timeout=120) == 0, run.console
    assert "stopped on SIGINT; every service was stopped" in run.console
    assert run.alive() == []


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_a_launcher_ended_by_a_signal_leaves_nothing_behind(launch, signum):
    """A closed terminal, a kill, a kill -9: within 30 s no process of the run is left, Ray's included."""
    run = launch("trainer.total_training_steps=200")
    run.wait_console("environment(s) registered with the API ready", timeout=900)
    run.process.send_signal(signum)
    run.process.wait(timeout=120)
    deadline = time.monotonic() + 30
    while run.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.alive() == [], run.console
    if signum != signal.SIGKILL:
        assert f"stopped on {signum.name}; every service was stopped" in run.console


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
