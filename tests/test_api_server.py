"""recipe.atropos.api as a real server on loopback: Atropos's own API tests, oldest-first and
version-aware batches, refusals at the door, a SIGKILL and restart that lose nothing, the
token, the default bind; and the launcher's choice of API."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import psutil
import pytest

from recipe.atropos.api.store import QUEUED, Store
from recipe.atropos.launcher.launch import Launcher
from recipe.atropos.trainer.trajectory_client import AtroposClient, Registration
from tests.conftest import API_SERVERS, free_port

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_TESTS = ("test_api_legacy.py", "test_api_messages_handling.py", "test_api_compression.py")


class APIProcess:
    """``python -m recipe.atropos.api`` (or ``run-api``) in its own process, restartable on the same port and file."""

    def __init__(self, workdir: Path, server: str = "recipe.atropos.api", extra_args=(), env=None):
        self.workdir = workdir
        self.server = server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "api.sqlite3"
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def command(self) -> list[str]:
        return [*API_SERVERS[self.server](self.port, self.db), *self.extra_args]

    def start(self, command: list[str] | None = None, ready_path: str = "/openapi.json") -> APIProcess:
        self.starts += 1
        with open(self.workdir / f"api-{self.starts}.log", "w") as log:
            self.process = subprocess.Popen(
                command or self.command(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.server} exited with {self.process.returncode}: {self.log()}")
            try:
                httpx.get(f"{self.url}{ready_path}", timeout=1)
                return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.server} did not answer on {self.url} within 60 s")
            time.sleep(0.1)

    def log(self) -> str:
        return (self.workdir / f"api-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        # written by Python's json, which puts NaN and Infinity as bare tokens: as environments send them
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", content=json.dumps(body), headers=headers, timeout=10, **kwargs)

    def get(self, path: str, **kwargs) -> dict:
        response = httpx.get(f"{self.url}{path}", timeout=10, **kwargs)
        response.raise_for_status()
        return response.json()


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory):
    process = APIProcess(tmp_path_factory.mktemp("api")).start()
    yield process
    process.stop()


@pytest.fixture
def api(shared_api):
    """The module's server, emptied (``/reset_data``) for each test."""
    httpx.get(f"{shared_api.url}/reset_data", timeout=10).raise_for_status()
    return shared_api


@pytest.fixture
def own_api(tmp_path):
    """A server of the test's own, to kill and restart."""
    process = APIProcess(tmp_path).start()
    yield process
    process.stop()


def register(api: APIProcess, batch_size: int, **extra) -> None:
    body = {
        "wandb_group": "g", "wandb_project": "p", "batch_size": batch_size, "max_token_len": 64,
        "checkpoint_dir": "", "save_checkpoint_interval": -1, "starting_step": 0, "num_steps": 100, **extra,
    }
    api.post("/register", body).raise_for_status()


def scored_group(tag: float, size: int = 4, env_id: int | None = None, **extra) -> dict:
    """A sound group; ``tag`` goes into every score, so a served group can be recognised."""
    tokens = [[1, 5, 6, 7 + i] for i in range(size)]
    masks = [[-100, -100, 6, 7 + i] for i in range(size)]
    return {"tokens": tokens, "masks": masks, "scores": [tag] * size, "env_id": env_id, **extra}


def served_tags(batch: list[dict]) -> list[float]:
    return [group["scores"][0] for group in batch]


# -- the protocol: Atropos's own tests ------------------------------------------------------


@pytest.mark.parametrize("server", ["recipe.atropos.api", "run-api"])
def test_atropos_own_api_tests_pass(server):
    """atroposlib's API tests (as installed with the wheel), with only the launched server swapped."""
    import atroposlib

    tests_dir = Path(atroposlib.__file__).parent / "tests"
    env = {
        **os.environ,
        "ATROPOS_API_UNDER_TEST": server,
        "ATROPOS_API_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.upstream_api_plugin", "-p", "no:cacheprovider", "-q",
         *[str(tests_dir / name) for name in UPSTREAM_TESTS]],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "36 passed" in result.stdout, result.stdout[-2000:]


# -- batch order ------------------------------------------------------------------------------


def three_batches_in_serving_order(api: APIProcess) -> list[float]:
    register(api, batch_size=4)
    for tag in (0.0, 1.0, 2.0):
        api.post("/scored_data", scored_group(tag)).raise_for_status()
    order = [served_tags(api.get("/batch")["batch"])[0] for _ in range(3)]
    assert api.get("/status")["current_step"] == 3
    return order


