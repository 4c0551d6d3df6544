"""benchmarks/compare_runs.py: the comparison's figures from two metrics files, as verl's file tracker writes them."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare_runs.py"
compare_runs = runpy.run_path(str(SCRIPT))


def write_run(path: Path, steps: list[dict]) -> Path:
    with path.open("w") as file:
        for step, data in enumerate(steps, start=1):
            file.write(json.dumps({"step": step, "data": data}) + "\n")
    return path


def ours_step(step_s: float, sequences: float, wait_s: float, groups: float, stale: float) -> dict:
    return {"timing_s/step": step_s, "atropos/sequences": sequences, "atropos/batch_wait_s": wait_s,
            "atropos/batch_wait_idle_s": wait_s / 2, "atropos/groups": groups, "atropos/groups_rejected": stale,
            "atropos/rejected/policy_lag_exceeded": stale}


def test_figures_count_steps_three_on(tmp_path):
    # steps 1-2 (start-up) are far off and must not count
    figures_input = [
        ours_step(100, 8, 90, 2, 9), ours_step(50, 8, 40, 2, 9),
        ours_step(10, 8, 1, 2, 0), ours_step(12, 8, 3, 2, 2), ours_step(14, 4, 2, 1, 0),
    ]
    ours = write_run(tmp_path / "ours.jsonl", figures_input)
    figures = compare_runs["run_figures"](ours)
    assert figures.steps == 3
    assert figures.median_step_s == 12
    assert figures.sequences_per_s == pytest.approx(20 / 36)
    assert figures.stale_share == pytest.approx(2 / 7)  # 2 stale of 5 trained + 2 rejected groups
    assert figures.wait_share == pytest.approx(6 / 36)
    assert figures.idle_wait_share == pytest.approx(3 / 36)
    assert figures.gen_share is None
    assert figures.tokens_per_s is figures.mean_response_tokens is None  # not logged here
    # runs that did not log the idle part of the wait show none, rather than 0
    for step in (3, 4, 5):
        del figures_input[step - 1]["atropos/batch_wait_idle_s"]
    assert compare_runs["run_figures"](write_run(tmp_path / "old.jsonl", figures_input)).idle_wait_share is None


def test_verl_runs_need_their_sequences_per_step_and_the_ratios_are_printed(tmp_path):
    # a run whose responses are half as long trains fewer tokens a second at a faster step
    ours = write_run(tmp_path / "ours.jsonl", [
        {**ours_step(10, 8, 0, 2, 0), "perf/total_num_tokens": 1000.0, "response_length/mean": 50.0,
         "atropos/replica/request_s_mean": mean, "atropos/replica/request_s_max": 2 * mean}
        for mean in (9.0, 9.0, 1.0, 1.5, 2.0)])
    verl_step = {"timing_s/step": 8.0, "timing_s/gen": 2.0, "perf/total_num_tokens": 1600.0,
                 "response_length/mean": 100.0, "timing_s/agent_loop/generate_sequences/mean": 0.75,
                 "timing_s/agent_loop/generate_sequences/max": 1.75}
    verl = write_run(tmp_path / "verl.jsonl", [verl_step] * 4)
    with pytest.raises(SystemExit, match="sequences per step"):
        compare_runs["run_figures"](verl)
    figures = compare_runs["run_figures"](verl, sequences_per_step=8)
    assert (figures.median_step_s, figures.sequences_per_s, figures.gen_share) == (8.0, 1.0, 0.25)
    printed = subprocess.run(
        [sys.executable, str(SCRIPT), "--ours", str(ours), "--verl", str(verl), "--verl-sequences-per-step", "8"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout
    assert "ratio ours/verl: step time 1.250, trained sequences/s 0.800, trained tokens/s 0.500" in printed
    assert "100 trained tokens/s, responses 50 tokens on average" in printed
    # one request's time at the replica: step medians from step 3 on, ours' and verl's agent loop's
    assert "a request at the replica 1.50 s on average, the slowest 3.00 s (step medians)" in printed
    assert "a request at the replica 0.75 s on average, the slowest 1.75 s (step medians)" in printed
