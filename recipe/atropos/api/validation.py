"""Checks at the door: a group that could not be trained, or could not even be sent
back as JSON, is refused before it is queued, with the field and the reason.

``run-api`` queues whatever parses; a group holding a NaN is accepted and then makes
``GET /batch`` fail (its JSON cannot be written), taking the good groups of that batch
with it. Here such a group never enters the queue, so no batch can be poisoned.

The reasons share their names with the trainer's own rejections
(``atropos/rejected/<reason>``) where they mean the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

EMPTY_GROUP = "empty_group"
GROUP_TOO_LARGE = "group_too_large"
SCORES_COUNT_MISMATCH = "scores_count_mismatch"
MASKS_LENGTH_MISMATCH = "masks_length_mismatch"
ADVANTAGES_LENGTH_MISMATCH = "advantages_length_mismatch"
LOGPROBS_LENGTH_MISMATCH = "logprobs_length_mismatch"
OVERRIDES_COUNT_MISMATCH = "overrides_count_mismatch"
NONFINITE_SCORE = "nonfinite_score"
NONFINITE_ADVANTAGE = "nonfinite_advantage"
NONFINITE_LOGPROB = "nonfinite_logprob"
NONFINITE_NUMBER = "nonfinite_number"
TOKEN_OUT_OF_RANGE = "token_out_of_range"
INVALID_POLICY_VERSION = "invalid_policy_version"
# the body did not match the protocol's types (missing field, text where a number belongs, ...)
MALFORMED = "malformed"


@dataclass(frozen=True)
class Refusal:
    """Why one group was refused: the field (a JSON path such as ``scores[2]``) and a reason name."""

    field: str
    reason: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason, "detail": self.detail}


# Per-sequence fields: one row per sequence each. A mask must also be as long as its tokens.
# The rows of advantages and log-probs are not held to the token count here: the protocol's
# own tests send advantages one entry longer than the tokens and expect them queued, so their
# alignment is the trainer's to check (it rejects a misaligned group, counted, when converting).
_ROW_PER_SEQUENCE = {
    "masks": MASKS_LENGTH_MISMATCH,
    "advantages": ADVANTAGES_LENGTH_MISMATCH,
    "ref_logprobs": LOGPROBS_LENGTH_MISMATCH,
    "inference_logprobs": LOGPROBS_LENGTH_MISMATCH,
    "overrides": OVERRIDES_COUNT_MISMATCH,
}
_NONFINITE_REASON = {
    "scores": NONFINITE_SCORE,
    "advantages": NONFINITE_ADVANTAGE,
    "ref_logprobs": NONFINITE_LOGPROB,
    "inference_logprobs": NONFINITE_LOGPROB,
}


# Beyond this a number is infinite once the trainer casts it to float32.
FLOAT32_MAX = 3.4028234663852886e38


def check_group(
    group: dict[str, Any], vocab_size: int | None = None, max_group_size: int | None = None
) -> Refusal | None:
    """The first reason to refuse ``group`` (a parsed ScoredData as a dict), or ``None`` if it is sound.

    ``max_group_size``: the registered batch size, when a trainer registered; a larger group could
    never be put in a batch (groups are not split) and would hold up every batch behind it.
    """
    tokens = group["tokens"]
    size = len(tokens)
    if size == 0:
        return Refusal("tokens", EMPTY_GROUP, "the group has no sequences")
    if max_group_size is not None and size > max_group_size:
        return Refusal(
            "tokens", GROUP_TOO_LARGE, f"{size} sequences, more than the registered batch_size={max_group_size}"
        )
    if len(group["scores"]) != size:
        return Refusal("scores", SCORES_COUNT_MISMATCH, f"{len(group['scores'])} scores for {size} sequences")
    for key, reason in _ROW_PER_SEQUENCE.items():
        rows = group.get(key)
        if rows is not None and len(rows) != size:
            return Refusal(key, reason, f"{len(rows)} entries of '{key}' for {size} sequences")
    for i, (mask, token_row) in enumerate(zip(group["masks"], tokens)):
        if len(mask) != len(token_row):
            return Refusal(
                f"masks[{i}]", MASKS_LENGTH_MISMATCH, f"{len(mask)} mask entries for {len(token_row)} tokens"
            )
    for i, row in enumerate(tokens):
        for j, token in enumerate(row):
            if token < 0 or (vocab_size is not None and token >= vocab_size):
                bound = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
                return Refusal(f"tokens[{i}][{j}]", TOKEN_OUT_OF_RANGE, f"token id {token} is not in {bound}")
    version = group.get("policy_version")
    if version is not None and version < 0:
        return Refusal("policy_version", INVALID_POLICY_VERSION, f"{version} is negative")
    # every number must be finite, in float32 too: JSON cannot carry NaN or infinity back to the
    # trainer, and a value beyond float32's range turns into infinity there
    for key, value in group.items():
        path = _first_nonfinite(value, key)
        if path is not None:
            reason = _NONFINITE_REASON.get(key, NONFINITE_NUMBER)
            return Refusal(path, reason, "not a finite number (NaN, infinity, or beyond float32's range)")
    return None


def _first_nonfinite(value: Any, path: str) -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) and abs(value) <= FLOAT32_MAX else path
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _first_nonfinite(item, f"{path}[{i}]")
            if found is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _first_nonfinite(item, f"{path}.{key}")
            if found is not None:
                return found
    return None
