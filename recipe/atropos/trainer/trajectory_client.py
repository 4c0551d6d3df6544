"""Typed HTTP client of the Atropos trajectory API (``run-api``).

Every call names the URL it used when it fails. Transient failures (connection
refused or reset, a timeout, a 5xx, a body that is not JSON) are retried with
exponential backoff; a 4xx or an error body fails at once with the server's own
message, because asking again cannot fix it. An empty ``/batch`` is polled with
the same backoff until a batch is full or ``timeout`` has passed; every
``stall_timeout`` of that wait the API's queue is read and explained
(:mod:`.stall`), and a queue that will never form a batch ends the wait at once.

An API that restarts is waited for: transient failures keep being retried until
``outage_s`` has passed, and an API that answers that this trainer is not registered
(it restarted without its state) is registered with again, at the trainer's current step.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import httpx

from ..settings import AtroposConfig
from .stall import QueueState, diagnose

logger = logging.getLogger(__name__)


# Longest pause between polls of an empty /batch, whatever backoff_max_s (which paces retries) says:
# a batch the API can form is taken within this, and a poll on loopback costs next to nothing. Every
# moment between the batch forming and the trainer taking it is a moment the replicas sit idle
# (colocated, the next batch is only generated once this one trains), so the pause stays short.
BATCH_POLL_MAX_S = 0.05


class AtroposAPIError(RuntimeError):
    """A call to the trajectory API failed."""


class AtroposConnectionError(AtroposAPIError):
    """The API could not be reached, or kept answering 5xx or non-JSON, through every retry."""


class AtroposRequestError(AtroposAPIError):
    """The API refused a request (4xx or an error body); retrying would not help."""


class AtroposBatchTimeout(AtroposAPIError, TimeoutError):
    """No full batch arrived within the configured wait."""


class AtroposBatchStalled(AtroposAPIError):
    """The API holds groups enough for a batch but cannot form one; waiting longer would not help."""


@dataclass(frozen=True)
class Registration:
    """What the trainer tells the API in ``POST /register``.

    ``batch_size`` counts sequences (``data.train_batch_size x rollout.n``), not groups.
    """

    batch_size: int
    max_token_len: int
    num_steps: int
    starting_step: int = 0
    checkpoint_dir: str = ""
    save_checkpoint_interval: int = -1
    wandb_group: str = ""
    wandb_project: str = ""

    def __post_init__(self):
        for name in ("batch_size", "max_token_len", "num_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Registration.{name} must be > 0, got {getattr(self, name)}")
        if self.starting_step < 0:
            raise ValueError(f"Registration.starting_step must be >= 0, got {self.starting_step}")


@dataclass(frozen=True)
class FetchedBatch:
    """One batch as ``GET /batch`` formed it: whole scored groups, never split."""

    groups: list[dict[str, Any]]
    wait_s: float
    polls: int

    @property
    def num_sequences(self) -> int:
        return sum(len(group.get("tokens") or ()) for group in self.groups)


class AtroposClient:
    """Client of one trajectory API. Not thread-safe: use one per thread."""

    def __init__(
        self,
        api_url: str,
        timeout: float = 600.0,
        max_retries: int = 5,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        stall_timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        outage_s: float = 0.0,
    ):
        self.api_url = api_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stall_timeout = stall_timeout
        self.outage_s = outage_s
        # what register() sent, to register again at ``step`` if the API forgets this trainer
        self._registration: Registration | None = None
        # the trainer's current step (set by the trainer), the starting step of a re-registration
        self.step = 0
        # how often the API forgot this trainer and was registered with again
        self.reregistrations = 0
        # Uncompressed answers: a batch is megabytes of JSON, and gzipping it (the API's middleware
        # compresses at level 9) takes the API ten times longer than sending it over loopback or a
        # cluster's network; the replicas sit idle for that time.
        self._http = httpx.Client(
            base_url=self.api_url, timeout=timeout, transport=transport, headers={"Accept-Encoding": "identity"}
        )

    @classmethod
    def from_config(cls, config: AtroposConfig) -> AtroposClient:
        return cls(
            api_url=config.api_url,
            timeout=config.timeout,
            max_retries=config.max_retries,
            backoff_initial_s=config.backoff_initial_s,
            backoff_max_s=config.backoff_max_s,
            stall_timeout=config.stall_timeout_s,
            outage_s=config.api_outage_s,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AtroposClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the API's routes ------------------------------------------------------------

    def register(self, registration: Registration) -> Any:
        """Register this trainer; returns the API's id for it."""
        body = self._call("POST", "/register", json=asdict(registration))
        if "uuid" not in body:
            raise AtroposRequestError(f"POST {self._url('/register')} answered without a 'uuid': {body!r}")
        self._registration = registration
        self.step = registration.starting_step
        logger.info(
            "registered with %s: batch_size=%d sequences, max_token_len=%d, starting_step=%d, num_steps=%d",
            self.api_url,
            registration.batch_size,
            registration.max_token_len,
            registration.starting_step,
            registration.num_steps,
        )
        return body["uuid"]

    def fetch_batch(self, timeout: float | None = None, cancel: threading.Event | None = None) -> FetchedBatch | None:
        """Wait for one full batch; poll with backoff while the API answers ``{"batch": null}``.

        Raises :class:`AtroposBatchTimeout` after ``timeout`` seconds (default: the
        client's), naming the URL, the wait and what the API had queued. Every
        ``stall_timeout`` seconds of waiting it reads the API's queue: raises
        :class:`AtroposBatchStalled` with the cause if the queue cannot form a batch,
        logs why it waits otherwise. Returns ``None`` if ``cancel`` is set while waiting.
        """
        wait_limit = self.timeout if timeout is None else timeout
        started = time.monotonic()
        deadline = started + wait_limit
        next_check = started + self.stall_timeout
        stall: str | None = None  # the cause, once the queue was found unable to form a batch
        delay = self.backoff_initial_s
        polls = 0
        while True:
            polls += 1
            body = self._call("GET", "/batch")
            if body.get("status") == "error" and self._registration is not None:
                # the API restarted without its state: register again where the trainer is now
                logger.warning(
                    "GET %s: the API no longer knows this trainer (%s); registering again at step %d",
                    self._url("/batch"),
                    body.get("message", body),
                    self.step,
                )
                self.register(replace(self._registration, starting_step=self.step))
                self.reregistrations += 1
                continue
            if body.get("status") == "error":
                raise AtroposRequestError(
                    f"GET {self._url('/batch')} answered an error: {body.get('message', body)!r}; "
                    "the trainer must POST /register before fetching batches"
                )
            groups = body.get("batch")
            if groups is not None:
                if not isinstance(groups, list):
                    raise AtroposRequestError(
                        f"GET {self._url('/batch')} answered a 'batch' that is not a list: {type(groups).__name__}"
                    )
                return FetchedBatch(groups=groups, wait_s=time.monotonic() - started, polls=polls)
            if stall is not None:
                raise AtroposBatchStalled(stall)
            if time.monotonic() >= next_check:
                stall = self._check_queue(time.monotonic() - started)
                next_check = time.monotonic() + self.stall_timeout
                if stall is not None:
                    continue  # one more poll at once: groups posted since the last one may have formed a batch
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AtroposBatchTimeout(self._timeout_message(time.monotonic() - started, wait_limit))
            if cancel is None:
                time.sleep(min(delay, remaining))
            elif cancel.wait(min(delay, remaining)):
                return None
            delay = min(delay * 2, self.backoff_max_s, BATCH_POLL_MAX_S)

    def status(self) -> dict[str, Any]:
        """``GET /status``: ``{"current_step", "queue_size"}`` (queue size in groups)."""
        return self._call("GET", "/status")

    def info(self) -> dict[str, Any]:
        """``GET /info``: the registered ``batch_size`` and ``max_token_len`` (-1 before /register)."""
        return self._call("GET", "/info")

    def queue_state(self) -> QueueState:
        """The API's queue: ``/status``, the registered batch size and, when an environment is
        registered, the largest queued group (``/status-env``)."""
        status = self.status()
        return QueueState(
            current_step=int(status.get("current_step", 0)),
            queue_size=int(status.get("queue_size", 0)),
            batch_size=int(self.info().get("batch_size", -1)),
            max_group_size=self._largest_queued_group(),
        )

    def _largest_queued_group(self) -> int | None:
        # /status-env reports the largest group across the whole queue, whichever env asks; it
        # answers HTTP 500 when no environment is registered, so one plain attempt, no retries
        try:
            response = self._http.request("GET", "/status-env", json={"env_id": 0}, timeout=10)
            body = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return None
        size = body.get("max_group_size") if isinstance(body, dict) else None
        return int(size) if isinstance(size, int) else None

    def _check_queue(self, waited: float) -> str | None:
        """Why no batch came for ``waited`` seconds: the cause if the queue cannot form one, else ``None``
        (after logging why the trainer waits)."""
        try:
            state = self.queue_state()
        except AtroposAPIError as exc:
            logger.warning("no batch from GET %s for %.0f s, and its queue could not be read: %s",
                           self._url("/batch"), waited, exc)
            return None
        diagnosis = diagnose(state, waited)
        if diagnosis.stalled:
            return f"{self._url('/batch')}: {diagnosis.cause} (trainer.atropos.stall_timeout_s={self.stall_timeout:g})"
        logger.warning("%s: %s", self._url("/batch"), diagnosis.cause)
        return None

    def disconnect_env(self, env_id: int) -> None:
        body = self._call("POST", "/disconnect-env", json={"env_id": env_id})
        if body.get("status") != "success":
            raise AtroposRequestError(
                f"POST {self._url('/disconnect-env')} could not disconnect env {env_id}: {body.get('error', body)!r}"
            )

    # -- transport -------------------------------------------------------------------

    def _url(self, path: str) -> str:
        return f"{self.api_url}{path}"

    def _call(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        """One logical call: retried on transient failures, then an error naming URL and cause."""
        url = self._url(path)
        delay = self.backoff_initial_s
        started = time.monotonic()
        attempts = self.max_retries + 1
        cause = ""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                cause = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code >= 500:
                    cause = f"HTTP {response.status_code}: {response.text[:200]!r}"
                elif response.status_code >= 400:
                    raise AtroposRequestError(
                        f"{method} {url} was refused with HTTP {response.status_code}: {response.text[:500]}"
                    )
                else:
                    try:
                        body = response.json()
                    except ValueError:
                        cause = f"HTTP {response.status_code} with a body that is not JSON: {response.text[:200]!r}"
                    else:
                        if isinstance(body, dict):
                            return body
                        cause = f"HTTP {response.status_code} with JSON that is not an object: {response.text[:200]!r}"
            if attempt < attempts or time.monotonic() - started < self.outage_s:
                logger.warning("%s %s failed (attempt %d of %d): %s", method, url, attempt, attempts, cause)
                time.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
                continue
            break
        raise AtroposConnectionError(
            f"{method} {url} failed after {attempt} attempts over {time.monotonic() - started:.1f} s: {cause}. "
            f"Is the trajectory API (run-api) running at {self.api_url}? (trainer.atropos.api_url)"
        )

    def _timeout_message(self, waited: float, wait_limit: float) -> str:
        try:
            queued = self.status()
            info = self.info()
            state = (
                f"the API is at step {queued.get('current_step')} with {queued.get('queue_size')} groups queued, "
                f"fewer sequences than the registered batch_size={info.get('batch_size')}"
            )
        except AtroposAPIError as exc:
            state = f"its status could not be read either ({exc})"
        return (
            f"no full batch from GET {self._url('/batch')} after waiting {waited:.1f} s "
            f"(trainer.atropos.timeout={wait_limit:g}): {state}. "
            "Are the environments running and posting scored groups to this API?"
        )
