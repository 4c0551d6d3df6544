"""The inference gateway: the one address environments use to reach the policy the trainer owns.

Routes:

* ``POST /generate`` - Atropos's tokens-in format (atroposlib's ``server_type: vllm``):
  ``{"prompt": {"prompt_token_ids": [...]}, "logprobs": 0, "n", "max_tokens", ...}`` ->
  ``{"logprobs": [[[{token_id: logprob}], ...], ...], "finish_reasons": [...]}``, translated
  to and from the replicas' native ``POST /inference/v1/generate`` (vLLM 0.24 has no
  ``/generate`` of Atropos's shape);
* ``POST /v1/completions`` and ``POST /v1/chat/completions`` - passed through to a replica;
* ``GET /health`` - 200 only while every replica answers its own ``/health``.

Each request goes to the replica with the fewest requests in flight. While the
trainer syncs weights it :meth:`Gateway.pause`-s the gateway: new requests wait,
requests in flight finish, and all of them go on after :meth:`Gateway.resume`
instead of failing against a sleeping engine.

Generation is paced to what the trainer will use (:mod:`.admission`): a request waits
while the sequences generated and not yet consumed fill the trainer's window.

``resume`` also names the policy version the replicas now hold, and ``/generate``
records which version sampled each sequence it returns (:mod:`.policy_versions`):
the trainer reads it back to measure and bound how stale a batch is.

A ``max_tokens`` that would overflow the replica's context (its ``max_model_len``, from
``/v1/models``) is lowered to fit (:mod:`.context_fit`); ``GET /stats`` counts every request
by client (the API key an environment sends), route and status code, and those clamps
(:mod:`.request_stats`).

Every body is validated by a typed model (:mod:`.requests`) before it reaches a
replica: a malformed request gets HTTP 400 naming the field, an unknown model name
HTTP 404 as vLLM answers it, and ``n`` / ``max_tokens`` are bounded. A ``/generate``
asking for ``n`` > 1 is sampled as ``n`` single-choice requests (:func:`sample_one_by_one`),
at most ``max_concurrency`` of them in flight across the gateway, so one caller asking
for many choices queues behind that limit instead of holding every connection.
"""

# no ``from __future__ import annotations``: FastAPI reads the routes' body types at definition time

import asyncio
import contextlib
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from .admission import GenerationWindow
from .context_fit import fit_to_context, token_prompt_length, tokenize_request
from .disconnect import unless_disconnected
from .partial_rollout import ABORTED, finish_tokens_in_choice, resend_until_finished
from .policy_versions import PolicyVersionLedger
from .replica_timing import ReplicaClock, generated_tokens
from .request_stats import CountRequests, RequestStats, current_client
from .requests import GatewayLimits, request_models, unknown_model_response, validation_error_handler

logger = logging.getLogger(__name__)

# vLLM's RequestOutputKind.FINAL_ONLY: one output per request, when it finishes
VLLM_FINAL_ONLY = 2

# Atropos request keys that are vLLM sampling parameters.
SAMPLING_KEYS = (
    "n",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "min_tokens",
    "seed",
    "stop",
    "stop_token_ids",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "skip_special_tokens",
)


def atropos_to_vllm_generate(body: dict[str, Any]) -> dict[str, Any]:
    """An Atropos ``/generate`` request as a vLLM ``/inference/v1/generate`` request."""
    prompt = body.get("prompt")
    token_ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    if not isinstance(token_ids, list) or not token_ids:
        raise HTTPException(400, "'prompt' must be {\"prompt_token_ids\": [token ids]} with at least one token")
    body = dict(body)
    if "max_new_tokens" in body:
        body["max_tokens"] = body.pop("max_new_tokens")
    sampling = {key: body[key] for key in SAMPLING_KEYS if body.get(key) is not None}
    # Atropos asks for logprobs=0: the sampled token's log-prob, nothing more.
    sampling["logprobs"] = int(body.get("logprobs") or 0)
    # The reply is read once, when the choice has finished (or was aborted, which vLLM answers with
    # every token so far): vLLM need not build an output for every step of every request on the event
    # loop that also serves the others (its RequestOutputKind.FINAL_ONLY).
    sampling["output_kind"] = VLLM_FINAL_ONLY
    if not sampling.get("stop"):
        # The reply carries token ids and the environment decodes them itself, so the replica need not
        # detokenize each token as it is generated, on that same loop; stop strings are matched on
        # text, so they keep it.
        sampling["detokenize"] = False
    return {"token_ids": token_ids, "sampling_params": sampling}


