"""The inference gateway: Atropos's /generate translated for vLLM's tokens-in route, routing, health, pausing.

Replicas here are the CPU backend's real server and, for vLLM (which cannot run on a
CPU), a replica that answers with replies recorded from vLLM 0.24.0 on an H100.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from atroposlib.envs.server_handling.server_baseline import APIServerConfig
from atroposlib.envs.server_handling.vllm_server import VLLMServer
from fastapi import FastAPI

from recipe.atropos.cpu.server import PolicyServer
from recipe.atropos.cpu.server import build_app as build_cpu_app
from recipe.atropos.gateway.server import GatewayServer, atropos_to_vllm_generate, vllm_to_atropos_generate
from tests.conftest import ServedApp
from tests.processes import free_port

RECORDED = json.loads((Path(__file__).parent / "data" / "vllm_0_24_replies.json").read_text())


def recorded_vllm_app(delay_s: float = 0.0) -> FastAPI:
    app = FastAPI()
    app.state.requests = []

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "/models/smollm2", "object": "model"}]}

    @app.post("/inference/v1/generate")
    async def generate(body: dict):
        app.state.requests.append(body)
        await asyncio.sleep(delay_s)
        return RECORDED["inference_v1_generate"]["reply"]

    return app


def test_atropos_request_becomes_vllm_tokens_in_request():
    atropos = {"prompt": {"prompt_token_ids": [5, 6, 7]}, "logprobs": 0, "n": 4, "max_tokens": 16,
               "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "unknown": 1}
    assert atropos_to_vllm_generate(atropos) == {
        "token_ids": [5, 6, 7],
        "sampling_params": {
            "n": 4, "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "stop": ["\n\n"], "logprobs": 0,
            "output_kind": 2,  # vLLM's FINAL_ONLY: the reply is read once the choice has finished
        },
    }
    # without stop strings (matched on text) the replica is spared detokenizing: the reply carries token ids
    assert atropos_to_vllm_generate({"prompt": {"prompt_token_ids": [1]}, "max_new_tokens": 3})["sampling_params"] == {
        "max_tokens": 3, "logprobs": 0, "output_kind": 2, "detokenize": False}


@pytest.mark.parametrize("bad", [{}, {"prompt": "text"}, {"prompt": {"prompt_token_ids": []}}])
def test_a_request_without_prompt_tokens_is_refused(bad):
    with pytest.raises(Exception, match="prompt_token_ids"):
        atropos_to_vllm_generate(bad)


def test_recorded_vllm_reply_becomes_atropos_reply():
    reply = vllm_to_atropos_generate(RECORDED["inference_v1_generate"]["reply"])
    assert reply["logprobs"] == [[[{"2": -0.6830326914787292}]]]
    assert reply["finish_reasons"] == ["stop"]
    assert reply["token_ids"] == [[2]]


def vllm_client(gateway_url: str, tokenizer: str) -> VLLMServer:
    config = APIServerConfig(model_name="model", base_url=f"{gateway_url}/v1", api_key="none", server_type="vllm",
                             tokenizer_name=tokenizer, timeout=60)
    return VLLMServer(config)


def test_atroposlib_vllm_client_through_the_gateway_to_recorded_vllm(tiny_model_dir):
    app = recorded_vllm_app()
    with ServedApp(app) as replica:
        gateway = GatewayServer([replica.url.removeprefix("http://")], port=0)
        gateway.start()
        try:
            client = vllm_client(gateway.url, tiny_model_dir)
            prompt, tokens, logprobs, finish = asyncio.run(
                client._tokens_and_logprobs_completion_wrapper(model="model", input_ids=[5, 6, 7], n=1, max_tokens=8)
            )
        finally:
            gateway.stop()
    assert (prompt, tokens, logprobs, finish) == ([5, 6, 7], [[2]], [[-0.6830326914787292]], ["stop"])
    # the replica's own model name replaces whatever the environment sent
    assert app.state.requests == [{"token_ids": [5, 6, 7], "model": "/models/smollm2",
                                   "sampling_params": {"n": 1, "max_tokens": 8, "logprobs": 0, "output_kind": 2,
                                                       "detokenize": False}}]


def test_n_choices_are_n_independent_single_choice_requests(tiny_model_dir):
    # vLLM 0.24's /inference/v1/generate answers a non-streaming n > 1 request with only the choices
    # that finished last (one, measured on the H100; the longest): topping those up would bias every
    # group towards long solutions, so each choice is sampled by its own request, as verl's agent loop does
    app = recorded_vllm_app()
    with ServedApp(app) as replica:
        gateway = GatewayServer([replica.url], port=0)
        gateway.start()
        try:
            reply = httpx.post(f"{gateway.url}/generate", json={
                "prompt": {"prompt_token_ids": [5, 6]}, "n": 4, "max_tokens": 8, "logprobs": 0}, timeout=30).json()
        finally:
            gateway.stop()
    assert len(reply["logprobs"]) == len(reply["finish_reasons"]) == 4
    assert [r["sampling_params"]["n"] for r in app.state.requests] == [1, 1, 1, 1]


@pytest.fixture
def cpu_replicas(tiny_model_dir):
    servers = [PolicyServer(tiny_model_dir), PolicyServer(tiny_model_dir)]
    with ServedApp(build_cpu_app(servers[0])) as first, ServedApp(build_cpu_app(servers[1])) as second:
        gateway = GatewayServer([first.url, second.url], port=0)
        gateway.start()
        yield gateway, servers
        gateway.stop()


def test_atroposlib_vllm_client_through_the_gateway_to_the_cpu_backend(cpu_replicas, tiny_model_dir):
    gateway, servers = cpu_replicas
    client = vllm_client(gateway.url, tiny_model_dir)
    prompt_ids = [1, 87, 85, 71, 84, 201]
    _, tokens, logprobs, finish = asyncio.run(
        client._tokens_and_logprobs_completion_wrapper(model="model", input_ids=prompt_ids, n=3, max_tokens=6)
    )
    assert len(tokens) == len(logprobs) == len(finish) == 3
    for sample, sample_logprobs, reason in zip(tokens, logprobs, finish):
        assert 1 <= len(sample) <= 6 and len(sample_logprobs) == len(sample)
        assert all(lp <= 0 for lp in sample_logprobs)
        assert reason in ("stop", "length")
        # the log-probs are the replica's own for exactly these tokens
        scores = asyncio.run(servers[0].score(prompt_ids + sample))[len(prompt_ids):]
        assert scores == pytest.approx(sample_logprobs, abs=1e-4)


def test_completions_and_chat_pass_through(cpu_replicas):
    gateway, _ = cpu_replicas
    completion = httpx.post(f"{gateway.url}/v1/completions", json={
        "prompt": [1, 87, 85], "max_tokens": 4, "n": 2, "logprobs": 1, "return_tokens_as_token_ids": True},
        timeout=60).json()
    assert len(completion["choices"]) == 2
    assert all(t.startswith("token_id:") for t in completion["choices"][0]["logprobs"]["tokens"])
    chat = httpx.post(f"{gateway.url}/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "2+3?"}], "max_tokens": 4}, timeout=60).json()
    assert chat["choices"][0]["message"]["role"] == "assistant"


def test_requests_are_spread_over_replicas(cpu_replicas):
    gateway, servers = cpu_replicas
    body = {"prompt": {"prompt_token_ids": [1, 2, 3]}, "max_tokens": 24, "logprobs": 0, "temperature": 1.0}

    def call():
        httpx.post(f"{gateway.url}/generate", json=body, timeout=60).raise_for_status()

    calls = [threading.Thread(target=call) for _ in range(6)]
    for c in calls:
        c.start()
    for c in calls:
        c.join()
    assert all(count == 0 for count in gateway.gateway._in_flight.values())
    assert sum(1 for _ in gateway.gateway.replicas) == 2


def test_health_is_200_only_while_every_replica_answers(tiny_model_dir):
    with ServedApp(recorded_vllm_app()) as replica:
        dead = f"127.0.0.1:{free_port()}"
        gateway = GatewayServer([replica.url, dead], port=0)
        gateway.start()
        try:
            answer = httpx.get(f"{gateway.url}/health", timeout=30)
            assert answer.status_code == 503
            assert answer.json()["replicas"][f"http://{dead}"]["ok"] is False
        finally:
            gateway.stop()
        gateway = GatewayServer([replica.url], port=0)
        gateway.start()
        try:
            assert httpx.get(f"{gateway.url}/health", timeout=30).status_code == 200
        finally:
            gateway.stop()


TWO_TOKENS = {"prompt": {"prompt_token_ids": [1, 2]}, "max_tokens": 2, "logprobs": 0}


@contextlib.contextmanager
def gateway_to_slow_replica(delay_s: float = 0.6):
    """A gateway over one recorded-vLLM replica that takes ``delay_s`` to answer: (replica app, gateway)."""
    app = recorded_vllm_app(delay_s=delay_s)
    with ServedApp(app) as replica:
        gateway = GatewayServer([replica.url], port=0)
        gateway.start()
        try:
            yield app, gateway
        finally:
            gateway.stop()


def test_pause_holds_new_requests_and_drains_those_in_flight():
    with gateway_to_slow_replica() as (app, gateway):
        done = {}

        def call(name):
            done[name] = httpx.post(f"{gateway.url}/generate", json=TWO_TOKENS, timeout=30).status_code

        in_flight = threading.Thread(target=call, args=("in_flight",))
        in_flight.start()
        time.sleep(0.2)
        started = time.monotonic()
        gateway.pause()  # returns once the replica has answered the request in flight
        assert time.monotonic() - started >= 0.2
        assert len(app.state.requests) == 1
        in_flight.join(timeout=10)
        assert done["in_flight"] == 200
        held = threading.Thread(target=call, args=("held",))
        held.start()
        time.sleep(0.5)
        assert "held" not in done and len(app.state.requests) == 1
        gateway.resume()
        held.join(timeout=10)
        assert done["held"] == 200 and len(app.state.requests) == 2


def test_idle_clock_runs_only_while_open_with_nothing_in_flight():
    # what atropos/batch_wait_idle_s is read from: the replicas' idle time while the trainer waits
    with gateway_to_slow_replica() as (_, gateway):
        start = gateway.idle_seconds()
        time.sleep(0.3)
        called = time.monotonic()
        before_call = gateway.idle_seconds()
        assert before_call - start >= 0.3  # open, nothing in flight
        assert httpx.post(f"{gateway.url}/generate", json=TWO_TOKENS, timeout=30).status_code == 200
        after_call = gateway.idle_seconds()
        # the 0.6 s (at least) the request was at the replica is not idle; its way in and out is
        assert after_call - before_call <= time.monotonic() - called - 0.6, (before_call, after_call)
        gateway.pause()
        paused_at = gateway.idle_seconds()
        time.sleep(0.3)
        assert gateway.idle_seconds() == paused_at  # paused: the replicas sleep or sync
        gateway.resume()
        time.sleep(0.3)
        assert gateway.idle_seconds() - paused_at >= 0.3


def test_the_replica_clock_times_each_request_from_sent_to_answered():
    # what atropos/replica/* is read from: verl's agent loop times each sample the same way
    with gateway_to_slow_replica(delay_s=0.3) as (_, gateway):
        assert gateway.take_replica_timing().requests == 0
        reply = httpx.post(f"{gateway.url}/generate", json={**TWO_TOKENS, "n": 4}, timeout=30)
        assert reply.status_code == 200
        timing = gateway.take_replica_timing()
        assert gateway.take_replica_timing().requests == 0  # each take starts afresh
    # four single-choice requests, sent together, each answered with one token after 0.3 s
    assert (timing.requests, timing.tokens) == (4, 4)
    assert 0.3 <= timing.request_s_mean <= timing.request_s_max <= timing.span_s < 2.0
    assert timing.start_spread_s < 0.2
    assert timing.tokens_per_s == pytest.approx(4 / timing.span_s)
    assert timing.metrics()["atropos/replica/requests"] == 4.0


def test_gateway_port_in_use_is_a_clear_error():
    with ServedApp(recorded_vllm_app()) as replica:
        with pytest.raises(OSError, match="trainer.atropos.gateway_port"):
            GatewayServer([replica.url], port=replica.port)
