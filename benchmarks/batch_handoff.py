"""Where the tail of a batch goes: from the last group's POST to the trainer holding the batch.

Colocated, the replicas sit idle from the moment they answer the last request of a batch until the
trainer has its batch (``atropos/batch_wait_idle_s``). Past the environment's own decoding and
scoring, that tail is: the environment POSTing the last group, the trajectory API storing it and
forming the batch, and the trainer's client polling ``GET /batch``, decoding it and converting it.
Everything here is the real thing: the API is ``python -m recipe.atropos.api`` in its own process on
loopback (its SQLite file in a temporary directory), registered with as the trainer and an environment
do; groups are posted by atroposlib's own ``BaseEnv._send_scored_data_to_api`` (a new aiohttp session,
JSON gzipped, ``/scored_data``), as the ``gsm8k`` environment sends them (tokens, masks, scores,
inference log-probs); and the trainer side is its :class:`AtroposClient` and :class:`BatchPrefetcher`
converting with ``convert_groups`` (pad id and vocabulary of Qwen2.5).

Each repeat posts every group but the last (not timed), asks the prefetcher for a batch and lets it
poll for a moment (as the trainer waits while the last groups are generated), then posts the last
group and times: (a) that POST's round trip, (b) from its return to the client returning the batch
(poll wait, ``GET /batch``, decoding), (c) the conversion (the prefetcher's ``convert_s``), (d) the
whole, from the start of the POST to the batch being ready. Then, with a full batch queued, a direct
``GET /batch`` as the trainer's client sends it (``Accept-Encoding: identity``) and one asking for
``gzip`` (httpx's and aiohttp's default), with the response's size; and in this process the gzip
(level 9, as Starlette's ``GZipMiddleware`` compresses it) and the JSON decoding of that body, and
the gzip of one group as the environment sends it. Prints the median and p90 of each over ``--repeats``.

    python benchmarks/batch_handoff.py
    python benchmarks/batch_handoff.py --groups 32 --group-size 8 --prompt-tokens 150 --response-tokens 285 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
from atroposlib.envs.base import BaseEnv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gateway_latency import percentile  # noqa: E402
from recipe.atropos.trainer.batch_pipeline import convert_groups  # noqa: E402
from recipe.atropos.trainer.prefetch import BatchPrefetcher  # noqa: E402
from recipe.atropos.trainer.trajectory_client import AtroposClient, Registration  # noqa: E402
from tests.processes import free_port, start_service  # noqa: E402

VOCAB_SIZE = 151936  # Qwen2.5's, as the launcher passes it (--vocab-size)
PAD_TOKEN_ID = 151643


class Environment:
    """Posts scored groups with atroposlib's own ``BaseEnv`` code (no model, no tokenizer)."""

    _send_scored_data_to_api = BaseEnv._send_scored_data_to_api
    _post_json_with_compression = BaseEnv._post_json_with_compression

    def __init__(self, url: str, group_size: int, max_token_length: int):
        self.config = SimpleNamespace(rollout_server_url=url)
        body = {"max_token_length": max_token_length, "desired_name": "gsm8k", "weight": 1.0,
                "min_batch_allocation": None, "group_size": group_size}
        answer = httpx.post(f"{url}/register-env", json=body, timeout=10).json()
        assert answer["status"] == "success", answer
        self.env_id = answer["env_id"]


def scored_group(rng: random.Random, size: int, prompt_tokens: int, response_tokens: int) -> dict:
    """A group as ``gsm8k`` returns it and ``handle_send_to_api`` completes it."""
    prompt = [rng.randrange(VOCAB_SIZE) for _ in range(prompt_tokens)]
    group = {"tokens": [], "masks": [], "scores": [], "inference_logprobs": []}
    for _ in range(size):
        response = [rng.randrange(VOCAB_SIZE) for _ in range(response_tokens)]
        group["tokens"].append(prompt + response)
        group["masks"].append([-100] * prompt_tokens + response)
        group["inference_logprobs"].append([1.0] * prompt_tokens + [-rng.expovariate(2.0) for _ in response])
        group["scores"].append(float(rng.random() < 0.5))
    for key in ("ref_logprobs", "overrides", "group_overrides", "distill_token_ids", "distill_logprobs"):
        group[key] = None
    return group


def timed_get(url: str, encoding: str) -> tuple[float, float, int, int]:
    """``GET /batch`` with ``Accept-Encoding: encoding``: (seconds to the whole body, to decode it, wire bytes,
    JSON bytes)."""
    with httpx.Client(timeout=60) as http:
        http.get(f"{url}/status")  # connected before the clock starts, as the client's pooled connection is
        started = time.perf_counter()
        response = http.get(f"{url}/batch", headers={"Accept-Encoding": encoding})
        received = time.perf_counter()
        body = response.json()
        decoded = time.perf_counter()
    assert body["batch"] is not None, "no full batch was queued"
    return received - started, decoded - received, response.num_bytes_downloaded, len(response.content)


