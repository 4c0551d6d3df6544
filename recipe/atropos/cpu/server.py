"""The CPU backend's HTTP server: the subset of vLLM's OpenAI server that the gateway uses.

Routes, with vLLM 0.24's request and reply shapes:

* ``POST /v1/completions`` - text or token-id prompts, ``n``, ``logprobs``,
  ``return_tokens_as_token_ids``, ``prompt_logprobs``, ``return_token_ids``;
* ``POST /inference/v1/generate`` - tokens in (``token_ids`` + ``sampling_params``),
  tokens out (``choices[].token_ids`` and per-token logprobs);
* ``POST /v1/chat/completions`` - the chat template applied to ``messages``;
* ``POST /tokenize``, ``GET /v1/models``, ``GET /health``, ``GET /is_sleeping``.

While the trainer has the replica asleep (training, then the weight sync) new
requests wait at a gate and requests already generating finish first, so no
request ever sees half-loaded weights.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from .generation import Sample, prompt_logprobs, sample


class PolicyServer:
    """One transformers model behind a lock, with a sleep gate and a weight version."""

    def __init__(self, model_path: str, served_model_name: str = "model", max_model_len: int = 2048, threads: int = 1):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.model_path = model_path
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
        self.model.eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_token_ids = tuple(dict.fromkeys(t for t in [self.tokenizer.eos_token_id, *eos] if t is not None))
        self._model_lock = threading.Lock()  # generation and weight loading never overlap
        self._awake = asyncio.Event()
        self._awake.set()
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        # a pause for a weight sync: requests in flight are cut short, new ones wait for resume()
        self._generating = asyncio.Event()
        self._generating.set()
        self._abort = threading.Event()  # read by the sampling thread between tokens
        self.weight_version = 0
        self.global_steps: int | None = None

    # -- lifecycle driven by the trainer -------------------------------------------------

    @property
    def sleeping(self) -> bool:
        return not self._awake.is_set()

    async def sleep(self) -> None:
        """Close the gate to new requests and wait for the ones generating to finish."""
        self._awake.clear()
        await self._drained.wait()

    async def wake_up(self) -> None:
        self._awake.set()

    async def abort_all(self) -> int:
        """Cut every request in flight short ("abort", with what it generated) and hold new ones
        until :meth:`resume`, as vLLM's pause for a weight sync does; returns how many were cut."""
        self._generating.clear()
        aborted = self._in_flight
        self._abort.set()
        await self._drained.wait()
        self._abort.clear()
        return aborted

    async def resume(self) -> None:
        self._generating.set()

    async def load_weights(self, named_tensors: dict[str, torch.Tensor], global_steps: int | None = None) -> dict:
        def load():
            with self._model_lock:
                missing, unexpected = self.model.load_state_dict(named_tensors, strict=False)
            return missing, unexpected

        missing, unexpected = await asyncio.to_thread(load)
        # tied embeddings appear once in the actor's state dict; anything else missing is a real mismatch
        missing = [name for name in missing if name != "lm_head.weight" or not self.model.config.tie_word_embeddings]
        if missing or unexpected:
            raise ValueError(
                f"weight update does not match the served model: missing {missing}, unexpected {unexpected}"
            )
        self.weight_version += 1
        self.global_steps = global_steps
        return {"weight_version": self.weight_version, "tensors": len(named_tensors)}

    # -- work ----------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], **params: Any) -> list[Sample]:
        await self._generating.wait()
        await self._awake.wait()
        self._in_flight += 1
        self._drained.clear()
        try:
            return await asyncio.to_thread(
                self._locked, sample, prompt_ids, stop_token_ids=self.stop_token_ids, abort=self._abort, **params
            )
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()

    async def score(self, token_ids: list[int]) -> list[float | None]:
        await self._awake.wait()
        return await asyncio.to_thread(self._locked, prompt_logprobs, token_ids)

    def _locked(self, fn, *args, **kwargs):
        with self._model_lock:
            return fn(self.model, *args, **kwargs)

    def token_text(self, token_id: int, as_token_id: bool) -> str:
        return f"token_id:{token_id}" if as_token_id else self.tokenizer.decode([token_id])


class SamplingParams(BaseModel):
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    n: int = Field(1, ge=1)
    logprobs: int | None = Field(None, ge=0)
    seed: int | None = None


class CompletionRequest(SamplingParams):
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    prompt_logprobs: int | None = Field(None, ge=0)
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False
    skip_special_tokens: bool = True


