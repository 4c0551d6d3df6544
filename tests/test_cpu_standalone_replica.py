"""The CPU replica in verl's disaggregated layout, on a real local Ray started as the CPU trainer starts it.

``RolloutReplica.init_standalone`` brings the replica up in its own resource pool (its
checkpoint-engine workers take logical GPU slots), and verl's ``CheckpointEngineManager``
syncs weights into it over the ``object_store`` checkpoint engine from an actor worker group.
"""

from __future__ import annotations

import httpx
import pytest
import ray
import torch
from verl.checkpoint_engine.base import CheckpointEngineRegistry
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register

# a Ray cluster and a served replica: a minute or more on 2 cores
pytestmark = pytest.mark.slow

TOKENS = [1, 87, 85, 71, 72, 90, 12, 40]


class HalvingTrainer(Worker):
    """Stands in for verl's actor workers: a model, a "training step" that halves every weight,
    and verl's two checkpoint-engine entry points (the same dispatch modes as ActorRolloutRefWorker)."""

    def __init__(self, model_path: str, bucket_size: int):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.checkpoint_engine = CheckpointEngineRegistry.new(
            "object_store", is_master=self.rank == 0, bucket_size=bucket_size
        )

    @register(dispatch_mode=Dispatch.DP_COMPUTE, blocking=False)
    def execute_checkpoint_engine(self, method: str, *args, **kwargs):
        return getattr(self.checkpoint_engine, method)(*args, **kwargs)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    async def update_weights(self, global_steps: int | None = None, mode: str = "auto"):
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.mul_(0.5)
        await self.checkpoint_engine.send_weights(self.model.state_dict().items(), global_steps=global_steps)


@pytest.fixture(scope="module")
def cpu_ray():
    """Ray as atropos_grpo_cpu.yaml starts it (logical GPU slots, the CPU platform in every process)."""
    from verl.plugin.platform import platform_manager

    from recipe.atropos.cpu.register import register

    register()  # the CPU platform, rollout and checkpoint engine, in this process

    env_vars = {
        "VERL_PLATFORM": "cpu",
        "VERL_USE_EXTERNAL_MODULES": "recipe.atropos.cpu.register",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VERL_PLATFORM", "cpu")
        # verl settles the platform once per process: forget whatever an earlier test settled on
        patch.setattr(platform_manager, "_current_platform", None)
        # a slot for the replica's worker and one for the actor's; CPUs are counted per bundle, not used
        ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env_vars})
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def rollout_config():
    from verl.workers.config import CheckpointEngineConfig, RolloutConfig

    return RolloutConfig(
        name="cpu",
        tensor_model_parallel_size=1,
        prompt_length=64,
        response_length=16,
        checkpoint_engine=CheckpointEngineConfig(backend="object_store", update_weights_bucket_megabytes=1),
    )


@pytest.fixture(scope="module")
def replica(cpu_ray, rollout_config, tiny_model_dir):
    import asyncio

    from verl.workers.config import HFModelConfig

    from recipe.atropos.cpu.replica import CPURolloutReplica

    replica = CPURolloutReplica(
        replica_rank=0, config=rollout_config, model_config=HFModelConfig(path=tiny_model_dir), gpus_per_node=1
    )
    asyncio.run(replica.init_standalone())
    return replica


def local_prompt_logprobs(model_path: str, scale: float) -> list[float | None]:
    from transformers import AutoModelForCausalLM

    from recipe.atropos.cpu.generation import prompt_logprobs

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(scale)
    return prompt_logprobs(model.eval(), TOKENS)


def assert_close(replica: list, local: list) -> None:
    assert replica[0] is None and local[0] is None
    assert max(abs(r - mine) for r, mine in zip(replica[1:], local[1:], strict=True)) < 1e-5


def test_standalone_replica_serves_http(replica):
    url = f"http://{replica.server_address}"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert [entry["id"] for entry in models["data"]] == ["model"]


def test_the_standalone_worker_leads_its_replica(replica):
    from verl.checkpoint_engine.base import CheckpointEngineWorker
    from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup

    from recipe.atropos.cpu.replica import server_actor_name

    # the replica's checkpoint-engine workers, seen as verl's CheckpointEngineManager sees them
    workers = RayWorkerGroup(
        worker_handles=replica.workers,
        ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(CheckpointEngineWorker)),
    )
    assert workers.get_replica_rank() == [0]
    assert workers.is_leader_rank() == [True]
    assert replica.servers == [ray.get_actor(server_actor_name(0))]


def test_checkpoint_engine_manager_syncs_weights_into_the_replica(replica, rollout_config, tiny_model_dir):
    from verl.checkpoint_engine.base import CheckpointEngineManager
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from recipe.atropos.trainer.sync_check import replica_prompt_logprobs

    url = f"http://{replica.server_address}"
    assert_close(replica_prompt_logprobs(url, TOKENS), local_prompt_logprobs(tiny_model_dir, 1.0))

    actor_pool = RayResourcePool(process_on_nodes=[1], use_gpu=True, max_colocate_count=1, name_prefix="actor_pool")
    actor_wg = RayWorkerGroup(
        resource_pool=actor_pool,
        # a small bucket, so the tiny model travels in several
        ray_cls_with_init=RayClassWithInitArgs(cls=ray.remote(HalvingTrainer), model_path=tiny_model_dir,
                                               bucket_size=64 << 10),
        device_name="cpu",
    )
    manager = CheckpointEngineManager(config=rollout_config.checkpoint_engine, actor_wg=actor_wg, replicas=[replica])

    manager.update_weights(global_steps=1)
    assert ray.get(replica.server_handle.weight_version.remote()) == 1
    assert_close(replica_prompt_logprobs(url, TOKENS), local_prompt_logprobs(tiny_model_dir, 0.5))

    manager.update_weights(global_steps=2)  # a second sync: a fresh mailbox, the same workers
    assert ray.get(replica.server_handle.weight_version.remote()) == 2
    assert_close(replica_prompt_logprobs(url, TOKENS), local_prompt_logprobs(tiny_model_dir, 0.25))
