"""A request whose ``max_tokens`` would overflow the replica's context is cut to fit, not refused.

Stock Atropos environments often ask for as many new tokens as their whole ``max_token_length``
(atroposlib's gsm8k server does: ``max_tokens=self.config.max_token_length``), which with any
prompt is more than the replica's context holds; vLLM and the CPU replica answer HTTP 400, every
time. The gateway lowers ``max_tokens`` to ``context - prompt tokens`` instead and counts it
(``GET /stats``, ``max_tokens_clamped``). A prompt that alone fills the context is left to the
replica to refuse.
"""

from __future__ import annotations

from typing import Any

# the keys an OpenAI-style request may name its length limit by (the first one present counts)
LIMIT_KEYS = ("max_tokens", "max_completion_tokens")


def token_prompt_length(path: str, body: dict[str, Any]) -> int | None:
    """Prompt tokens of a request that carries them as ids; None if they must be counted by the replica."""
    if path == "/inference/v1/generate":
        return len(body.get("token_ids") or [])
    if path == "/v1/completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            return max(len(p) for p in prompt)
    return None


def tokenize_request(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The replica's ``/tokenize`` request that counts a text or chat prompt; None if there is nothing to count."""
    if path == "/v1/chat/completions" and isinstance(body.get("messages"), list):
        return {"messages": body["messages"], "add_generation_prompt": body.get("add_generation_prompt", True)}
    if path == "/v1/completions" and isinstance(body.get("prompt"), str):
        return {"prompt": body["prompt"]}
    return None


def requested_new_tokens(path: str, body: dict[str, Any]) -> tuple[str, dict, int] | None:
    """Where the request names its new-token limit: (key, the dict holding it, value); None if it names none."""
    holder = body.get("sampling_params", {}) if path == "/inference/v1/generate" else body
    for key in LIMIT_KEYS:
        value = holder.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, holder, value
    return None


def fit_to_context(path: str, body: dict[str, Any], prompt_tokens: int, context_len: int) -> dict[str, Any] | None:
    """``body`` with its new-token limit lowered to what fits after ``prompt_tokens``; None if it already fits.

    Never raises the limit, and leaves a prompt with no room at all for the replica to refuse.
    """
    found = requested_new_tokens(path, body)
    if found is None:
        return None
    key, holder, wanted = found
    room = context_len - prompt_tokens
    if wanted <= room or room < 1:
        return None
    fitted = {**holder, key: room}
    return {**body, "sampling_params": fitted} if path == "/inference/v1/generate" else fitted
