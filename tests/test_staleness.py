"""Policy versions and the staleness bound: the gateway's ledger, the lag of a group, the bound.

The versions come through the real gateway (over loopback, to the CPU backend's real
server); the batches through the real converter from Atropos-shaped groups.
"""

from __future__ import annotations

import threading

import httpx
import pytest

from recipe.atropos.cpu.server import PolicyServer
from recipe.atropos.cpu.server import build_app as build_cpu_app
from recipe.atropos.gateway.policy_versions import PolicyVersionLedger, group_lag
from recipe.atropos.gateway.server import GatewayServer
from recipe.atropos.settings import AtroposConfig
from recipe.atropos.trainer.batch import groups_to_dataproto
from recipe.atropos.trainer.staleness import POLICY_LAG_EXCEEDED, bound_policy_lag, sequences_of
from tests.conftest import ServedApp


def scored_group(sequences: list[list[int]], prompt_len: int, env_id: int = 0) -> dict:
    """An Atropos group whose tokens are exactly the sequences the gateway returned."""
    return {
        "tokens": sequences,
        "masks": [[-100] * prompt_len + seq[prompt_len:] for seq in sequences],
        "scores": [float(i) for i in range(len(sequences))],
        "env_id": env_id,
    }


def convert(groups):
    return groups_to_dataproto(groups, max_token_len=512, pad_token_id=0)


# -- the ledger ------------------------------------------------------------------------


def test_ledger_keeps_the_oldest_version_of_a_sequence_and_forgets_the_oldest_entries():
    ledger = PolicyVersionLedger(capacity=2)
    ledger.record([1, 2, 3], 4)
    ledger.record([1, 2, 3], 6)  # sampled again later: the older version stands
    assert ledger.version_of([1, 2, 3]) == 4
    ledger.record([7], 5)
    ledger.record([8], 5)
    assert len(ledger) == 2
    assert ledger.version_of([1, 2, 3]) is None
    assert ledger.version_of([8]) == 5
    assert ledger.version_of([1, 2]) is None  # a prefix is another sequence


def test_group_lag_counts_from_the_oldest_known_sequence():
    ledger = PolicyVersionLedger()
    ledger.record([1, 2, 3], 2)
    ledger.record([1, 2, 4], 3)
    lag = group_lag(ledger, [[1, 2, 3], [1, 2, 4], [1, 2, 5]], actor_version=4)
    assert (lag.lag, lag.known_sequences, lag.sequences) == (2, 2, 3)
    assert group_lag(ledger, [[9, 9]], actor_version=4).lag is None


def test_a_capacity_of_zero_is_refused():
    with pytest.raises(ValueError, match="capacity"):
        PolicyVersionLedger(capacity=0)


# -- the bound on converted batches ------------------------------------------------------


def three_groups_generated_at(ledger: PolicyVersionLedger, versions: list[int]):
    groups = []
    for g, version in enumerate(versions):
        sequences = [[1, 10 + g, 20 + g, 30 + i, 40 + i] for i in range(2)]
        for seq in sequences:
            ledger.record(seq, version)
        groups.append(scored_group(sequences, prompt_len=3, env_id=g))
    return groups


def test_groups_beyond_the_bound_are_rejected_with_a_reason_and_the_rest_kept():
    ledger = PolicyVersionLedger()
    groups = three_groups_generated_at(ledger, [5, 4, 2])
    bounded, metrics = bound_policy_lag(convert(groups), ledger, actor_version=5, max_lag=1)

    assert len(bounded.data) == 4  # groups 0 and 1, two sequences each
    assert sorted(set(bounded.data.non_tensor_batch["env_id"].tolist())) == [0, 1]
    [rejection] = bounded.rejections
    assert (rejection.reason, rejection.group_index, rejection.env_id) == (POLICY_LAG_EXCEEDED, 2, 2)
    assert "3 actor updates ago" in rejection.detail and "max_policy_lag_steps is 1" in rejection.detail
    assert bounded.rejected_by_reason[POLICY_LAG_EXCEEDED] == 1
    assert metrics["atropos/policy_lag_steps"] == pytest.approx(0.5)  # lags 0 and 1
    assert metrics["atropos/policy_lag_steps_max"] == 1
    assert metrics["atropos/policy_version_known_fraction"] == 1.0


