"""The routes: atroposlib 0.4.0's trajectory API protocol over the durable store.

Same paths, bodies and answers as ``run-api``; where this server differs it says so
next to the route (and docs/atropos_integration.rst lists every difference).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import JSONResponse, PlainTextResponse, Response

from .auth import TokenAuth
from .batching import form_batch, sizes_summing_to
from .compression import GzipRequestBody
from .models import EnvIdentifier, RegisterEnv, Registration, ScoredData
from .store import BUFFERED, QUEUED, Store, dumps
from .validation import MALFORMED, Refusal, check_group

logger = logging.getLogger(__name__)

# the least weight /status-env reports, so no environment is starved entirely
MIN_ENV_WEIGHT = 0.01
# An environment asks /status-env many times a second while it runs. One silent this long has
# died (its restart registers under a new id): its min_batch_allocation no longer holds batches back.
ENV_SILENCE_S = 30.0

EMPTY_EXAMPLE = {
    "tokens": [],
    "masks": [],
    "scores": [],
    "advantages": [],
    "ref_logprobs": [],
    "generation_params": [],
    "inference_logprobs": [],
    "messages": [],
    "images": [],
}


# sequences of every group that reached the door, refused or not (a meta value, not a per-env counter)
ARRIVED_SEQUENCES = "arrived_sequences"
# sequences of every group served to the trainer: what left the queue, so nothing in transit is missed
SERVED_SEQUENCES = "served_sequences"


def env_key(env_id: int | None) -> str:
    """How counters name an environment ("none" for groups sent without an env_id)."""
    return "none" if env_id is None else str(env_id)


class TrajectoryAPI:
    """The protocol's operations on a :class:`Store`; the routes below are thin wrappers."""

    def __init__(self, store: Store, vocab_size: int | None = None, env_silence_s: float = ENV_SILENCE_S):
        self.store = store
        self.default_vocab_size = vocab_size
        self.env_silence_s = env_silence_s
        # env_id -> when it last asked /status-env or registered (in memory: a restarted API
        # gives every environment a fresh ``env_silence_s`` from its start)
        self._last_heard: dict[int, float] = {}
        self._started = time.monotonic()

    def heard_from(self, env_id: int) -> None:
        self._last_heard[env_id] = time.monotonic()

    def is_silent(self, env_id: int) -> bool:
        """An environment that stopped asking for its status (it died) for ``env_silence_s``."""
        return time.monotonic() - self._last_heard.get(env_id, self._started) > self.env_silence_s

    @property
    def registration(self) -> dict[str, Any] | None:
        return self.store.get("registration")

    @property
    def step(self) -> int:
        return self.store.get("step", 0)

    def vocab_size(self) -> int | None:
        registration = self.registration or {}
        return registration.get("vocab_size") or self.default_vocab_size

    # -- trainer -----------------------------------------------------------------------------

    def register(self, registration: Registration) -> dict[str, Any]:
        # The first registration sets the run up; later ones (a trainer that restarted) join it
        # as it is, at the API's step: the queue and the step survive the trainer and the API.
        with self.store.transaction():
            if self.registration is None:
                self.store.put("registration", registration.model_dump())
                self.store.put("step", registration.starting_step)
                self.store.put("started", False)
            else:
                logger.info("a trainer joined the registered run at step %d", self.step)
        return {"uuid": uuid.uuid4().int}

    def next_batch(self) -> dict[str, Any] | Response:
        registration = self.registration
        if registration is None:
            return {"status": "error", "message": "Trainer not registered. Call /register first.", "batch": []}
        with self.store.transaction():
            if not self.store.get("started", False):
                self.store.put("started", True)
            min_allocations = {
                env["registered_id"]: env["min_batch_allocation"]
                for env in self.store.envs()
                if env["connected"] and env["min_batch_allocation"] is not None
                and not self.is_silent(env["registered_id"])
            }
            chosen = form_batch(self.store.index(QUEUED), registration["batch_size"], min_allocations)
            if chosen is None:
                return {"batch": None}
            seqs = [group.seq for group in chosen]
            bodies = self.store.bodies(seqs)
            self.store.remove(seqs)
            self.store.put("step", self.step + 1)
            for group in chosen:
                self.store.bump(env_key(group.env_id), "served")
            served = sum(group.size for group in chosen)
            self.store.put(SERVED_SEQUENCES, self.store.get(SERVED_SEQUENCES, 0) + served)
        logger.info(
            "step %d: served %d groups, %d sequences, oldest first",
            self.step,
            len(chosen),
            sum(group.size for group in chosen),
        )
        # the stored groups are JSON already (finite numbers only): no re-encoding
        return Response('{"batch":[' + ",".join(bodies) + "]}", media_type="application/json")

    # -- environments ------------------------------------------------------------------------

    def register_env(self, request: RegisterEnv) -> dict[str, Any]:
        if not self.store.get("started", False):
            return {"status": "wait for trainer to start"}
        registration = self.registration or {}
        with self.store.transaction():
            envs = self.store.envs()
            same_name = sum(1 for env in envs if env["desired_name"] == request.desired_name)
            config = {
                "max_context_len": request.max_token_length,
                "weight": request.weight if request.weight is not None else 1.0,
                "desired_name": request.desired_name,
                "real_name": f"{request.desired_name}_{same_name}",
                "registered_id": len(envs),
                "last_update": time.time(),
                "connected": True,
                "min_batch_allocation": request.min_batch_allocation,
                "group_size": request.group_size,
            }
            self.store.add_env(config)
        self.heard_from(config["registered_id"])
        return {
            "status": "success",
            "env_id": config["registered_id"],
            "wandb_name": config["real_name"],
            "checkpoint_dir": registration.get("checkpoint_dir", ""),
            "starting_step": self.step,
            "checkpoint_interval": registration.get("save_checkpoint_interval"),
            "num_steps": registration.get("num_steps"),
        }

    def disconnect_env(self, env_id: int) -> dict[str, Any]:
        with self.store.transaction():
            env = self._env(env_id)
            if env is None:
                return {"status": "failure", "error": f"no environment registered with env_id {env_id}"}
            env["connected"] = False
            self.store.update_env(env)
        return {"status": "success"}

    def _env(self, env_id: int | None) -> dict[str, Any] | None:
        envs = self.store.envs()
        return envs[env_id] if env_id is not None and 0 <= env_id < len(envs) else None

    def accept(self, groups: list[ScoredData]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Check and queue a list of groups in one transaction: (answers of the accepted, refusals)."""
        answers, refusals = [], []
        arrived = 0
        vocab_size = self.vocab_size()
        # a group larger than the registered batch could never be served: it would block every batch
        max_group_size = (self.registration or {}).get("batch_size") or None
        with self.store.transaction():
            for index, scored in enumerate(groups):
                group = scored.as_group()
                # what reached the API at all, refused or not: the gateway paces generation by it
                arrived += len(group.get("tokens") or ())
                refusal = check_group(group, vocab_size, max_group_size)
                if refusal is not None:
                    self._count_refusal(group.get("env_id"), refusal)
                    refusals.append({"index": index, **refusal.as_dict()})
                    continue
                answers.append(self._enqueue(group))
                self.store.bump(env_key(group.get("env_id")), "accepted")
            self.store.put(ARRIVED_SEQUENCES, self.store.get(ARRIVED_SEQUENCES, 0) + arrived)
        return answers, refusals

    def _count_refusal(self, env_id: int | None, refusal: Refusal) -> None:
        logger.warning(
            "refused a group from env %s: %s: %s (%s)", env_key(env_id), refusal.field, refusal.reason, refusal.detail
        )
        self.store.bump(env_key(env_id), f"refused/{refusal.reason}")

    def count_malformed(self, env_id: Any) -> None:
        with self.store.transaction():
            self.store.bump(env_key(env_id if isinstance(env_id, int) else None), f"refused/{MALFORMED}")

    def _enqueue(self, group: dict[str, Any]) -> dict[str, Any]:
        body = dumps(group)
        env = self._env(group.get("env_id"))
        size = len(group["tokens"])
        # A group smaller than its environment's group size waits until some of its kind add up
        # to one. (A larger one is queued as it is: it could never be completed.)
        if env is not None and size < env["group_size"]:
            self.store.add_group(BUFFERED, group, body, self.step)
            waiting = self.store.index(BUFFERED, env["registered_id"])
            picked = [waiting[i] for i in sizes_summing_to([g.size for g in waiting], env["group_size"])]
            if picked:
                self.store.set_state([g.seq for g in picked], QUEUED)
                self.store.put_raw("latest", self.store.bodies([picked[-1].seq])[0])
            left = sum(g.size for g in waiting) - sum(g.size for g in picked)
            return {"status": "buffered", "buffer_size": left}
        self.store.add_group(QUEUED, group, body, self.step)
        self.store.put_raw("latest", body)
        return {"status": "received"}

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, int]:
        return {"current_step": self.step, "queue_size": self.store.count(QUEUED)}

    def status_env(self, env_id: int) -> dict[str, Any] | None:
        """What an environment asks before it generates more: its weight and the queue as it sees it."""
        envs = self.store.envs()
        if not 0 <= env_id < len(envs):
            return None
        env = envs[env_id]
        self.heard_from(env_id)
        connected = [e for e in envs if e["connected"]]
        total = sum(e["max_context_len"] * max(0.0, e["weight"]) for e in connected)
        weight = env["max_context_len"] * env["weight"] / total if total > 0 else 0.0
        env_weight = max(MIN_ENV_WEIGHT, weight)
        with_minimum = [e for e in connected if e.get("min_batch_allocation") is not None]
        unallocated_fraction = 1.0 - min(sum(e["min_batch_allocation"] for e in with_minimum), 1.0)

        queue = self.store.index(QUEUED)
        max_group_size = max([1, *(g.size for g in queue)])
        own = [g for g in queue if g.env_id == env_id]
        # an environment whose groups grew reports the larger size from now on
        group_size = max([env["group_size"], *(g.size for g in own)])
        if group_size != env["group_size"]:
            env["group_size"] = group_size
            with self.store.transaction():
                self.store.update_env(env)
        own_sequences = sum(g.size for g in own)

        batch_size = (self.registration or {}).get("batch_size", 0)
        minimum_of = {e["registered_id"]: int(batch_size * e["min_batch_allocation"]) for e in with_minimum}
        others: dict[Any, int] = {}
        for g in queue:
            if g.env_id != env_id:
                others[g.env_id] = others.get(g.env_id, 0) + g.size
        # what other environments queued beyond their own minimums, counted in whole packs
        available_from_others = 0
        if max_group_size > 1:
            for other, sequences in others.items():
                packs = -(-sequences // max_group_size)
                available_from_others += max(0, packs * max_group_size - minimum_of.get(other, 0))
        return {
            "current_step": self.step,
            "queue_size": (own_sequences + available_from_others) // group_size,
            "unallocated_fraction": unallocated_fraction,
            "self_queue_size": own_sequences // group_size,
            "max_group_size": max_group_size,
            "env_weight": env_weight,
        }

    def stats(self) -> dict[str, Any]:
        """Counters per environment (accepted, served, refused/<reason>), sequences arrived, the queue.

        Not in ``run-api``.
        """
        queue = self.store.index(QUEUED)
        buffered = self.store.index(BUFFERED)
        counters = self.store.counters()
        return {
            "current_step": self.step,
            "queue_size": len(queue),
            "queued_sequences": sum(g.size for g in queue),
            "buffered_groups": len(buffered),
            "buffered_sequences": sum(g.size for g in buffered),
            "arrived_sequences": self.store.get(ARRIVED_SEQUENCES, 0),
            # read after the queue: a batch served in between is counted twice, never missed
            "served_sequences": self.store.get(SERVED_SEQUENCES, 0),
            "envs": counters,
        }

    def reset(self) -> None:
        self._last_heard.clear()
        with self.store.transaction():
            self.store.clear()


def _refused(answers: list[dict], refusals: list[dict], processed: int) -> JSONResponse:
    return JSONResponse(
        {"status": "refused", "groups_processed": processed, "accepted": len(answers), "refused": refusals},
        status_code=422,
    )


def create_app(
    store: Store, token: str | None = None, vocab_size: int | None = None, env_silence_s: float = ENV_SILENCE_S
) -> FastAPI:
    """The FastAPI app over ``store``; with ``token``, every request must present it (see :mod:`.auth`)."""
    api = TrajectoryAPI(store, vocab_size=vocab_size, env_silence_s=env_silence_s)
    app = FastAPI(title="Atropos trajectory API (recipe.atropos.api)")
    app.state.api = api
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    app.add_middleware(GzipRequestBody)
    if token:
        app.add_middleware(TokenAuth, token=token)

    @app.exception_handler(RequestValidationError)
    async def count_malformed(request: Request, exc: RequestValidationError):
        # a body that does not parse as the protocol's types is refused as FastAPI does (422), and counted
        if request.url.path in ("/scored_data", "/scored_data_list"):
            body = exc.body
            items = body if isinstance(body, list) else [body]
            for item in items or [None]:
                api.count_malformed(item.get("env_id") if isinstance(item, dict) else None)
        return await request_validation_exception_handler(request, exc)

    @app.get("/")
    async def root():
        return {"message": "Atropos trajectory API"}

    @app.post("/register")
    async def register(registration: Registration):
        return api.register(registration)

    @app.post("/register-env")
    async def register_env(request: RegisterEnv):
        return api.register_env(request)

    @app.post("/disconnect-env")
    async def disconnect_env(request: EnvIdentifier):
        return api.disconnect_env(request.env_id)

    @app.get("/wandb_info")
    async def wandb_info():
        registration = api.registration or {}
        return {"group": registration.get("wandb_group"), "project": registration.get("wandb_project")}

    @app.get("/info")
    async def info():
        registration = api.registration or {}
        return {
            "batch_size": registration.get("batch_size", -1),
            "max_token_len": registration.get("max_token_len", -1),
        }

    @app.get("/batch")
    async def batch():
        return api.next_batch()

    @app.get("/latest_example")
    async def latest_example():
        latest = store.get_raw("latest")
        return EMPTY_EXAMPLE if latest is None else Response(latest, media_type="application/json")

    @app.post("/scored_data")
    async def scored_data(group: ScoredData):
        answers, refusals = api.accept([group])
        return _refused(answers, refusals, 1) if refusals else answers[0]

    @app.post("/scored_data_list")
    async def scored_data_list(groups: list[ScoredData]):
        # Each group is checked on its own: the sound ones are queued even when another is refused.
        answers, refusals = api.accept(groups)
        if refusals:
            return _refused(answers, refusals, len(groups))
        answer: dict[str, Any] = {"status": "received", "groups_processed": len(groups)}
        buffered = [a for a in answers if a["status"] == "buffered"]
        if buffered:
            answer["buffered"] = len(buffered)
            answer["last_buffer_size"] = buffered[-1]["buffer_size"]
        return answer

    @app.get("/status")
    async def status():
        return api.status()

    @app.get("/status-env")
    async def status_env(request: EnvIdentifier):
        # run-api answers 500 here before the environment registered; this answers 404 and says why
        answer = api.status_env(request.env_id)
        if answer is None:
            return JSONResponse(
                {"status": "error", "message": f"no environment registered with env_id {request.env_id}"},
                status_code=404,
            )
        return answer

    @app.get("/stats")
    async def stats():
        return api.stats()

    @app.get("/reset_data")
    async def reset_data():
        api.reset()
        return PlainTextResponse("Reset successful", status_code=200)

    return app
