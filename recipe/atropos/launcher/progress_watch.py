"""Named early failure: a run whose environments train nothing stops within minutes, saying why.

Two signs, both configurable under ``services``:

* no step trained within ``first_step_timeout_s`` of the environments registering;
* ``max_rejected_batches`` batches in a row of which the trainer rejected every group.

Either way the launcher stops the run with a report, one line per environment, from what each
part saw: the gateway's count of that environment's requests by route and status code (it knows
an environment by the API key the launcher gives it), the env runner's status file (env_id,
groups posted, errors atroposlib logged and swallowed, the last one), and the trainer's
``batches.jsonl`` (groups fetched and rejected, by reason, with an example).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class EnvView:
    """Everything the launcher can see of one environment copy."""

    name: str
    env_id: int | None = None
    groups_posted: int | None = None
    errors_logged: int = 0
    last_error: str | None = None
    warnings_logged: int = 0
    last_warning: str | None = None
    requests: dict[str, int] = field(default_factory=dict)  # "POST /generate 200" -> count
    clamped: int = 0  # requests whose max_tokens the gateway cut to fit the context
    groups_fetched: int = 0
    rejected: Counter = field(default_factory=Counter)
    example: str | None = None

    def line(self) -> str:
        parts = [f"{self.name} (env_id {'?' if self.env_id is None else self.env_id})"]
        if self.requests:
            calls = ", ".join(f"{key} x{count}" for key, count in sorted(self.requests.items()))
            parts.append(f"gateway requests: {calls}")
        else:
            parts.append("gateway requests: none")
        if self.clamped:
            parts.append(f"max_tokens clamped to the context {self.clamped} times")
        parts.append(f"groups posted: {'?' if self.groups_posted is None else self.groups_posted}")
        parts.append(f"groups the trainer fetched: {self.groups_fetched}")
        if self.rejected:
            reasons = ", ".join(f"{reason} {count}" for reason, count in self.rejected.most_common())
            parts.append(f"rejected: {reasons} (e.g. {self.example})")
        if self.errors_logged:
            parts.append(f"errors the environment logged: {self.errors_logged}, the last: {self.last_error}")
        if self.warnings_logged:
            parts.append(f"warnings it logged: {self.warnings_logged}, the last: {self.last_warning}")
        return "; ".join(parts)


def read_batches(path: Path) -> list[dict]:
    """The trainer's ``batches.jsonl`` so far (a line still being written is left for next time)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def rejected_in_a_row(batches: list[dict]) -> int:
    """How many of the last batches in a row trained nothing."""
    count = 0
    for record in reversed(batches):
        if record.get("trained"):
            break
        count += 1
    return count


def read_status(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def gateway_stats(gateway_url: str | None) -> dict:
    """The gateway's ``GET /stats`` (requests by client, route and status), or {} if it does not answer."""
    if not gateway_url:
        return {}
    try:
        response = httpx.get(f"{gateway_url}/stats", timeout=5)
        return response.json() if response.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


def env_views(names: list[str], status_files: dict[str, Path], stats: dict, batches: list[dict]) -> list[EnvView]:
    """One view per environment copy, joined on its service name (gateway) and env_id (trainer)."""
    views = []
    by_env_id: dict[str, EnvView] = {}
    for name in names:
        status = read_status(status_files[name])
        view = EnvView(
            name=name,
            env_id=status.get("env_id"),
            groups_posted=status.get("groups_posted"),
            errors_logged=status.get("errors_logged", 0),
            last_error=status.get("last_error"),
            warnings_logged=status.get("warnings_logged", 0),
            last_warning=status.get("last_warning"),
            requests=dict(stats.get("requests", {}).get(name, {})),
            clamped=int(stats.get("max_tokens_clamped", {}).get(name, 0)),
        )
        views.append(view)
        if view.env_id is not None:
            by_env_id[str(view.env_id)] = view
    for record in batches:
        for env_id, count in record.get("groups", {}).items():
            if env_id in by_env_id:
                by_env_id[env_id].groups_fetched += count
        for env_id, reasons in record.get("rejected", {}).items():
            if env_id in by_env_id:
                by_env_id[env_id].rejected.update(reasons)
                by_env_id[env_id].example = record.get("example", {}).get(env_id, by_env_id[env_id].example)
    return views


def stall_report(cause: str, views: list[EnvView], stats: dict) -> str:
    lines = [cause, "what each environment did:"]
    lines += [f"  {view.line()}" for view in views]
    others = stats.get("requests", {})
    unknown = {client: calls for client, calls in others.items() if client not in {v.name for v in views}}
    for client, calls in sorted(unknown.items()):
        lines.append(f"  gateway requests from {client}: " + ", ".join(f"{k} x{n}" for k, n in sorted(calls.items())))
    return "\n".join(lines)


class ProgressWatch:
    """Decides when a run that trains nothing has waited long enough, and says why."""

    def __init__(self, first_step_timeout_s: float, max_rejected_batches: int, batches_file: Path):
        self.first_step_timeout_s = first_step_timeout_s
        self.max_rejected_batches = max_rejected_batches
        self.batches_file = batches_file

    def stall_cause(self, waited_s: float, steps_trained: int) -> str | None:
        """Why the run should stop now, or None; ``waited_s`` counts from the environments' registration."""
        batches = read_batches(self.batches_file)
        in_a_row = rejected_in_a_row(batches)
        if self.max_rejected_batches and in_a_row >= self.max_rejected_batches:
            return (
                f"the trainer rejected every group of {in_a_row} batches in a row "
                f"(services.max_rejected_batches={self.max_rejected_batches})"
            )
        if self.first_step_timeout_s and steps_trained == 0 and waited_s > self.first_step_timeout_s:
            return (
                f"no step trained within {self.first_step_timeout_s:.0f} s of the environments registering "
                f"(services.first_step_timeout_s); the trainer fetched {len(batches)} batch(es)"
            )
        return None
