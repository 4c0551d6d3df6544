"""verl's actor worker for the disaggregated layout, where the policy is served from other GPUs.

With ``actor_rollout_ref.hybrid_engine=false`` the inference replicas run standalone
in their own resource pool and take the actor's weights through verl's checkpoint
engine (nccl), so the actor's workers must not build an inference engine of their own.
verl's ``ActorRolloutRefWorker`` builds one wherever its role names a rollout, and its
only spelling of a fused actor and reference policy is ``actor_rollout_ref``; this
worker keeps verl's checks on that role and then drops the rollout part of it.
"""

from __future__ import annotations

from verl.workers.engine_workers import ActorRolloutRefWorker


def without_rollout(role: str) -> str:
    """``actor_rollout_ref`` -> ``actor_ref``, ``actor_rollout`` -> ``actor``."""
    return role.replace("_rollout", "")


class StandaloneRolloutActorWorker(ActorRolloutRefWorker):
    def __init__(self, config, role: str, **kwargs):
        super().__init__(config, role, **kwargs)
        self.role = without_rollout(role)
