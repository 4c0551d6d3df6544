"""The CPU backend behind verl's rollout interfaces: a replica, its server actor, and the in-worker adapter.

* :class:`CPUInferenceServer` - a Ray actor that owns a :class:`~.server.PolicyServer`
  and serves it over HTTP on 127.0.0.1 (uvicorn);
* :class:`CPURolloutReplica` - verl's ``RolloutReplica`` for it (``rollout.name=cpu``):
  one server per replica, started on the node of the replica's workers: the training
  workers in the hybrid layout, the replica's own checkpoint-engine workers in the
  disaggregated one (``RolloutReplica.init_standalone``);
* :class:`CPUServerAdapter` - verl's ``BaseRollout`` inside those workers. verl's weight
  sync hands it full tensors (the actor's own in the hybrid layout, the checkpoint
  engine's in the disaggregated one); the replica's leader rank loads them into the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator

from .server import PolicyServer, build_app

logger = logging.getLogger(__name__)


def server_actor_name(replica_rank: int) -> str:
    return f"atropos_cpu_inference_server_{replica_rank}"


def _worker_rank() -> int:
    """This worker's rank: from its process group if it has one yet, else the ``RANK`` verl's worker group sets."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _model_path(model_config) -> str:
    path = getattr(model_config, "local_path", None) or model_config.path
    return os.path.expanduser(path)


class CPUInferenceServer:
    """Ray actor: the policy's HTTP server plus the calls verl's replica manager makes."""

    def __init__(self, model_path: str, max_model_len: int, host: str = "127.0.0.1"):
        self.policy = PolicyServer(model_path, max_model_len=max_model_len)
        self.host = host
        self.port: int | None = None
        self._uvicorn = None

    async def launch_server(self) -> str:
        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(build_app(self.policy), log_level="warning", lifespan="off")
        self._uvicorn = uvicorn.Server(config)
        asyncio.get_running_loop().create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            await asyncio.sleep(0.02)
        return f"{self.host}:{self.port}"

    async def update_weights(self, named_tensors: dict[str, torch.Tensor], global_steps: int | None = None) -> dict:
        return await self.policy.load_weights(named_tensors, global_steps)

    async def sleep(self) -> None:
        await self.policy.sleep()

    async def wake_up(self, tags=None) -> None:
        await self.policy.wake_up()

    async def generate(self, prompt_ids, sampling_params, request_id=None, **kwargs) -> TokenOutput:
        """verl's token-in, token-out call (its agent loop and LLM client use it)."""
        params = dict(sampling_params)
        samples = await self.policy.generate(
            list(prompt_ids),
            max_tokens=int(params.get("max_tokens", params.get("max_new_tokens", 16))),
            temperature=float(params.get("temperature", 1.0)),
            top_p=float(params.get("top_p", 1.0)),
        )
        s = samples[0]
        stop = {"stop": "completed", "abort": "aborted"}.get(s.finish_reason, "length")
        return TokenOutput(token_ids=s.token_ids, log_probs=s.logprobs, stop_reason=stop)

    async def weight_version(self) -> int:
        return self.policy.weight_version

    # Cache, abort and profiling calls of verl's CheckpointEngineManager and replica manager. A CPU
    # model has no KV cache to free. Aborting is as vLLM's: requests in flight come back cut short
    # ("abort"), new ones wait until resume_generation (loading weights takes the model lock, so
    # nothing ever samples from half-loaded weights either way).
    async def clear_kv_cache(self):
        pass

    async def release_kv_cache(self):
        pass

    async def resume_kv_cache(self):
        pass

    async def abort_all_requests(self, reject_request: bool = False, **kwargs):
        return {"aborted_count": await self.policy.abort_all(), "request_ids": []}

    async def resume_generation(self):
        await self.policy.resume()

    async def start_profile(self, **kwargs):
        pass

    async def stop_profile(self):
        pass

    async def set_global_steps(self, global_steps: int):
        self.policy.global_steps = global_steps


class CPURolloutReplica(RolloutReplica):
    """One CPU server per replica, in the hybrid layout (``init_hybrid``) or the disaggregated one
    (``init_standalone``).

    ``init_standalone`` places the replica's checkpoint-engine workers with ``use_gpu=True``
    whatever :meth:`rollout_worker_use_gpu` says; on the CPU platform that takes one of Ray's
    logical ``GPU`` slots per worker (``ray_kwargs.ray_init.num_gpus`` counts training workers
    and replica workers together).
    """

    def rollout_worker_use_gpu(self) -> bool:
        return False  # read by init_colocated only

    async def launch_servers(self):
        options = {"name": server_actor_name(self.replica_rank), "num_cpus": 0, "max_concurrency": self.max_concurrency}
        if self.workers:
            # next to the replica's workers, whose leader loads weights into it
            node_id = await self.workers[0].__ray_call__.remote(lambda worker: ray.get_runtime_context().get_node_id())
            options["scheduling_strategy"] = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
                node_id=node_id, soft=False
            )
        max_model_len = self.config.max_model_len or (self.config.prompt_length + self.config.response_length)
        server = ray.remote(CPUInferenceServer).options(**options).remote(_model_path(self.model_config), max_model_len)
        self._server_address = await server.launch_server.remote()
        self._server_handle = server
        self.servers = [server]


class CPUServerAdapter(BaseRollout):
    """verl's rollout object inside a worker; the leader rank of a replica talks to its server.

    Built by verl in two places:

    * hybrid layout: in each training worker, without ``replica_rank``; replicas take
      consecutive blocks of training ranks, so the training rank says which replica;
    * disaggregated layout: in each checkpoint-engine worker of a standalone replica, with
      ``replica_rank`` (and ``device_mesh=None``); ``RANK`` counts the replica's own workers.
    """

    def __init__(self, config, model_config, device_mesh=None, *args, replica_rank: int | None = None, **kwargs):
        super().__init__(config, model_config, device_mesh)
        replica_size = (
            self.config.tensor_model_parallel_size
            * self.config.data_parallel_size
            * self.config.pipeline_model_parallel_size
        )
        rank = _worker_rank()
        # verl's own adapters take -1 for "not given"
        self.replica_rank = rank // replica_size if replica_rank is None or replica_rank < 0 else replica_rank
        self.is_leader_rank = rank % replica_size == 0
        self._server = None

    @property
    def server(self):
        if self._server is None:
            self._server = ray.get_actor(server_actor_name(self.replica_rank))
        return self._server

    async def resume(self, tags: list[str]):
        # verl resumes "kv_cache" last, once the new weights are in: the server may take requests again
        if self.is_leader_rank and "kv_cache" in tags:
            await self.server.wake_up.remote()

    async def release(self):
        if self.is_leader_rank:
            await self.server.sleep.remote()

    async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs):
        if wire_format != "named_tensors":
            raise ValueError(f"the CPU backend loads full named tensors, not {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "the CPU backend loads full weights, not LoRA adapters: set actor_rollout_ref.model.lora.merge=true"
            )
        named_tensors = {}
        # Every rank must walk the generator: gathering an FSDP2 shard into a full tensor is a collective,
        # and each checkpoint-engine worker of a standalone replica receives every bucket.
        async for name, tensor in ensure_async_iterator(weights):
            if self.is_leader_rank:
                named_tensors[name] = tensor.detach().to("cpu", copy=True)
        if self.is_leader_rank:
            result = await self.server.update_weights.remote(named_tensors, kwargs.get("global_steps"))
            logger.info("replica %d loaded weights: %s", self.replica_rank, result)
