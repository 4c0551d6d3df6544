"""The whole trainer on a CPU: verl's workers (FSDP2 over gloo), the CPU rollout backend,
the gateway, a real trajectory API (recipe.atropos.api; run-api too for the first test) and real
Atropos environments, each in its own process."""

from __future__ import annotations

import json
import math
import random

import httpx
import pytest

from recipe.atropos.data.prepare_gsm8k import prepare
from recipe.atropos.models.make_tiny_model import write_tiny_model
from recipe.atropos.trainer.sync_check import replica_prompt_logprobs
from tests.cpu_run import CPURun

pytestmark = pytest.mark.slow

DESIGN_METRICS = [
    "atropos/batch_wait_s",
    "atropos/groups",
    "atropos/sequences",
    "atropos/groups_rejected",
    "atropos/score_mean",
    "atropos/override_fraction",
    "atropos/pad_sequences",
    "actor/pg_loss",
    "actor/grad_norm",
    "timing_s/step",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model_dir = write_tiny_model(str(root / "tiny-qwen2"))
    prepare("synthetic", str(root / "gsm8k"), train_size=64, test_size=8)
    return {"model": model_dir, "train": str(root / "gsm8k" / "train.parquet")}


@pytest.fixture
def cpu_run(request, tmp_path, assets):
    run = CPURun(tmp_path, assets["model"])
    run.start_api(getattr(request, "param", "recipe.atropos.api"))
    yield run
    run.stop()


# The trainer against both trajectory APIs: the project's and Atropos's run-api.
@pytest.mark.parametrize("cpu_run", ["recipe.atropos.api", "run-api"], indirect=True)
def test_three_steps_through_a_real_environment(cpu_run, assets):
    steps = cpu_run.train_through("recipe.atropos.envs.gsm8k_answer_credit", assets["train"],
                                  "trainer.total_training_steps=3", "trainer.atropos.check_weight_sync=true")
    assert sorted(steps) == [1, 2, 3]
    for step, metrics in steps.items():
        for name in DESIGN_METRICS:
            assert name in metrics, f"step {step} lacks {name}"
        assert any(name.startswith("atropos/env/") and name.endswith("/score_mean") for name in metrics)
        # part of the wait for the batch, no more
        assert 0 <= metrics["atropos/batch_wait_idle_s"] <= metrics["atropos/batch_wait_s"]
        # requests the replicas answered since the last batch, timed one by one (none at a step whose
        # batch was generated before the last fetch, as run-api's open window allows)
        if metrics["atropos/replica/requests"] > 0:
            assert metrics["atropos/replica/tokens"] > 0
            assert 0 < metrics["atropos/replica/request_s_mean"] <= metrics["atropos/replica/request_s_max"]
            assert metrics["atropos/replica/request_s_max"] <= metrics["atropos/replica/span_s"]
        # two groups a batch; any the staleness bound left out are counted, not lost
        # (a batch left out whole is followed by another in the same step: whole batches either way)
        stale = metrics.get("atropos/rejected/policy_lag_exceeded", 0)
        assert (metrics["atropos/groups"] + stale) % 2 == 0 and metrics["atropos/groups"] > 0
        assert metrics["atropos/sequences"] == 4 * metrics["atropos/groups"]
        # every sequence came through the gateway, so its policy version is known and within the bound
        assert metrics["atropos/policy_version_known_fraction"] == 1.0
        assert 0 <= metrics["atropos/policy_lag_steps"] <= metrics["atropos/policy_lag_steps_max"] <= 1
        # the environment sent token-level advantages for every sequence, and they were used
        assert metrics["atropos/override_fraction"] == 1.0
        # after each sync the replicas score a sequence exactly as the actor does
        assert metrics["atropos/weight_sync_max_logprob_gap"] < 1e-4
    # every trained sequence was one request, answered before its batch was fetched
    answered = sum(steps[s]["atropos/replica/requests"] for s in (1, 2, 3))
    assert answered >= sum(steps[s]["atropos/sequences"] for s in (1, 2, 3))
    fixed_probe = [steps[s]["atropos/weight_sync_fixed_probe_logprob"] for s in (1, 2, 3)]
    assert len(set(fixed_probe)) == 3, f"the replicas' weights did not move: {fixed_probe}"


def designed_group(rng: random.Random, favoured: list[int], disfavoured: list[int]) -> dict:
    """Four answers to one prompt; big positive advantages on ``favoured`` tokens, negative on ``disfavoured``."""
    prompt = [1] + [rng.randrange(3, 250) for _ in range(12)]
    tokens, masks, advantages = [], [], []
    for _ in range(4):
        answer = favoured + disfavoured + [2]
        tokens.append(prompt + answer)
        masks.append([-100] * len(prompt) + answer)
        advantages.append([0.0] * len(prompt) + [5.0] * len(favoured) + [-5.0] * len(disfavoured) + [0.0])
    # scores would give GRPO zero advantages: whatever moves comes from the Atropos advantages
    return {"tokens": tokens, "masks": masks, "scores": [1.0] * 4, "advantages": advantages}


def test_token_level_advantages_reach_the_loss(cpu_run):
    cpu_run.start_trainer("trainer.total_training_steps=2")
    cpu_run.wait_registered()
    cpu_run.wait_for(lambda: cpu_run.replica_weight_versions() == [1, 1], "first weight sync", 60)
    rng = random.Random(0)
    favoured, disfavoured = [70, 71, 72], [80, 81, 82]
    groups = [designed_group(rng, favoured, disfavoured) for _ in range(2)]
    sequence = groups[0]["tokens"][0]
    start = len(sequence) - 7  # first answer token
    replicas = list(httpx.get(f"{cpu_run.gateway_url}/health").json()["replicas"])
    before = replica_prompt_logprobs(replicas[0], sequence)

    httpx.post(f"{cpu_run.api_url}/scored_data_list", json=groups).raise_for_status()
    cpu_run.wait_for(lambda: cpu_run.replica_weight_versions() == [2, 2], "weights after step 1", 120)
    after = replica_prompt_logprobs(replicas[0], sequence)

    for position in range(start, start + 3):
        assert after[position] > before[position], f"favoured at {position}: {before[position]} -> {after[position]}"
    for position in range(start + 3, start + 6):
        assert after[position] < before[position], f"disfavoured at {position}: {before[position]} -> {after[position]}"

    # a group with a NaN score among them is refused at the door (422), and the good ones train
    poisoned = designed_group(rng, favoured, disfavoured)
    poisoned["scores"][2] = float("nan")
    answer = httpx.post(
        f"{cpu_run.api_url}/scored_data_list",
        content=json.dumps([groups[0], poisoned, groups[1]]),
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 422 and answer.json()["accepted"] == 2
    assert answer.json()["refused"][0]["field"] == "scores[2]"
    assert cpu_run.wait_trainer() == 0, cpu_run.log("trainer")[-4000:]
    steps = cpu_run.steps()
    assert steps[1]["atropos/override_fraction"] == 1.0
    assert steps[2]["atropos/groups"] == 2 and steps[2]["atropos/groups_rejected"] == 0


def plain_batch(rng: random.Random) -> list[dict]:
    groups = []
    for _ in range(2):
        prompt = [1] + [rng.randrange(3, 250) for _ in range(10)]
        answers = [[rng.randrange(3, 250) for _ in range(rng.randint(2, 8))] + [2] for _ in range(4)]
        groups.append(
            {
                "tokens": [prompt + a for a in answers],
                "masks": [[-100] * len(prompt) + a for a in answers],
                "scores": [rng.random() for _ in answers],
            }
        )
    return groups


def out_of_vocabulary(group: dict) -> dict:
    """The group with one trained token id beyond the tiny model's vocabulary (259 ids)."""
    tokens, masks = [list(t) for t in group["tokens"]], [list(m) for m in group["masks"]]
    tokens[1][-2] = masks[1][-2] = 5000
    return {**group, "tokens": tokens, "masks": masks}


def test_resume_from_a_step_2_checkpoint(tmp_path, assets):
    rng = random.Random(1)
    first = CPURun(tmp_path, assets["model"])
    try:
        # Atropos's run-api takes any group: the trainer's converter is what stands between it and the actor
        first.start_api("run-api")
        first.start_trainer("trainer.total_training_steps=2", "trainer.save_freq=2")
        first.wait_registered()
        # each batch carries a group the actor cannot take: it is rejected with a reason and the run goes on
        good, bad = plain_batch(rng)
        httpx.post(f"{first.api_url}/scored_data_list", json=[good, out_of_vocabulary(bad)]).raise_for_status()
        good, bad = plain_batch(rng)
        overflowing = {**bad, "scores": [1e39] + bad["scores"][1:]}  # finite in float64, inf in float32
        httpx.post(f"{first.api_url}/scored_data_list", json=[good, overflowing]).raise_for_status()
        assert first.wait_trainer() == 0, first.log("trainer")[-4000:]
    finally:
        first.stop()
    assert (tmp_path / "checkpoints" / "global_step_2" / "actor").is_dir()
    steps = first.steps()
    assert sorted(steps) == [1, 2]
    # (the API may serve the two batches in either order)
    rejected = [name for metrics in steps.values() for name in metrics if name.startswith("atropos/rejected/")]
    assert sorted(rejected) == ["atropos/rejected/nonfinite_score", "atropos/rejected/token_out_of_vocab"]
    for metrics in steps.values():
        assert metrics["atropos/groups"] == 1 and metrics["atropos/groups_rejected"] == 1
        assert math.isfinite(metrics["atropos/score_mean"]) and math.isfinite(metrics["actor/pg_loss"])
    assert "token id 5000 is outside the policy's vocabulary [0, 259)" in first.log("trainer")

    second = CPURun(tmp_path, assets["model"])
    try:
        second.start_api()
        second.start_trainer("trainer.total_training_steps=3", "trainer.resume_mode=auto")
        second.wait_registered()
        # the trainer registered the step it resumed from
        assert httpx.get(f"{second.api_url}/status").json()["current_step"] == 2
        httpx.post(f"{second.api_url}/scored_data_list", json=plain_batch(rng)).raise_for_status()
        assert second.wait_trainer() == 0, second.log("trainer")[-4000:]
        assert sorted(second.steps()) == [3]
        assert httpx.get(f"{second.api_url}/status").json()["current_step"] == 3
    finally:
        second.stop()


def gateway_group(gateway_url: str, rng: random.Random) -> dict:
    """Four answers sampled through the gateway (so it knows their policy version), scored at random."""
    prompt = [1] + [rng.randrange(3, 250) for _ in range(10)]
    reply = httpx.post(f"{gateway_url}/generate", json={
        "prompt": {"prompt_token_ids": prompt}, "n": 4, "max_tokens": 8, "logprobs": 0, "temperature": 1.0},
        timeout=120).json()
    answers = reply["token_ids"]
    return {
        "tokens": [prompt + a for a in answers],
        "masks": [[-100] * len(prompt) + a for a in answers],
        "scores": [rng.random() for _ in answers],
    }


def test_a_group_older_than_the_staleness_bound_is_rejected_and_counted(cpu_run):
    cpu_run.start_trainer("trainer.total_training_steps=3", "trainer.atropos.max_policy_lag_steps=1")
    cpu_run.wait_registered()
    cpu_run.wait_for(lambda: cpu_run.replica_weight_versions() == [1, 1], "first weight sync", 60)
    rng = random.Random(2)
    post = lambda groups: httpx.post(f"{cpu_run.api_url}/scored_data_list", json=groups).raise_for_status()  # noqa: E731
    old = gateway_group(cpu_run.gateway_url, rng)  # sampled by the initial weights (version 0)
    post([gateway_group(cpu_run.gateway_url, rng) for _ in range(2)])  # step 1, actor at version 0
    cpu_run.wait_for(lambda: cpu_run.replica_weight_versions() == [2, 2], "weights after step 1", 120)
    post([gateway_group(cpu_run.gateway_url, rng) for _ in range(2)])  # step 2, actor at version 1
    cpu_run.wait_for(lambda: cpu_run.replica_weight_versions() == [3, 3], "weights after step 2", 120)
    post([old, gateway_group(cpu_run.gateway_url, rng)])  # step 3, actor at version 2: `old` is 2 behind
    assert cpu_run.wait_trainer() == 0, cpu_run.log("trainer")[-4000:]

    steps = cpu_run.steps()
    for step in (1, 2):
        assert steps[step]["atropos/policy_lag_steps"] == 0 and steps[step]["atropos/groups"] == 2
    assert steps[3]["atropos/groups"] == 1 and steps[3]["atropos/sequences"] == 4
    assert steps[3]["atropos/rejected/policy_lag_exceeded"] == 1 and steps[3]["atropos/groups_rejected"] == 1
    assert steps[3]["atropos/policy_lag_steps"] == 0
    assert "policy_lag_exceeded: generated 2 actor updates ago" in cpu_run.log("trainer")


STANDALONE_LAYOUT = [
    "actor_rollout_ref.hybrid_engine=false",
    "trainer.n_gpus_per_node=1",
    "actor_rollout_ref.rollout.nnodes=1",
    "actor_rollout_ref.rollout.n_gpus_per_node=1",
    "actor_rollout_ref.rollout.free_cache_engine=false",
    "actor_rollout_ref.rollout.checkpoint_engine.backend=object_store",
]


# partial_rollout: verl's weight update aborts what is in flight and the gateway continues it
@pytest.mark.parametrize("partial_rollout", [False, True], ids=["drain", "partial rollout"])
def test_disaggregated_layout_trains_while_the_standalone_replica_generates(cpu_run, assets, partial_rollout):
    steps = cpu_run.train_through(
        "recipe.atropos.envs.gsm8k_answer_credit", assets["train"],
        "trainer.total_training_steps=3", "trainer.atropos.check_weight_sync=true", *STANDALONE_LAYOUT,
        f"trainer.atropos.partial_rollout={str(partial_rollout).lower()}",
    )
    log = cpu_run.log("trainer")
    assert "rollout_standalone" in log or "init_standalone" in log or "standalone" in log.lower()
    assert sorted(steps) == [1, 2, 3]
    for step, metrics in steps.items():
        assert metrics["atropos/policy_version_known_fraction"] == 1.0
        assert 0 <= metrics["atropos/policy_lag_steps_max"] <= 1
        # the weights reached the standalone replica through the checkpoint engine
        assert metrics["atropos/weight_sync_max_logprob_gap"] < 1e-4
        # the replica was not put to sleep for training: only the weight sync paused it
        assert "timing_s/update_weights" in metrics
    fixed_probe = [steps[s]["atropos/weight_sync_fixed_probe_logprob"] for s in (1, 2, 3)]
    assert len(set(fixed_probe)) == 3, f"the replica's weights did not move: {fixed_probe}"


def test_colocated_partial_rollout_aborts_before_sleep_and_resumes_after_the_sync(cpu_run, assets):
    # the replicas are aborted (verl's abort_replicas) before they sleep, and must take requests
    # again after the weight update (resume_generation_replicas): a third step proves they did
    steps = cpu_run.train_through("recipe.atropos.envs.gsm8k", assets["train"],
                                  "trainer.total_training_steps=3", "trainer.atropos.partial_rollout=true")
    assert sorted(steps) == [1, 2, 3]
    for metrics in steps.values():
        assert metrics["atropos/sync_drain_s"] < 1.0  # nothing waited for: what was in flight was aborted
