"""The CPU backend's HTTP server: vLLM's reply shapes, the sleep gate, weight loading."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from recipe.atropos.cpu.generation import prompt_logprobs, sample
from recipe.atropos.cpu.server import PolicyServer, build_app

RECORDED = json.loads((Path(__file__).parent / "data" / "vllm_0_24_replies.json").read_text())


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return PolicyServer(tiny_model_dir, max_model_len=256)


@pytest.fixture(scope="module")
def client(policy):
    return TestClient(build_app(policy))


def same_shape(ours, theirs, path="reply"):
    """Every key vLLM's reply has, ours has too, with the same JSON type (recursively)."""
    if isinstance(theirs, dict):
        assert isinstance(ours, dict), f"{path}: {type(ours).__name__}, vLLM has an object"
        if all(key.startswith("token_id:") or key.isdigit() for key in theirs):
            return  # keyed by token: the keys are data, not schema
        for key, value in theirs.items():
            if key in ("service_tier", "system_fingerprint", "kv_transfer_params", "routed_experts", "prompt_token_ids",
                       "prompt_tokens_details"):
                continue
            assert key in ours, f"{path}.{key} missing"
            if value is not None and ours[key] is not None:
                same_shape(ours[key], value, f"{path}.{key}")
    elif isinstance(theirs, list) and theirs and ours:
        same_shape(ours[0], theirs[0], f"{path}[0]")


def test_tokens_in_generate_has_vllms_shape(client):
    reply = client.post("/inference/v1/generate", json={
        "token_ids": [1, 87, 85], "sampling_params": {"max_tokens": 8, "temperature": 0, "logprobs": 1}}).json()
    same_shape(reply, RECORDED["inference_v1_generate"]["reply"])
    choice = reply["choices"][0]
    assert len(choice["logprobs"]["content"]) == len(choice["token_ids"]) <= 8
    assert choice["logprobs"]["content"][0]["token"] == f"token_id:{choice['token_ids'][0]}"


def test_token_id_completions_have_vllms_shape(client):
    reply = client.post("/v1/completions", json={
        "prompt": [1, 87, 85, 71], "max_tokens": 12, "temperature": 1.0, "n": 4, "logprobs": 1,
        "return_tokens_as_token_ids": True}).json()
    same_shape(reply, RECORDED["completions_token_ids"]["reply"])
    assert len(reply["choices"]) == 4
    assert reply["usage"]["prompt_tokens"] == 4


def test_prompt_logprobs_have_vllms_shape_and_match_the_model(client, policy):
    ids = [1, 87, 85, 71, 84]
    request = {"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    reply = client.post("/v1/completions", json=request).json()
    same_shape(reply, RECORDED["completions_prompt_logprobs"]["reply"])
    entries = reply["choices"][0]["prompt_logprobs"]
    assert entries[0] is None
    expected = prompt_logprobs(policy.model, ids)
    for token, entry, want in zip(ids[1:], entries[1:], expected[1:]):
        assert entry[str(token)]["logprob"] == pytest.approx(want)


def test_greedy_samples_are_the_argmax_and_logprobs_are_the_models(policy):
    prompt = [1, 87, 85]
    (s,) = sample(policy.model, prompt, n=1, max_tokens=5, temperature=0, stop_token_ids=policy.stop_token_ids)
    scores = prompt_logprobs(policy.model, prompt + s.token_ids)[len(prompt):]
    assert s.logprobs == pytest.approx(scores, abs=1e-5)
    with torch.no_grad():
        logits = policy.model(torch.tensor([prompt])).logits[0, -1]
    assert s.token_ids[0] == int(logits.argmax())


@pytest.mark.parametrize("body, message", [
    ({"prompt": [1, 99999], "max_tokens": 2}, "out of the vocabulary"),
    ({"prompt": [1] * 250, "max_tokens": 10}, "maximum context length is 256"),
    ({"prompt": [], "max_tokens": 2}, "no tokens"),
])
def test_bad_requests_are_refused_with_the_reason(client, body, message):
    reply = client.post("/v1/completions", json=body)
    assert reply.status_code == 400
    assert message in reply.json()["detail"]


def test_sleep_holds_requests_until_wake_up(tiny_model_dir):
    server = PolicyServer(tiny_model_dir)

    async def scenario():
        await server.sleep()
        assert server.sleeping
        request = asyncio.create_task(server.generate([1, 2, 3], max_tokens=2))
        await asyncio.sleep(0.3)
        assert not request.done()
        await server.wake_up()
        return await asyncio.wait_for(request, 30)

    samples = asyncio.run(scenario())
    assert len(samples) == 1 and 1 <= len(samples[0].token_ids) <= 2


def test_weights_load_and_a_mismatch_is_refused(tiny_model_dir):
    server = PolicyServer(tiny_model_dir)
    new = {name: torch.zeros_like(p) for name, p in server.model.state_dict().items()}
    result = asyncio.run(server.load_weights(new, global_steps=4))
    assert result["weight_version"] == 1 and server.global_steps == 4
    assert all(float(p.abs().sum()) == 0 for p in server.model.parameters())
    with pytest.raises(ValueError, match="unexpected"):
        asyncio.run(server.load_weights({"not.a.weight": torch.zeros(1)}))


def test_health_reports_weight_version_and_sleep(client):
    reply = client.get("/health")
    assert reply.status_code == 200 and reply.json()["sleeping"] is False
