"""Latency of ordinary gateway requests while greedy callers ask for many choices each.

The replica and the gateway each run in their own process. The replica is a stand-in
for vLLM's tokens-in route on loopback: one choice per request (as vLLM 0.24 answers
whatever ``n`` asks), ``--delay-ms`` per request, at most
``--replica-capacity`` requests served at once (the rest queue, as in an engine whose
batch is full). The gateway fans each ``n`` > 1 request out into single-choice requests,
at most ``--max-concurrency`` in flight gateway-wide.

Prints, for ordinary requests (``n=1``) from ``--ordinary-callers`` callers: p50 and p99
alone, then while ``--greedy-callers`` callers keep sending ``n=--max-n`` requests, once
with the configured fan-out limit and once with a limit as large as the greedy load (what
an unbounded fan-out does); and what a request for ``n=10000`` gets.

    python benchmarks/gateway_latency.py
    python benchmarks/gateway_latency.py --delay-ms 50 --replica-capacity 32 --max-concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import statistics
import threading
import time

import httpx
import uvicorn
from fastapi import FastAPI

from recipe.atropos.gateway.requests import GatewayLimits
from recipe.atropos.gateway.server import GatewayServer

PROMPT = {"prompt": {"prompt_token_ids": [5, 6, 7]}, "max_tokens": 8, "logprobs": 0}
ONE_CHOICE = {"choices": [{"token_ids": [2], "finish_reason": "stop", "logprobs": {"content": [{"logprob": -0.5}]}}]}


def stand_in_replica(delay_s: float, capacity: int) -> FastAPI:
    app = FastAPI()
    slots = asyncio.Semaphore(capacity)

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stand-in", "object": "model"}]}

    @app.post("/inference/v1/generate")
    async def generate(body: dict):
        async with slots:
            await asyncio.sleep(delay_s)
        return ONE_CHOICE

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_replica(port: int, delay_s: float, capacity: int) -> None:
    uvicorn.run(stand_in_replica(delay_s, capacity), host="127.0.0.1", port=port, log_level="warning")


def _run_gateway(port: int, replica_url: str, limits: GatewayLimits) -> None:
    gateway = GatewayServer([replica_url], port=port, limits=limits)
    gateway.start()
    threading.Event().wait()


class Process:
    """A server in its own process (as the replica and the gateway are in a run), on a free loopback port."""

    def __init__(self, target, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = multiprocessing.Process(target=target, args=(self.port, *args), daemon=True)

    def __enter__(self):
        self._process.start()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no answer on {self.url}/health within 60 s")
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._process.terminate()
        self._process.join(timeout=10)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def ordinary_latencies(url: str, callers: int, requests: int, greedy_callers: int, greedy_n: int) -> list[float]:
    latencies: list[float] = []
    done = asyncio.Event()
    limits = httpx.Limits(max_connections=callers + greedy_callers + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def greedy():
            while not done.is_set():
                response = await client.post(f"{url}/generate", json={**PROMPT, "n": greedy_n})
                if response.status_code != 200:
                    raise RuntimeError(f"a greedy request got HTTP {response.status_code}: {response.text[:300]}")

        async def ordinary(count: int):
            for _ in range(count):
                started = time.monotonic()
                (await client.post(f"{url}/generate", json=PROMPT)).raise_for_status()
                latencies.append(time.monotonic() - started)

        greedy_tasks = [asyncio.create_task(greedy()) for _ in range(greedy_callers)]
        if greedy_tasks:
            await asyncio.sleep(0.5)  # the greedy fan-outs are under way
        await asyncio.gather(*[ordinary(requests // callers) for _ in range(callers)])
        done.set()
        await asyncio.gather(*greedy_tasks)
    return latencies


def measure(replica_url: str, limits: GatewayLimits, args, greedy_callers: int) -> list[float]:
    with Process(_run_gateway, replica_url, limits) as gateway:
        return asyncio.run(
            ordinary_latencies(gateway.url, args.ordinary_callers, args.ordinary_requests, greedy_callers, args.max_n)
        )


def report(label: str, latencies: list[float]) -> None:
    ms = [1000 * s for s in latencies]
    print(f"{label:<58} p50 {statistics.median(ms):8.1f} ms   p99 {percentile(ms, 99):8.1f} ms   ({len(ms)} requests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=20.0, help="time the replica takes per request")
    parser.add_argument("--replica-capacity", type=int, default=48, help="requests the replica serves at once")
    parser.add_argument("--max-n", type=int, default=64, help="trainer.atropos.gateway_max_n; greedy callers ask this")
    parser.add_argument("--max-concurrency", type=int, default=32, help="trainer.atropos.gateway_max_concurrency")
    parser.add_argument("--greedy-callers", type=int, default=4)
    parser.add_argument("--ordinary-callers", type=int, default=4)
    parser.add_argument("--ordinary-requests", type=int, default=200)
    args = parser.parse_args()

    with Process(_run_replica, args.delay_ms / 1000, args.replica_capacity) as replica:
        bounded = GatewayLimits(max_n=args.max_n, max_concurrency=args.max_concurrency)
        unbounded = GatewayLimits(max_n=args.max_n, max_concurrency=args.greedy_callers * args.max_n)
        print(f"replica: one choice per request, {args.delay_ms:g} ms each, {args.replica_capacity} at once; "
              f"{args.ordinary_callers} ordinary callers (n=1), {args.greedy_callers} greedy callers (n={args.max_n})")
        report("ordinary requests alone", measure(replica.url, bounded, args, greedy_callers=0))
        report(f"with greedy callers, fan-out limit {args.max_concurrency} (gateway_max_concurrency)",
               measure(replica.url, bounded, args, greedy_callers=args.greedy_callers))
        report(f"with greedy callers, fan-out limit {unbounded.max_concurrency} (as if unbounded)",
               measure(replica.url, unbounded, args, greedy_callers=args.greedy_callers))

        with Process(_run_gateway, replica.url, bounded) as gateway:
            started = time.monotonic()
            response = httpx.post(f"{gateway.url}/generate", json={**PROMPT, "n": 10000}, timeout=600)
            print(f"n=10000: HTTP {response.status_code} in {1000 * (time.monotonic() - started):.1f} ms: "
                  f"{response.json()['error']['message'] if response.status_code != 200 else 'served'}")


if __name__ == "__main__":
    main()
