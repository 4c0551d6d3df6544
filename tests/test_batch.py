"""groups_to_dataproto: layout of the converted batch and every rejection reason."""

from __future__ import annotations

import math

import pytest
import torch

from recipe.atropos.trainer import batch as B
from recipe.atropos.trainer.batch import groups_to_dataproto

PAD = 0


VOCAB = 259  # the tiny test model's
BATCH = 8  # registered batch size, in sequences


def convert(groups, max_token_len=64, require_advantages=False):
    return groups_to_dataproto(
        groups,
        max_token_len=max_token_len,
        pad_token_id=PAD,
        require_advantages=require_advantages,
        vocab_size=VOCAB,
        max_group_size=BATCH,
    )


def tool_use_group() -> dict:
    """Prompt [11 12 13], answer [21 22], tool output [31 32] (not trained), answer [23 24]."""
    tokens = [11, 12, 13, 21, 22, 31, 32, 23, 24]
    mask = [-100, -100, -100, 21, 22, -100, -100, 23, 24]
    return {
        "tokens": [tokens, tokens[:5]],
        "masks": [mask, mask[:5]],
        "scores": [1.0, -1.0],
        "advantages": [[0.0, 0, 0, 0.1, 0.2, 9, 9, 0.3, 0.4], [0.0, 0, 0, 0.5, 0.6]],
        "inference_logprobs": [[1.0, 1, 1, -0.1, -0.2, 1, 1, -0.3, -0.4], [1.0, 1, 1, -0.5, -0.6]],
        "overrides": [{"set_advantage_to_zero": True}, {"note": "kept"}],
        "env_id": 3,
    }


def plain_group(prompt_len=1, env_id=None) -> dict:
    prompt = list(range(100, 100 + prompt_len))
    return {
        "tokens": [prompt + [7, 8], prompt + [9]],
        "masks": [[-100] * prompt_len + [7, 8], [-100] * prompt_len + [9]],
        "scores": [0.0, 1.0],
        "env_id": env_id,
    }


