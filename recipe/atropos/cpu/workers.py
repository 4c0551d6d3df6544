"""verl's actor/rollout/ref worker, with its process group on gloo before verl builds one.

verl joins a process group with the backend ``cpu:gloo,<device>:<backend>``; on
the CPU platform that reads ``cpu:gloo,cpu:gloo``, which torch refuses. verl
skips that step when a default group exists, so this worker creates a plain gloo
group first from the rank variables Ray's worker group sets.
"""

from __future__ import annotations

import os

import torch.distributed
from verl.workers.engine_workers import ActorRolloutRefWorker

from ..trainer.actor_worker import StandaloneRolloutActorWorker


def init_gloo_process_group() -> None:
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend="gloo",
            rank=int(os.environ.get("RANK", 0)),
            world_size=int(os.environ.get("WORLD_SIZE", 1)),
        )


class CPUActorRolloutRefWorker(ActorRolloutRefWorker):
    def __init__(self, *args, **kwargs):
        init_gloo_process_group()
        super().__init__(*args, **kwargs)


class CPUStandaloneRolloutActorWorker(StandaloneRolloutActorWorker):
    """The disaggregated layout's actor on the CPU platform (see :mod:`..actor_worker`)."""

    def __init__(self, *args, **kwargs):
        init_gloo_process_group()
        super().__init__(*args, **kwargs)
