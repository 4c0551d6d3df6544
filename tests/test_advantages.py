"""The advantage merge, checked number for number against verl's own GRPO."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

from recipe.atropos.trainer.advantages import FROM_ATROPOS, apply_atropos_advantages, merge_atropos_advantages
from recipe.atropos.trainer.batch import groups_to_dataproto


def random_inputs(group_sizes, response_length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    size = sum(group_sizes)
    index = np.array([f"g{g}" for g, n in enumerate(group_sizes) for _ in range(n)], dtype=object)
    mask = (torch.rand(size, response_length, generator=gen) > 0.3).long()
    mask[:, 0] = 1
    rewards = torch.zeros(size, response_length)
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    rewards[torch.arange(size), last] = torch.randn(size, generator=gen)
    atropos = torch.randn(size, response_length, generator=gen)
    return rewards, mask, index, atropos


@pytest.mark.parametrize("norm_adv_by_std_in_grpo", [True, False])
@pytest.mark.parametrize("group_sizes", [[4], [2, 3], [1, 8, 5], [16] * 4])
def test_without_atropos_advantages_the_merge_is_verls_grpo(group_sizes, norm_adv_by_std_in_grpo):
    rewards, mask, index, atropos = random_inputs(group_sizes)
    size = len(index)
    merged, from_atropos = merge_atropos_advantages(
        rewards, mask, index, atropos, torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool),
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
    )
    expected, _ = compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)
    torch.testing.assert_close(merged, expected)
    assert not from_atropos.any()


@pytest.mark.parametrize("norm_adv_by_std_in_grpo", [True, False])
def test_grpo_formula_per_group(norm_adv_by_std_in_grpo):
    rewards, mask, index, atropos = random_inputs([3, 5])
    size = len(index)
    merged, _ = merge_atropos_advantages(
        rewards, mask, index, atropos, torch.zeros(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool),
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, epsilon=1e-6,
    )
    scores = rewards.sum(-1)
    for group in ("g0", "g1"):
        rows = torch.from_numpy(index == group)
        group_scores = scores[rows]
        centred = group_scores - group_scores.mean()
        want = centred / (group_scores.std() + 1e-6) if norm_adv_by_std_in_grpo else centred
        torch.testing.assert_close(merged[rows], want.unsqueeze(-1) * mask[rows])


def test_mixed_batch_takes_atropos_exactly_where_given_and_grpo_elsewhere():
    rewards, mask, index, atropos = random_inputs([4, 4, 4])
    has = torch.tensor([True] * 4 + [False] * 4 + [True] * 4)
    no_zeroing = torch.zeros(12, dtype=torch.bool)
    merged, from_atropos = merge_atropos_advantages(rewards, mask, index, atropos, has, no_zeroing)
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    torch.testing.assert_close(merged[has], atropos[has] * mask[has])
    torch.testing.assert_close(merged[~has], grpo[~has])
    assert from_atropos.tolist() == has.tolist()
    # nothing leaks outside the loss mask
    assert (merged[mask == 0] == 0).all()


def test_use_advantages_false_means_grpo_everywhere():
    rewards, mask, index, atropos = random_inputs([4, 4])
    has = torch.ones(8, dtype=torch.bool)
    merged, from_atropos = merge_atropos_advantages(
        rewards, mask, index, atropos, has, torch.zeros(8, dtype=torch.bool), use_advantages=False
    )
    grpo, _ = compute_grpo_outcome_advantage(rewards, mask, index)
    torch.testing.assert_close(merged, grpo)
    assert not from_atropos.any()


def test_set_advantage_to_zero_applies_after_normalising():
    rewards, mask, index, atropos = random_inputs([4, 4])
    has = torch.tensor([False] * 4 + [True] * 4)
    zero = torch.tensor([True, False, False, False, False, True, False, False])
    merged, _ = merge_atropos_advantages(rewards, mask, index, atropos, has, zero)
    unzeroed, _ = merge_atropos_advantages(rewards, mask, index, atropos, has, torch.zeros(8, dtype=torch.bool))
    assert (merged[zero] == 0).all()
    # the zeroed sequence still counted in its group's mean and std
    torch.testing.assert_close(merged[~zero], unzeroed[~zero])
    assert (unzeroed[zero].abs().sum(-1) > 0).all()


def test_apply_on_a_converted_batch_uses_rewards_when_the_trainer_set_them():
    groups = [
        {"tokens": [[5, 6, 7], [5, 6, 8]], "masks": [[-100, 6, 7], [-100, 6, 8]], "scores": [1.0, 0.0]},
        {
            "tokens": [[5, 9, 9], [5, 9, 4]],
            "masks": [[-100, 9, 9], [-100, 9, 4]],
            "scores": [0.0, 0.0],
            "advantages": [[0.0, 2.0, 3.0], [0.0, -1.0, -2.0]],
            "overrides": [{}, {"set_advantage_to_zero": True}],
        },
    ]
    data = groups_to_dataproto(groups, max_token_len=8, pad_token_id=0).data
    apply_atropos_advantages(data)
    adv = data.batch["advantages"]
    torch.testing.assert_close(adv[0], torch.full((2,), 1 / (2**0.5 + 1e-6)))
    torch.testing.assert_close(adv[1], -adv[0])
    torch.testing.assert_close(adv[2], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(adv[3], torch.zeros(2))
    assert torch.equal(data.batch["returns"], adv)
    assert data.batch[FROM_ATROPOS].tolist() == [False, False, True, True]

    # token_level_rewards (scores less a KL penalty, set by the trainer) win over token_level_scores
    data.batch["token_level_rewards"] = data.batch["token_level_scores"].flip(0)
    apply_atropos_advantages(data)
    torch.testing.assert_close(data.batch["advantages"][:2], torch.zeros(2, 2))
