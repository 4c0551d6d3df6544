"""Metrics as data: what verl's file tracker writes is what the launcher, the plot script and tests read."""

from __future__ import annotations

import numpy as np
import pytest
from verl.utils.tracking import Tracking

from recipe.atropos.launcher.metrics_file import MetricsFollower, read_step_metrics, summary


@pytest.fixture
def tracker(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))  # as the trainer sets it from trainer.atropos.metrics_file
    tracking = Tracking(project_name="p", experiment_name="e", default_backend=["file"])
    yield tracking, path
    tracking.logger["file"].finish()


def test_steps_written_by_verls_file_tracker_are_read_back_as_they_come(tracker):
    tracking, path = tracker
    follower = MetricsFollower(path)
    tracking.log(data={"val-core/acc": 0.1}, step=0)  # validation before training: no atropos/ metric
    tracking.log(data={"atropos/score_mean": np.float32(0.25), "atropos/env/0/score_mean": 0.5,
                       "atropos/override_fraction": 1.0, "atropos/groups_rejected": 0, "timing_s/step": 1.5,
                       "actor/pg_loss": np.float64(-0.5)}, step=1)
    first = follower.new_steps()
    assert list(first) == [1]
    assert first[1]["actor/pg_loss"] == -0.5 and first[1]["atropos/env/0/score_mean"] == 0.5
    assert follower.new_steps() == {}  # each step once
    tracking.log(data={"atropos/score_mean": 0.75}, step=2)
    assert follower.new_steps() == {2: {"atropos/score_mean": 0.75}}
    assert sorted(read_step_metrics(path)) == [1, 2]
    assert sorted(read_step_metrics(path, require_prefix="val-core/")) == [0]
    line = summary(1, first[1], total_steps=5)
    assert line == "step 1/5 | score_mean 0.250 | env 0 0.500 | override_fraction 1.00 | rejected 0 | 1.5 s"


def test_a_half_written_line_waits_and_a_broken_one_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "data": {"atropos/score_mean": 0.5}}\n{"step": 2, "da')
    follower = MetricsFollower(path)
    assert list(follower.new_steps()) == [1]
    with open(path, "a") as file:
        file.write('ta": {"atropos/score_mean": 1.0}}\n')
    assert follower.new_steps() == {2: {"atropos/score_mean": 1.0}}
    path.write_text('{"step": 1, "data": {}}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_step_metrics(path)