def test_batches_are_served_oldest_first(api):
    assert three_batches_in_serving_order(api) == [0.0, 1.0, 2.0]


def test_run_api_serves_the_newest_first(tmp_path):
    """What this API changes: run-api forms all three batches at the first fetch and pops the newest."""
    api = APIProcess(tmp_path, "run-api").start()
    try:
        assert three_batches_in_serving_order(api) == [2.0, 1.0, 0.0]
    finally:
        api.stop()


def test_batches_are_formed_from_the_oldest_policy_version_first(api):
    register(api, batch_size=8)
    assert api.get("/batch")["batch"] is None  # nothing queued yet, still step 0
    api.post("/scored_data", scored_group(1.0, policy_version=2)).raise_for_status()
    api.post("/scored_data", scored_group(2.0, policy_version=0)).raise_for_status()
    # no version: ranked by the step it arrived at (0), after the version-0 group that came before it
    api.post("/scored_data", scored_group(3.0)).raise_for_status()
    api.post("/scored_data", scored_group(4.0, policy_version=1)).raise_for_status()
    first = api.get("/batch")["batch"]
    assert served_tags(first) == [2.0, 3.0]
    assert first[0]["policy_version"] == 0 and "policy_version" not in first[1]
    assert served_tags(api.get("/batch")["batch"]) == [4.0, 1.0]


def test_smaller_groups_wait_for_partners_and_min_allocations_hold(api):
    register(api, batch_size=8)
    api.get("/batch")  # the trainer's first fetch lets environments register
    env_ids = []
    for name, share in (("a", 0.5), ("b", 0.5)):
        body = {"max_token_length": 64, "desired_name": name, "weight": 1.0, "group_size": 4,
                "min_batch_allocation": share}
        env_ids.append(api.post("/register-env", body).json()["env_id"])
    a, b = env_ids
    first_half = api.post("/scored_data", scored_group(1.0, size=2, env_id=a)).json()
    assert first_half == {"status": "buffered", "buffer_size": 2}
    assert api.get("/status")["queue_size"] == 0
    # a second half-group completes one group of the registered size: both are queued
    second_half = api.post("/scored_data", scored_group(2.0, size=2, env_id=a)).json()
    assert second_half == {"status": "buffered", "buffer_size": 0}
    api.post("/scored_data", scored_group(3.0, env_id=a)).raise_for_status()
    assert api.get("/status")["queue_size"] == 3
    # env b has nothing queued: its half of the batch cannot be met yet
    assert api.get("/batch")["batch"] is None
    api.post("/scored_data", scored_group(4.0, env_id=b)).raise_for_status()
    assert sorted(served_tags(api.get("/batch")["batch"])) == [1.0, 2.0, 4.0]
    status = httpx.request("GET", f"{api.url}/status-env", json={"env_id": a}).json()
    assert status["self_queue_size"] == 1 and status["unallocated_fraction"] == 0.0


def test_status_env_of_an_unknown_env_is_404_not_500(api):
    response = httpx.request("GET", f"{api.url}/status-env", json={"env_id": 0})
    assert response.status_code == 404 and "no environment registered" in response.json()["message"]


# -- checks at the door -------------------------------------------------------------------------


def test_a_nan_group_is_refused_and_the_good_groups_in_flight_are_served(api):
    register(api, batch_size=8)
    poisoned = scored_group(9.0)
    poisoned["scores"][1] = math.nan
    response = api.post("/scored_data_list", [scored_group(1.0), poisoned, scored_group(2.0)])
    assert response.status_code == 422
    answer = response.json()
    assert answer["accepted"] == 2 and answer["groups_processed"] == 3
    assert answer["refused"] == [
        {"index": 1, "field": "scores[1]", "reason": "nonfinite_score",
         "detail": "not a finite number (NaN, infinity, or beyond float32's range)"}
    ]
    with AtroposClient(api.url, timeout=10) as client:
        batch = client.fetch_batch()
    assert served_tags(batch.groups) == [1.0, 2.0]
    assert api.get("/stats")["envs"]["none"] == {"accepted": 2, "served": 2, "refused/nonfinite_score": 1}
    # every sequence that reached the door, refused or not: what the gateway's generation window settles by
    assert api.get("/stats")["arrived_sequences"] == 12


