"""GRPO advantages merged with the token-level advantages Atropos environments send.

Per sequence i of a group:

* Atropos advantages given and ``use_advantages`` -> A[i, t] = the Atropos advantage
  at response token t, masked by the loss mask;
* otherwise -> GRPO from the group's scores, computed by verl's own
  ``compute_grpo_outcome_advantage`` ((score - mean) / (std + eps), or score - mean
  when ``norm_adv_by_std_in_grpo`` is off), broadcast over the response tokens;
* ``overrides[i].set_advantage_to_zero`` -> A[i] = 0, applied after the above, so
  the sequence still counts in its group's mean and std.

verl 0.9.1's estimator registry hands an estimator only rewards, mask, index and
config, so the Atropos tensors cannot reach a registered estimator: the trainer
calls :func:`apply_atropos_advantages` in place of verl's ``compute_advantage``.
"""

from __future__ import annotations

import numpy as np
import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

from .batch import ATROPOS_ADVANTAGES, HAS_ATROPOS_ADVANTAGES, ZERO_ADVANTAGE

FROM_ATROPOS = "atropos_advantages_used"


def merge_atropos_advantages(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    atropos_advantages: torch.Tensor,
    has_atropos_advantages: torch.Tensor,
    zero_advantage: torch.Tensor,
    *,
    use_advantages: bool = True,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level advantages for a batch, and which sequences took theirs from Atropos.

    Args:
        token_level_rewards: (bs, response_length) outcome rewards (the score on one token).
        response_mask: (bs, response_length) 1 where a token is trained.
        index: (bs,) group id of each sequence (verl's ``uid``).
        atropos_advantages: (bs, response_length) advantages sent by the environment.
        has_atropos_advantages: (bs,) bool, the environment sent advantages for this sequence.
        zero_advantage: (bs,) bool, ``overrides[i].set_advantage_to_zero``.

    Returns:
        ``(advantages, from_atropos)``: (bs, response_length) float and (bs,) bool.
    """
    grpo, _ = compute_grpo_outcome_advantage(
        token_level_rewards=token_level_rewards,
        response_mask=response_mask,
        index=index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
    )
    from_atropos = has_atropos_advantages.bool() & use_advantages
    mask = response_mask.to(grpo.dtype)
    advantages = torch.where(from_atropos.unsqueeze(-1), atropos_advantages.to(grpo.dtype) * mask, grpo)
    advantages = advantages.masked_fill(zero_advantage.bool().unsqueeze(-1), 0.0)
    return advantages, from_atropos


def apply_atropos_advantages(
    data: DataProto,
    *,
    use_advantages: bool = True,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
) -> DataProto:
    """Write ``advantages`` and ``returns`` into a batch made by ``groups_to_dataproto``.

    Uses ``token_level_rewards`` (scores less any in-reward KL penalty) when the
    trainer has set them, else ``token_level_scores``. Also writes the per-sequence
    flag ``atropos_advantages_used`` that ``atropos/override_fraction`` is read from.
    """
    batch = data.batch
    rewards = batch["token_level_rewards"] if "token_level_rewards" in batch.keys() else batch["token_level_scores"]
    advantages, from_atropos = merge_atropos_advantages(
        token_level_rewards=rewards,
        response_mask=batch["response_mask"],
        index=data.non_tensor_batch["uid"],
        atropos_advantages=batch[ATROPOS_ADVANTAGES],
        has_atropos_advantages=batch[HAS_ATROPOS_ADVANTAGES],
        zero_advantage=batch[ZERO_ADVANTAGE],
        use_advantages=use_advantages,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        epsilon=epsilon,
    )
    batch["advantages"] = advantages
    batch["returns"] = advantages
    batch[FROM_ATROPOS] = from_atropos
    return data
