"""Generation sized to demand: the gateway's window of outstanding sequences.

The window alone (its arithmetic, on an event loop), then the real pieces together:
the project's trajectory API in its own process, the gateway over a replica, the
pacer feeding the window from the API's ``/stats``, environments that generate
through the gateway and post to the API, and a trainer that fetches batches at its
own pace (fast, slow, or not at all).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import httpx
import pytest

from recipe.atropos.gateway.admission import GenerationWindow
from recipe.atropos.gateway.server import GatewayServer
from recipe.atropos.trainer.pacing import GenerationPacer, window_sequences
from tests.conftest import ServedApp, TrajectoryAPI
from tests.test_gateway import recorded_vllm_app


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def test_requests_are_admitted_while_the_window_has_room_and_held_after():
    async def scenario():
        window = GenerationWindow(window=8, settle_s=60)
        await window.acquire(4)
        await window.acquire(4)
        held = asyncio.create_task(window.acquire(4))
        await asyncio.sleep(0.05)
        assert not held.done() and window.stats().held_requests == 1
        # returned to the environment, then arrived at the API: still outstanding (queued)
        await window.release(4)
        await window.observe(0, 0)  # the baseline
        await window.observe(4, downstream=4)
        await asyncio.sleep(0.05)
        assert not held.done()
        # the trainer consumed them: room for the held request
        await window.observe(4, downstream=0)
        await asyncio.wait_for(held, 1)
        stats = window.stats()
        assert (stats.admitted, stats.returned, stats.arrived, stats.in_flight) == (12, 4, 4, 8)
        assert stats.held_total == 1 and stats.held_s > 0

    run(scenario())


def test_the_window_is_overshot_by_at_most_one_request():
    # a window that is no multiple of the group size still fills: one group more, never two
    async def scenario():
        window = GenerationWindow(window=10, settle_s=60)
        for _ in range(3):
            await window.acquire(4)
        assert window.stats().in_flight == 12
        fourth = asyncio.create_task(window.acquire(4))
        await asyncio.sleep(0.05)
        assert not fourth.done()
        fourth.cancel()

    run(scenario())


def test_sequences_that_never_arrive_count_as_dropped_and_give_their_room_back():
    async def scenario():
        window = GenerationWindow(window=4, settle_s=0.5)
        await window.observe(0, 0)
        await window.acquire(4)
        await window.release(4)  # the environment dropped the group: it never posts it
        held = asyncio.create_task(window.acquire(4))
        await asyncio.sleep(0.3)
        assert not held.done()
        await asyncio.wait_for(held, 2)  # the held request wakes by itself once the room expires
        stats = window.stats()
        assert stats.dropped == 4 and stats.unsettled == 0

    run(scenario())


def test_arrivals_settle_the_oldest_returned_first_and_a_restarted_api_sets_a_new_baseline():
    clock = FakeClock()

    async def scenario():
        window = GenerationWindow(window=100, settle_s=5, clock=clock)
        await window.observe(50, 0)  # sequences from before this gateway: not its business
        for returned_at in (0.0, 1.0, 2.0):
            clock.now = returned_at
            await window.acquire(4)
            await window.release(4)
        await window.observe(56, 0)  # the first group and half of the second arrived
        assert window.stats().unsettled == 6
        await window.observe(3, 0)  # the API restarted and counts from 0 again
        await window.observe(5, 0)
        clock.now = 6.5
        stats = window.stats()
        assert stats.arrived == 8 and stats.unsettled == 4 and stats.dropped == 0
        clock.now = 7.0
        assert window.stats().dropped == 4

    run(scenario())


def test_a_failed_request_returns_nothing_and_frees_its_room():
    async def scenario():
        window = GenerationWindow(window=4, settle_s=60)
        await window.acquire(4)
        await window.release(4, returned=0)
        await asyncio.wait_for(window.acquire(4), 1)
        assert window.stats().returned == 0

    run(scenario())


def test_a_starved_trainer_with_nothing_moving_lets_one_held_request_through():
    async def scenario():
        window = GenerationWindow(window=8, settle_s=60, quiet_s=0.2)
        await window.observe(0, 0)
        await window.acquire(8)
        await window.release(8)
        # all 8 arrived and wait at the API, but they cannot form a batch without another group
        await window.observe(8, downstream=8, starved=False)
        held = [asyncio.create_task(window.acquire(4)) for _ in range(2)]
        await asyncio.sleep(0.5)
        assert not any(task.done() for task in held)  # the trainer is not waiting: nothing is let through
        await window.observe(8, downstream=8, starved=True)
        done, pending = await asyncio.wait(held, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        await asyncio.sleep(0.5)
        assert len(pending) == 1 and not pending.pop().done()  # one per quiet spell: the first is in flight
        assert window.stats().escapes == 1
        for task in held:
            task.cancel()

    run(scenario())


def test_held_requests_take_turns_across_clients_and_keep_their_order_within_one():
    async def scenario():
        window = GenerationWindow(window=4, settle_s=60)
        admitted = []

        async def ask(client, name):
            await window.acquire(2, client)
            admitted.append(name)

        await window.acquire(4, "greedy")  # one environment fills the window
        tasks = [asyncio.create_task(ask("greedy", f"greedy {i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(ask("other", "other 0")))  # held after the greedy one's three
        await asyncio.sleep(0.05)
        assert admitted == [] and window.stats().held_requests == 4
        await window.release(4, returned=0)  # room for two requests of two
        await asyncio.sleep(0.05)
        # first come, first served would admit greedy 0 and greedy 1: the other client's turn comes first
        assert admitted == ["other 0", "greedy 0"]
        await window.release(4, returned=0)
        await asyncio.sleep(0.05)
        assert admitted == ["other 0", "greedy 0", "greedy 1", "greedy 2"]
        await asyncio.gather(*tasks)

    run(scenario())


def test_a_cancelled_held_request_gives_its_turn_to_the_next():
    async def scenario():
        window = GenerationWindow(window=2, settle_s=60)
        await window.acquire(2, "a")
        first = asyncio.create_task(window.acquire(2, "b"))
        second = asyncio.create_task(window.acquire(2, "c"))
        await asyncio.sleep(0.05)
        first.cancel()  # its caller went away while it was next in line
        await window.release(2, returned=0)
        await asyncio.wait_for(second, 1)
        assert window.stats().held_requests == 0 and window.stats().in_flight == 2

    run(scenario())


def test_no_window_never_holds():
    async def scenario():
        window = GenerationWindow()
        for _ in range(100):
            await window.acquire(64)
        assert window.stats().held_total == 0

    run(scenario())


@pytest.mark.parametrize(
    ("configured", "disaggregated", "lag", "expected"),
    [(None, False, 1, 32), (None, True, 1, 64), (None, True, 3, 128), (None, True, -1, 64), (0, True, 1, None),
     (3, False, 1, 96)],
)
def test_the_window_is_sized_by_layout_and_staleness_bound(configured, disaggregated, lag, expected):
    assert window_sequences(configured, 32, disaggregated=disaggregated, max_policy_lag_steps=lag) == expected


# -- the real pieces together ---------------------------------------------------------------

GROUP = 4  # sequences per group
BATCH = 8  # sequences per batch: two groups


@pytest.fixture
def own_api(project_api):
    project_api.register_trainer(batch_size=BATCH)
    return project_api


class Rig:
    """Gateway (window of ``window`` sequences) over a replica, paced from the API; environments as threads."""

    def __init__(self, api: TrajectoryAPI, replica_url: str, window: int, settle_s: float = 30.0,
                 drop_every: int = 0, env_count: int = 1, min_batch_allocation: float | None = None):
        self.api = api
        self.gateway = GatewayServer([replica_url], port=0, window_settle_s=settle_s)
        self.gateway.start()
        self.trained = 0  # this stand-in trainer is done with a batch as soon as it has it
        self.fetching = False
        self.pacer = GenerationPacer(api.url, self.gateway.observe_downstream, lambda: self.trained,
                                     starved=lambda: self.fetching, poll_s=0.05)
        assert self.pacer.poll_once()  # the project's API counts arrivals: the window can be fed
        self.gateway.size_window(window)
        self.pacer.start()
        self.env_ids = [register_env(api, f"paced{i}", min_batch_allocation) for i in range(env_count)]
        self.drop_every = drop_every
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.posted = 0
        self._tags = itertools.count()
        self._envs: list[threading.Thread] = []

    def start_envs(self, count: int, env: int = 0) -> None:
        for _ in range(count):
            thread = threading.Thread(target=self._env, args=(self.env_ids[env],), daemon=True)
            thread.start()
            self._envs.append(thread)

    def _env(self, env_id: int) -> None:
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                # as atroposlib's loop does before each group: the API hears from the environment (one
                # it has not heard from for env_silence_s no longer holds batches to its minimum)
                client.request("GET", f"{self.api.url}/status-env", json={"env_id": env_id}).raise_for_status()
                tag = next(self._tags)
                prompt = [1, 100 + tag % 50, 7]
                reply = client.post(f"{self.gateway.url}/generate",
                                    json={"prompt": {"prompt_token_ids": prompt}, "n": GROUP, "max_tokens": 4,
                                          "logprobs": 0})
                if reply.status_code != 200:
                    self.errors.append(f"{reply.status_code} {reply.text[:200]}")
                    return
                if self.drop_every and tag % self.drop_every == 0:
                    continue  # as atroposlib drops a group whose scores are all equal
                tokens = [prompt + ids for ids in reply.json()["token_ids"]]
                group = {"tokens": tokens, "masks": [[-100] * len(prompt) + ids for ids in reply.json()["token_ids"]],
                         "scores": [float(tag)] * GROUP, "env_id": env_id}
                self.api.post("/scored_data", group)
                self.posted += GROUP

    def fetch(self, timeout: float = 30) -> list[dict]:
        deadline = time.monotonic() + timeout
        self.fetching = True
        try:
            while time.monotonic() < deadline:
                batch = self.api.get("/batch")["batch"]
                if batch:
                    self.trained += sum(len(group["tokens"]) for group in batch)
                    return batch
                time.sleep(0.02)
        finally:
            self.fetching = False
        raise AssertionError(f"no batch within {timeout} s: {self.gateway.window_stats()}")

    def close(self) -> None:
        self.stop.set()
        self.gateway.size_window(None)  # let the held environments finish their last request
        for thread in self._envs:
            thread.join(timeout=10)
        self.pacer.stop()
        self.gateway.stop()


def register_env(api: TrajectoryAPI, name: str, min_batch_allocation: float | None) -> int:
    body = {"max_token_length": 64, "desired_name": name, "weight": 1.0, "group_size": GROUP,
            "min_batch_allocation": min_batch_allocation}
    answer = api.post("/register-env", body)
    assert answer["status"] == "success", answer
    return answer["env_id"]


@pytest.fixture
def replica():
    with ServedApp(recorded_vllm_app(delay_s=0.01)) as served:
        yield served


def test_a_stopped_trainer_holds_the_environments_at_the_window(own_api, replica):
    rig = Rig(own_api, replica.url, window=2 * BATCH)
    try:
        rig.start_envs(4)
        time.sleep(2.0)  # the trainer fetches nothing: environments must wait, not fail or run ahead
        stats = rig.gateway.window_stats()
        # at most one request (one group) beyond the window
        assert stats.admitted <= 2 * BATCH + GROUP - 1, stats
        assert stats.held_requests >= 1 and rig.errors == []
        queued = own_api.get("/stats")["queued_sequences"]
        assert queued == rig.posted <= stats.admitted
        # the trainer comes back: one batch consumed lets about one batch more be generated
        rig.fetch()
        time.sleep(1.0)
        assert rig.gateway.window_stats().admitted <= 3 * BATCH + GROUP - 1
        assert rig.errors == []
    finally:
        rig.close()


@pytest.mark.parametrize("step_s", [0.0, 0.3], ids=["fast trainer", "slow trainer"])
def test_generation_follows_consumption_with_no_deadlock(own_api, replica, step_s):
    rig = Rig(own_api, replica.url, window=BATCH)
    try:
        rig.start_envs(3)
        trained = 0
        for _ in range(12):
            trained += sum(len(group["tokens"]) for group in rig.fetch())
            time.sleep(step_s)
        stats = rig.gateway.window_stats()
        # generated = trained + what is still outstanding, which the window bounds
        assert trained == 12 * BATCH
        assert stats.admitted - trained <= BATCH + GROUP - 1, stats
        assert rig.errors == []
    finally:
        rig.close()


def test_environments_that_drop_groups_still_fill_every_batch(own_api, replica):
    # every other group dropped by its environment: its room comes back after settle_s
    rig = Rig(own_api, replica.url, window=BATCH, settle_s=0.3, drop_every=2)
    try:
        rig.start_envs(2)
        for _ in range(4):
            rig.fetch(timeout=30)
        stats = rig.gateway.window_stats()
        assert stats.dropped >= GROUP and rig.errors == []
    finally:
        rig.close()


def test_a_window_filled_by_one_environment_still_gets_the_other_environments_share(own_api, replica):
    # each environment must give half of every batch; the greedy one alone can fill the window
    rig = Rig(own_api, replica.url, window=BATCH, env_count=2, min_batch_allocation=0.5)
    try:
        rig.start_envs(3, env=0)
        time.sleep(0.5)
        rig.start_envs(1, env=1)
        for _ in range(4):
            batch = rig.fetch(timeout=30)
            assert sorted({group["env_id"] for group in batch}) == rig.env_ids
        assert rig.gateway.window_stats().escapes >= 1 and rig.errors == []
    finally:
        rig.close()