def with_change(change):
    group = scored_group(1.0, env_id=0)
    change(group)
    return group


@pytest.mark.parametrize(
    "group, field, reason",
    [
        (with_change(lambda g: g["masks"][2].pop()), "masks[2]", "masks_length_mismatch"),
        (with_change(lambda g: g["scores"].pop()), "scores", "scores_count_mismatch"),
        (with_change(lambda g: g["masks"].pop()), "masks", "masks_length_mismatch"),
        (with_change(lambda g: g.update(advantages=[[0.0] * 4] * 3)), "advantages", "advantages_length_mismatch"),
        (with_change(lambda g: g.update(advantages=[[0.0, math.inf, 0.0, 0.0]] * 4)), "advantages[0][1]",
         "nonfinite_advantage"),
        (with_change(lambda g: g.update(inference_logprobs=[[1.0, 1.0, -math.inf, 0.0]] * 4)),
         "inference_logprobs[0][2]", "nonfinite_logprob"),
        (with_change(lambda g: g.update(generation_params={"temperature": math.nan})), "generation_params.temperature",
         "nonfinite_number"),
        (with_change(lambda g: g["tokens"][3].__setitem__(1, 1000)), "tokens[3][1]", "token_out_of_range"),
        (with_change(lambda g: g["tokens"][0].__setitem__(0, -1)), "tokens[0][0]", "token_out_of_range"),
        (with_change(lambda g: g.update(tokens=[], masks=[], scores=[])), "tokens", "empty_group"),
        # finite as JSON, infinite once the trainer casts it to float32
        (with_change(lambda g: g["scores"].__setitem__(1, 1e39)), "scores[1]", "nonfinite_score"),
        # more sequences than the registered batch (4) could never be served
        (with_change(lambda g: g.update(tokens=g["tokens"] * 2, masks=g["masks"] * 2, scores=g["scores"] * 2)),
         "tokens", "group_too_large"),
    ],
)
def test_a_malformed_group_is_refused_with_its_field_and_reason(api, group, field, reason):
    register(api, batch_size=4, vocab_size=512)
    response = api.post("/scored_data", group)
    assert response.status_code == 422, response.text
    assert response.json()["refused"][0]["field"] == field
    assert response.json()["refused"][0]["reason"] == reason
    assert api.get("/stats")["envs"]["0"] == {f"refused/{reason}": 1}
    assert api.get("/status")["queue_size"] == 0


def test_a_body_of_the_wrong_types_is_refused_as_fastapi_does_and_counted(api):
    response = api.post("/scored_data", {"tokens": [["a"]], "masks": [[1]], "scores": [1.0], "env_id": 3})
    assert response.status_code == 422 and "detail" in response.json()
    assert api.get("/stats")["envs"]["3"] == {"refused/malformed": 1}


# -- durability -----------------------------------------------------------------------------------


def test_sigkill_and_restart_lose_no_accepted_group(own_api):
    """posted = trained + refused + queued, across a SIGKILL; the step and registrations survive."""
    api = own_api
    register(api, batch_size=8)
    client = AtroposClient(api.url, timeout=60, max_retries=40, backoff_initial_s=0.05, backoff_max_s=0.5)
    api.get("/batch")  # the trainer's first fetch: environments may register
    env = api.post("/register-env", {"max_token_length": 64, "desired_name": "e", "weight": 1.0, "group_size": 4})
    env_id = env.json()["env_id"]
    accepted, refused, trained = [], 0, []

    def post(tag: float, poisoned: bool = False) -> None:
        nonlocal refused
        group = scored_group(tag, env_id=env_id)
        if poisoned:
            group["scores"][0] = math.inf
        response = api.post("/scored_data", group)
        if response.status_code == 422:
            refused += 1
        else:
            response.raise_for_status()
            accepted.append(tag)

    for tag in range(7):
        post(float(tag), poisoned=tag == 3)
    trained += served_tags(client.fetch_batch().groups)
    step_before = api.get("/status")["current_step"]
    api.kill()  # 4 good groups queued, 1 in the buffer of none; step 1

    # the trainer asks for its next batch while the API is down: its retries reach the restarted API
    fetched = {}
    waiter = threading.Thread(target=lambda: fetched.update(batch=client.fetch_batch()))
    waiter.start()
    time.sleep(0.5)
    api.start()
    assert "resuming from" in api.log()
    waiter.join(timeout=60)
    trained += served_tags(fetched["batch"].groups)
    assert api.get("/status")["current_step"] == step_before + 1
    assert api.get("/info")["batch_size"] == 8  # the registration survived
    assert httpx.request("GET", f"{api.url}/status-env", json={"env_id": env_id}).status_code == 200
    # a trainer that registers again joins the run at the API's step, not at its own starting_step
    register(api, batch_size=8)
    assert api.get("/status")["current_step"] == step_before + 1

    for tag in range(10, 15):
        post(float(tag), poisoned=tag == 12)
    trained += served_tags(client.fetch_batch().groups)
    api.kill()
    api.start()
    queued = api.get("/status")["queue_size"]
    stats = api.get("/stats")["envs"][str(env_id)]
    api.stop()
    client.close()

    store = Store(api.db)
    still_queued = [float(body.split('"scores":[')[1].split(",")[0]) for body in
                    store.bodies([g.seq for g in store.index(QUEUED)])]
    store.close()
    assert len(accepted) + refused == 12 and refused == 2
    assert len(accepted) == len(trained) + queued
    assert sorted(trained + still_queued) == sorted(accepted)  # each accepted group exactly once
    assert trained == sorted(trained)  # and served oldest first, across the restarts
    assert stats == {"accepted": 10, "served": 6, "refused/nonfinite_score": 2}


