"""From fetched groups to the batch one step trains: convert -> staleness filter -> pad.

Each stage is a pure function of its inputs; :func:`shape_batch` chains the last
two and returns one :class:`ShapedBatch`, the only thing the step (and its metrics)
reads: the batch to train, which of its rows are padding, and every rejection since
the last trained step. Conversion (:func:`convert_groups`) runs ahead, in the
prefetch thread, so the training thread only filters and pads.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from verl import DataProto

from ..gateway.policy_versions import PolicyVersionLedger
from .batch import ConversionResult, Rejection, groups_to_dataproto
from .staleness import bound_policy_lag

# bool per row of a shaped batch: True for the rows added only to fill the registered batch size.
# A batch key, not a side list, so it follows the rows through verl's reordering (balance_batch).
IS_PAD = "atropos_is_pad"


@dataclass
class ShapedBatch:
    """What one training step gets from the pipeline.

    Attributes:
        data: real rows then pad rows, ``IS_PAD`` marking the latter; ``None`` when
            every group fetched was rejected (nothing to train this time).
        num_groups: groups fetched since the last trained step.
        rejections: every group left out since the last trained step, in order.
        lag_metrics: ``atropos/policy_lag_steps*`` of the last fetched batch.
    """

    data: DataProto | None
    num_groups: int
    rejections: list[Rejection] = field(default_factory=list)
    lag_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def rejected_by_reason(self) -> Counter:
        return Counter(rejection.reason for rejection in self.rejections)

    @property
    def num_pad_rows(self) -> int:
        return 0 if self.data is None else int(self.data.batch[IS_PAD].sum())


def convert_groups(
    groups: list[dict], *, max_token_len: int, pad_token_id: int, require_advantages: bool,
    vocab_size: int | None = None, max_group_size: int | None = None,
) -> ConversionResult:
    """Stage 1: validate and convert scored groups (every bad group rejected with a reason)."""
    return groups_to_dataproto(
        groups, max_token_len=max_token_len, pad_token_id=pad_token_id, require_advantages=require_advantages,
        vocab_size=vocab_size, max_group_size=max_group_size,
    )


def pad_to_multiple(data: DataProto, unit: int) -> DataProto:
    """Stage 3: ``data`` with ``IS_PAD`` rows appended up to a multiple of ``unit`` sequences.

    verl splits a batch over data-parallel ranks, mini- and micro-batches assuming
    ``data.train_batch_size x rollout.n`` sequences (or a multiple); rejected groups can
    leave fewer. Pad rows copy real ones with an empty loss mask and a zero score, each
    in a GRPO group of its own: they change neither the loss nor any real group's mean
    and std, and ``IS_PAD`` lets every metric leave them out.
    """
    # a new DataProto over the same tensors: the caller's batch stays as it was
    data = DataProto(batch=data.batch.clone(recurse=False), non_tensor_batch=dict(data.non_tensor_batch),
                     meta_info=dict(data.meta_info))
    data.batch[IS_PAD] = torch.zeros(len(data), dtype=torch.bool)
    missing = -len(data) % unit
    if missing == 0:
        return data
    pad = data.select_idxs(np.arange(missing) % len(data))
    pad.batch["response_mask"] = torch.zeros_like(pad.batch["response_mask"])
    pad.batch["token_level_scores"] = torch.zeros_like(pad.batch["token_level_scores"])
    pad.batch[IS_PAD] = torch.ones(missing, dtype=torch.bool)
    pad.non_tensor_batch["uid"] = np.array([f"pad-{uuid.uuid4()}" for _ in range(missing)], dtype=object)
    return DataProto.concat([data, pad])


def shape_batch(
    converted: ConversionResult,
    *,
    ledger: PolicyVersionLedger,
    actor_version: int,
    max_policy_lag_steps: int,
    unit: int,
    carried: ShapedBatch | None = None,
) -> ShapedBatch:
    """Stages 2 and 3 on a converted batch: drop stale groups, then pad.

    Args:
        converted: stage 1's output for the fetched batch.
        ledger: the gateway's record of which weights generated which sequence.
        actor_version: the weights the actor trains from (the step they were synced after).
        max_policy_lag_steps: the staleness bound (``trainer.atropos.max_policy_lag_steps``).
        unit: the registered batch size in sequences; the trained batch is a multiple of it.
        carried: the previous result if it trained nothing (``data is None``): its groups
            and rejections are reported with this one.
    """
    kept, lag_metrics = bound_policy_lag(converted, ledger, actor_version, max_policy_lag_steps)
    earlier = carried.rejections if carried is not None else []
    earlier_groups = carried.num_groups if carried is not None else 0
    return ShapedBatch(
        data=None if kept.data is None else pad_to_multiple(kept.data, unit),
        num_groups=earlier_groups + kept.num_groups,
        rejections=[*earlier, *kept.rejections],
        lag_metrics=lag_metrics,
    )
