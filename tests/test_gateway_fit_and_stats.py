"""The gateway meets what stock environments send: max_tokens cut to fit the context, every request counted.

atroposlib's gsm8k server asks for ``max_tokens = env.max_token_length`` (prompt + response as the
launcher sets it), so prompt + max_tokens is always more than the replica's context: the replica
refuses (HTTP 400), every request. Through the gateway the request is cut to fit and counted.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from atroposlib.envs.server_handling.server_baseline import APIServerConfig
from atroposlib.envs.server_handling.vllm_server import VLLMServer

from recipe.atropos.cpu.server import PolicyServer
from recipe.atropos.cpu.server import build_app as build_cpu_app
from recipe.atropos.gateway.context_fit import fit_to_context, token_prompt_length, tokenize_request
from recipe.atropos.gateway.server import GatewayServer
from tests.conftest import ServedApp

CONTEXT = 48


@pytest.fixture
def small_context(tiny_model_dir):
    """A real CPU replica with a 48-token context behind a real gateway."""
    with ServedApp(build_cpu_app(PolicyServer(tiny_model_dir, max_model_len=CONTEXT))) as replica:
        gateway = GatewayServer([replica.url], port=0)
        gateway.start()
        try:
            yield replica, gateway
        finally:
            gateway.stop()


def test_the_replica_refuses_what_a_stock_env_asks_for(small_context):
    replica, _ = small_context
    body = {"token_ids": list(range(1, 11)), "sampling_params": {"max_tokens": CONTEXT, "logprobs": 0}}
    answer = httpx.post(f"{replica.url}/inference/v1/generate", json={**body, "model": "model"}, timeout=60)
    assert answer.status_code == 400 and "maximum context length" in answer.text


def test_generate_max_tokens_is_cut_to_fit_and_counted(small_context):
    _, gateway = small_context
    prompt = list(range(1, 11))
    body = {"prompt": {"prompt_token_ids": prompt}, "n": 2, "max_tokens": CONTEXT, "logprobs": 0,
            "temperature": 1.0}
    answer = httpx.post(f"{gateway.url}/generate", json=body, headers={"Authorization": "Bearer gsm8k_0"}, timeout=120)
    assert answer.status_code == 200, answer.text
    lengths = [len(ids) for ids in answer.json()["token_ids"]]
    assert len(lengths) == 2 and all(1 <= n <= CONTEXT - len(prompt) for n in lengths)
    stats = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    assert stats["max_tokens_clamped"]["gsm8k_0"] >= 1
    assert stats["requests"]["gsm8k_0"] == {"POST /generate 200": 1}


def test_chat_max_tokens_is_counted_by_the_replica_and_cut(small_context):
    _, gateway = small_context
    body = {"messages": [{"role": "user", "content": "hit?"}], "max_tokens": 512, "temperature": 1.0}
    answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120,
                        headers={"Authorization": "Bearer blackjack_0"})
    assert answer.status_code == 200, answer.text
    stats = httpx.get(f"{gateway.url}/stats", timeout=10).json()
    assert stats["max_tokens_clamped"] == {"blackjack_0": 1}


def test_requests_are_counted_per_client_with_their_status(small_context, tiny_model_dir):
    _, gateway = small_context
    # atroposlib's own client sends the API key the launcher gives each environment
    config = APIServerConfig(model_name="m", base_url=f"{gateway.url}/v1", api_key="gsm8k_server_0",
                             server_type="vllm", tokenizer_name=tiny_model_dir, timeout=60)
    asyncio.run(VLLMServer(config)._tokens_and_logprobs_completion_wrapper(
        model="m", input_ids=[1, 2, 3], n=1, max_tokens=4))
    # a prompt that alone fills the context is not cut: the replica's refusal comes through, counted
    too_long = {"prompt": {"prompt_token_ids": [5] * CONTEXT}, "max_tokens": 4}
    refused = httpx.post(f"{gateway.url}/generate", json=too_long, headers={"Authorization": "Bearer gsm8k_server_0"},
                         timeout=60)
    assert refused.status_code == 400
    httpx.post(f"{gateway.url}/generate", json={"prompt": "text"}, timeout=60)
    requests = httpx.get(f"{gateway.url}/stats", timeout=10).json()["requests"]
    assert requests["gsm8k_server_0"] == {"POST /generate 200": 1, "POST /generate 400": 1}
    assert requests["anonymous"] == {"POST /generate 400": 1}


def test_fit_to_context_rules():
    generate = {"token_ids": [1] * 10, "sampling_params": {"max_tokens": 100}}
    assert token_prompt_length("/inference/v1/generate", generate) == 10
    assert fit_to_context("/inference/v1/generate", generate, 10, 48)["sampling_params"] == {"max_tokens": 38}
    assert fit_to_context("/inference/v1/generate", generate, 10, 200) is None  # fits: untouched
    assert fit_to_context("/inference/v1/generate", generate, 48, 48) is None  # no room: the replica says so
    chat = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 90}
    assert token_prompt_length("/v1/chat/completions", chat) is None
    assert tokenize_request("/v1/chat/completions", chat)["add_generation_prompt"] is True
    assert fit_to_context("/v1/chat/completions", chat, 8, 48)["max_completion_tokens"] == 40
    assert token_prompt_length("/v1/completions", {"prompt": [[1, 2], [1, 2, 3]]}) == 3
    assert fit_to_context("/v1/completions", {"prompt": "x"}, 3, 48) is None  # names no limit