def report(name: str, values: list[float]) -> None:
    print(f"  {name:<52} p50 {statistics.median(values) * 1e3:8.1f} ms   p90 {percentile(values, 90) * 1e3:8.1f} ms")


async def main(args: argparse.Namespace) -> None:
    logging.getLogger("atroposlib.envs.base").setLevel(logging.INFO)  # it logs every answer at DEBUG
    rng = random.Random(0)
    batch_size = args.groups * args.group_size
    max_token_len = args.prompt_tokens + args.response_tokens
    groups = [scored_group(rng, args.group_size, args.prompt_tokens, args.response_tokens)
              for _ in range(args.groups)]
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "recipe.atropos.api", "--host", "127.0.0.1", "--port", str(port),
                   "--db", f"{workdir}/api.sqlite3", "--vocab-size", str(VOCAB_SIZE)]
        api = start_service("api", command, Path(workdir), ready=lambda: httpx.get(f"{url}/", timeout=1).is_success)
        client = AtroposClient(url)  # the trainer's defaults (trainer.atropos)
        marks: dict[str, float] = {}

        def convert(fetched: list[dict]):
            marks["fetched"] = time.perf_counter()
            return convert_groups(fetched, max_token_len=max_token_len, pad_token_id=PAD_TOKEN_ID,
                                  require_advantages=False, vocab_size=VOCAB_SIZE, max_group_size=batch_size)

        prefetcher = BatchPrefetcher(client, convert)
        try:
            client.register(Registration(batch_size=batch_size, max_token_len=max_token_len, num_steps=10_000))
            httpx.get(f"{url}/batch", timeout=10)  # environments may register once the trainer has polled
            env = Environment(url, args.group_size, max_token_len)
            prefetcher.start()
            times: dict[str, list[float]] = {key: [] for key in "abcd"}
            for _ in range(args.repeats):
                for group in groups[:-1]:
                    await env._send_scored_data_to_api(dict(group))
                prefetcher.request(1)
                await asyncio.sleep(rng.uniform(0.2, 0.3))  # the client polls every BATCH_POLL_MAX_S by now
                started = time.perf_counter()
                await env._send_scored_data_to_api(dict(groups[-1]))
                posted = time.perf_counter()
                item, _ = await asyncio.to_thread(prefetcher.get)
                ready = time.perf_counter()
                assert item.result.num_groups == args.groups and not item.result.rejections, item.result.rejections
                prefetcher.done_with(item)
                for key, value in zip("abcd", (posted - started, marks["fetched"] - posted, item.convert_s,
                                               ready - started)):
                    times[key].append(value)

            direct: dict[str, list] = {"identity": [], "gzip": []}
            for encoding in direct:
                for _ in range(args.repeats):
                    for group in groups:
                        await env._send_scored_data_to_api(dict(group))
                    direct[encoding].append(timed_get(url, encoding))
        finally:
            prefetcher.stop()
            client.close()
            api.stop(10)

    raw = ('{"batch":[' + ",".join(json.dumps({**g, "env_id": env.env_id}, separators=(",", ":")) for g in groups)
           + "]}").encode()
    one_group = json.dumps(groups[-1]).encode()
    in_process = {"gzip": [], "decode": [], "group gzip": []}
    for _ in range(args.repeats):
        for key, work in (("gzip", lambda: gzip.compress(raw, 9)), ("decode", lambda: json.loads(raw)),
                          ("group gzip", lambda: gzip.compress(one_group))):
            started = time.perf_counter()
            work()
            in_process[key].append(time.perf_counter() - started)

    print(f"{args.groups} groups x {args.group_size} sequences, {args.prompt_tokens} prompt + "
          f"{args.response_tokens} response tokens, {args.repeats} repeats")
    print("last group -> batch ready (trainer's client and prefetcher):")
    report("(a) POST /scored_data of the last group", times["a"])
    report("(b) POST returned -> client returned the batch", times["b"])
    report("(c) conversion (prefetcher's convert_s)", times["c"])
    report("(d) total: POST started -> batch ready", times["d"])
    print("GET /batch with a full batch queued (connection opened beforehand):")
    for encoding, rows in direct.items():
        report(f"{encoding}: request -> whole body", [row[0] for row in rows])
        report(f"{encoding}: JSON decoding of the body (httpx)", [row[1] for row in rows])
        print(f"  {encoding}: {statistics.median(row[2] for row in rows) / 1e6:.2f} MB on the wire, "
              f"{statistics.median(row[3] for row in rows) / 1e6:.2f} MB of JSON")
    print("in this process:")
    report("gzip level 9 of the /batch body (GZipMiddleware's)", in_process["gzip"])
    report("json.loads of the /batch body", in_process["decode"])
    report(f"gzip of one group as BaseEnv posts it ({len(one_group) / 1e3:.0f} kB)", in_process["group gzip"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=150)
    parser.add_argument("--response-tokens", type=int, default=285)
    parser.add_argument("--repeats", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