# -- access ------------------------------------------------------------------------------------------


def test_the_token_is_required_when_set_and_every_client_can_send_it(tmp_path):
    token = "s3cret-token"
    api = APIProcess(tmp_path, env={"ATROPOS_API_TOKEN": token}).start()
    try:
        assert httpx.get(f"{api.url}/status").status_code == 401
        assert api.post("/scored_data", scored_group(1.0)).status_code == 401
        assert httpx.get(f"{api.url}/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{api.url}/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(f"{api.url}/status", headers={"X-Atropos-Token": token}).status_code == 200
        # the trainer's client, the token in the URL (basic auth)
        url_with_token = f"http://atropos:{token}@127.0.0.1:{api.port}"
        with AtroposClient(url_with_token, timeout=10, max_retries=0) as client:
            client.register(Registration(batch_size=4, max_token_len=64, num_steps=10))
            assert client.status()["current_step"] == 0

        async def as_an_environment():
            # aiohttp, as Atropos's BaseEnv posts, with the same URL
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{url_with_token}/scored_data", json=scored_group(1.0)) as response,
            ):
                return response.status

        assert asyncio.run(as_an_environment()) == 200
        assert api.get("/status", headers={"X-Atropos-Token": token})["queue_size"] == 1
    finally:
        api.stop()


def test_without_a_token_no_header_is_needed(api):
    assert httpx.get(f"{api.url}/status").status_code == 200
    assert api.post("/scored_data", scored_group(1.0)).status_code == 200


def test_binds_loopback_only_by_default(tmp_path):
    api = APIProcess(tmp_path)
    command = [sys.executable, "-m", "recipe.atropos.api", "--port", str(api.port), "--db", str(api.db)]
    api.start(command)
    try:
        listening = [c for c in psutil.Process(api.process.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening
    finally:
        api.stop()


# -- the launcher ----------------------------------------------------------------------------------


def test_the_launcher_starts_this_api_by_default_and_run_api_with_one_key(tmp_path):
    config = REPO / "recipe" / "atropos" / "config" / "atropos_grpo_cpu.yaml"
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"vocab_size": 320}')
    overrides = ["trainer.atropos.api_url=http://localhost:9555", f"actor_rollout_ref.model.path={model}"]
    api = Launcher(config, overrides, tmp_path).services[0]
    assert api.command[1:3] == ["-m", "recipe.atropos.api"]
    flags = dict(zip(api.command[3::2], api.command[4::2]))
    assert flags == {"--host": "127.0.0.1", "--port": "9555", "--db": str(tmp_path / "api.sqlite3"),
                     "--vocab-size": "320"}
    api = Launcher(config, [*overrides, "services.api=run-api"], tmp_path).services[0]
    assert api.command[1:] == ["-m", "atroposlib.cli.run_api", "--host", "127.0.0.1", "--port", "9555"]
    with pytest.raises(SystemExit, match="services.api must be one of"):
        Launcher(config, [*overrides, "services.api=other"], tmp_path)
