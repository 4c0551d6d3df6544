"""Per-step figures of a run from its metrics file: a PNG of the mean environment score and
``atropos/override_fraction``, and the step-time table against verl's own GRPO.

    python scripts/plot_metrics.py --ours RUN/metrics.jsonl --native native_metrics.jsonl --png docs/results_smollm2.png

Both files are verl's file-tracker JSONL: the launcher writes ``<run dir>/metrics.jsonl``;
verl's own run writes one with ``trainer.logger='["console","file"]'`` and
``VERL_FILE_LOGGER_PATH`` (``benchmarks/gpu_compare.sh`` sets both).

With ``--learning LABEL=FILE ...`` it compares runs instead: the mean score of the sampled
responses per step (verl's ``critic/score/mean``, which every run logs, ours on the trained rows
only) in one figure, the means of the first and last five steps, and the held-out accuracy
(verl's ``val-core/*/acc/mean@1``) where a run validated:

    python scripts/plot_metrics.py --learning ours=RUN/metrics.jsonl verl=native_metrics.jsonl --png score.png

Step time is verl's ``timing_s/step``; the median skips the first two steps (start-up).
The integration's own share of a step is the time the step waited for its batch
(``atropos/batch_wait_s``) plus the advantage merge (``timing_s/adv``); fetching and
converting the next batch run in a background thread (``atropos/fetch_s``, ``atropos/convert_s``).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from recipe.atropos.launcher.metrics_file import read_step_metrics


def median_after(steps: dict[int, dict], key: str, skip: int = 2) -> float:
    values = [m[key] for s, m in sorted(steps.items()) if s > skip and key in m]
    return statistics.median(values) if values else float("nan")


SCORE = "critic/score/mean"


def held_out_accuracy(steps: dict[int, dict]) -> dict[int, float]:
    """``{step: accuracy}`` of each validation in a run (verl's ``val-core/<source>/acc/mean@1``)."""
    return {
        step: value for step, metrics in sorted(steps.items())
        for key, value in metrics.items() if key.startswith("val-core/") and key.endswith("/acc/mean@1")
    }


def compare_learning(runs: list[str], png: Path | None) -> None:
    """The score per step of several runs (``LABEL=FILE`` each), as a table and one figure."""
    curves = {}
    for run in runs:
        label, _, path = run.partition("=")
        if not path:
            raise SystemExit(f"--learning {run!r}: give LABEL=FILE")
        steps = read_step_metrics(path, require_prefix="")
        curves[label] = {step: m[SCORE] for step, m in steps.items() if SCORE in m}
        scores = [curves[label][s] for s in sorted(curves[label])]
        if not scores:
            raise SystemExit(f"{path}: no step logs {SCORE}")
        first, last = scores[:5], scores[-5:]
        accuracy = ", ".join(f"step {s}: {a:.3f}" for s, a in held_out_accuracy(steps).items()) or "not validated"
        print(f"{label}: {len(scores)} steps; mean score of the first 5 {sum(first) / len(first):.3f}, "
              f"of the last 5 {sum(last) / len(last):.3f}; held-out accuracy {accuracy}")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, axis = plt.subplots(figsize=(7, 4))
        for label, curve in curves.items():
            axis.plot(sorted(curve), [curve[s] for s in sorted(curve)], marker="o", label=label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
        axis.set_xlabel("step")
        axis.set_ylabel("mean score of the sampled responses")
        axis.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--learning", nargs="+", metavar="LABEL=FILE", help="compare the score per step of runs")
    parser.add_argument("--ours", type=Path, help="metrics file of this project's run")
    parser.add_argument("--native", type=Path, help="metrics file of verl's own GRPO run")
    parser.add_argument("--png", type=Path, help="where to write the plot")
    args = parser.parse_args()
    if args.learning:
        compare_learning(args.learning, args.png)
        return
    if args.ours is None:
        parser.error("give --ours (or --learning)")

    ours = read_step_metrics(args.ours)
    if not ours:
        raise SystemExit(f"{args.ours}: no step metrics found")
    native = read_step_metrics(args.native, require_prefix="timing_s/") if args.native else {}
    print(f"steps: ours {len(ours)}, native {len(native)}")
    env_keys = sorted({k for m in ours.values() for k in m if k.startswith("atropos/env/")})
    print("| step | score_mean | " + " | ".join(env_keys) + " | override_fraction | step s |")
    for step, m in sorted(ours.items()):
        envs = " | ".join(f"{m.get(k, float('nan')):.3f}" for k in env_keys)
        print(f"| {step} | {m.get('atropos/score_mean', float('nan')):.3f} | {envs} | "
              f"{m.get('atropos/override_fraction', float('nan')):.2f} | {m.get('timing_s/step', float('nan')):.2f} |")
    step_ours = median_after(ours, "timing_s/step")
    print(f"median step time after step 2, ours: {step_ours:.2f} s")
    for key in ("atropos/batch_wait_s", "timing_s/adv", "timing_s/update_actor", "timing_s/old_log_prob",
                "timing_s/update_weights", "timing_s/pause_rollout", "atropos/fetch_s", "atropos/convert_s"):
        print(f"  median {key}: {median_after(ours, key):.4f}")
    share = (median_after(ours, "atropos/batch_wait_s") + median_after(ours, "timing_s/adv")) / step_ours
    print(f"integration share of the step (batch wait + merge): {100 * share:.2f} %")
    if native:
        step_native = median_after(native, "timing_s/step")
        print(
            f"median step time after step 2, native: {step_native:.2f} s; "
            f"ratio ours/native: {step_ours / step_native:.3f}"
        )
        for key in ("timing_s/gen", "timing_s/update_actor", "timing_s/old_log_prob", "timing_s/update_weights"):
            print(f"  native median {key}: {median_after(native, key):.4f}")

    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = sorted(ours)
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        top.plot(steps, [ours[s].get("atropos/score_mean", float("nan")) for s in steps], marker="o", label="all")
        for key in env_keys:
            values = [ours[s].get(key, float("nan")) for s in steps]
            top.plot(steps, values, marker=".", label=f"env {key.split('/')[2]}")
        top.set_ylabel("mean env score")
        top.legend()
        override = [ours[s].get("atropos/override_fraction", float("nan")) for s in steps]
        bottom.plot(steps, override, marker="o", color="tab:green")
        bottom.set_ylabel("override_fraction")
        bottom.set_xlabel("step")
        bottom.set_ylim(-0.05, 1.05)
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
