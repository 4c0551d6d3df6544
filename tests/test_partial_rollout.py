"""A weight sync cuts generation short and the gateway finishes it: one complete, correctly versioned sequence.

The replica is the CPU backend's real server, whose ``POST /pause`` aborts what is in flight
as vLLM's pause does (each request comes back with what it generated, ``finish_reason``
"abort") and holds new requests until ``POST /resume``; the gateway in front of it is the one
the trainer runs.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from recipe.atropos.cpu.server import PolicyServer
from recipe.atropos.cpu.server import build_app as build_cpu_app
from recipe.atropos.gateway.server import GatewayServer
from tests.conftest import ServedApp

LONG = 1500  # new tokens: long enough on a CPU to be caught in flight


@pytest.fixture
def rig(tiny_model_dir):
    server = PolicyServer(tiny_model_dir)
    server.stop_token_ids = ()  # every request runs to max_tokens: its length says nothing was lost
    with ServedApp(build_cpu_app(server)) as replica:
        gateway = GatewayServer([replica.url], port=0)
        gateway.start()
        try:
            yield server, replica, gateway
        finally:
            gateway.stop()


def in_background(post) -> tuple[threading.Thread, dict]:
    answer: dict = {}
    thread = threading.Thread(target=lambda: answer.update(post()), daemon=True)
    thread.start()
    return thread, answer


def sync_while_generating(server: PolicyServer, replica: ServedApp, gateway: GatewayServer, requests: int = 1) -> int:
    """What the trainer does with partial_rollout: hold the gateway, abort, (sync,) resume both;
    ``requests`` are in flight at the replica when it begins."""
    deadline = time.monotonic() + 60
    while server._in_flight < requests:
        assert time.monotonic() < deadline, "the request never reached the replica"
        time.sleep(0.01)
    time.sleep(0.2)  # some tokens in
    drain = gateway.pause(drain=False)
    aborted = httpx.post(f"{replica.url}/pause", timeout=60).json()["aborted_count"]
    # ... the new weights would load here ...
    httpx.post(f"{replica.url}/resume", timeout=10).raise_for_status()
    gateway.resume(1)
    assert drain.requests == requests and drain.seconds < 1.0
    return aborted


def test_an_aborted_tokens_in_request_is_finished_under_the_new_weights(rig):
    server, replica, gateway = rig
    prompt = [1, 40, 41, 42]
    thread, answer = in_background(lambda: httpx.post(
        f"{gateway.url}/generate",
        json={"prompt": {"prompt_token_ids": prompt}, "n": 2, "max_tokens": LONG, "logprobs": 0}, timeout=300,
    ).json())
    # each choice is its own request
    assert sync_while_generating(server, replica, gateway, requests=2) == 2
    thread.join(timeout=300)
    # every choice complete: all the tokens asked for, a log-prob for each, no trace of the abort
    assert answer["finish_reasons"] == ["length", "length"]
    assert [len(tokens) for tokens in answer["token_ids"]] == [LONG, LONG]
    assert [len(logprobs) for logprobs in answer["logprobs"]] == [LONG, LONG]
    stats = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    assert stats["continued_after_abort"] == 2
    # versioned by the oldest weights that sampled it: the sync came after it started
    for tokens in answer["token_ids"]:
        assert gateway.ledger.version_of(prompt + tokens) == 0


def test_an_aborted_openai_request_is_sent_again_whole(rig):
    server, replica, gateway = rig
    thread, answer = in_background(lambda: httpx.post(
        f"{gateway.url}/v1/completions", json={"model": "model", "prompt": "hello", "max_tokens": LONG}, timeout=300,
    ).json())
    assert sync_while_generating(server, replica, gateway) == 1
    thread.join(timeout=300)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == LONG