def test_the_kept_rows_are_the_kept_groups_tokens():
    ledger = PolicyVersionLedger()
    groups = three_groups_generated_at(ledger, [1, 3, 3])
    bounded, _ = bound_policy_lag(convert(groups), ledger, actor_version=3, max_lag=0)
    assert sequences_of(bounded.data) == groups[1]["tokens"] + groups[2]["tokens"]


def test_no_bound_keeps_everything_and_still_measures():
    ledger = PolicyVersionLedger()
    groups = three_groups_generated_at(ledger, [0, 0, 0])
    bounded, metrics = bound_policy_lag(convert(groups), ledger, actor_version=7, max_lag=-1)
    assert len(bounded.data) == 6 and bounded.rejections == []
    assert metrics["atropos/policy_lag_steps"] == 7


def test_a_batch_entirely_too_stale_leaves_no_data():
    ledger = PolicyVersionLedger()
    groups = three_groups_generated_at(ledger, [0, 0, 0])
    bounded, _ = bound_policy_lag(convert(groups), ledger, actor_version=2, max_lag=1)
    assert bounded.data is None
    assert bounded.rejected_by_reason[POLICY_LAG_EXCEEDED] == 3


def test_sequences_the_gateway_never_saw_are_kept_and_counted_as_unknown():
    ledger = PolicyVersionLedger()
    groups = three_groups_generated_at(ledger, [0, 0])
    groups.append(scored_group([[1, 99, 98, 97], [1, 99, 98, 96]], prompt_len=3, env_id=5))
    bounded, metrics = bound_policy_lag(convert(groups), ledger, actor_version=0, max_lag=0)
    assert len(bounded.data) == 6
    assert metrics["atropos/policy_version_known_fraction"] == pytest.approx(4 / 6)


def test_the_bound_is_a_config_key_with_default_one_step():
    assert AtroposConfig().max_policy_lag_steps == 1
    with pytest.raises(ValueError, match="max_policy_lag_steps"):
        AtroposConfig(max_policy_lag_steps=-2)


# -- the gateway records who generated what ------------------------------------------------


@pytest.fixture
def gateway_on_cpu_replica(tiny_model_dir):
    with ServedApp(build_cpu_app(PolicyServer(tiny_model_dir))) as replica:
        gateway = GatewayServer([replica.url], port=0)
        gateway.start()
        yield gateway
        gateway.stop()


def generate(gateway: GatewayServer, prompt: list[int], n: int) -> list[list[int]]:
    reply = httpx.post(f"{gateway.url}/generate", json={
        "prompt": {"prompt_token_ids": prompt}, "n": n, "max_tokens": 5, "logprobs": 0, "temperature": 1.0},
        timeout=60).json()
    return [prompt + tokens for tokens in reply["token_ids"]]


def test_the_gateway_records_the_version_each_sequence_came_from(gateway_on_cpu_replica):
    gateway = gateway_on_cpu_replica
    before = generate(gateway, [1, 87, 85, 71], n=3)
    gateway.pause()
    gateway.resume(policy_version=1)
    after = generate(gateway, [1, 60, 61, 62], n=2)

    assert [gateway.ledger.version_of(seq) for seq in before] == [0, 0, 0]
    assert [gateway.ledger.version_of(seq) for seq in after] == [1, 1]
    # as the trainer sees them once the actor is at version 1
    batch = convert([scored_group(before, prompt_len=4), scored_group(after, prompt_len=4, env_id=1)])
    bounded, metrics = bound_policy_lag(batch, gateway.ledger, actor_version=1, max_lag=1)
    assert metrics["atropos/policy_version_known_fraction"] == 1.0
    assert metrics["atropos/policy_lag_steps"] == 0.5
    bounded, _ = bound_policy_lag(batch, gateway.ledger, actor_version=2, max_lag=1)
    assert sequences_of(bounded.data) == after  # the version-0 group is now two updates old


def test_a_request_held_by_a_pause_is_generated_by_the_new_version(gateway_on_cpu_replica):
    gateway = gateway_on_cpu_replica
    gateway.pause()
    result = {}
    held = threading.Thread(target=lambda: result.setdefault("seqs", generate(gateway, [1, 90, 91], n=1)))
    held.start()
    held.join(timeout=0.5)
    assert held.is_alive()  # waiting at the gateway
    gateway.resume(policy_version=4)
    held.join(timeout=60)
    [seq] = result["seqs"]
    assert gateway.ledger.version_of(seq) == 4
