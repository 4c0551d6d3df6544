"""Register -> environments post -> fetch -> convert -> merge, through a real ``run-api``."""

from __future__ import annotations

import pytest
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

from recipe.atropos.gateway.policy_versions import PolicyVersionLedger
from recipe.atropos.trainer import batch as B
from recipe.atropos.trainer.advantages import apply_atropos_advantages
from recipe.atropos.trainer.batch_pipeline import shape_batch
from recipe.atropos.trainer.metrics import atropos_metrics
from recipe.atropos.trainer.trajectory_client import AtroposBatchTimeout, AtroposClient, Registration

GROUP_SIZE = 4


def math_group(env_id: int, seed: int) -> dict:
    """A GRPO group: prompt, then an answer; scores only."""
    prompt = [1, 50 + seed, 51, 52]
    answers = [[60 + seed, 61, 2], [62, 2], [63, 64, 65, 2], [66, 2]]
    return {
        "tokens": [prompt + a for a in answers],
        "masks": [[-100] * len(prompt) + a for a in answers],
        "scores": [1.0, 0.0, 0.0, 1.0 if seed % 2 else 0.5],
        "env_id": env_id,
    }


def tool_group(env_id: int) -> dict:
    """Token-level advantages, a tool-output span inside the response, and one zeroed sequence."""
    prompt = [1, 70, 71]
    tokens, masks, advantages = [], [], []
    for i in range(GROUP_SIZE):
        call, output, answer = [80 + i, 81], [90, 91, 92], [83, 2]
        seq = prompt + call + output + answer
        tokens.append(seq)
        masks.append([-100] * 3 + call + [-100] * 3 + answer)
        advantages.append([0.0] * 3 + [0.5 * (i + 1), 0.25] + [0.0] * 3 + [-1.0, 1.0 + i])
    return {
        "tokens": tokens,
        "masks": masks,
        "scores": [0.0, 1.0, 0.0, 1.0],
        "advantages": advantages,
        "inference_logprobs": [[1.0 if m == -100 else -0.5 for m in mask] for mask in masks],
        "overrides": [{}, {"set_advantage_to_zero": True}, {}, {}],
        "env_id": env_id,
    }


@pytest.fixture
def registered(trajectory_api):
    client = AtroposClient(trajectory_api.url, timeout=10, backoff_initial_s=0.02, backoff_max_s=0.2)
    client.register(Registration(batch_size=4 * GROUP_SIZE, max_token_len=32, num_steps=3))
    # The API lets environments register only after the trainer's first /batch.
    with pytest.raises(AtroposBatchTimeout):
        client.fetch_batch(timeout=0.05)
    math_env = trajectory_api.register_env("math", GROUP_SIZE)
    tool_env = trajectory_api.register_env("tools", GROUP_SIZE)
    yield client, trajectory_api, math_env, tool_env
    client.close()


