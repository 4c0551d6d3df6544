"""verl checkpoint engine ``object_store``: weight sync through Ray's object store.

Why it exists: in verl's disaggregated layout (``actor_rollout_ref.hybrid_engine=false``)
the inference replicas run in their own resource pool, and ``CheckpointEngineManager``
moves the actor's weights to them with a transport backend: ``nccl`` on a GPU. A
machine without a GPU has no nccl, so this backend carries the same calls over Ray
instead. The trainer and its replicas go through the very same manager sequence as
with nccl (abort, release kv cache, ``build_process_group``, ``update_weights``,
``finalize``, resume); only the wire differs. Select it with
``actor_rollout_ref.rollout.checkpoint_engine.backend=object_store``.

How a sync goes:

* ``prepare()`` on the master (actor rank 0) starts a mailbox
  (:mod:`recipe.atropos.cpu.weights_mailbox`): a small named async Ray actor holding
  nothing but object references. Its name travels in the metadata.
* ``build_topology()`` makes actor rank 0 the one sender (rank 0), the other actor ranks
  bystanders (rank -1: they walk the weights generator, since producing each full
  tensor is a collective over the actor group), and the rollout workers receivers
  (ranks 1..N).
* ``send_weights()`` packs the weights, copied to the CPU, into buckets of at most
  ``bucket_size`` bytes (a bigger tensor goes alone), puts each bucket into the object
  store and posts its reference to the mailbox.
* ``receive_weights()`` takes bucket after bucket from the mailbox, waiting for the
  next one to be posted, and yields ``(name, tensor)`` until the last bucket.
* ``finalize()`` on the master kills the mailbox (verl calls it once every receiver
  has returned).

Limits: every weight passes through actor rank 0's process and Ray's object store, and
every receiver reads the whole model: fine for the small models a CPU trains, no
substitute for nccl on a GPU. The sender waits while ``max_pending_buckets`` buckets are
posted that some receiver has yet to take (set it under
``checkpoint_engine.engine_kwargs.object_store``), so a sync keeps a few buckets in the
object store at a time, not the whole model.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.checkpoint_engine.base import CheckpointEngine, CheckpointEngineRegistry
from verl.workers.rollout.utils import ensure_async_iterator

from .weights_mailbox import WeightsMailbox

logger = logging.getLogger(__name__)

BACKEND = "object_store"
MAILBOX_NAME_PREFIX = "atropos_weights_mailbox_"

SENDER_RANK = 0
BYSTANDER_RANK = -1  # actor ranks that only walk the weights generator

_MailboxActor = ray.remote(WeightsMailbox)


def _tensor_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a flat uint8 array: Ray stores numpy arrays without pickling them."""
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _tensor_from_bytes(raw: np.ndarray, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    if raw.size == 0:
        return torch.empty(shape, dtype=dtype)  # numpy gives an empty array stride 0, which view(dtype) refuses
    # Arrays read from the object store are read-only views of shared memory: copy into a tensor the caller owns.
    return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)


