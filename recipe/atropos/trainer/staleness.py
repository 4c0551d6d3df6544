"""The staleness bound: groups generated too many actor updates ago are left out, counted.

With the rollout on its own GPUs, environments keep sampling while the actor trains,
so a batch can come from weights one or more updates behind the actor. The trainer
measures that lag per group (:mod:`.policy_versions`) and keeps only groups within
``trainer.atropos.max_policy_lag_steps``; the rest become rejections with reason
``policy_lag_exceeded``, like any malformed group: reported, never trained.
"""

from __future__ import annotations

import numpy as np
import torch

from ..gateway.policy_versions import PolicyVersionLedger, group_lag
from .batch import ENV_ID, GROUP_INDEX, NO_ENV_ID, ConversionResult, Rejection

POLICY_LAG_EXCEEDED = "policy_lag_exceeded"


def sequences_of(data) -> list[list[int]]:
    """Each row's tokens as the environment sent them: prompt and response without padding."""
    input_ids, attention = data.batch["input_ids"], data.batch["attention_mask"].bool()
    return [input_ids[row][attention[row]].tolist() for row in range(len(input_ids))]


def bound_policy_lag(
    result: ConversionResult,
    ledger: PolicyVersionLedger,
    actor_version: int,
    max_lag: int,
) -> tuple[ConversionResult, dict[str, float]]:
    """Drop the groups whose lag exceeds ``max_lag`` (< 0: no bound); measure the lag of the rest.

    Args:
        result: a converted batch.
        ledger: the gateway's record of which weights generated which sequence.
        actor_version: the weights the actor trains this batch from (the step they were
            synced after; 0 for the initial weights).
        max_lag: the largest lag, in actor updates, a trained group may have.

    Returns:
        The batch without stale groups (``data`` is None if none is left), with their
        rejections added, and the metrics ``atropos/policy_lag_steps`` (mean over the
        trained groups whose version is known), ``atropos/policy_lag_steps_max`` and
        ``atropos/policy_version_known_fraction`` (share of sequences found in the ledger).
    """
    data = result.data
    if data is None:
        return result, {}
    uids = data.non_tensor_batch["uid"]
    sequences = sequences_of(data)
    rows_of: dict[str, list[int]] = {}
    for row, uid in enumerate(uids):
        rows_of.setdefault(uid, []).append(row)

    keep_rows: list[int] = []
    kept_lags: list[int] = []
    rejections = list(result.rejections)
    known = 0
    for rows in rows_of.values():
        lag = group_lag(ledger, [sequences[row] for row in rows], actor_version)
        known += lag.known_sequences
        if lag.lag is not None and 0 <= max_lag < lag.lag:
            env_id = int(data.non_tensor_batch[ENV_ID][rows[0]])
            rejections.append(
                Rejection(
                    group_index=int(data.non_tensor_batch[GROUP_INDEX][rows[0]]),
                    env_id=None if env_id == NO_ENV_ID else env_id,
                    reason=POLICY_LAG_EXCEEDED,
                    detail=(
                        f"generated {lag.lag} actor updates ago (actor at version {actor_version}); "
                        f"trainer.atropos.max_policy_lag_steps is {max_lag}"
                    ),
                )
            )
            continue
        keep_rows.extend(rows)
        if lag.lag is not None:
            kept_lags.append(lag.lag)

    metrics = {"atropos/policy_version_known_fraction": known / len(sequences)}
    if kept_lags:
        metrics["atropos/policy_lag_steps"] = float(np.mean(kept_lags))
        metrics["atropos/policy_lag_steps_max"] = float(max(kept_lags))
    if len(keep_rows) == len(sequences):
        kept = data
    elif keep_rows:
        kept = data.select_idxs(torch.tensor(sorted(keep_rows)))
    else:
        kept = None
    kept_result = ConversionResult(
        data=kept, num_groups=result.num_groups, rejections=rejections, env_ids=result.env_ids
    )
    return kept_result, metrics