def vllm_to_atropos_generate(reply: dict[str, Any]) -> dict[str, Any]:
    """A vLLM ``/inference/v1/generate`` reply in Atropos's ``/generate`` shape."""
    logprobs, finish_reasons, token_ids = [], [], []
    for choice in reply["choices"]:
        content = (choice.get("logprobs") or {}).get("content")
        if content is None or len(content) != len(choice["token_ids"]):
            raise ValueError("the replica answered without a log-prob for every generated token")
        logprobs.append([[{str(token): entry["logprob"]}] for token, entry in zip(choice["token_ids"], content)])
        finish_reasons.append(choice.get("finish_reason"))
        token_ids.append(choice["token_ids"])
    return {"logprobs": logprobs, "finish_reasons": finish_reasons, "token_ids": token_ids}


async def sample_one_by_one(gateway: "Gateway", vllm_request: dict[str, Any], wanted: int) -> tuple[dict, list[int]]:
    """``wanted`` choices from single-choice requests, each with the policy version that sampled it.

    One request per choice, as verl's agent loop samples: vLLM 0.24's tokens-in route answers a
    non-streaming ``n > 1`` request with only the choices that finished last, the longest, so
    topping those up would bias every group towards long, truncated solutions.
    """
    single = {**vllm_request, "sampling_params": {**vllm_request["sampling_params"], "n": 1}}
    if wanted == 1:
        replies = [await gateway.forward_versioned("/inference/v1/generate", single)]
    else:
        replies = await gateway.forward_single_choices("/inference/v1/generate", single, wanted)
    sampled = [(choice, version) for reply, version in replies for choice in reply.get("choices") or []]
    if len(sampled) != wanted:
        raise HTTPException(502, f"the replica answered {len(sampled)} choices to {wanted} single-choice requests")
    return {"choices": [choice for choice, _ in sampled]}, [version for _, version in sampled]


def choices_asked(body: dict[str, Any]) -> int:
    """Sequences an OpenAI-style request will generate: ``n`` choices per prompt, prompts as listed."""
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
    return max(1, int(body.get("n") or 1)) * prompts


@dataclasses.dataclass(frozen=True)
class Drain:
    """What one pause waited for: requests in flight at the replicas when it began, and how long."""

    requests: int
    seconds: float


