"""Read the per-step metrics back from verl's console logger (``step:N - key:value - ...``)."""

from __future__ import annotations

import re

_METRIC = re.compile(r"([\w/.\-]+):(?:np\.float\d+\()?(-?[\d.]+(?:e[-+]?\d+)?|nan|inf)")


def parse_step_line(line: str, require_prefix: str = "atropos/") -> tuple[int, dict[str, float]] | None:
    """``(step, metrics)`` of one console line with a metric named ``require_prefix...``, else ``None``."""
    at = line.find("step:")
    if at < 0 or " - " not in line[at:]:
        return None
    fields = {key: float(value) for key, value in _METRIC.findall(line[at:])}
    if "step" not in fields or not any(key.startswith(require_prefix) for key in fields):
        return None
    return int(fields.pop("step")), fields


def parse_step_metrics(console: str, require_prefix: str = "atropos/") -> dict[int, dict[str, float]]:
    """Every step's metrics in a console log, as ``{step: {name: value}}``."""
    steps = {}
    for line in console.splitlines():
        parsed = parse_step_line(line, require_prefix)
        if parsed is not None:
            steps[parsed[0]] = parsed[1]
    return steps


def summary(step: int, metrics: dict[str, float], total_steps: int | None = None) -> str:
    """A one-line summary of a step: mean score overall and per environment, override share, time."""
    of = f"/{total_steps}" if total_steps else ""
    parts = [f"step {step}{of}", f"score_mean {metrics.get('atropos/score_mean', float('nan')):.3f}"]
    for name in sorted(metrics):
        if name.startswith("atropos/env/") and name.endswith("/score_mean"):
            parts.append(f"env {name.split('/')[2]} {metrics[name]:.3f}")
    if "atropos/override_fraction" in metrics:
        parts.append(f"override_fraction {metrics['atropos/override_fraction']:.2f}")
    if "atropos/groups_rejected" in metrics:
        parts.append(f"rejected {int(metrics['atropos/groups_rejected'])}")
    if "timing_s/step" in metrics:
        parts.append(f"{metrics['timing_s/step']:.1f} s")
    return " | ".join(parts)
