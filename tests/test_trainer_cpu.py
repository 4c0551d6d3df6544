"""The whole trainer on a CPU: verl's workers (FSDP2 over gloo), the CPU rollout backend,
the gateway, a real run-api and real Atropos environments, each in its own process."""

from __future__ import annotations

import random

import httpx
import pytest

from recipe.atropos.data.prepare_gsm8k import prepare
from recipe.atropos.models.make_tiny_model import write_tiny_model
from recipe.atropos.sync_check import replica_prompt_logprobs
from recipe.atropos.console_metrics import parse_step_metrics
from tests.cpu_run import CPURun

DESIGN_METRICS = [
    "atropos/batch_wait_s",
    "atropos/groups",
    "atropos/sequences",
    "atropos/groups_rejected",
    "atropos/score_mean",
    "atropos/override_fraction",
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
def cpu_run(tmp_path, assets):
    run = CPURun(tmp_path, assets["model"])
    run.start_api()
    yield run
    run.stop()


def test_three_steps_through_a_real_environment(cpu_run, assets):
    cpu_run.start_trainer("trainer.total_training_steps=3", "trainer.atropos.check_weight_sync=true")
    cpu_run.wait_for(lambda: httpx.get(f"{cpu_run.gateway_url}/health").status_code == 200, "gateway", 240)
    cpu_run.start_env("recipe.atropos.envs.gsm8k_answer_credit", assets["train"])
    assert cpu_run.wait_trainer() == 0, cpu_run.log("trainer")[-4000:]

    steps = parse_step_metrics(cpu_run.log("trainer"))
    assert sorted(steps) == [1, 2, 3]
    for step, metrics in steps.items():
        for name in DESIGN_METRICS:
            assert name in metrics, f"step {step} lacks {name}"
        assert any(name.startswith("atropos/env/") and name.endswith("/score_mean") for name in metrics)
        assert metrics["atropos/sequences"] == 8 and metrics["atropos/groups"] == 2
        # the environment sent token-level advantages for every sequence, and they were used
        assert metrics["atropos/override_fraction"] == 1.0
        # after each sync the replicas score a sequence exactly as the actor does
        assert metrics["atropos/weight_sync_max_logprob_gap"] < 1e-4
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
        assert after[position] > before[position], f"favoured token at {position}: {before[position]} -> {after[position]}"
    for position in range(start + 3, start + 6):
        assert after[position] < before[position], f"disfavoured token at {position}: {before[position]} -> {after[position]}"

    httpx.post(f"{cpu_run.api_url}/scored_data_list", json=groups).raise_for_status()
    assert cpu_run.wait_trainer() == 0, cpu_run.log("trainer")[-4000:]
    assert parse_step_metrics(cpu_run.log("trainer"))[1]["atropos/override_fraction"] == 1.0


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


def test_resume_from_a_step_2_checkpoint(tmp_path, assets):
    rng = random.Random(1)
    first = CPURun(tmp_path, assets["model"])
    try:
        first.start_api()
        first.start_trainer("trainer.total_training_steps=2", "trainer.save_freq=2")
        first.wait_registered()
        for _ in range(2):
            httpx.post(f"{first.api_url}/scored_data_list", json=plain_batch(rng)).raise_for_status()
        assert first.wait_trainer() == 0, first.log("trainer")[-4000:]
    finally:
        first.stop()
    assert (tmp_path / "checkpoints" / "global_step_2" / "actor").is_dir()

    second = CPURun(tmp_path, assets["model"])
    try:
        second.start_api()
        second.start_trainer("trainer.total_training_steps=3", "trainer.resume_mode=auto")
        second.wait_registered()
        # the trainer registered the step it resumed from
        assert httpx.get(f"{second.api_url}/status").json()["current_step"] == 2
        httpx.post(f"{second.api_url}/scored_data_list", json=plain_batch(rng)).raise_for_status()
        assert second.wait_trainer() == 0, second.log("trainer")[-4000:]
        assert sorted(parse_step_metrics(second.log("trainer"))) == [3]
        assert httpx.get(f"{second.api_url}/status").json()["current_step"] == 3
    finally:
        second.stop()
