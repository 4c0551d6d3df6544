"""The gateway refuses malformed requests with a 4xx naming the field, refuses unknown model names as
vLLM does, bounds n and max_tokens, and keeps one greedy caller from stalling the others.

The replica is the recorded vLLM 0.24 stand-in of test_gateway.py (one choice per request,
whatever n asks), served by a real uvicorn on loopback; it counts the requests it holds at once.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from fastapi import FastAPI

from recipe.atropos.gateway.requests import GatewayLimits
from recipe.atropos.gateway.server import GatewayServer
from tests.conftest import ServedApp
from tests.test_gateway import RECORDED

GENERATE, COMPLETIONS, CHAT_COMPLETIONS = "/generate", "/v1/completions", "/v1/chat/completions"
LIMITS = GatewayLimits(max_n=8, max_tokens=64, max_concurrency=2)
PROMPT = {"prompt": {"prompt_token_ids": [5, 6, 7]}}
COMPLETION = {"model": "model", "prompt": [5, 6, 7], "max_tokens": 4}
CHAT = {"model": "model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def counting_replica(delay_s: float) -> FastAPI:
    """Answers every route after ``delay_s``; records the most requests it held at once."""
    app = FastAPI()
    app.state.in_flight = 0
    app.state.peak = 0
    app.state.requests = 0

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "/models/smollm2", "object": "model"}]}

    async def held(reply):
        app.state.requests += 1
        app.state.in_flight += 1
        app.state.peak = max(app.state.peak, app.state.in_flight)
        try:
            await asyncio.sleep(delay_s)
        finally:
            app.state.in_flight -= 1
        return reply

    @app.post("/inference/v1/generate")
    async def generate(body: dict):
        return await held(RECORDED["inference_v1_generate"]["reply"])

    @app.post("/v1/completions")
    async def completions(body: dict):
        return await held({"object": "text_completion", "model": body["model"], "choices": []})

    @app.post("/v1/chat/completions")
    async def chat(body: dict):
        return await held({"object": "chat.completion", "model": body["model"], "choices": []})

    return app


@pytest.fixture(scope="module")
def served_gateway():
    app = counting_replica(delay_s=0.05)
    with ServedApp(app) as replica:
        server = GatewayServer([replica.url], port=0, limits=LIMITS, model_names=("model",))
        server.start()
        try:
            yield server, app
        finally:
            server.stop()


@pytest.fixture
def gateway(served_gateway):
    served_gateway[1].state.requests = 0
    return served_gateway


def raw(route: str, body: dict) -> tuple[str, bytes, str]:
    return route, json.dumps(body).encode(), "application/json"


# (case, route, body bytes, content type, status, field named in the error)
MALFORMED = [
    ("invalid JSON", "/generate", b'{"prompt": ', "application/json", 400, "body"),
    ("body is a list", "/generate", b"[1, 2, 3]", "application/json", 400, "body"),
    ("NaN temperature", *raw(GENERATE, {**PROMPT, "temperature": float("nan")}), 400, "temperature"),
    ("Infinity temperature", *raw(GENERATE, {**PROMPT, "temperature": float("inf")}), 400, "temperature"),
    ("negative temperature", *raw(GENERATE, {**PROMPT, "temperature": -1.0}), 400, "temperature"),
    ("non-integer logprobs", *raw(GENERATE, {**PROMPT, "logprobs": 1.5}), 400, "logprobs"),
    ("string logprobs", *raw(GENERATE, {**PROMPT, "logprobs": "one"}), 400, "logprobs"),
    ("no prompt tokens", *raw(GENERATE, {"prompt": {"prompt_token_ids": []}}), 400, "prompt.prompt_token_ids"),
    ("negative token id", *raw(GENERATE, {"prompt": {"prompt_token_ids": [5, -1]}}), 400, "prompt.prompt_token_ids.1"),
    ("text prompt", *raw(GENERATE, {"prompt": "hello"}), 400, "prompt"),
    ("n too large", *raw(GENERATE, {**PROMPT, "n": 10000}), 400, "n"),
    ("n zero", *raw(GENERATE, {**PROMPT, "n": 0}), 400, "n"),
    ("max_tokens too large", *raw(GENERATE, {**PROMPT, "max_tokens": 65}), 400, "max_tokens"),
    ("max_new_tokens too large", *raw(GENERATE, {**PROMPT, "max_new_tokens": 10**6}), 400, "max_new_tokens"),
    ("text/plain body", "/generate", json.dumps(PROMPT).encode(), "text/plain", 415, "content-type"),
    ("completions: text/plain", COMPLETIONS, json.dumps(COMPLETION).encode(), "text/plain", 415, "content-type"),
    ("completions: no prompt", *raw(COMPLETIONS, {"model": "model"}), 400, "prompt"),
    ("completions: NaN top_p", *raw(COMPLETIONS, {**COMPLETION, "top_p": float("nan")}), 400, "top_p"),
    ("completions: n too large", *raw(COMPLETIONS, {**COMPLETION, "n": 9}), 400, "n"),
    ("completions: max_tokens too large", *raw(COMPLETIONS, {**COMPLETION, "max_tokens": 10**6}), 400, "max_tokens"),
    ("completions: streaming", *raw(COMPLETIONS, {**COMPLETION, "stream": True}), 400, "stream"),
    ("completions: unknown model", *raw(COMPLETIONS, {**COMPLETION, "model": "gpt-4"}), 404, "model"),
    ("chat: messages not a list", *raw(CHAT_COMPLETIONS, {**CHAT, "messages": "hi"}), 400, "messages"),
    ("chat: message without role", *raw(CHAT_COMPLETIONS, {**CHAT, "messages": [{"content": "hi"}]}), 400,
     "messages.0.role"),
    ("chat: logprobs not a bool", *raw(CHAT_COMPLETIONS, {**CHAT, "logprobs": 3}), 400, "logprobs"),
    ("chat: max_completion_tokens too large", *raw(CHAT_COMPLETIONS, {**CHAT, "max_completion_tokens": 65}), 400,
     "max_completion_tokens"),
    ("chat: unknown model", *raw(CHAT_COMPLETIONS, {**CHAT, "model": "other"}), 404, "model"),
    ("generate: unknown model", *raw(GENERATE, {**PROMPT, "model": "other"}), 404, "model"),
]


@pytest.mark.parametrize("case, route, body, content_type, status, field", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_malformed_request_gets_a_4xx_naming_the_field(gateway, case, route, body, content_type, status, field):
    server, replica = gateway
    response = httpx.post(f"{server.url}{route}", content=body, headers={"content-type": content_type}, timeout=10)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["code"] == status, error
    assert field in error["message"] or status == 404, error
    # nothing reached the replica
    assert replica.state.requests == 0


def test_an_unknown_model_is_refused_as_vllm_refuses_it(gateway):
    server, _ = gateway
    response = httpx.post(f"{server.url}/v1/completions", json={**COMPLETION, "model": "gpt-4"}, timeout=10)
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "The model `gpt-4` does not exist.", "type": "NotFoundError",
                                         "param": "model", "code": 404}}


@pytest.mark.parametrize("route, body", [
    ("/generate", {**PROMPT, "n": 8, "max_tokens": 64, "temperature": 1, "logprobs": 0, "unknown_kwarg": 1}),
    ("/v1/completions", {**COMPLETION, "echo": False}),  # keys the gateway does not name pass through
    ("/v1/completions", {**COMPLETION, "model": "/models/smollm2"}),  # the replica's own id
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 1}),
    ("/v1/chat/completions", {key: value for key, value in CHAT.items() if key != "model"}),
])
def test_well_formed_requests_at_the_limits_pass(gateway, route, body):
    server, replica = gateway
    response = httpx.post(f"{server.url}{route}", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert replica.state.requests == body.get("n", 1)


def test_fan_out_keeps_to_the_concurrency_limit_and_others_keep_their_latency():
    app = counting_replica(delay_s=0.2)
    limits = GatewayLimits(max_n=64, max_tokens=64, max_concurrency=4)
    with ServedApp(app) as replica:
        server = GatewayServer([replica.url], port=0, limits=limits)
        server.start()
        try:
            with httpx.Client(timeout=60) as client:
                alone = _timed(client, server.url, n=1)

                async def greedy_and_ordinary():
                    async with httpx.AsyncClient(timeout=60) as async_client:
                        greedy = asyncio.create_task(
                            async_client.post(f"{server.url}/generate", json={**PROMPT, "n": 64, "max_tokens": 4}))
                        await asyncio.sleep(0.3)  # the greedy fan-out is under way
                        started = time.monotonic()
                        ordinary = await async_client.post(f"{server.url}/generate", json={**PROMPT, "max_tokens": 4})
                        ordinary_s = time.monotonic() - started
                        return await greedy, ordinary, ordinary_s

                greedy, ordinary, ordinary_s = asyncio.run(greedy_and_ordinary())
        finally:
            server.stop()
    assert greedy.status_code == ordinary.status_code == 200
    assert len(greedy.json()["token_ids"]) == 64
    # at most max_concurrency sub-requests, plus the ordinary one
    assert app.state.peak <= limits.max_concurrency + 1, app.state.peak
    # 64 sub-requests of 0.2 s, 4 at a time, take over 3 s; the ordinary request did not wait for them
    assert ordinary_s < alone + 1.5, (ordinary_s, alone)


def _timed(client: httpx.Client, url: str, n: int) -> float:
    started = time.monotonic()
    client.post(f"{url}/generate", json={**PROMPT, "n": n, "max_tokens": 4}).raise_for_status()
    return time.monotonic() - started