def test_prompt_response_split_padding_and_multi_region_mask():
    result = convert([tool_use_group(), plain_group(prompt_len=1)])
    assert result.rejections == []
    batch = result.data.batch
    # prompt width 3 (left-padded), response width 6 (right-padded)
    assert batch["prompts"].tolist() == [[11, 12, 13], [11, 12, 13], [PAD, PAD, 100], [PAD, PAD, 100]]
    assert batch["responses"].tolist() == [
        [21, 22, 31, 32, 23, 24],
        [21, 22, PAD, PAD, PAD, PAD],
        [7, 8, PAD, PAD, PAD, PAD],
        [9, PAD, PAD, PAD, PAD, PAD],
    ]
    assert torch.equal(batch["input_ids"], torch.cat([batch["prompts"], batch["responses"]], dim=1))
    assert batch["attention_mask"].tolist()[0] == [1] * 9
    assert batch["attention_mask"].tolist()[2] == [0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert batch["position_ids"].tolist()[2] == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    # the tool-output span is attended to but not trained
    assert batch["response_mask"].tolist() == [
        [1, 1, 0, 0, 1, 1],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
    ]


def test_score_sits_on_the_last_trained_token():
    batch = convert([tool_use_group(), plain_group()]).data.batch
    scores = batch["token_level_scores"]
    assert scores[0].tolist() == [0, 0, 0, 0, 0, 1.0]
    assert scores[1].tolist() == [0, -1.0, 0, 0, 0, 0]
    assert scores[3].tolist() == [1.0, 0, 0, 0, 0, 0]
    assert batch[B.SCORES].tolist() == [1.0, -1.0, 0.0, 1.0]


def test_advantages_and_logprobs_are_cut_to_the_response_and_masked():
    result = convert([tool_use_group()])
    batch = result.data.batch
    expected = torch.tensor([[0.1, 0.2, 0, 0, 0.3, 0.4], [0.5, 0.6, 0, 0, 0, 0]])
    torch.testing.assert_close(batch[B.ATROPOS_ADVANTAGES], expected)
    assert batch[B.HAS_ATROPOS_ADVANTAGES].tolist() == [True, True]
    expected = torch.tensor([[-0.1, -0.2, 0, 0, -0.3, -0.4], [-0.5, -0.6, 0, 0, 0, 0]])
    torch.testing.assert_close(batch["rollout_log_probs"], expected)


def test_logprobs_are_left_out_unless_every_sequence_has_them():
    result = convert([tool_use_group(), plain_group()])
    assert "rollout_log_probs" not in result.data.batch.keys()
    assert result.data.batch[B.HAS_ATROPOS_ADVANTAGES].tolist() == [True, True, False, False]


def test_one_uid_per_group_env_ids_and_overrides_kept():
    result = convert([tool_use_group(), plain_group(env_id=None), plain_group(env_id=5)])
    data = result.data
    uids = data.non_tensor_batch["uid"]
    assert uids[0] == uids[1] != uids[2] == uids[3] != uids[4] == uids[5]
    assert len(set(uids)) == 3
    assert data.non_tensor_batch[B.ENV_ID].tolist() == [3, 3, B.NO_ENV_ID, B.NO_ENV_ID, 5, 5]
    assert data.non_tensor_batch[B.OVERRIDES][1] == {"note": "kept"}
    assert data.non_tensor_batch[B.OVERRIDES][2] is None
    assert data.batch[B.ZERO_ADVANTAGE].tolist() == [True, False, False, False, False, False]


def test_batch_of_only_rejected_groups_has_no_data():
    result = convert([{"tokens": [], "masks": [], "scores": []}])
    assert result.data is None
    assert result.num_groups == 1
    assert result.rejected_by_reason == {B.EMPTY_GROUP: 1}


def with_changes(**changes) -> dict:
    group = tool_use_group()
    for key, value in changes.items():
        if value is _DELETE:
            del group[key]
        else:
            group[key] = value
    return group


_DELETE = object()
T, M = tool_use_group()["tokens"], tool_use_group()["masks"]

REJECTIONS = [
    (B.EMPTY_GROUP, with_changes(tokens=[], masks=[], scores=[], advantages=_DELETE, inference_logprobs=_DELETE, overrides=_DELETE), "no sequences"),
    (B.SCORES_COUNT_MISMATCH, with_changes(scores=[1.0]), "1 scores for 2 sequences"),
    (B.MASKS_LENGTH_MISMATCH, with_changes(masks=[M[0]]), "1 masks for 2 sequences"),
    (B.MASKS_LENGTH_MISMATCH, with_changes(masks=[M[0], M[1][:-1]]), "sequence 1: 5 tokens but 4 mask entries"),
    (B.ADVANTAGES_LENGTH_MISMATCH, with_changes(advantages=[[0.0] * 9, [0.0] * 4]), "sequence 1: 5 tokens but 4 advantages"),
    (B.ADVANTAGES_LENGTH_MISMATCH, with_changes(advantages=[[0.0] * 9]), "1 entries of 'advantages' for 2"),
    (B.LOGPROBS_LENGTH_MISMATCH, with_changes(inference_logprobs=[[0.0] * 9, [0.0] * 6]), "5 tokens but 6 inference_logprobs"),
    (B.OVERRIDES_COUNT_MISMATCH, with_changes(overrides=[{}]), "1 entries of 'overrides'"),
    (B.NONFINITE_SCORE, with_changes(scores=[1.0, math.nan]), "sequence 1: score nan"),
    (B.NONFINITE_SCORE, with_changes(scores=[math.inf, 1.0]), "sequence 0: score inf"),
    (B.NONFINITE_ADVANTAGE, with_changes(advantages=[[0.0] * 8 + [math.nan], [0.0] * 5]), "sequence 0, position 8"),
    (B.NONFINITE_ADVANTAGE, with_changes(advantages=[[0.0] * 9, [0.0] * 3 + [-math.inf, 0]]), "sequence 1, position 3"),
    (B.NONFINITE_LOGPROB, with_changes(inference_logprobs=[[0.0] * 9, [0.0] * 4 + [math.nan]]), "sequence 1, position 4"),
    (B.INVALID_MASK_VALUE, with_changes(masks=[M[0], [-100, -100, -100, 21, 99]]), "position 4: mask 99 is neither -100 nor the token 22"),
    (B.INVALID_MASK_VALUE, with_changes(masks=[M[0], [-100, -100, -100, 21, 0]]), "mask 0"),
    (B.NO_TRAINED_TOKEN, with_changes(masks=[M[0], [-100] * 5]), "sequence 1: every mask entry is -100"),
    (B.NO_PROMPT, with_changes(masks=[M[0], T[1]]), "position 0 is trained"),
    (B.TOO_LONG, with_changes(tokens=[T[0] + [1] * 60, T[1]], masks=[M[0] + [1] * 60, M[1]], advantages=_DELETE, inference_logprobs=_DELETE), "69 tokens, more than the registered max_token_len=64"),
    (B.NONFINITE_SCORE, with_changes(scores=[1e39, 1.0]), "sequence 0: score, beyond float32's range, 1e+39"),
    (B.NONFINITE_SCORE, with_changes(scores=[3e38, 3e38]), "overflows float32"),
    (B.NONFINITE_ADVANTAGE, with_changes(advantages=[[0.0] * 9, [0.0] * 4 + [1e39]]), "sequence 1, position 4: advantage inf"),
    (B.NONFINITE_LOGPROB, with_changes(inference_logprobs=[[0.0] * 9, [0.0] * 3 + [-1e39, 0]]), "sequence 1, position 3"),
    (B.TOKEN_OUT_OF_VOCAB, with_changes(tokens=[T[0], T[1][:4] + [5000]], masks=[M[0], M[1][:4] + [5000]]), "sequence 1, position 4: token id 5000 is outside the policy's vocabulary [0, 259)"),
    (B.TOKEN_OUT_OF_VOCAB, with_changes(tokens=[[-1] + T[0][1:], T[1]]), "sequence 0, position 0: token id -1"),
    (B.TOKEN_OUT_OF_VOCAB, with_changes(tokens=[T[0], T[1][:4] + [VOCAB]], masks=[M[0], M[1][:4] + [VOCAB]]), "token id 259"),
    (B.GROUP_TOO_LARGE, {"tokens": [T[1]] * 1000, "masks": [M[1]] * 1000, "scores": [0.0] * 1000, "env_id": None}, "1000 sequences, more than the registered batch_size=8"),
    (B.GROUP_TOO_LARGE, {"tokens": [T[1]] * 9, "masks": [M[1]] * 9, "scores": [0.0] * 9, "env_id": 77}, "9 sequences"),
    (B.MALFORMED, "not a group", "must be a JSON object"),
    (B.MALFORMED, with_changes(tokens=None), "must be lists"),
    (B.MALFORMED, with_changes(tokens=[T[0], ["a", "b", "c", "d", "e"]]), "sequence 1: 'tokens' must be integers"),
    (B.MALFORMED, with_changes(tokens=[T[0], T[1][:4] + [22.5]]), "sequence 1: 'tokens' must be integers, got float64"),
    (B.MALFORMED, with_changes(tokens=[T[0], [1, [2], 3, 4, 5]]), "ValueError"),
    (B.MALFORMED, with_changes(tokens=[T[0], [[1], [2], [3], [4], [5]]]), "flat list of integers"),
    (B.MALFORMED, with_changes(overrides=["zero", {}]), "an override must be an object"),
    (B.MALFORMED, with_changes(env_id="three"), "'env_id' must be an integer"),
]


@pytest.mark.parametrize("reason, bad_group, detail", REJECTIONS, ids=[f"{r[0]}-{i}" for i, r in enumerate(REJECTIONS)])
def test_every_rejection_is_named_counted_and_the_good_groups_survive(reason, bad_group, detail):
    result = convert([plain_group(env_id=1), bad_group, plain_group(env_id=2)])
    assert [r.reason for r in result.rejections] == [reason]
    rejection = result.rejections[0]
    assert rejection.group_index == 1
    assert detail in rejection.detail, rejection.detail
    assert detail in str(rejection)
    # training goes on with the valid groups
    assert result.data.batch["input_ids"].shape[0] == 4
    assert result.data.non_tensor_batch[B.ENV_ID].tolist() == [1, 1, 2, 2]


def test_missing_advantages_is_a_rejection_only_without_fallback():
    assert convert([plain_group()], require_advantages=False).rejections == []
    result = convert([plain_group(), tool_use_group()], require_advantages=True)
    assert [(r.group_index, r.reason) for r in result.rejections] == [(0, B.MISSING_ADVANTAGES)]
    assert "trainer.atropos.fallback_to_grpo=false" in result.rejections[0].detail
    assert result.data.batch["input_ids"].shape[0] == 2


def test_nonfinite_values_outside_trained_positions_are_harmless():
    group = tool_use_group()
    group["advantages"][0][0] = math.nan  # a prompt position
    group["inference_logprobs"][0][5] = math.inf  # inside the tool-output span
    result = convert([group])
    assert result.rejections == []
    assert torch.isfinite(result.data.batch[B.ATROPOS_ADVANTAGES]).all()
    assert torch.isfinite(result.data.batch["rollout_log_probs"]).all()


def test_every_named_reason_is_listed():
    tested = {reason for reason, _, _ in REJECTIONS} | {B.MISSING_ADVANTAGES}
    assert tested == set(B.REJECTION_REASONS)


def test_limits_are_inclusive_and_optional():
    # the largest id in the vocabulary, and a group exactly the registered batch size, are fine
    top = VOCAB - 1
    full = {"tokens": [[1, top]] * BATCH, "masks": [[-100, top]] * BATCH, "scores": [3e37] * BATCH}
    assert convert([full]).rejections == []
    # without the trainer's limits the converter checks neither
    unbounded = groups_to_dataproto([{**full, "tokens": [[1, 5000]] * 9, "masks": [[-100, 5000]] * 9,
                                      "scores": [0.0] * 9}], max_token_len=64, pad_token_id=PAD)
    assert unbounded.rejections == []