def test_round_trip_with_two_envs_advantages_masks_and_overrides(registered):
    client, api, math_env, tool_env = registered
    api.post("/scored_data", math_group(math_env, seed=0))
    api.post("/scored_data_list", [tool_group(tool_env), math_group(math_env, seed=1)])
    api.post("/scored_data", tool_group(tool_env))

    fetched = client.fetch_batch()
    assert fetched.num_sequences == 4 * GROUP_SIZE
    result = B.groups_to_dataproto(fetched.groups, max_token_len=32, pad_token_id=0)
    assert result.rejections == []
    data = apply_atropos_advantages(result.data)
    batch = data.batch

    env_ids = data.non_tensor_batch[B.ENV_ID]
    from_tools = torch.from_numpy(env_ids == tool_env)
    assert from_tools.sum() == 2 * GROUP_SIZE
    assert len(set(data.non_tensor_batch["uid"])) == 4

    # Atropos advantages exactly where given (masked; the zeroed sequence is 0) ...
    tool_rows = torch.nonzero(from_tools).flatten().tolist()
    for row in tool_rows:
        assert batch["response_mask"][row][:7].tolist() == [1, 1, 0, 0, 0, 1, 1]  # the tool output is not trained
        i = batch["responses"][row][0].item() - 80  # which sequence of tool_group() this is
        zeroed = data.non_tensor_batch[B.OVERRIDES][row].get("set_advantage_to_zero", False)
        assert zeroed == (i == 1)
        want = [0.0] * 7 if zeroed else [0.5 * (i + 1), 0.25, 0, 0, 0, -1.0, 1.0 + i]
        torch.testing.assert_close(batch["advantages"][row][:7], torch.tensor(want))

    # ... and verl's GRPO elsewhere.
    math_rows = ~from_tools
    grpo, _ = compute_grpo_outcome_advantage(
        batch["token_level_scores"][math_rows],
        batch["response_mask"][math_rows],
        data.non_tensor_batch["uid"][math_rows.numpy()],
    )
    torch.testing.assert_close(batch["advantages"][math_rows], grpo)

    shaped = shape_batch(result, ledger=PolicyVersionLedger(), actor_version=0, max_policy_lag_steps=1, unit=16)
    metrics = atropos_metrics(shaped, apply_atropos_advantages(shaped.data), fetched.wait_s)
    assert metrics["atropos/groups"] == 4
    assert metrics["atropos/sequences"] == 16
    assert metrics["atropos/groups_rejected"] == 0
    assert metrics["atropos/override_fraction"] == 0.5
    assert metrics[f"atropos/env/{tool_env}/score_mean"] == 0.5
    assert metrics[f"atropos/env/{math_env}/score_mean"] == pytest.approx((1.5 + 2.0) / 8)
    assert "rollout_log_probs" not in batch.keys()  # the math env sent none
    assert client.status()["current_step"] == 1


def test_a_malformed_group_from_the_api_is_counted_and_training_goes_on(registered):
    client, api, math_env, tool_env = registered
    bad = tool_group(tool_env)
    bad["masks"][2][4] = 12345  # not -100 and not the token
    api.post("/scored_data_list", [math_group(math_env, 0), bad, math_group(math_env, 1), tool_group(tool_env)])
    fetched = client.fetch_batch()
    result = B.groups_to_dataproto(fetched.groups, max_token_len=32, pad_token_id=0)
    assert [r.reason for r in result.rejections] == [B.INVALID_MASK_VALUE]
    assert result.rejections[0].env_id == tool_env
    # the step trains 16 rows (the registered size): 12 real ones and 4 of padding
    shaped = shape_batch(result, ledger=PolicyVersionLedger(), actor_version=0, max_policy_lag_steps=1, unit=16)
    assert len(shaped.data) == 16
    metrics = atropos_metrics(shaped, apply_atropos_advantages(shaped.data), fetched.wait_s)
    assert metrics["atropos/groups"] == 3
    assert metrics["atropos/groups_rejected"] == 1
    assert metrics[f"atropos/rejected/{B.INVALID_MASK_VALUE}"] == 1
    assert metrics["atropos/sequences"] == 12
    assert metrics["atropos/pad_sequences"] == 4
    assert metrics["atropos/override_fraction"] == pytest.approx(4 / 12)  # the one tool group left


def test_too_long_for_the_registration_is_rejected(registered):
    client, api, math_env, _ = registered
    long_group = math_group(math_env, 0)
    long_group["tokens"][0] = long_group["tokens"][0] + [7] * 40
    long_group["masks"][0] = long_group["masks"][0] + [7] * 40
    for seed in range(4):
        api.post("/scored_data", long_group if seed == 0 else math_group(math_env, seed))
    fetched = client.fetch_batch()
    max_token_len = client.info()["max_token_len"]
    result = B.groups_to_dataproto(fetched.groups, max_token_len=max_token_len, pad_token_id=0)
    assert [r.reason for r in result.rejections] == [B.TOO_LONG]
    assert "max_token_len=32" in result.rejections[0].detail
