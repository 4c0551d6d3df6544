"""Requests a weight sync cut short are finished afterwards, not thrown away or waited for.

When the replicas must take new weights, requests still generating are aborted (verl's
``abort_all_requests``, vLLM's pause): each comes back with what it generated so far and
``finish_reason`` "abort". Rather than drain them first (the sync waits for the longest) or
hand a cut sequence to the environment, the gateway holds the request until the gateway
opens again and continues it from where it stopped: the prompt plus the tokens so far,
for the tokens still allowed. The environment gets one complete sequence; its tokens
carry the log-probs of the weights that sampled each of them (what rollout correction
needs), and the ledger records the oldest policy version among them.

OpenAI-style requests (text in, text out) cannot be continued token for token: an aborted
one is sent again whole once the gateway opens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

ABORTED = "abort"

Forward = Callable[[str, dict[str, Any]], Awaitable[tuple[dict[str, Any], int]]]


def was_aborted(reply: dict[str, Any]) -> bool:
    return any(choice.get("finish_reason") == ABORTED for choice in reply.get("choices") or [])


async def finish_tokens_in_choice(forward: Forward, request: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
    """``choice`` of a tokens-in ``request`` continued until it is no longer aborted.

    ``forward`` is the gateway's (it waits while the gateway is paused): continuations start
    once the new weights are in.
    """
    token_ids = list(choice["token_ids"])
    content = list((choice.get("logprobs") or {}).get("content") or [])
    sampling = request["sampling_params"]
    max_tokens = sampling.get("max_tokens")
    while choice.get("finish_reason") == ABORTED:
        left = None if max_tokens is None else max_tokens - len(token_ids)
        if left is not None and left <= 0:
            choice = {**choice, "finish_reason": "length"}
            break
        continued = {**sampling, "n": 1}
        if left is not None:
            continued["max_tokens"] = left
        if sampling.get("min_tokens"):
            continued["min_tokens"] = max(0, sampling["min_tokens"] - len(token_ids))
        prompt = list(request["token_ids"]) + token_ids
        reply, _ = await forward("/inference/v1/generate", {"token_ids": prompt, "sampling_params": continued})
        choice = reply["choices"][0]
        token_ids += choice["token_ids"]
        content += (choice.get("logprobs") or {}).get("content") or []
    return {**choice, "token_ids": token_ids, "logprobs": {"content": content}}


async def resend_until_finished(forward: Forward, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """An OpenAI-style request sent again whole while any of its choices comes back aborted."""
    reply, version = await forward(path, body)
    while was_aborted(reply):
        reply, version = await forward(path, body)
    return reply, version
