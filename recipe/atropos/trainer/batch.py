"""Atropos scored groups -> one verl ``DataProto`` for ``RayPPOTrainer``'s update path.

One scored group is one GRPO group (one ``uid``). Per sequence:

* prompt = the tokens before the first trained position, response = the rest;
  prompts are left-padded and responses right-padded to the batch's widths;
* a position is trained iff its Atropos mask is not -100, so ``response_mask``
  can hold several regions (a tool-output span inside the response is context,
  attended to but not trained);
* the score sits on the last trained token of ``token_level_scores``;
* Atropos ``advantages`` and ``inference_logprobs`` (both aligned to the full
  token sequence) are cut to the response;
* an optional field sent as ``null`` or as an empty list is absent (atroposlib's default
  ``collect_trajectories`` sends ``[]`` for every optional field no item carried).

Every group is validated first. A bad group is rejected with a named reason and
counted; the converter never raises on bad data, so one broken environment
cannot stop training.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from verl import DataProto
from verl.utils.model import compute_position_id_with_mask

IGNORE_MASK = -100

# Why a group can be rejected; each becomes the metric atropos/rejected/<reason>.
EMPTY_GROUP = "empty_group"
MALFORMED = "malformed"
SCORES_COUNT_MISMATCH = "scores_count_mismatch"
MASKS_LENGTH_MISMATCH = "masks_length_mismatch"
ADVANTAGES_LENGTH_MISMATCH = "advantages_length_mismatch"
LOGPROBS_LENGTH_MISMATCH = "logprobs_length_mismatch"
OVERRIDES_COUNT_MISMATCH = "overrides_count_mismatch"
NONFINITE_SCORE = "nonfinite_score"
NONFINITE_ADVANTAGE = "nonfinite_advantage"
NONFINITE_LOGPROB = "nonfinite_logprob"
INVALID_MASK_VALUE = "invalid_mask_value"
NO_TRAINED_TOKEN = "no_trained_token"
NO_PROMPT = "no_prompt"
TOO_LONG = "too_long"
MISSING_ADVANTAGES = "missing_advantages"
TOKEN_OUT_OF_VOCAB = "token_out_of_vocab"
GROUP_TOO_LARGE = "group_too_large"

REJECTION_REASONS = (
    EMPTY_GROUP,
    MALFORMED,
    SCORES_COUNT_MISMATCH,
    MASKS_LENGTH_MISMATCH,
    ADVANTAGES_LENGTH_MISMATCH,
    LOGPROBS_LENGTH_MISMATCH,
    OVERRIDES_COUNT_MISMATCH,
    NONFINITE_SCORE,
    NONFINITE_ADVANTAGE,
    NONFINITE_LOGPROB,
    INVALID_MASK_VALUE,
    NO_TRAINED_TOKEN,
    NO_PROMPT,
    TOO_LONG,
    MISSING_ADVANTAGES,
    TOKEN_OUT_OF_VOCAB,
    GROUP_TOO_LARGE,
)

# Keys this module adds beside verl's own (input_ids, attention_mask, position_ids,
# prompts, responses, response_mask, token_level_scores, rollout_log_probs).
ATROPOS_ADVANTAGES = "atropos_advantages"
HAS_ATROPOS_ADVANTAGES = "atropos_has_advantages"
ZERO_ADVANTAGE = "atropos_zero_advantage"
SCORES = "atropos_scores"
ENV_ID = "env_id"
OVERRIDES = "atropos_overrides"
GROUP_INDEX = "atropos_group_index"  # position of the sequence's group in the fetched batch
NO_ENV_ID = -1


@dataclass(frozen=True)
class Rejection:
    """One group left out of the batch, and why."""

    group_index: int
    env_id: int | None
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"group {self.group_index} (env {self.env_id}) rejected: {self.reason}: {self.detail}"


@dataclass
class ConversionResult:
    """The batch built from the valid groups (``None`` if none was valid) and every rejection."""

    data: DataProto | None
    num_groups: int
    rejections: list[Rejection] = field(default_factory=list)
    # the env_id of every group fetched, in order (None where a group names none)
    env_ids: list[int | None] = field(default_factory=list)

    @property
    def rejected_by_reason(self) -> Counter:
        return Counter(rejection.reason for rejection in self.rejections)


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Sequence:
    tokens: np.ndarray
    trained: np.ndarray
    prompt_len: int
    score: float
    advantages: np.ndarray | None
    logprobs: np.ndarray | None
    zero_advantage: bool
    overrides: dict | None


@dataclass
class _Group:
    env_id: int | None
    sequences: list[_Sequence]


def groups_to_dataproto(
    groups: list[dict[str, Any]],
    *,
    max_token_len: int,
    pad_token_id: int,
    require_advantages: bool = False,
    vocab_size: int | None = None,
    max_group_size: int | None = None,
) -> ConversionResult:
    """Validate and convert scored groups into one padded ``DataProto``.

    Args:
        groups: scored groups as ``GET /batch`` returns them.
        max_token_len: the length registered with the API; longer sequences are rejected.
        pad_token_id: id written at padded positions (never attended to).
        require_advantages: reject groups that carry no ``advantages``
            (``trainer.atropos.fallback_to_grpo=false``).
        vocab_size: rows of the policy's embedding; a token id outside ``[0, vocab_size)``
            would make the actor index out of range, so its group is rejected.
        max_group_size: the registered batch size in sequences; a larger group cannot
            fit any batch the trainer's settings were checked for.
    """
    limits = _Limits(max_token_len, require_advantages, vocab_size, max_group_size)
    valid: list[tuple[int, _Group]] = []
    rejections: list[Rejection] = []
    env_ids: list[int | None] = []
    for index, group in enumerate(groups):
        env_id = group.get("env_id") if isinstance(group, dict) else None
        env_ids.append(env_id if isinstance(env_id, int) else None)
        try:
            valid.append((index, _validate_group(group, limits)))
        except _Rejected as exc:
            rejections.append(Rejection(index, env_id, exc.reason, exc.detail))
        except (TypeError, ValueError, OverflowError, AttributeError) as exc:
            rejections.append(Rejection(index, env_id, MALFORMED, f"{type(exc).__name__}: {exc}"))
    data = _collate(valid, pad_token_id) if valid else None
    return ConversionResult(data=data, num_groups=len(groups), rejections=rejections, env_ids=env_ids)


@dataclass(frozen=True)
class _Limits:
    max_token_len: int
    require_advantages: bool
    vocab_size: int | None
    max_group_size: int | None


def _validate_group(group: Any, limits: _Limits) -> _Group:
    if not isinstance(group, dict):
        raise _Rejected(MALFORMED, f"a group must be a JSON object, got {type(group).__name__}")
    tokens = group.get("tokens")
    masks = group.get("masks")
    scores = group.get("scores")
    if not isinstance(tokens, list) or not isinstance(masks, list) or not isinstance(scores, list):
        raise _Rejected(MALFORMED, "'tokens', 'masks' and 'scores' must be lists")
    size = len(tokens)
    if size == 0:
        raise _Rejected(EMPTY_GROUP, "the group has no sequences")
    if limits.max_group_size is not None and size > limits.max_group_size:
        raise _Rejected(
            GROUP_TOO_LARGE,
            f"{size} sequences, more than the registered batch_size={limits.max_group_size} sequences",
        )
    if len(scores) != size:
        raise _Rejected(SCORES_COUNT_MISMATCH, f"{len(scores)} scores for {size} sequences")
    if len(masks) != size:
        raise _Rejected(MASKS_LENGTH_MISMATCH, f"{len(masks)} masks for {size} sequences")
    advantages = _optional_per_sequence(group, "advantages", size, ADVANTAGES_LENGTH_MISMATCH)
    logprobs = _optional_per_sequence(group, "inference_logprobs", size, LOGPROBS_LENGTH_MISMATCH)
    overrides = _optional_per_sequence(group, "overrides", size, OVERRIDES_COUNT_MISMATCH)
    if advantages is None and limits.require_advantages:
        raise _Rejected(
            MISSING_ADVANTAGES,
            "the group carries no 'advantages' and trainer.atropos.fallback_to_grpo=false",
        )
    score_array = np.asarray(scores, dtype=np.float64)
    if score_array.ndim != 1:
        raise _Rejected(MALFORMED, "'scores' must be a flat list of numbers")
    _check_scores_fit_float32(score_array, scores)

    sequences = []
    for i in range(size):
        seq_overrides = overrides[i] if overrides is not None else None
        if seq_overrides is not None and not isinstance(seq_overrides, dict):
            raise _Rejected(
                MALFORMED, f"sequence {i}: an override must be an object, got {type(seq_overrides).__name__}"
            )
        sequences.append(
            _validate_sequence(
                i,
                tokens[i],
                masks[i],
                float(score_array[i]),
                advantages[i] if advantages is not None else None,
                logprobs[i] if logprobs is not None else None,
                seq_overrides,
                limits,
            )
        )
    env_id = group.get("env_id")
    if env_id is not None and not isinstance(env_id, int):
        raise _Rejected(MALFORMED, f"'env_id' must be an integer, got {env_id!r}")
    return _Group(env_id=env_id, sequences=sequences)


def _check_scores_fit_float32(score_array: np.ndarray, scores: list) -> None:
    """The trainer holds scores, and GRPO their group mean and std, in float32: all must stay finite there."""
    with np.errstate(over="ignore", invalid="ignore"):
        as_float32 = score_array.astype(np.float32)
        finite = np.isfinite(as_float32)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            what = "score" if not np.isfinite(score_array[bad]) else "score, beyond float32's range,"
            raise _Rejected(NONFINITE_SCORE, f"sequence {bad}: {what} {scores[bad]!r}")
        mean = as_float32.mean(dtype=np.float32)
        std = as_float32.std(dtype=np.float32)
    if not (np.isfinite(mean) and np.isfinite(std)):
        raise _Rejected(
            NONFINITE_SCORE, f"the group's score mean ({mean}) or std ({std}) overflows float32; scores {scores!r}"
        )


def _optional_per_sequence(group: dict, key: str, size: int, reason: str) -> list | None:
    """A per-sequence field, or None where the group does not carry it.

    atroposlib's default ``BaseEnv.collect_trajectories`` starts every optional field as ``[]``
    and appends only what its items carry, so ``[]`` is how a stock environment says "absent".
    """
    value = group.get(key)
    if value is None or (isinstance(value, list) and not value):
        return None
    if not isinstance(value, list):
        raise _Rejected(MALFORMED, f"'{key}' must be a list, got {type(value).__name__}")
    if len(value) != size:
        raise _Rejected(reason, f"{len(value)} entries of '{key}' for {size} sequences")
    return value


def _int_row(values: Any, what: str, i: int) -> np.ndarray:
    row = np.asarray(values)
    if row.ndim != 1:
        raise _Rejected(MALFORMED, f"sequence {i}: '{what}' must be a flat list of integers")
    # a cast would turn 3.5 into token 3 and "7" into token 7 without a word
    if row.size and row.dtype.kind not in "iu":
        raise _Rejected(MALFORMED, f"sequence {i}: '{what}' must be integers, got {row.dtype} values")
    return row.astype(np.int64)


def _per_token_row(
    rows, field: str, label: str, i: int, length: int, trained, trained_positions, length_reason: str,
    nonfinite_reason: str,
):
    """Row ``i`` of a per-token float field, one value per token, finite wherever it is trained."""
    row = _float_row(rows, field, i)
    if len(row) != length:
        raise _Rejected(length_reason, f"sequence {i}: {length} tokens but {len(row)} {field}")
    # Only trained positions reach the loss, so only they must be finite.
    if not np.isfinite(row[trained]).all():
        at = int(trained_positions[~np.isfinite(row[trained])][0])
        raise _Rejected(nonfinite_reason, f"sequence {i}, position {at}: {label} {row[at]}")
    return row


def _float_row(values: Any, what: str, i: int) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflow becomes inf, rejected below as not finite
        row = np.asarray(values, dtype=np.float32)
    if row.ndim != 1:
        raise _Rejected(MALFORMED, f"sequence {i}: '{what}' must be a flat list of numbers")
    return row


def _validate_sequence(
    i: int,
    tokens: Any,
    mask: Any,
    score: float,
    advantages: Any,
    logprobs: Any,
    overrides: dict | None,
    limits: _Limits,
) -> _Sequence:
    token_row = _int_row(tokens, "tokens", i)
    mask_row = _int_row(mask, "masks", i)
    length = len(token_row)
    if len(mask_row) != length:
        raise _Rejected(MASKS_LENGTH_MISMATCH, f"sequence {i}: {length} tokens but {len(mask_row)} mask entries")
    if length > limits.max_token_len:
        raise _Rejected(
            TOO_LONG, f"sequence {i}: {length} tokens, more than the registered max_token_len={limits.max_token_len}"
        )
    if limits.vocab_size is not None:
        outside = (token_row < 0) | (token_row >= limits.vocab_size)
        if outside.any():
            at = int(np.flatnonzero(outside)[0])
            raise _Rejected(
                TOKEN_OUT_OF_VOCAB,
                f"sequence {i}, position {at}: token id {int(token_row[at])} is outside the policy's vocabulary "
                f"[0, {limits.vocab_size})",
            )
    trained = mask_row != IGNORE_MASK
    wrong = trained & (mask_row != token_row)
    if wrong.any():
        at = int(np.flatnonzero(wrong)[0])
        raise _Rejected(
            INVALID_MASK_VALUE,
            f"sequence {i}, position {at}: mask {int(mask_row[at])} is neither -100 nor the token {int(token_row[at])}",
        )
    trained_positions = np.flatnonzero(trained)
    if len(trained_positions) == 0:
        raise _Rejected(NO_TRAINED_TOKEN, f"sequence {i}: every mask entry is -100")
    prompt_len = int(trained_positions[0])
    if prompt_len == 0:
        raise _Rejected(NO_PROMPT, f"sequence {i}: position 0 is trained, but a trained token needs a token before it")

    advantage_row = None
    if advantages is not None:
        advantage_row = _per_token_row(
            advantages, "advantages", "advantage", i, length, trained, trained_positions,
            ADVANTAGES_LENGTH_MISMATCH, NONFINITE_ADVANTAGE,
        )
    logprob_row = None
    if logprobs is not None:
        logprob_row = _per_token_row(
            logprobs, "inference_logprobs", "inference logprob", i, length, trained, trained_positions,
            LOGPROBS_LENGTH_MISMATCH, NONFINITE_LOGPROB,
        )
    return _Sequence(
        tokens=token_row,
        trained=trained,
        prompt_len=prompt_len,
        score=score,
        advantages=advantage_row,
        logprobs=logprob_row,
        zero_advantage=bool(overrides and overrides.get("set_advantage_to_zero", False)),
        overrides=overrides,
    )


def _collate(indexed_groups: list[tuple[int, _Group]], pad_token_id: int) -> DataProto:
    groups = [group for _, group in indexed_groups]
    sequences = [seq for group in groups for seq in group.sequences]
    size = len(sequences)
    prompt_width = max(seq.prompt_len for seq in sequences)
    response_width = max(len(seq.tokens) - seq.prompt_len for seq in sequences)

    prompts = np.full((size, prompt_width), pad_token_id, dtype=np.int64)
    prompt_attention = np.zeros((size, prompt_width), dtype=np.int64)
    responses = np.full((size, response_width), pad_token_id, dtype=np.int64)
    response_attention = np.zeros((size, response_width), dtype=np.int64)
    response_mask = np.zeros((size, response_width), dtype=np.int64)
    scores_on_tokens = np.zeros((size, response_width), dtype=np.float32)
    advantages = np.zeros((size, response_width), dtype=np.float32)
    has_advantages = np.zeros(size, dtype=bool)
    all_logprobs = all(seq.logprobs is not None for seq in sequences)
    logprobs = np.zeros((size, response_width), dtype=np.float32) if all_logprobs else None

    for row, seq in enumerate(sequences):
        p = seq.prompt_len
        r = len(seq.tokens) - p
        prompts[row, prompt_width - p :] = seq.tokens[:p]
        prompt_attention[row, prompt_width - p :] = 1
        responses[row, :r] = seq.tokens[p:]
        response_attention[row, :r] = 1
        trained = seq.trained[p:]
        response_mask[row, :r] = trained
        # The last trained token carries the outcome score, as verl's reward managers place it.
        scores_on_tokens[row, int(np.flatnonzero(trained)[-1])] = seq.score
        if seq.advantages is not None:
            advantages[row, :r] = np.where(trained, seq.advantages[p:], 0.0)
            has_advantages[row] = True
        if logprobs is not None:
            # Atropos writes 1.0 at untrained positions; keep 0.0 there.
            logprobs[row, :r] = np.where(trained, seq.logprobs[p:], 0.0)

    attention_mask = torch.from_numpy(np.concatenate([prompt_attention, response_attention], axis=1))
    tensors = {
        "prompts": torch.from_numpy(prompts),
        "responses": torch.from_numpy(responses),
        "input_ids": torch.from_numpy(np.concatenate([prompts, responses], axis=1)),
        "attention_mask": attention_mask,
        "position_ids": compute_position_id_with_mask(attention_mask),
        "response_mask": torch.from_numpy(response_mask),
        "token_level_scores": torch.from_numpy(scores_on_tokens),
        ATROPOS_ADVANTAGES: torch.from_numpy(advantages),
        HAS_ATROPOS_ADVANTAGES: torch.from_numpy(has_advantages),
        ZERO_ADVANTAGE: torch.tensor([seq.zero_advantage for seq in sequences], dtype=torch.bool),
        SCORES: torch.tensor([seq.score for seq in sequences], dtype=torch.float32),
    }
    if logprobs is not None:
        tensors["rollout_log_probs"] = torch.from_numpy(logprobs)

    uids, env_ids, group_indices = [], [], []
    for index, group in indexed_groups:
        uid = str(uuid.uuid4())
        uids.extend([uid] * len(group.sequences))
        group_indices.extend([index] * len(group.sequences))
        env_ids.extend([NO_ENV_ID if group.env_id is None else group.env_id] * len(group.sequences))
    overrides = np.empty(size, dtype=object)
    overrides[:] = [seq.overrides for seq in sequences]
    non_tensors = {
        "uid": np.array(uids, dtype=object),
        ENV_ID: np.array(env_ids, dtype=np.int64),
        OVERRIDES: overrides,
        GROUP_INDEX: np.array(group_indices, dtype=np.int64),
    }
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info={})
