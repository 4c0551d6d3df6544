"""The batch pipeline (convert -> staleness filter -> pad) and the metrics of a padded step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl.trainer.ppo.metric_utils import compute_data_metrics

from recipe.atropos.gateway.policy_versions import PolicyVersionLedger
from recipe.atropos.trainer import batch as B
from recipe.atropos.trainer.advantages import apply_atropos_advantages
from recipe.atropos.trainer.batch_pipeline import IS_PAD, convert_groups, pad_to_multiple, shape_batch
from recipe.atropos.trainer.metrics import atropos_metrics, data_metrics, real_rows
from recipe.atropos.trainer.staleness import POLICY_LAG_EXCEEDED, sequences_of
from tests.test_api_roundtrip import math_group, tool_group

UNIT = 16  # registered batch size: 4 groups of 4


def convert(groups):
    return convert_groups(groups, max_token_len=32, pad_token_id=0, require_advantages=False)


def shape(converted, ledger=None, actor_version=0, carried=None):
    return shape_batch(
        converted,
        ledger=ledger or PolicyVersionLedger(),
        actor_version=actor_version,
        max_policy_lag_steps=1,
        unit=UNIT,
        carried=carried,
    )


def merge(data):
    """The step's advantage stage without a KL penalty: rewards are the scores, then the merge."""
    data.batch["token_level_rewards"] = data.batch["token_level_scores"]
    return apply_atropos_advantages(data)


def one_group_rejected():
    """Four groups, one malformed: 12 real rows (one group with token-level advantages) and 4 of padding."""
    bad = math_group(0, seed=2)
    bad["scores"] = bad["scores"][:2]
    return [math_group(0, seed=0), bad, math_group(0, seed=1), tool_group(1)]


def test_a_padded_step_counts_only_real_rows_in_its_metrics():
    shaped = shape(convert(one_group_rejected()))
    assert len(shaped.data) == UNIT
    assert shaped.data.batch[IS_PAD].tolist() == [False] * 12 + [True] * 4
    trained = merge(shaped.data)

    metrics = atropos_metrics(shaped, trained, batch_wait_s=0.5)
    real_scores = [1.0, 0.0, 0.0, 0.5] + [1.0, 0.0, 0.0, 1.0] + [0.0, 1.0, 0.0, 1.0]
    assert metrics["atropos/sequences"] == 12
    assert metrics["atropos/pad_sequences"] == 4
    assert metrics["atropos/groups"] == 3
    assert metrics["atropos/groups_rejected"] == 1
    assert metrics[f"atropos/rejected/{B.SCORES_COUNT_MISMATCH}"] == 1
    # the tool group's 4 sequences took their advantages from Atropos: 4 of 12 real rows
    assert metrics["atropos/override_fraction"] == pytest.approx(4 / 12)
    assert metrics["atropos/score_mean"] == pytest.approx(np.mean(real_scores))

    # verl's data metrics over the 12 real rows; over all 16 the zero-scored pad rows pull the mean down
    verl_metrics = data_metrics(trained)
    assert verl_metrics["critic/score/mean"] == pytest.approx(np.mean(real_scores))
    padded = compute_data_metrics(batch=trained, use_critic=False)
    assert padded["critic/score/mean"] == pytest.approx(sum(real_scores) / UNIT)
    response_width = trained.batch["responses"].shape[1]
    real_lengths = real_rows(trained).batch["attention_mask"][:, -response_width:].sum(-1).float()
    assert verl_metrics["response_length/mean"] == pytest.approx(real_lengths.mean().item())


def test_pad_rows_train_nothing_and_form_groups_of_their_own():
    shaped = shape(convert(one_group_rejected()))
    pad = shaped.data.batch[IS_PAD]
    assert shaped.data.batch["response_mask"][pad].sum() == 0
    assert shaped.data.batch["token_level_scores"][pad].sum() == 0
    uids = shaped.data.non_tensor_batch["uid"]
    assert len(set(uids[pad.numpy()])) == 4 and not set(uids[pad.numpy()]) & set(uids[~pad.numpy()])
    advantages = merge(shaped.data).batch["advantages"]
    assert advantages[pad].abs().sum() == 0


def test_the_pad_mask_follows_the_rows_when_verl_reorders_them():
    shaped = shape(convert(one_group_rejected()))
    trained = merge(shaped.data)
    before = atropos_metrics(shaped, trained, batch_wait_s=0.0)
    trained.reorder(torch.randperm(len(trained)))  # what verl's balance_batch does
    after = atropos_metrics(shaped, trained, batch_wait_s=0.0)
    assert after["atropos/override_fraction"] == before["atropos/override_fraction"]
    assert after["atropos/score_mean"] == pytest.approx(before["atropos/score_mean"])
    assert data_metrics(trained)["critic/score/mean"] == pytest.approx(before["atropos/score_mean"])


def test_a_full_batch_gets_no_padding_and_padding_leaves_its_input_untouched():
    converted = convert([math_group(0, seed) for seed in range(4)])
    shaped = shape(converted)
    assert len(shaped.data) == UNIT and shaped.num_pad_rows == 0
    assert IS_PAD not in converted.data.batch.keys()  # stage 3 builds a new batch
    short = convert([math_group(0, 0)]).data
    padded = pad_to_multiple(short, UNIT)
    assert len(short) == 4 and IS_PAD not in short.batch.keys() and len(padded) == UNIT


def test_rejections_of_a_wholly_rejected_batch_are_reported_with_the_next_trained_step():
    ledger = PolicyVersionLedger()
    stale = convert([math_group(0, seed) for seed in (5, 6)])
    for tokens in sequences_of(stale.data):
        ledger.record(tokens, 0)  # generated by the initial weights
    nothing = shape(stale, ledger=ledger, actor_version=3)
    assert nothing.data is None
    assert [r.reason for r in nothing.rejections] == [POLICY_LAG_EXCEEDED] * 2

    shaped = shape(convert(one_group_rejected()), ledger=ledger, actor_version=3, carried=nothing)
    assert shaped.num_groups == 6
    assert [r.reason for r in shaped.rejections] == [POLICY_LAG_EXCEEDED] * 2 + [B.SCORES_COUNT_MISMATCH]
    metrics = atropos_metrics(shaped, merge(shaped.data), batch_wait_s=0.0)
    assert metrics["atropos/groups"] == 3
    assert metrics["atropos/groups_rejected"] == 3
    assert metrics[f"atropos/rejected/{POLICY_LAG_EXCEEDED}"] == 2
