"""Faults a run meets, on real processes on loopback: an API restarted without its state, an environment
that died while holding a batch share, the launcher killed outright, and restart budgets.

The launcher end to end under the same faults (an environment and the API killed mid-run, SIGHUP,
SIGTERM and SIGKILL of the launcher, what listens beyond loopback) is in
``recipe/atropos/tests/test_integration.py``; a NaN group refused at the door while the good
groups of the same batch train is ``tests/test_api_server.py`` and ``tests/test_trainer_cpu.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from recipe.atropos.launcher.launch import Launcher, api_in_use
from recipe.atropos.launcher.service_process import Service
from recipe.atropos.launcher.supervision import RestartPolicy, Supervisor
from recipe.atropos.trainer.trajectory_client import AtroposClient, AtroposConnectionError, Registration
from tests.test_api_server import APIProcess, register, scored_group, served_tags


def test_a_silent_environment_no_longer_holds_batches_back(tmp_path):
    """An environment that died keeps its min_batch_allocation only until it has been silent env_silence_s."""
    api = APIProcess(tmp_path, extra_args=["--env-silence-s", "2"]).start()
    try:
        register(api, batch_size=8)
        api.get("/batch")
        env_ids = []
        for name in ("alive", "dead"):
            body = {"max_token_length": 64, "desired_name": name, "weight": 1.0, "group_size": 4,
                    "min_batch_allocation": 0.5}
            env_ids.append(api.post("/register-env", body).json()["env_id"])
        alive, _dead = env_ids
        for tag in (1.0, 2.0):
            api.post("/scored_data", scored_group(tag, env_id=alive)).raise_for_status()
        # the dead environment's half of the batch is still awaited
        assert api.get("/batch")["batch"] is None
        deadline = time.monotonic() + 20
        batch = None
        while batch is None and time.monotonic() < deadline:
            # the living environment keeps asking for its status, as atroposlib's do
            httpx.request("GET", f"{api.url}/status-env", json={"env_id": alive}, timeout=5).raise_for_status()
            batch = api.get("/batch")["batch"]
            time.sleep(0.3)
        assert batch is not None, "the silent environment still holds batches back"
        assert sorted(served_tags(batch)) == [1.0, 2.0]
    finally:
        api.stop()


def test_the_client_waits_out_an_api_restart_and_registers_again_where_it_is(tmp_path):
    api = APIProcess(tmp_path).start()
    client = AtroposClient(api.url, timeout=60, max_retries=1, backoff_initial_s=0.05, backoff_max_s=0.5, outage_s=60)
    try:
        client.register(Registration(batch_size=4, max_token_len=64, num_steps=10))
        client.step = 3  # three steps trained
        api.kill()
        fetched = {}
        waiter = threading.Thread(target=lambda: fetched.update(batch=client.fetch_batch()))
        waiter.start()
        time.sleep(2)  # more than max_retries' backoff: only outage_s keeps the client waiting
        # the API comes back without its state (a new database): it no longer knows the trainer
        api.start(api.command() + ["--fresh"])
        deadline = time.monotonic() + 30
        while api.get("/info")["batch_size"] != 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api.get("/info")["batch_size"] == 4, "the trainer did not register again"
        api.post("/scored_data", scored_group(7.0)).raise_for_status()
        waiter.join(timeout=60)
        assert served_tags(fetched["batch"].groups) == [7.0]
        assert client.reregistrations == 1
        # registered again at its own step: the API serves step 4 next
        assert api.get("/status")["current_step"] == 4
    finally:
        client.close()
        api.stop()


def test_without_outage_s_an_unreachable_api_fails_fast_naming_it(tmp_path):
    api = APIProcess(tmp_path).start()
    api.kill()
    client = AtroposClient(api.url, max_retries=2, backoff_initial_s=0.05)
    started = time.monotonic()
    with pytest.raises(AtroposConnectionError, match=f"{api.url}/status failed after 3 attempts"):
        client.status()
    assert time.monotonic() - started < 10
    client.close()


def test_the_readiness_probe_for_run_api_causes_no_server_error(tmp_path):
    api = APIProcess(tmp_path, server="run-api").start()
    try:
        assert api_in_use(api.url) is False  # nothing registered yet: answered, not a 500
        register(api, batch_size=8)
        assert api_in_use(api.url) is False
        api.post("/scored_data", scored_group(1.0)).raise_for_status()
        assert api_in_use(api.url) is True
        log = api.log()
        assert " 500 " not in log and "Traceback" not in log, log
    finally:
        api.stop()


def test_restarts_back_off_and_the_run_fails_naming_a_service_that_keeps_dying(tmp_path, capsys):
    supervisor = Supervisor(tmp_path / "restarts.json")
    policy = RestartPolicy(restarts=2, backoff_s=0.2)
    assert [policy.delay(n) for n in range(3)] == [0.2, 0.4, 0.8]
    assert supervisor.on_death("gsm8k_0", "env", policy, -9) is None
    assert supervisor.pending("gsm8k_0") and supervisor.due_now() == []
    time.sleep(0.25)
    assert supervisor.due_now() == ["gsm8k_0"]
    assert supervisor.on_death("gsm8k_0", "env", policy, 1) is None
    time.sleep(0.45)
    assert supervisor.due_now() == ["gsm8k_0"]
    failure = supervisor.on_death("gsm8k_0", "env", policy, 1)
    assert failure == "gsm8k_0 kept dying: exited with 1 after 2 restart(s) (services.env_restarts=2)"
    assert json.loads((tmp_path / "restarts.json").read_text()) == {
        "env_restarts": 2, "api_restarts": 0, "by_service": {"gsm8k_0": 2},
    }
    assert "gsm8k_0 exited with -9; restart 1 of 2 in 0.2 s" in capsys.readouterr().out


# A launcher in miniature: the real watchdog and a service in a session of its own, with a child.
FAKE_LAUNCHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from recipe.atropos.launcher.orphans import Watchdog
    from recipe.atropos.launcher.service_process import Service

    run_dir = Path(sys.argv[1])
    watchdog = Watchdog(run_dir)
    watchdog.start()
    service = Service("svc", ["bash", "-c", "sleep 300 & sleep 300"], run_dir / "svc.log")
    service.start()
    watchdog.record(service.pid)
    (run_dir / "svc.pid").write_text(str(service.pid))
    time.sleep(300)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP])
def test_a_launcher_gone_leaves_no_service_behind(tmp_path, signum):
    launcher = subprocess.Popen([sys.executable, "-c", FAKE_LAUNCHER, str(tmp_path)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "svc.pid").is_file():
            assert launcher.poll() is None and time.monotonic() < deadline, "the launcher did not start its service"
            time.sleep(0.1)
        session = int((tmp_path / "svc.pid").read_text())
        time.sleep(0.5)
        members = [p for p in psutil.process_iter() if _sid(p.pid) == session]
        assert len(members) >= 2  # bash and its sleeps
        launcher.send_signal(signum)
        launcher.wait(timeout=10)
        gone, alive = psutil.wait_procs(members, timeout=30)
        assert alive == [], f"left after the launcher's {signal.Signals(signum).name}: {alive}"
        deadline = time.monotonic() + 10
        while "is gone: stopped" not in (tmp_path / "watchdog.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"launcher {launcher.pid} is gone: stopped" in (tmp_path / "watchdog.log").read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


# -- the launcher's supervision, on real processes that die ------------------------------------------

CPU_CONFIG = Path(__file__).resolve().parents[1] / "recipe" / "atropos" / "config" / "atropos_grpo_cpu.yaml"


def supervised(tmp_path: Path, *overrides: str) -> Launcher:
    """A launcher of the CPU config whose services are replaced by processes that die on their own."""
    launcher = Launcher(CPU_CONFIG, ["trainer.atropos.api_url=http://127.0.0.1:9", *overrides], tmp_path)
    dies = [sys.executable, "-c", "import sys; print('dying'); sys.exit(3)"]
    launcher.services = [Service(name, dies, tmp_path / f"{name}.log") for name in ("api", "gsm8k_0")]
    for service in launcher.services:
        service.start()
        service.process.wait(timeout=60)
    return launcher


def until_supervised(launcher: Launcher, done, timeout: float = 60) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        failure = launcher._supervise()
        if failure or done():
            return failure
        time.sleep(0.1)
    raise AssertionError("nothing happened within the wait")


def test_the_launcher_restarts_a_dead_api_and_environment_then_names_one_that_keeps_dying(tmp_path, capsys):
    launcher = supervised(tmp_path, "services.env_restart_backoff_s=0.1", "services.env_restarts=1",
                          "services.api_restarts=1")
    first = {service.name: service.pid for service in launcher.services}
    assert until_supervised(launcher, lambda: launcher.supervisor.restarts["gsm8k_0"] == 1
                            and launcher.supervisor.restarts["api"] == 1) is None
    # both started again: new processes
    assert all(service.pid != first[service.name] for service in launcher.services)
    for service in launcher.services:
        service.process.wait(timeout=60)
    failure = until_supervised(launcher, lambda: False)
    assert failure.startswith("api kept dying: exited with 3 after 1 restart(s) (services.api_restarts=1)")
    assert "dying" in failure  # with its last log lines
    assert json.loads((tmp_path / "restarts.json").read_text())["by_service"] == {"api": 1, "gsm8k_0": 1}
    assert "[launcher] restarting gsm8k_0 (restart 1)" in capsys.readouterr().out


def test_with_run_api_a_dead_api_stops_the_run_saying_its_queue_is_lost(tmp_path):
    launcher = supervised(tmp_path, "services.api=run-api")
    failure = launcher._supervise()
    assert failure.startswith("api (run-api) exited with 3: run-api keeps its queue in memory, so every group")
    assert launcher.supervisor.restarts == {}
