"""Read the trainer's metrics as data: the JSONL verl's file tracker writes (``trainer.atropos.metrics_file``).

One line per logged step, ``{"step": N, "data": {"name": value, ...}}``. The launcher
follows the file while training runs; tests and ``scripts/plot_metrics.py`` read it whole.
"""

from __future__ import annotations

import json
from pathlib import Path

Steps = dict[int, dict[str, float]]


def _numbers(data: dict) -> dict[str, float]:
    return {key: float(value) for key, value in data.items() if isinstance(value, (int, float))}


def parse_lines(text: str, require_prefix: str = "atropos/") -> Steps:
    """``{step: metrics}`` of the complete JSONL lines in ``text`` that hold a metric named ``require_prefix...``.

    A step logged twice (validation before training, then the step) keeps both sets of keys.
    """
    steps: Steps = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step, data = int(record["step"]), record["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"metrics file line {number} is not a {{'step', 'data'}} record: {exc}") from exc
        steps.setdefault(step, {}).update(_numbers(data))
    return {step: data for step, data in steps.items() if any(key.startswith(require_prefix) for key in data)}


def read_step_metrics(path: str | Path, require_prefix: str = "atropos/") -> Steps:
    """Every training step's metrics in a metrics file, as ``{step: {name: value}}``."""
    return parse_lines(Path(path).read_text(), require_prefix)


class MetricsFollower:
    """Hands out each training step's metrics once, as the trainer appends them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._offset = 0

    def new_steps(self) -> Steps:
        """The steps whose lines were completed since the last call (none if the file is not there yet)."""
        try:
            with open(self.path, "rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return {}
        complete = chunk.rfind(b"\n") + 1
        self._offset += complete
        return parse_lines(chunk[:complete].decode(errors="replace"))


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
