"""A request whose caller disconnects leaves the generation window: held, it never starts; generating,
it stops and gives its room back at once. atroposlib cancels an environment's running groups when the
API's queue is full, so a gateway that went on would generate for nobody and hold the window for
``settle_s`` (a real uvicorn gateway over the recorded vLLM stand-in, real HTTP on loopback)."""

from __future__ import annotations

import time

import httpx
import pytest

from recipe.atropos.gateway.server import GatewayServer
from tests.conftest import ServedApp
from tests.test_gateway import recorded_vllm_app

GROUP = 4
BODY = {"prompt": {"prompt_token_ids": [1, 2, 3]}, "n": GROUP, "max_tokens": 4, "logprobs": 0}


def abandoned(gateway: GatewayServer, expected: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(f"{gateway.url}/stats", timeout=10).json()
        if stats["abandoned_by_caller"] >= expected or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_a_held_request_whose_caller_left_never_starts():
    app = recorded_vllm_app()
    with ServedApp(app) as replica:
        # room for one group; returned sequences that never reach an API come back after 2 s
        gateway = GatewayServer([replica.url], port=0, window_settle_s=2.0)
        gateway.start()
        try:
            gateway.size_window(GROUP)
            assert httpx.post(f"{gateway.url}/generate", json=BODY, timeout=30).status_code == 200
            with pytest.raises(httpx.ReadTimeout):  # held at the full window; the caller gives up
                httpx.post(f"{gateway.url}/generate", json=BODY, timeout=0.5)
            assert abandoned(gateway, 1)["abandoned_by_caller"] == 1
            time.sleep(2.5)  # the window's room is back: a request still held would start now
            stats = gateway.window_stats()
        finally:
            gateway.stop()
    assert len(app.state.requests) == GROUP  # the first group's choices, nothing for the caller that left
    assert stats.held_requests == 0 and stats.in_flight == 0 and stats.admitted == GROUP


def test_a_generating_request_whose_caller_left_gives_its_room_back_at_once():
    app = recorded_vllm_app(delay_s=3.0)
    with ServedApp(app) as replica:
        gateway = GatewayServer([replica.url], port=0, window_settle_s=60.0)
        gateway.start()
        try:
            gateway.size_window(GROUP)
            with pytest.raises(httpx.ReadTimeout):  # admitted and generating; the caller gives up
                httpx.post(f"{gateway.url}/generate", json=BODY, timeout=1.0)
            assert abandoned(gateway, 1)["abandoned_by_caller"] == 1
            stats = gateway.window_stats()
            # nothing returned to wait out settle_s (60 s): the next group is admitted and answered now
            started = time.monotonic()
            answered = httpx.post(f"{gateway.url}/generate", json=BODY, timeout=30)
            took = time.monotonic() - started
        finally:
            gateway.stop()
    assert stats.in_flight == 0 and stats.returned == 0 and stats.unsettled == 0
    assert answered.status_code == 200 and len(answered.json()["token_ids"]) == GROUP
    assert took < 10.0, took
