"""CPU backend for tests and laptops: a verl platform, a rollout backend, and the glue to load them.

GPU runs use vLLM; this backend lets the same trainer run where there is no GPU.
verl imports this package in every process (driver, Ray workers, server actors)
when ``VERL_USE_EXTERNAL_MODULES=recipe.atropos.cpu.register``, and that variable can
only name a module to import: registering is this module's one job, so importing it
calls :func:`register`, which registers:

* the ``cpu`` platform (select it with ``VERL_PLATFORM=cpu``): tensors on the CPU,
  collectives on gloo;
* verl's FSDP engine for the ``cpu`` device (verl registers it for cuda and npu only);
* the ``cpu`` rollout (``actor_rollout_ref.rollout.name=cpu``): a transformers model
  served over HTTP like vLLM's OpenAI server, fed by verl's own weight sync;
* the ``object_store`` checkpoint engine
  (``actor_rollout_ref.rollout.checkpoint_engine.backend=object_store``): the weight
  sync of verl's disaggregated layout over Ray's object store, where GPUs use nccl.

``recipe/atropos/config/atropos_grpo_cpu.yaml`` sets all of this up.
"""

from __future__ import annotations

from verl.checkpoint_engine.base import CheckpointEngineRegistry
from verl.plugin.platform import PlatformRegistry
from verl.workers.rollout import base as _rollout_base
from verl.workers.rollout.replica import RolloutReplicaRegistry

from .cpu_platform import PlatformCPU
from .object_store_engine import BACKEND as OBJECT_STORE_BACKEND
from .object_store_engine import ObjectStoreCheckpointEngine

ROLLOUT_NAME = "cpu"
PLATFORM_NAME = "cpu"


def _load_replica():
    from .replica import CPURolloutReplica

    return CPURolloutReplica


def _register_engine() -> None:
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    registered = EngineRegistry._engines.get("language_model", {}).get("fsdp2", {})
    if "cpu" not in registered:
        EngineRegistry.register(model_type="language_model", backend=["fsdp", "fsdp2"], device="cpu")(
            FSDPEngineWithLMHead
        )


def register() -> None:
    """Register the CPU platform, FSDP engine, rollout and checkpoint engine with verl (idempotent)."""
    PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    # also registered by its own module, which verl's checkpoint_engine.custom_backend_module imports alone
    CheckpointEngineRegistry.register(OBJECT_STORE_BACKEND)(ObjectStoreCheckpointEngine)
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    # verl 0.9.1 has no register function for the in-worker rollout class, only this table.
    _rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "recipe.atropos.cpu.replica.CPUServerAdapter"
    _register_engine()


register()
