"""The ``object_store`` checkpoint engine on a real local Ray: one sender, one bystander, two receivers."""

from __future__ import annotations

import asyncio

import pytest
import ray
import torch

from recipe.atropos.cpu.object_store_engine import BYSTANDER_RANK, SENDER_RANK, ObjectStoreCheckpointEngine

BUCKET_SIZE = 128  # bytes: the weights below need several buckets


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def model_weights() -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        ("embed.weight", torch.randn(8, 4, generator=generator)),  # 128 bytes: fills a bucket
        ("layer.0.weight", torch.randn(4, 4, generator=generator).to(torch.bfloat16)),
        ("layer.0.bias", torch.randn(4, generator=generator, dtype=torch.float64)),
        ("big.weight", torch.randn(40, 3, generator=generator)),  # 480 bytes: more than a bucket
        ("transposed.weight", torch.randn(3, 5, generator=generator).t()),  # not contiguous
        ("positions", torch.arange(10, dtype=torch.int64)),
        ("mask", torch.tensor([True, False, True])),
        ("scale", torch.tensor(0.5)),  # zero-dimensional
        ("empty", torch.empty(0, 7)),
        ("head.weight", torch.randn(2, 4, generator=generator, dtype=torch.float16)),
    ]


def weights_generator():
    """What the sender gets from verl: a plain generator."""
    yield from model_weights()


async def async_weights_generator():
    for name, tensor in model_weights():
        await asyncio.sleep(0)
        yield name, tensor


def connect(actor_engines, receivers):
    """What CheckpointEngineManager.build_process_group does, without worker groups."""
    metadata = [engine.prepare() for engine in actor_engines + receivers]
    actor_kwargs, rollout_kwargs = ObjectStoreCheckpointEngine.build_topology(
        len(actor_engines), len(receivers), metadata
    )
    for engines, kwargs in ((actor_engines, actor_kwargs), (receivers, rollout_kwargs)):
        for i, engine in enumerate(engines):
            engine.init_process_group(**{key: values[i] for key, values in kwargs.items()})


async def collect(engine) -> list[tuple[str, torch.Tensor]]:
    return [(name, tensor) async for name, tensor in engine.receive_weights(global_steps=1)]


def assert_same_weights(received, sent):
    assert [name for name, _ in received] == [name for name, _ in sent]
    for (name, got), (_, want) in zip(received, sent):
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), name


@pytest.mark.parametrize("make_weights", [weights_generator, async_weights_generator])
def test_every_receiver_gets_every_weight(make_weights):
    master = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE, is_master=True)
    bystander = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE)
    receivers = [ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE) for _ in range(2)]
    connect([master, bystander], receivers)
    assert (master.rank, bystander.rank) == (SENDER_RANK, BYSTANDER_RANK)
    assert [r.rank for r in receivers] == [1, 2]

    posted = []
    post = master._post

    async def count_posts(index, bucket, is_last):
        posted.append((index, [name for name, _ in bucket], is_last))
        await post(index, bucket, is_last)

    master._post = count_posts
    walked = []

    def bystander_weights():
        for name, tensor in model_weights():
            walked.append(name)
            yield name, tensor

    async def sync():
        return await asyncio.gather(
            master.send_weights(make_weights(), global_steps=1),
            bystander.send_weights(bystander_weights(), global_steps=1),
            *(collect(r) for r in receivers),
        )

    _, _, *received = asyncio.run(sync())

    sent = model_weights()
    for weights in received:
        assert_same_weights(weights, sent)
    assert walked == [name for name, _ in sent], "the bystander rank must walk the whole generator"
    # buckets fill up to BUCKET_SIZE bytes in order; a tensor bigger than a bucket goes alone
    assert posted == [
        (0, ["embed.weight"], False),
        (1, ["layer.0.weight", "layer.0.bias"], False),
        (2, ["big.weight"], False),
        (3, ["transposed.weight"], False),
        (4, ["positions", "mask", "scale", "empty", "head.weight"], True),
    ]

    mailbox = master.mailbox_name
    for engine in [master, bystander, *receivers]:
        engine.finalize()
    with pytest.raises(ValueError):
        ray.get_actor(mailbox)


def test_received_tensors_are_writable_copies():
    master = ObjectStoreCheckpointEngine(bucket_size=1 << 20, is_master=True)
    receiver = ObjectStoreCheckpointEngine(bucket_size=1 << 20)
    connect([master], [receiver])
    weight = torch.ones(3, 3)

    async def sync():
        return await asyncio.gather(master.send_weights([("w", weight)]), collect(receiver))

    _, [(_, received)] = asyncio.run(sync())
    received.add_(1)  # the receiver owns it: no read-only object-store memory underneath
    assert torch.equal(weight, torch.ones(3, 3))
    master.finalize()
    receiver.finalize()


def test_a_second_sync_gets_a_fresh_mailbox():
    master = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE, is_master=True)
    receiver = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE)
    names = []
    for step in (1, 2):
        connect([master], [receiver])
        names.append(master.mailbox_name)
        weights = [("w", torch.full((4,), float(step)))]

        async def sync(weights=weights):
            return await asyncio.gather(master.send_weights(weights), collect(receiver))

        _, received = asyncio.run(sync())
        assert_same_weights(received, weights)
        master.finalize()
        receiver.finalize()
    assert names[0] != names[1]


def test_the_sender_waits_for_receivers_to_catch_up():
    master = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE, is_master=True, max_pending_buckets=1)
    receivers = [ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE) for _ in range(2)]
    connect([master], receivers)

    async def sync():
        sending = asyncio.create_task(master.send_weights(weights_generator()))
        await asyncio.sleep(0.5)
        # five buckets, room for one: without receivers the sender cannot be done
        assert not sending.done()
        received = await asyncio.gather(*(collect(r) for r in receivers))
        await sending
        return received

    for weights in asyncio.run(sync()):
        assert_same_weights(weights, model_weights())
    for engine in [master, *receivers]:
        engine.finalize()


def test_receiving_before_init_process_group_is_refused():
    engine = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE)
    with pytest.raises(RuntimeError, match=r"receive_weights\(\) before init_process_group"):
        asyncio.run(collect(engine))


def test_an_unknown_mailbox_is_named_in_the_error():
    engine = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE)
    with pytest.raises(RuntimeError, match="no weights mailbox named 'atropos_weights_mailbox_gone'"):
        engine.init_process_group(rank=1, num_receivers=1, mailbox_name="atropos_weights_mailbox_gone")


def test_topology_needs_a_master():
    plain = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE)
    with pytest.raises(ValueError, match="is_master=True"):
        ObjectStoreCheckpointEngine.build_topology(1, 1, [plain.prepare(), plain.prepare()])


def test_a_receiver_cannot_send():
    engine = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE)
    engine.rank = 1
    with pytest.raises(RuntimeError, match="only rank 0 sends"):
        asyncio.run(engine.send_weights([]))


def test_a_receiver_whose_mailbox_is_killed_mid_sync_fails_clearly():
    master = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE, is_master=True)
    receiver = ObjectStoreCheckpointEngine(bucket_size=BUCKET_SIZE)
    connect([master], [receiver])
    master.finalize()  # kills the mailbox before anything was sent
    with pytest.raises(RuntimeError, match="ended before bucket 0 arrived"):
        asyncio.run(collect(receiver))
