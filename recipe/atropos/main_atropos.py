"""Hydra entry point: GRPO in verl on batches from the Atropos trajectory API.

    python -m recipe.atropos.main_atropos --config-name atropos_grpo_small [key=value ...]

Like verl's ``main_ppo`` with the legacy trainer, but it builds no training
dataset (environments supply the data) and runs :class:`RayGRPOAtroposTrainer`.
Every verl key works from the command line, e.g.
``actor_rollout_ref.model.lora_rank=8 trainer.total_training_steps=50``.
"""

from __future__ import annotations

import os
import socket

import hydra
import ray
from omegaconf import OmegaConf, open_dict
from verl.trainer.main_ppo import run_ppo
from verl.trainer.main_ppo_v0 import BaseTaskRunner
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import omega_conf_to_dataclass, validate_config


def bind_ray(config) -> None:
    """Start Ray's node on ``services.node_ip`` (default 127.0.0.1): its dashboard agent and object
    manager then listen on that address, not on the machine's external one. (Ray 2.60's gRPC
    servers, in the GCS, the raylet and every worker, listen on ``[::]`` whatever this address.)

    Left alone where ``ray_kwargs.ray_init`` names ``address`` (joining a cluster) or its own
    ``_node_ip_address``.
    """
    from .settings import ServicesConfig

    ray_init = config.ray_kwargs.get("ray_init") or {}
    if ray_init.get("address") or ray_init.get("_node_ip_address"):
        return
    with open_dict(config):
        if config.ray_kwargs.get("ray_init") is None:
            config.ray_kwargs.ray_init = {}
        config.ray_kwargs.ray_init["_node_ip_address"] = ServicesConfig.from_run_config(config).node_ip


def check_config(config) -> None:
    """Fail at start-up, naming the key, where a setting cannot work with Atropos data."""
    if config.algorithm.adv_estimator != "grpo":
        raise ValueError(
            f"algorithm.adv_estimator={config.algorithm.adv_estimator!r}: this trainer computes GRPO advantages "
            "merged with Atropos token-level advantages; set algorithm.adv_estimator=grpo"
        )
    if config.trainer.get("use_v1", False):
        raise ValueError(
            "trainer.use_v1=true: RayGRPOAtroposTrainer extends the legacy trainer; set trainer.use_v1=false"
        )
    if not config.actor_rollout_ref.hybrid_engine:
        check_standalone_layout(config)


def check_standalone_layout(config) -> None:
    """The disaggregated layout (``actor_rollout_ref.hybrid_engine=false``) needs these settings."""
    rollout = config.actor_rollout_ref.rollout
    if rollout.nnodes <= 0 or rollout.n_gpus_per_node <= 0:
        raise ValueError(
            f"actor_rollout_ref.hybrid_engine=false runs the replicas on GPUs of their own: set "
            f"actor_rollout_ref.rollout.nnodes (got {rollout.nnodes}) and actor_rollout_ref.rollout.n_gpus_per_node "
            f"(got {rollout.n_gpus_per_node}) to how many of them"
        )
    if rollout.checkpoint_engine.backend == "naive":
        raise ValueError(
            "actor_rollout_ref.hybrid_engine=false: the naive checkpoint engine only reaches replicas in the actor's "
            "own processes; set actor_rollout_ref.rollout.checkpoint_engine.backend=nccl"
        )
    if rollout.free_cache_engine:
        raise ValueError(
            "actor_rollout_ref.hybrid_engine=false: standalone replicas never sleep, and verl's weight sync into "
            "them needs actor_rollout_ref.rollout.free_cache_engine=false"
        )
    if config.data.get("val_files"):
        raise ValueError(
            "data.val_files is set with actor_rollout_ref.hybrid_engine=false: validation runs only in the "
            "colocated layout; set data.val_files=null"
        )


class AtroposTaskRunner(BaseTaskRunner):
    """Builds workers, resource pools and the trainer inside the Ray driver task."""

    def add_actor_rollout_worker(self, config):
        actor_rollout_cls, ray_worker_group_cls = super().add_actor_rollout_worker(config)
        standalone = not config.actor_rollout_ref.hybrid_engine
        if config.trainer.device == "cpu":
            from .cpu.workers import CPUActorRolloutRefWorker, CPUStandaloneRolloutActorWorker

            actor_rollout_cls = CPUStandaloneRolloutActorWorker if standalone else CPUActorRolloutRefWorker
        elif standalone:
            from .trainer.actor_worker import StandaloneRolloutActorWorker

            actor_rollout_cls = StandaloneRolloutActorWorker
        # same role verl chose (with or without a fused reference policy), the worker for this layout
        for role in self.role_worker_mapping:
            self.role_worker_mapping[role] = ray.remote(actor_rollout_cls)
        return actor_rollout_cls, ray_worker_group_cls

    def run(self, config):
        from verl.single_controller.ray import RayWorkerGroup

        from .trainer.ray_trainer import RayGRPOAtroposTrainer

        print(f"AtroposTaskRunner on {socket.gethostname()}, PID {os.getpid()}")
        OmegaConf.resolve(config)
        self.add_actor_rollout_worker(config)
        validate_config(
            config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
        )
        model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        trainer = RayGRPOAtroposTrainer(
            config=config,
            tokenizer=model_config.tokenizer,
            processor=model_config.processor,
            role_worker_mapping=self.role_worker_mapping,
            resource_pool_manager=self.init_resource_pool_mgr(config),
            ray_worker_group_cls=RayWorkerGroup,
            vocab_size=model_config.hf_config.vocab_size,
        )
        trainer.init_workers()
        trainer.fit()


@hydra.main(config_path="config", config_name="atropos_grpo_small", version_base=None)
def main(config) -> None:
    check_config(config)
    bind_ray(config)
    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(AtroposTaskRunner))


if __name__ == "__main__":
    main()
