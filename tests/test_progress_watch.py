"""Named early failure: what the launcher reports when environments train nothing, and when it stops the run."""

from __future__ import annotations

import json

from recipe.atropos.launcher.progress_watch import ProgressWatch, env_views, rejected_in_a_row, stall_report
from recipe.atropos.trainer import batch as B
from recipe.atropos.trainer.batch_log import BatchLog


def rejected_batch(log: BatchLog, step: int, env_id: int) -> None:
    # the rejection the converter made of atroposlib's default group before empty lists meant absent
    rejection = B.Rejection(0, env_id, B.ADVANTAGES_LENGTH_MISMATCH, "0 entries of 'advantages' for 4 sequences")
    log.write(step, [env_id, env_id], [rejection, rejection], trained=False)


def test_k_wholly_rejected_batches_in_a_row_stop_the_run_naming_env_and_reason(tmp_path):
    log = BatchLog(str(tmp_path / "batches.jsonl"))
    watch = ProgressWatch(first_step_timeout_s=240, max_rejected_batches=3, batches_file=tmp_path / "batches.jsonl")
    log.write(1, [0, 1], [], trained=True)
    rejected_batch(log, 2, env_id=1)
    rejected_batch(log, 2, env_id=1)
    assert watch.stall_cause(waited_s=10, steps_trained=1) is None
    rejected_batch(log, 2, env_id=1)
    cause = watch.stall_cause(waited_s=10, steps_trained=1)
    assert cause.startswith("the trainer rejected every group of 3 batches in a row")

    (tmp_path / "blackjack_0.status.json").write_text(json.dumps({"env_id": 1, "groups_posted": 7}))
    (tmp_path / "gsm8k_0.status.json").write_text(json.dumps({"env_id": 0, "groups_posted": 2}))
    stats = {"requests": {"blackjack_0": {"POST /v1/chat/completions 200": 12}}, "max_tokens_clamped": {}}
    names = ["gsm8k_0", "blackjack_0"]
    views = env_views(names, {n: tmp_path / f"{n}.status.json" for n in names}, stats,
                      [json.loads(line) for line in (tmp_path / "batches.jsonl").read_text().splitlines()])
    report = stall_report(cause, views, stats)
    blackjack = next(line for line in report.splitlines() if "blackjack_0" in line)
    assert "(env_id 1)" in blackjack and "POST /v1/chat/completions 200 x12" in blackjack
    assert "groups posted: 7" in blackjack and "groups the trainer fetched: 7" in blackjack
    assert "rejected: advantages_length_mismatch 6" in blackjack and "0 entries of 'advantages'" in blackjack
    gsm8k = next(line for line in report.splitlines() if "gsm8k_0" in line)
    assert "gateway requests: none" in gsm8k and "groups the trainer fetched: 1" in gsm8k


def test_no_step_within_the_first_step_timeout_names_what_each_env_did(tmp_path):
    watch = ProgressWatch(first_step_timeout_s=60, max_rejected_batches=3, batches_file=tmp_path / "batches.jsonl")
    assert watch.stall_cause(waited_s=59, steps_trained=0) is None
    assert "no step trained within 60 s" in watch.stall_cause(waited_s=61, steps_trained=0)
    assert watch.stall_cause(waited_s=600, steps_trained=1) is None  # once a step trained, the limit is off
    # an env that swallowed every error: the status file says so
    status = {"env_id": 0, "groups_posted": 0, "errors_logged": 40,
              "last_error": "Failed to send 1 ScoredDataGroups: Object of type BatchEncoding is not JSON serializable"}
    (tmp_path / "blackjack_0.status.json").write_text(json.dumps(status))
    views = env_views(["blackjack_0"], {"blackjack_0": tmp_path / "blackjack_0.status.json"}, {}, [])
    line = views[0].line()
    assert "groups posted: 0" in line and "errors the environment logged: 40" in line and "BatchEncoding" in line


def test_limits_of_zero_never_stop(tmp_path):
    log = BatchLog(str(tmp_path / "batches.jsonl"))
    for step in range(5):
        rejected_batch(log, step, env_id=0)
    watch = ProgressWatch(first_step_timeout_s=0, max_rejected_batches=0, batches_file=tmp_path / "batches.jsonl")
    assert watch.stall_cause(waited_s=10_000, steps_trained=0) is None
    assert rejected_in_a_row([json.loads(x) for x in (tmp_path / "batches.jsonl").read_text().splitlines()]) == 5
