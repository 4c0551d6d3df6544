"""The ``atropos/*`` metrics of one training step, from pure inputs."""

from __future__ import annotations

import torch

from .advantages import FROM_ATROPOS
from .batch import ENV_ID, NO_ENV_ID, SCORES, ConversionResult


def atropos_metrics(result: ConversionResult, batch_wait_s: float) -> dict[str, float]:
    """Metrics of one fetched and converted batch (after the advantage merge, if any).

    ``atropos/override_fraction`` is the share of sequences whose advantages came
    from Atropos; it is 0 until :func:`apply_atropos_advantages` has run.
    """
    metrics: dict[str, float] = {
        "atropos/batch_wait_s": float(batch_wait_s),
        "atropos/groups": float(result.num_groups - len(result.rejections)),
        "atropos/groups_rejected": float(len(result.rejections)),
    }
    for reason, count in sorted(result.rejected_by_reason.items()):
        metrics[f"atropos/rejected/{reason}"] = float(count)

    data = result.data
    if data is None:
        metrics["atropos/sequences"] = 0.0
        return metrics
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
