"""The figures of a throughput comparison, from each run's metrics file (verl's file-tracker JSONL).

    python benchmarks/compare_runs.py --ours OURS.jsonl --verl VERL.jsonl --verl-sequences-per-step 256

For each run, over steps 3 on (the first two carry start-up): the median step time
(``timing_s/step``), trained sequences per second (sequences trained / time spent in
those steps), the share of groups discarded as stale (``atropos/rejected/policy_lag_exceeded``
against all groups that reached the trainer), and the share of the step spent waiting for
the batch (ours: ``atropos/batch_wait_s``; verl's own GRPO has no wait, it generates:
``timing_s/gen`` is given instead). Colocated, ours generates while it waits, so its wait holds
its generation; the part of it in which the replicas had nothing to generate
(``atropos/batch_wait_idle_s``: environments scoring and posting, the API forming the batch) is
given apart. Step times depend on how long the responses are, and two runs' policies drift
apart, so the trained tokens per second (verl's ``perf/total_num_tokens``, prompts and
responses) and the mean response length are given too. So is how long one request took at
the replica, the median over the steps of each step's mean and slowest (ours:
``atropos/replica/request_s_mean`` and ``_max``, each choice one request; verl's:
``timing_s/agent_loop/generate_sequences/mean`` and ``/max``): the same engine answering
slower in one run points at the way requests reach it, not at pacing. Then the ratios ours / verl.

verl's own run does not log how many sequences a step trained: it is its
``data.train_batch_size`` x ``rollout.n``, given as ``--verl-sequences-per-step``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.atropos.launcher.metrics_file import read_step_metrics  # noqa: E402

FIRST_STEP = 3  # steps before this one include start-up (compilation, first weight sync)


@dataclass
class RunFigures:
    steps: int  # steps counted (FIRST_STEP on)
    median_step_s: float
    sequences_per_s: float
    stale_share: float | None  # None: the run has no staleness bound (verl's own)
    wait_share: float | None  # batch wait / step time; None for verl's own
    idle_wait_share: float | None  # batch wait with the replicas idle / step time; None: not logged
    gen_share: float | None  # verl's timing_s/gen / step time; None for ours
    tokens_per_s: float | None  # perf/total_num_tokens / step time; None: not logged
    mean_response_tokens: float | None  # mean of response_length/mean; None: not logged
    request_s: tuple[float, float] | None  # step medians of one request's mean and slowest time; None: not logged


# one request's time at the replica, mean and slowest of a step: ours', then verl's own
REQUEST_TIME_KEYS = (
    ("atropos/replica/request_s_mean", "atropos/replica/request_s_max"),
    ("timing_s/agent_loop/generate_sequences/mean", "timing_s/agent_loop/generate_sequences/max"),
)


def run_figures(path: str | Path, sequences_per_step: int | None = None) -> RunFigures:
    """The figures of one run; ``sequences_per_step`` for runs that do not log ``atropos/sequences``."""
    steps = {s: m for s, m in read_step_metrics(path, require_prefix="timing_s/").items() if s >= FIRST_STEP}
    if not steps:
        raise SystemExit(f"{path}: no step {FIRST_STEP} or later with timing_s/* metrics")
    step_s = [m["timing_s/step"] for m in steps.values()]
    ours = any("atropos/sequences" in m for m in steps.values())
    if ours:
        trained = sum(m.get("atropos/sequences", 0.0) for m in steps.values())
    elif sequences_per_step is not None:
        trained = sequences_per_step * len(steps)
    else:
        raise SystemExit(f"{path}: no atropos/sequences; give the run's sequences per step")
    stale = wait = idle_wait = gen = None
    if ours:
        rejected_stale = sum(m.get("atropos/rejected/policy_lag_exceeded", 0.0) for m in steps.values())
        reached = sum(m.get("atropos/groups", 0.0) + m.get("atropos/groups_rejected", 0.0) for m in steps.values())
        stale = rejected_stale / reached if reached else 0.0
        wait = sum(m.get("atropos/batch_wait_s", 0.0) for m in steps.values()) / sum(step_s)
        if all("atropos/batch_wait_idle_s" in m for m in steps.values()):
            idle_wait = sum(m["atropos/batch_wait_idle_s"] for m in steps.values()) / sum(step_s)
    else:
        gen = sum(m.get("timing_s/gen", 0.0) for m in steps.values()) / sum(step_s)
    tokens = response = None
    if all("perf/total_num_tokens" in m for m in steps.values()):
        tokens = sum(m["perf/total_num_tokens"] for m in steps.values()) / sum(step_s)
    if all("response_length/mean" in m for m in steps.values()):
        response = statistics.mean(m["response_length/mean"] for m in steps.values())
    request_s = None
    for mean_key, max_key in REQUEST_TIME_KEYS:
        if all(mean_key in m and max_key in m for m in steps.values()):
            request_s = (statistics.median(m[mean_key] for m in steps.values()),
                         statistics.median(m[max_key] for m in steps.values()))
            break
    return RunFigures(
        steps=len(steps),
        median_step_s=statistics.median(step_s),
        sequences_per_s=trained / sum(step_s),
        stale_share=stale,
        wait_share=wait,
        idle_wait_share=idle_wait,
        gen_share=gen,
        tokens_per_s=tokens,
        mean_response_tokens=response,
        request_s=request_s,
    )


def describe(label: str, figures: RunFigures) -> str:
    parts = [f"{label}: {figures.steps} steps", f"median step {figures.median_step_s:.2f} s",
             f"{figures.sequences_per_s:.2f} trained sequences/s"]
    if figures.stale_share is not None:
        parts.append(f"stale-discarded {100 * figures.stale_share:.1f} % of groups")
    if figures.wait_share is not None:
        parts.append(f"batch wait {100 * figures.wait_share:.1f} % of a step")
    if figures.idle_wait_share is not None:
        parts.append(f"batch wait with the replicas idle {100 * figures.idle_wait_share:.1f} % of a step")
    if figures.gen_share is not None:
        parts.append(f"generation {100 * figures.gen_share:.1f} % of a step")
    if figures.tokens_per_s is not None:
        parts.append(f"{figures.tokens_per_s:.0f} trained tokens/s")
    if figures.mean_response_tokens is not None:
        parts.append(f"responses {figures.mean_response_tokens:.0f} tokens on average")
    if figures.request_s is not None:
        parts.append(f"a request at the replica {figures.request_s[0]:.2f} s on average, "
                     f"the slowest {figures.request_s[1]:.2f} s (step medians)")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", type=Path, required=True, help="metrics file of the launcher's run")
    parser.add_argument("--verl", type=Path, help="metrics file of verl's own GRPO run")
    parser.add_argument("--verl-sequences-per-step", type=int, help="verl's data.train_batch_size x rollout.n")
    parser.add_argument("--label", default="", help="a prefix for the printed lines")
    args = parser.parse_args(argv)
    ours = run_figures(args.ours)
    print(describe(f"{args.label}ours", ours))
    if args.verl is None:
        return
    verl = run_figures(args.verl, args.verl_sequences_per_step)
    print(describe(f"{args.label}verl", verl))
    ratios = (f"{args.label}ratio ours/verl: step time {ours.median_step_s / verl.median_step_s:.3f}, "
              f"trained sequences/s {ours.sequences_per_s / verl.sequences_per_s:.3f}")
    if ours.tokens_per_s is not None and verl.tokens_per_s is not None:
        ratios += f", trained tokens/s {ours.tokens_per_s / verl.tokens_per_s:.3f}"
    print(ratios)


if __name__ == "__main__":
    main()