class GenerateRequest(BaseModel):
    model: str | None = None
    token_ids: list[int]
    sampling_params: SamplingParams = SamplingParams()


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[dict[str, Any]]
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    n: int = Field(1, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    seed: int | None = None


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


def _chat_prompt(server: PolicyServer, messages: list[dict[str, Any]]) -> list[int]:
    text = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return server.tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompts(server: PolicyServer, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [server.tokenizer(prompt)["input_ids"]]
    if not prompt or all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [server.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]


def _sampling_kwargs(params) -> dict:
    return {
        "n": params.n,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": max(params.top_k, 0),
        "logprobs": params.logprobs or 0,
        "seed": params.seed,
    }


def _check_length(server: PolicyServer, prompt_ids: list[int], max_tokens: int) -> None:
    if not prompt_ids:
        raise HTTPException(400, "the prompt has no tokens")
    if len(prompt_ids) + max_tokens > server.max_model_len:
        raise HTTPException(
            400,
            f"this model's maximum context length is {server.max_model_len} tokens; the request has "
            f"{len(prompt_ids)} prompt tokens and asks for {max_tokens} more",
        )
    vocab = len(server.tokenizer)
    bad = [t for t in prompt_ids if not 0 <= t < vocab]
    if bad:
        raise HTTPException(400, f"token ids out of the vocabulary (size {vocab}): {bad[:5]}")


def _completion_logprobs(server: PolicyServer, s: Sample, as_token_id: bool) -> dict:
    tokens = [server.token_text(t, as_token_id) for t in s.token_ids]
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    top = [{server.token_text(t, as_token_id): lp for t, lp in entries.items()} for entries in s.top_logprobs]
    return {"text_offset": offsets, "token_logprobs": s.logprobs, "tokens": tokens, "top_logprobs": top}


def _prompt_logprobs_reply(server: PolicyServer, prompt_ids: list[int], scores: list[float | None]) -> list:
    reply: list = [None]
    for token, logprob in zip(prompt_ids[1:], scores[1:]):
        decoded = server.tokenizer.decode([token])
        reply.append({str(token): {"logprob": logprob, "rank": None, "decoded_token": decoded}})
    return reply


def _content_logprobs(server: PolicyServer, s: Sample, as_token_id: bool, top_k: int | None = None) -> dict:
    """Per-token log-probs in the ``{"content": [...]}`` shape of chat replies and the tokens-in route."""
    content = []
    for token, logprob, entries in zip(s.token_ids, s.logprobs, s.top_logprobs):
        top = [{"token": server.token_text(t, as_token_id), "logprob": lp, "bytes": None} for t, lp in entries.items()]
        content.append({"token": server.token_text(token, as_token_id), "logprob": logprob, "bytes": None,
                        "top_logprobs": top if top_k is None else top[:top_k]})
    return {"content": content}


def _openai_reply(server: PolicyServer, kind: str, id_prefix: str, choices: list, prompt_tokens: int,
                  completion_tokens: int) -> dict:
    return {
        "id": f"{id_prefix}-{uuid.uuid4().hex[:16]}",
        "object": kind,
        "created": int(time.time()),
        "model": server.served_model_name,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def build_app(server: PolicyServer) -> FastAPI:
    app = FastAPI(title="atropos-verl CPU inference server")

    @app.get("/health")
    async def health():
        return {"status": "ok", "weight_version": server.weight_version, "sleeping": server.sleeping}

    @app.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": server.sleeping}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": server.served_model_name,
            "object": "model",
            "owned_by": "atropos-verl",
            "max_model_len": server.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        if request.messages is not None:
            tokens = _chat_prompt(server, request.messages)
        elif request.prompt is not None:
            tokens = server.tokenizer(request.prompt, add_special_tokens=request.add_special_tokens)["input_ids"]
        else:
            raise HTTPException(400, "give 'prompt' or 'messages'")
        return {"count": len(tokens), "max_model_len": server.max_model_len, "tokens": tokens, "token_strs": None}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        prompts = _prompts(server, request.prompt)
        for prompt_ids in prompts:
            _check_length(server, prompt_ids, request.max_tokens)
        choices, completion_tokens = [], 0
        for prompt_ids in prompts:
            samples = await server.generate(prompt_ids, **_sampling_kwargs(request))
            scores = await server.score(prompt_ids) if request.prompt_logprobs is not None else None
            for s in samples:
                completion_tokens += len(s.token_ids)
                choices.append(
                    {
                        "index": len(choices),
                        "text": server.tokenizer.decode(s.token_ids, skip_special_tokens=request.skip_special_tokens),
                        "logprobs": None
                        if request.logprobs is None
                        else _completion_logprobs(server, s, request.return_tokens_as_token_ids),
                        "finish_reason": s.finish_reason,
                        "stop_reason": None,
                        "token_ids": s.token_ids if request.return_token_ids else None,
                        "prompt_logprobs": (
                            None if scores is None else _prompt_logprobs_reply(server, prompt_ids, scores)
                        ),
                        "prompt_token_ids": prompt_ids if request.return_token_ids else None,
                    }
                )
        prompt_tokens = sum(len(p) for p in prompts)
        return _openai_reply(server, "text_completion", "cmpl", choices, prompt_tokens, completion_tokens)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        prompt_ids = _chat_prompt(server, request.messages)
        max_tokens = request.max_completion_tokens or request.max_tokens or server.max_model_len - len(prompt_ids)
        _check_length(server, prompt_ids, max_tokens)
        samples = await server.generate(
            prompt_ids,
            n=request.n,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=max(request.top_k, 0),
            logprobs=request.top_logprobs or 0,
            seed=request.seed,
        )
        choices = []
        for index, s in enumerate(samples):
            logprobs = _content_logprobs(server, s, False, request.top_logprobs or 0) if request.logprobs else None
            text = server.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "logprobs": logprobs, "finish_reason": s.finish_reason})
        completion_tokens = sum(len(s.token_ids) for s in samples)
        return _openai_reply(server, "chat.completion", "chatcmpl", choices, len(prompt_ids), completion_tokens)

    # vLLM's own names for these (its server's development routes): a pause for a weight sync
    @app.post("/pause")
    async def pause():
        return {"aborted_count": await server.abort_all()}

    @app.post("/resume")
    async def resume():
        await server.resume()
        return {}

    @app.post("/inference/v1/generate")
    async def generate(request: GenerateRequest):
        params = request.sampling_params
        _check_length(server, request.token_ids, params.max_tokens)
        samples = await server.generate(request.token_ids, **_sampling_kwargs(params))
        choices = []
        for index, s in enumerate(samples):
            logprobs = None if params.logprobs is None else _content_logprobs(server, s, True)
            choices.append(
                {"index": index, "logprobs": logprobs, "finish_reason": s.finish_reason, "token_ids": s.token_ids}
            )
        return {
            "request_id": uuid.uuid4().hex[:16],
            "choices": choices,
            "prompt_logprobs": None,
            "kv_transfer_params": None,
        }

    return app