class Gateway:
    """Routes requests over the replicas; pausable while weights sync."""

    def __init__(self, replica_addresses: list[str], request_timeout: float = 600.0,
                 ledger: PolicyVersionLedger | None = None, limits: GatewayLimits | None = None,
                 model_names: tuple[str, ...] = (), window: GenerationWindow | None = None):
        if not replica_addresses:
            raise ValueError("the gateway needs at least one inference replica")
        self.replicas = [a if a.startswith("http") else f"http://{a}" for a in replica_addresses]
        self.request_timeout = request_timeout
        self.limits = limits if limits is not None else GatewayLimits()
        # names environments may call the policy by, besides the replicas' own ids
        self.model_names = frozenset(model_names)
        self._fan_out = asyncio.Semaphore(self.limits.max_concurrency)
        self.ledger = ledger if ledger is not None else PolicyVersionLedger()
        # unbounded until the trainer sizes it
        self.window = window if window is not None else GenerationWindow()
        # the step the replicas' weights were synced after; 0 until the trainer names one
        self.policy_version = 0
        self._in_flight = {replica: 0 for replica in self.replicas}
        # seconds the gateway was open with nothing in flight at any replica: time the trainer may
        # wait for a batch while the replicas have nothing to generate (environments scoring,
        # posting, held by the window); the clock stops while paused (the replicas sleep or sync)
        self._idle_s = 0.0
        self._idle_since: float | None = time.monotonic()
        self.continued = 0  # tokens-in choices continued after a weight sync cut them short
        self.abandoned = 0  # requests given up because their caller disconnected (held or generating)
        self._open = asyncio.Event()
        self._open.set()
        self._drained = asyncio.Event()
        self._drained.set()
        self._http: httpx.AsyncClient | None = None
        self._served_model: dict[str, str] = {}
        self._context_len: dict[str, int | None] = {}
        self.stats = RequestStats()
        self.replica_clock = ReplicaClock()

    # -- pause / resume, from the trainer ---------------------------------------------

    async def pause(self, drain: bool = True) -> Drain:
        """Hold new requests and wait until the ones in flight have finished: what that cost.

        ``drain=False`` only holds new requests: the caller aborts those in flight, and the
        gateway continues them once it opens again (:mod:`.partial_rollout`).
        """
        self._open.clear()
        self._stop_idle_clock()
        in_flight = sum(self._in_flight.values())
        started = time.monotonic()
        if drain:
            await self._drained.wait()
        return Drain(requests=in_flight, seconds=time.monotonic() - started)

    async def resume(self, policy_version: int | None = None) -> None:
        """Let requests through again, generated from ``policy_version`` if a new one was synced."""
        if policy_version is not None:
            self.policy_version = policy_version
        self._open.set()
        if not any(self._in_flight.values()) and self._idle_since is None:
            self._idle_since = time.monotonic()

    @property
    def paused(self) -> bool:
        return not self._open.is_set()

    def idle_seconds(self) -> float:
        """Seconds so far the gateway was open with no request in flight at any replica."""
        running = time.monotonic() - self._idle_since if self._idle_since is not None else 0.0
        return self._idle_s + running

    def _stop_idle_clock(self) -> None:
        if self._idle_since is not None:
            self._idle_s += time.monotonic() - self._idle_since
            self._idle_since = None

    # -- forwarding ---------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self, choices: int) -> AsyncIterator[None]:
        """Hold the request until ``choices`` more sequences fit the generation window."""
        await self.window.acquire(choices, current_client.get())
        answered = False
        try:
            yield
            answered = True
        finally:
            await self.window.release(choices, returned=choices if answered else 0)

    async def forward_versioned(self, path: str, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """The replica's reply and the policy version that produced it.

        A pause waits for requests in flight, so a request admitted at version v
        finishes at version v.
        """
        await self._open.wait()
        version = self.policy_version
        replica = min(self.replicas, key=self._in_flight.__getitem__)
        self._in_flight[replica] += 1
        self._drained.clear()
        self._stop_idle_clock()
        try:
            # environments name the model as they please; each replica serves exactly one
            body = {**body, "model": await self._model_of(replica)}
            body = await self._fit_to_context(replica, path, body)
            sent = self.replica_clock.now()
            response = await self._client().post(f"{replica}{path}", json=body)
            answered = self.replica_clock.now()
        except httpx.TransportError as exc:
            raise HTTPException(502, f"replica {replica} did not answer {path}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._in_flight[replica] -= 1
            if not any(self._in_flight.values()):
                self._drained.set()
                if self._open.is_set():
                    self._idle_since = time.monotonic()
        if response.status_code != 200:
            raise HTTPException(response.status_code, f"replica {replica} answered {path}: {response.text[:500]}")
        reply = response.json()
        self.replica_clock.note(sent, answered, generated_tokens(reply))
        return reply, version

    async def forward_single_choices(self, path: str, body: dict[str, Any], count: int) -> list[tuple[dict, int]]:
        """``count`` requests of one choice each, at most ``limits.max_concurrency`` in flight gateway-wide."""

        async def one() -> tuple[dict, int]:
            async with self._fan_out:
                return await self.forward_versioned(path, body)

        return await asyncio.gather(*[one() for _ in range(count)])

    async def is_known_model(self, name: str) -> bool:
        """Whether ``name`` is a configured name of the policy or a replica's own model id."""
        if name in self.model_names:
            return True
        served = await asyncio.gather(*[self._model_of(replica) for replica in self.replicas], return_exceptions=True)
        return name in [model for model in served if isinstance(model, str)]

    async def _model_of(self, replica: str) -> str:
        if replica not in self._served_model:
            response = await self._client().get(f"{replica}/v1/models", timeout=30)
            response.raise_for_status()
            card = response.json()["data"][0]
            self._served_model[replica] = card["id"]
            # vLLM and the CPU replica both name their context here
            self._context_len[replica] = card.get("max_model_len")
        return self._served_model[replica]

    async def _fit_to_context(self, replica: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with a ``max_tokens`` that overflows the replica's context lowered to fit (counted)."""
        context_len = self._context_len.get(replica)
        if not context_len:
            return body
        prompt_tokens = token_prompt_length(path, body)
        if prompt_tokens is None:
            counting = tokenize_request(path, body)
            if counting is None:
                return body
            response = await self._client().post(f"{replica}/tokenize", json={**counting, "model": body["model"]})
            if response.status_code != 200:
                return body  # the replica will say what is wrong with the prompt itself
            prompt_tokens = int(response.json()["count"])
        fitted = fit_to_context(path, body, prompt_tokens, context_len)
        if fitted is None:
            return body
        self.stats.count_clamp()
        logger.debug("max_tokens lowered to fit %d prompt tokens in the context of %d", prompt_tokens, context_len)
        return fitted

    async def replica_health(self) -> dict[str, dict]:
        """Each replica's own ``/health``: ``{"ok": bool, ...its reply, or "error"}``."""

        async def check(replica: str) -> dict:
            try:
                response = await self._client().get(f"{replica}/health", timeout=5)
            except httpx.TransportError as exc:
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            if response.status_code != 200:
                return {"ok": False, "error": f"HTTP {response.status_code}"}
            try:
                body = response.json()
            except ValueError:
                body = {}  # vLLM answers /health with an empty body
            return {**(body if isinstance(body, dict) else {}), "ok": True}

        results = await asyncio.gather(*[check(replica) for replica in self.replicas])
        return dict(zip(self.replicas, results))

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            # room for the fan-out's sub-requests and as many ordinary requests again
            connections = 2 * self.limits.max_concurrency + 16
            limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
            self._http = httpx.AsyncClient(timeout=self.request_timeout, limits=limits)
        return self._http


async def generate_tokens_in(gateway: Gateway, vllm_request: dict[str, Any]) -> dict[str, Any]:
    """An Atropos ``/generate`` through the window: its choices, continued after an abort, versioned."""
    wanted = int(vllm_request["sampling_params"].get("n", 1))
    async with gateway.admitted(wanted):
        reply, versions = await sample_one_by_one(gateway, vllm_request, wanted)
        # choices a weight sync cut short are continued under the new weights, all at once; each
        # keeps the version it started under, the oldest of its tokens
        cut = [index for index, choice in enumerate(reply["choices"]) if choice.get("finish_reason") == ABORTED]
        gateway.continued += len(cut)
        finished = await asyncio.gather(*[
            finish_tokens_in_choice(gateway.forward_versioned, vllm_request, reply["choices"][index]) for index in cut
        ])
        for index, choice in zip(cut, finished):
            reply["choices"][index] = choice
    try:
        translated = vllm_to_atropos_generate(reply)
    except (KeyError, TypeError, ValueError) as exc:
        raise HTTPException(502, f"unexpected reply from the replica: {exc}") from exc
    prompt_ids = list(vllm_request["token_ids"])
    for output_ids, choice_version in zip(translated["token_ids"], versions):
        gateway.ledger.record(prompt_ids + list(output_ids), choice_version)
    return translated


async def forward_openai(gateway: Gateway, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-style request through the window, sent again whole if a weight sync cut it short."""
    async with gateway.admitted(choices_asked(body)):
        return (await resend_until_finished(gateway.forward_versioned, path, body))[0]


def build_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="atropos-verl inference gateway")
    app.add_middleware(CountRequests, stats=gateway.stats)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    models = request_models(gateway.limits)

    @app.get("/stats")
    async def stats():
        return {**gateway.stats.snapshot(), "generation_window": dataclasses.asdict(gateway.window.stats()),
                "continued_after_abort": gateway.continued, "abandoned_by_caller": gateway.abandoned}

    @app.get("/health")
    async def health():
        replicas = await gateway.replica_health()
        healthy = all(state["ok"] for state in replicas.values())
        body = {"status": "ok" if healthy else "unavailable", "paused": gateway.paused, "replicas": replicas}
        return JSONResponse(body, status_code=200 if healthy else 503)

    def abandoned():
        gateway.abandoned += 1

    @app.post("/generate")
    async def generate(request: models.generate, raw: Request):
        if request.model is not None and not await gateway.is_known_model(request.model):
            return unknown_model_response(request.model)
        vllm_request = atropos_to_vllm_generate(request.model_dump(exclude_unset=True))
        reply = await unless_disconnected(raw, generate_tokens_in(gateway, vllm_request), abandoned)
        # a dict of plain JSON types: FastAPI's encoder would walk each of its per-token entries
        # (a batch of 256 x 448-token choices: about a second of the gateway's time)
        return reply if isinstance(reply, Response) else JSONResponse(reply)

    @app.post("/v1/completions")
    async def completions(request: models.completion, raw: Request):
        if request.model is not None and not await gateway.is_known_model(request.model):
            return unknown_model_response(request.model)
        work = forward_openai(gateway, "/v1/completions", request.model_dump(exclude_unset=True))
        return await unless_disconnected(raw, work, abandoned)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: models.chat, raw: Request):
        if request.model is not None and not await gateway.is_known_model(request.model):
            return unknown_model_response(request.model)
        work = forward_openai(gateway, "/v1/chat/completions", request.model_dump(exclude_unset=True))
        return await unless_disconnected(raw, work, abandoned)

    return app


class GatewayServer:
    """Runs the gateway's uvicorn server on its own event loop in a background thread.

    The trainer's loop is synchronous; :meth:`pause` and :meth:`resume` block until
    the gateway has done so.
    """

    def __init__(self, replica_addresses: list[str], host: str = "127.0.0.1", port: int = 8000,
                 request_timeout: float = 600.0, ledger: PolicyVersionLedger | None = None,
                 limits: GatewayLimits | None = None, model_names: tuple[str, ...] = (),
                 window_settle_s: float = 5.0):
        self.host = host
        self._window_settle_s = window_settle_s
        self._limits = limits
        self._model_names = tuple(model_names)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            raise OSError(
                f"the inference gateway cannot listen on {host}:{port}: {exc}; "
                "free the port or set trainer.atropos.gateway_port"
            ) from exc
        self.port = self._sock.getsockname()[1]
        self._replica_addresses = replica_addresses
        self._request_timeout = request_timeout
        self.ledger = ledger if ledger is not None else PolicyVersionLedger()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="atropos-gateway", daemon=True)
        self.gateway: Gateway | None = None
        self._server: uvicorn.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
        logger.info("inference gateway on %s over replicas %s", self.url, self._replica_addresses)

    async def _start(self) -> None:
        self.gateway = Gateway(self._replica_addresses, request_timeout=self._request_timeout, ledger=self.ledger,
                               limits=self._limits, model_names=self._model_names,
                               window=GenerationWindow(settle_s=self._window_settle_s))
        config = uvicorn.Config(build_app(self.gateway), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._loop.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started:
            await asyncio.sleep(0.01)

    def pause(self, drain: bool = True) -> Drain:
        return asyncio.run_coroutine_threadsafe(self.gateway.pause(drain), self._loop).result()

    def size_window(self, window: int | None) -> None:
        """At most ``window`` sequences generated and not yet consumed (None: no bound)."""
        asyncio.run_coroutine_threadsafe(self.gateway.window.resize(window), self._loop).result()

    def observe_downstream(self, arrived_total: int, downstream: int, starved: bool = False) -> None:
        """Sequences that ever arrived at the API, those arrived but not trained yet, and whether the
        trainer waits for a batch (see :mod:`.admission`)."""
        observed = self.gateway.window.observe(arrived_total, downstream, starved)
        asyncio.run_coroutine_threadsafe(observed, self._loop).result()

    def idle_seconds(self) -> float:
        """Seconds so far the gateway was open with nothing in flight (see :meth:`Gateway.idle_seconds`)."""
        return self._read_on_loop(self.gateway.idle_seconds)

    def window_stats(self):
        return self._read_on_loop(self.gateway.window.stats)

    def take_replica_timing(self):
        """How the replicas answered since the last call (:mod:`.replica_timing`)."""
        return self._read_on_loop(self.gateway.replica_clock.take)

    def _read_on_loop(self, read):
        """``read()`` run on the gateway's event loop, where the state it reads changes."""

        async def run():
            return read()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def resume(self, policy_version: int | None = None) -> None:
        asyncio.run_coroutine_threadsafe(self.gateway.resume(policy_version), self._loop).result()

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0.2), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._sock.close()
