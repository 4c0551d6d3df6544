"""A trajectory API that cannot form a batch is reported with its cause, never waited on silently.

Against a real run-api (the project's own API refuses such groups at the door, tested at the end):
one group larger than the registered batch (env_id null, unregistered or
registered) blocks every batch after it; the client names it after trainer.atropos.stall_timeout_s
instead of waiting out trainer.atropos.timeout. An empty queue is logged with its cause.
"""

from __future__ import annotations

import logging
import time

import httpx
import pytest

from recipe.atropos.trainer.stall import QueueState, diagnose
from recipe.atropos.trainer.trajectory_client import (
    AtroposBatchStalled,
    AtroposBatchTimeout,
    AtroposClient,
    Registration,
)

CLIENT_LOGGER = "recipe.atropos.trainer.trajectory_client"


def group(size: int, env_id: int | None = None) -> dict:
    return {
        "tokens": [[1, 2, 3, 10 + i % 200] for i in range(size)],
        "masks": [[-100, -100, 3, 10 + i % 200] for i in range(size)],
        "scores": [float(i % 2) for i in range(size)],
        "env_id": env_id,
    }


@pytest.fixture
def client(trajectory_api):
    client = AtroposClient(trajectory_api.url, timeout=30, backoff_initial_s=0.02, backoff_max_s=0.1, stall_timeout=0.5)
    client.register(Registration(batch_size=8, max_token_len=16, num_steps=10))
    yield client
    client.close()


# (case, an environment registered first, the oversized group's env_id, what the cause names)
# (run-api itself re-buffers a registered environment's groups to that environment's group size)
OVERSIZED = [
    ("env_id null", False, None, "13 groups"),
    ("env_id unregistered", False, 7, "13 groups"),
    # with an environment registered, /status-env reports the largest queued group
    ("env_id null beside a registered env", True, None,
     "a queued group holds 1000 sequences, more than the registered batch_size=8"),
    ("env_id unregistered beside a registered env", True, 7, "a queued group holds 1000 sequences"),
]


@pytest.mark.parametrize("trajectory_api", ["run-api"], indirect=True)
@pytest.mark.parametrize("case, register_env, env_id, cause", OVERSIZED, ids=[c[0] for c in OVERSIZED])
def test_an_oversized_group_is_reported_with_its_cause(trajectory_api, client, case, register_env, env_id, cause):
    if register_env:
        with pytest.raises(AtroposBatchTimeout):  # environments register only after the trainer's first /batch
            client.fetch_batch(timeout=0.05)
        trajectory_api.register_env("env", group_size=4)
    trajectory_api.post("/scored_data", group(1000, env_id))
    trajectory_api.post("/scored_data_list", [group(4, env_id) for _ in range(12)])
    started = time.monotonic()
    with pytest.raises(AtroposBatchStalled) as raised:
        client.fetch_batch()
    # reported after stall_timeout, long before trainer.atropos.timeout (30 s here)
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert cause in message, message
    assert "trainer.atropos.stall_timeout_s=0.5" in message and "/batch" in message
    assert trajectory_api.get("/status")["queue_size"] == 13


def test_an_empty_queue_is_logged_with_its_cause_until_the_timeout(client, caplog):
    with caplog.at_level(logging.WARNING, logger=CLIENT_LOGGER), pytest.raises(AtroposBatchTimeout):
        client.fetch_batch(timeout=2.5)
    reports = [r.getMessage() for r in caplog.records if "no group is queued" in r.getMessage()]
    assert len(reports) >= 2, reports  # again every stall_timeout
    assert "env.rollout_server_url" in reports[0]


@pytest.mark.parametrize("trajectory_api", ["run-api"], indirect=True)
@pytest.mark.parametrize("first", [group(4), group(0)], ids=["half a batch", "an empty group"])
def test_a_queue_that_does_not_drain_is_reported(trajectory_api, client, caplog, first):
    trajectory_api.post("/scored_data", first)
    with caplog.at_level(logging.WARNING, logger=CLIENT_LOGGER), pytest.raises(AtroposBatchTimeout):
        client.fetch_batch(timeout=0.8)
    assert any("1 groups are queued, fewer than a batch" in r.getMessage() for r in caplog.records)
    trajectory_api.post("/scored_data_list", [group(4), group(4)])
    assert client.fetch_batch().num_sequences == 8


@pytest.mark.parametrize("state, stalled, phrase", [
    (QueueState(0, 0, 8), False, "no group is queued"),
    (QueueState(0, 1, 8, max_group_size=4), False, "fewer than a batch"),
    (QueueState(0, 1, 8, max_group_size=9), True, "holds 9 sequences"),
    (QueueState(0, 8, 8), True, "8 groups are queued"),
    (QueueState(0, 7, 8), False, "fewer than a batch"),
])
def test_diagnosis(state, stalled, phrase):
    diagnosis = diagnose(state, waited_s=60)
    assert diagnosis.stalled is stalled
    assert phrase in diagnosis.cause and "60 s" in diagnosis.cause


@pytest.mark.parametrize("trajectory_api", ["recipe.atropos.api"], indirect=True)
@pytest.mark.parametrize("bad, reason", [(group(1000), "group_too_large"), (group(0), "empty_group")],
                         ids=["oversized", "empty"])
def test_the_projects_api_refuses_what_would_stall_a_batch(trajectory_api, client, bad, reason):
    answer = httpx.post(f"{trajectory_api.url}/scored_data", json=bad, timeout=10)
    assert answer.status_code == 422, answer.text
    assert reason in answer.text
    trajectory_api.post("/scored_data_list", [group(4), group(4)])
    assert client.fetch_batch().num_sequences == 8
