"""One JSON line per batch the trainer fetched: groups and rejections by environment (``atropos.batches_file``).

The launcher reads it to tell an environment whose every group is rejected from one that sends
nothing, and to name the reason; a person can read it too::

    {"step": 1, "trained": false, "groups": {"0": 2}, "rejected": {"0": {"advantages_length_mismatch": 2}},
     "example": {"0": "group 0 (env 0) rejected: advantages_length_mismatch: 0 entries of ..."}}

Environment ids are the trajectory API's (``-1``: a group that named none).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

from .batch import NO_ENV_ID, Rejection


def batch_record(step: int, env_ids: list[int | None], rejections: list[Rejection], trained: bool) -> dict:
    """The line for one fetched batch: groups per environment, rejections per environment and reason."""
    groups = Counter(str(NO_ENV_ID if env_id is None else env_id) for env_id in env_ids)
    rejected: dict[str, Counter] = {}
    example: dict[str, str] = {}
    for rejection in rejections:
        env = str(NO_ENV_ID if rejection.env_id is None else rejection.env_id)
        rejected.setdefault(env, Counter())[rejection.reason] += 1
        example.setdefault(env, str(rejection)[:400])
    return {
        "step": step,
        "time": time.time(),
        "trained": trained,
        "groups": dict(groups),
        "rejected": {env: dict(reasons) for env, reasons in rejected.items()},
        "example": example,
    }


class BatchLog:
    """Appends :func:`batch_record` lines to a file (flushed each time: the launcher reads it while we run)."""

    def __init__(self, path: str | None):
        self.path = Path(os.path.expanduser(path)) if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, env_ids: list[int | None], rejections: list[Rejection], trained: bool) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(batch_record(step, env_ids, rejections, trained)) + "\n")
