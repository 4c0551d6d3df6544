"""The metrics of one training step, from the batch it trained: pad rows never count.

Both functions read the batch after the advantage merge, the very object the actor
updated on, so ``atropos/override_fraction`` sees the flags the merge wrote.
"""

from __future__ import annotations

import torch
from verl import DataProto
from verl.trainer.ppo.metric_utils import compute_data_metrics

from .advantages import FROM_ATROPOS
from .batch import ENV_ID, NO_ENV_ID, SCORES
from .batch_pipeline import IS_PAD, ShapedBatch


def real_rows(batch: DataProto) -> DataProto:
    """The rows of a trained batch that came from the environments (``IS_PAD`` rows left out)."""
    if IS_PAD not in batch.batch.keys() or not bool(batch.batch[IS_PAD].any()):
        return batch
    return batch.select_idxs(~batch.batch[IS_PAD])


def atropos_metrics(shaped: ShapedBatch, trained: DataProto | None, batch_wait_s: float) -> dict[str, float]:
    """``atropos/*`` of one step.

    Args:
        shaped: what the pipeline gave the step (groups and rejections since the last trained step).
        trained: the batch the actor updated on (``shaped.data`` after the advantage merge),
            or ``None`` when nothing trained.
        batch_wait_s: how long the step waited for the batch.
    """
    metrics: dict[str, float] = {
        "atropos/batch_wait_s": float(batch_wait_s),
        "atropos/groups": float(shaped.num_groups - len(shaped.rejections)),
        "atropos/groups_rejected": float(len(shaped.rejections)),
        "atropos/pad_sequences": float(shaped.num_pad_rows),
    }
    for reason, count in sorted(shaped.rejected_by_reason.items()):
        metrics[f"atropos/rejected/{reason}"] = float(count)
    metrics.update(shaped.lag_metrics)
    if trained is None:
        metrics["atropos/sequences"] = 0.0
        return metrics

    data = real_rows(trained)
    scores = data.batch[SCORES]
    metrics["atropos/sequences"] = float(len(scores))
    metrics["atropos/score_mean"] = scores.mean().item()
    from_atropos = data.batch[FROM_ATROPOS] if FROM_ATROPOS in data.batch.keys() else torch.zeros(len(scores))
    metrics["atropos/override_fraction"] = from_atropos.float().mean().item()

    env_ids = torch.from_numpy(data.non_tensor_batch[ENV_ID])
    for env_id in torch.unique(env_ids).tolist():
        name = "none" if env_id == NO_ENV_ID else str(env_id)
        metrics[f"atropos/env/{name}/score_mean"] = scores[env_ids == env_id].mean().item()
    return metrics


def data_metrics(trained: DataProto) -> dict[str, float]:
    """verl's ``critic/*``, ``response_length/*`` and ``prompt_length/*`` over the real rows only."""
    return compute_data_metrics(batch=real_rows(trained), use_critic=False)