@CheckpointEngineRegistry.register(BACKEND)
class ObjectStoreCheckpointEngine(CheckpointEngine):
    """Checkpoint engine that moves weights through Ray's object store (see the module docstring).

    Args:
        bucket_size: Most bytes per bucket; a single tensor bigger than this goes in a bucket of its own.
        is_master: True on actor rank 0, which starts the mailbox and sends.
        max_pending_buckets: Buckets the mailbox holds before the sender waits for receivers to catch up.
    """

    wire_format = "named_tensors"

    def __init__(self, bucket_size: int, is_master: bool = False, max_pending_buckets: int = 2) -> None:
        if bucket_size <= 0:
            raise ValueError(f"bucket_size must be a positive number of bytes, got {bucket_size}")
        if max_pending_buckets < 1:
            raise ValueError(f"max_pending_buckets must be at least 1, got {max_pending_buckets}")
        self.bucket_size = bucket_size
        self.is_master = is_master
        self.max_pending_buckets = max_pending_buckets
        self.rank: int | None = None
        self.num_receivers: int | None = None
        self.mailbox_name: str | None = None
        self._mailbox = None  # receivers' and sender's handle, set by init_process_group
        self._owned_mailbox = None  # the master's handle to the mailbox it started

    # -- group lifecycle ---------------------------------------------------------------

    def prepare(self) -> dict[str, Any]:
        if not self.is_master:
            return {"mailbox": None}
        self._kill_owned_mailbox()  # a sync that never reached finalize leaves nothing behind
        name = f"{MAILBOX_NAME_PREFIX}{uuid.uuid4().hex}"
        self._owned_mailbox = _MailboxActor.options(
            name=name,
            num_cpus=0,
            # next to the sender, which posts every bucket; soft: any node will do if this one is full
            scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
        ).remote(self.max_pending_buckets)
        return {"mailbox": name}

    @classmethod
    def build_topology(
        cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        mailbox = metadata[0].get("mailbox") if metadata and isinstance(metadata[0], dict) else None
        if not mailbox:
            raise ValueError(
                "object_store checkpoint engine: actor rank 0's prepare() named no mailbox; "
                "actor rank 0 must be built with is_master=True"
            )
        if rollout_world_size < 1:
            raise ValueError(
                f"object_store checkpoint engine: {rollout_world_size} rollout workers, at least one must receive"
            )
        actor_kwargs = {
            "rank": [SENDER_RANK] + [BYSTANDER_RANK] * (actor_wg_world_size - 1),
            "num_receivers": [rollout_world_size] * actor_wg_world_size,
            "mailbox_name": [mailbox] * actor_wg_world_size,
        }
        rollout_kwargs = {
            "rank": list(range(1, rollout_world_size + 1)),
            "num_receivers": [rollout_world_size] * rollout_world_size,
            "mailbox_name": [mailbox] * rollout_world_size,
        }
        return actor_kwargs, rollout_kwargs

    def init_process_group(self, rank: int, num_receivers: int, mailbox_name: str) -> None:
        self.rank = rank
        self.num_receivers = num_receivers
        self.mailbox_name = mailbox_name
        if rank == BYSTANDER_RANK:
            return
        if rank == SENDER_RANK and self._owned_mailbox is not None:
            self._mailbox = self._owned_mailbox
            return
        try:
            self._mailbox = ray.get_actor(mailbox_name)
        except ValueError as error:
            raise RuntimeError(
                f"object_store checkpoint engine rank {rank}: no weights mailbox named {mailbox_name!r}; "
                "the master's prepare() starts it and its finalize() ends it"
            ) from error

    def finalize(self) -> None:
        self._kill_owned_mailbox()
        self._mailbox = None
        self.rank = None
        self.num_receivers = None
        self.mailbox_name = None

    def _kill_owned_mailbox(self) -> None:
        if self._owned_mailbox is not None:
            ray.kill(self._owned_mailbox)
            self._owned_mailbox = None

    def _require_rank(self, call: str) -> int:
        if self.rank is None:
            raise RuntimeError(f"object_store checkpoint engine: {call}() before init_process_group()")
        return self.rank

    # -- transfer ----------------------------------------------------------------------

    async def send_weights(self, weights, global_steps: int | None = None) -> None:
        """Send ``(name, tensor)`` pairs from a sync or async iterable; bystander ranks only walk it."""
        rank = self._require_rank("send_weights")
        if rank == BYSTANDER_RANK:
            async for _ in ensure_async_iterator(weights):
                pass
            return
        if rank != SENDER_RANK:
            raise RuntimeError(f"object_store checkpoint engine: rank {rank} is a receiver, only rank 0 sends")

        start = time.perf_counter()
        index, total_bytes = 0, 0
        bucket: list[tuple[str, torch.Tensor]] = []
        bucket_bytes = 0
        async for name, tensor in ensure_async_iterator(weights):
            # copy now: the generator may reuse its buffers, and a GPU tensor should leave the GPU at once
            tensor = tensor.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            if bucket and bucket_bytes + tensor.nbytes > self.bucket_size:
                await self._post(index, bucket, is_last=False)
                index, total_bytes = index + 1, total_bytes + bucket_bytes
                bucket, bucket_bytes = [], 0
            bucket.append((name, tensor))
            bucket_bytes += tensor.nbytes
        await self._post(index, bucket, is_last=True)
        total_bytes += bucket_bytes
        logger.info(
            "object_store sent %d bytes in %d buckets to %d receivers in %.2f s",
            total_bytes, index + 1, self.num_receivers, time.perf_counter() - start,
        )

    async def _post(self, index: int, bucket: list[tuple[str, torch.Tensor]], is_last: bool) -> None:
        layout = [(name, tensor.dtype, tensor.shape) for name, tensor in bucket]
        payload = [_tensor_bytes(tensor) for _, tensor in bucket]
        ref = ray.put((layout, payload))
        await self._mailbox.post.remote(index, [ref], is_last, self.num_receivers)

    async def receive_weights(self, global_steps: int | None = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        """Yield ``(name, tensor)`` pairs, bucket after bucket, until the sender's last bucket."""
        rank = self._require_rank("receive_weights")
        if rank < 1:
            raise RuntimeError(f"object_store checkpoint engine: rank {rank} is on the actor side, receivers are 1..N")
        index = 0
        while True:
            try:
                ref_holder, is_last = await self._mailbox.take.remote(index)
            except ray.exceptions.RayActorError as error:
                raise RuntimeError(
                    f"object_store checkpoint engine rank {rank}: weights mailbox {self.mailbox_name!r} "
                    f"ended before bucket {index} arrived (did the sender fail?)"
                ) from error
            layout, payload = await ref_holder[0]
            for (name, dtype, shape), raw in zip(layout, payload, strict=True):
                yield name, _tensor_from_bytes(raw, dtype, shape)
            if is_last:
                return
            index += 1
