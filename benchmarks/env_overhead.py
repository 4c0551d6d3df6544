"""What a batch costs outside the inference engine: the gateway and the environment's client.

A colocated step waits for its batch while the environments sample it through the gateway. This
measures the part of that wait that is not generation: the replica is a stand-in for vLLM's
tokens-in route that answers at once with ``--tokens`` tokens (and their log-probs) per choice,
so everything timed is the real gateway (one single-choice request per choice, the generation
window, the policy-version ledger) and the real ``gsm8k`` environment's sampling path
(atroposlib's managed server: tokenizing the prompt, the HTTP round trip, the nodes with tokens,
masks and log-probs, the decoded texts, the scores). Replica and gateway run in their own
processes, as in a run; the environment samples ``--groups`` groups of ``--group-size`` at once,
as the launcher's ``env.max_num_workers`` lets it.

Prints the wall time of the whole batch, the time per group (p50, p99) and what one sequence
costs, ``--repeats`` times.

    python benchmarks/env_overhead.py
    python benchmarks/env_overhead.py --groups 32 --group-size 8 --tokens 448
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_latency import Process, _run_gateway  # noqa: E402
from recipe.atropos.envs.gsm8k import GSM8KEnv  # noqa: E402
from recipe.atropos.gateway.requests import GatewayLimits  # noqa: E402
from recipe.atropos.models.make_tiny_model import write_tiny_model  # noqa: E402

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
           "How many clips did Natalia sell altogether in April and May?"


def instant_replica(tokens: int, vocab: int) -> FastAPI:
    """vLLM's tokens-in route answering at once: ``tokens`` random ids (no end-of-sequence) per choice."""
    app = FastAPI()
    rng = random.Random(0)

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stand-in", "object": "model", "max_model_len": 4096}]}

    @app.post("/inference/v1/generate")
    async def generate(body: dict):
        ids = [rng.randrange(3, vocab) for _ in range(tokens)]
        content = [{"logprob": -1.0} for _ in ids]
        reply = {"choices": [{"token_ids": ids, "finish_reason": "length", "logprobs": {"content": content}}]}
        # serialised here, not by FastAPI's encoder: the stand-in should cost next to nothing
        return Response(json.dumps(reply), media_type="application/json")

    return app


def _run_replica(port: int, tokens: int, vocab: int) -> None:
    uvicorn.run(instant_replica(tokens, vocab), host="127.0.0.1", port=port, log_level="warning")


def environment(gateway_url: str, model_dir: str, data_path: str, group_size: int, tokens: int) -> GSM8KEnv:
    config, servers = GSM8KEnv.config_init()
    config = config.model_copy(update={"tokenizer_name": model_dir, "data_path": data_path, "group_size": group_size,
                                       "max_new_tokens": tokens, "max_token_length": 4096})
    servers = [server.model_copy(update={"base_url": f"{gateway_url}/v1", "tokenizer_name": model_dir})
               for server in servers]
    return GSM8KEnv(config, servers)


async def one_batch(env: GSM8KEnv, groups: int) -> tuple[float, list[float]]:
    async def one_group() -> float:
        started = time.perf_counter()
        group, _ = await env.collect_trajectories(await env.get_next_item())
        assert len(group["tokens"]) == env.config.group_size
        return time.perf_counter() - started

    started = time.perf_counter()
    per_group = await asyncio.gather(*[one_group() for _ in range(groups)])
    return time.perf_counter() - started, list(per_group)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=32, help="groups sampled at once (a batch)")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=448, help="tokens per sampled solution")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_model(str(Path(tmp) / "tiny-qwen2"))
        data_path = str(Path(tmp) / "train.parquet")
        rows = [{"prompt": [{"role": "user", "content": QUESTION}], "reward_model": {"ground_truth": "72"}}]
        pq.write_table(pa.Table.from_pylist(rows * args.groups), data_path)
        vocab = 250  # the tiny model's tokenizer decodes ids below this
        limits = GatewayLimits(max_concurrency=args.groups * args.group_size)
        with Process(_run_replica, args.tokens, vocab) as replica, \
                Process(_run_gateway, replica.url, limits) as gateway:
            env = environment(gateway.url, model_dir, data_path, args.group_size, args.tokens)

            async def run() -> None:
                await env.setup()
                for repeat in range(1, args.repeats + 1):
                    wall, per_group = await one_batch(env, args.groups)
                    sequences = args.groups * args.group_size
                    per_group.sort()
                    print(f"batch {repeat}: {args.groups} groups x {args.group_size} x {args.tokens} tokens in "
                          f"{wall:.2f} s; per group p50 {statistics.median(per_group):.2f} s, "
                          f"p99 {per_group[int(0.99 * (len(per_group) - 1))]:.2f} s; "
                          f"{1000 * wall / sequences:.1f} ms a sequence")

            asyncio.run(run())


if __name__ == "__main__":
    main()
