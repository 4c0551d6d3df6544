"""Generation sized to what the trainer consumes: the gateway's window, fed from the API.

The gateway holds generation requests once the sequences generated and not yet
consumed fill a window (:mod:`..gateway.admission`). This module sizes that window
and keeps it fed, from a background thread, with what only the trainer side can
see, from the project's ``GET /stats`` and the trainer's own count: how many
sequences ever arrived at the trajectory API (``arrived_sequences``), and how many
are downstream, not trained yet: queued there, plus served to the trainer
(``served_sequences``) minus those a step finished with. Counting what was served,
rather than what the trainer holds, leaves no gap while a batch is in transit.

The window, in registered batches (``trainer.atropos.generation_window_batches``):

* colocated (the replicas sleep while the actor trains): **1**. Sequences are only
  generated while the trainer waits for its batch, and a batch generated under
  version v trains at once, so one batch is all a step can use; more would sit in
  the queue a step and be in flight when the replicas must sleep.
* standalone replicas (they generate while the actor trains): **1 + the staleness
  bound**. Oldest-first batches train a sequence generated under version v within
  that many steps, so nothing admitted goes stale.

Atropos's own ``run-api`` has no ``/stats``: the window is then left open (logged).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx


def window_sequences(configured_batches: int | None, batch_size: int, disaggregated: bool,
                     max_policy_lag_steps: int) -> int | None:
    """The window in sequences; None: no window.

    ``configured_batches``: None picks the layout's default (see the module docstring),
    0 means no window.
    """
    if configured_batches is None:
        if not disaggregated:
            configured_batches = 1
        elif max_policy_lag_steps < 0:
            configured_batches = 2  # no bound to respect: one batch training, one generating
        else:
            configured_batches = 1 + max_policy_lag_steps
    if configured_batches == 0:
        return None
    return configured_batches * batch_size


class GenerationPacer:
    """Reads the API's counts every ``poll_s`` and hands them to the gateway's window."""

    def __init__(self, api_url: str, observe: Callable[[int, int, bool], None], done: Callable[[], int],
                 starved: Callable[[], bool] = lambda: False, poll_s: float = 0.25,
                 transport: httpx.BaseTransport | None = None):
        """
        Args:
            api_url: the trajectory API.
            observe: the gateway's ``observe_downstream(arrived_total, downstream, starved)``.
            done: sequences the trainer finished with (trained, or rejected whole), ever.
            starved: whether the training thread is blocked for its next batch. Not the
                prefetch fetching ahead: in the colocated layout that goes on while the
                actor trains, and a request let through then would be in flight at the
                next sleep.
        """
        self._http = httpx.Client(base_url=api_url.rstrip("/"), timeout=10, transport=transport)
        self._observe = observe
        self._done = done
        self._served_before: int | None = None  # served to an earlier trainer: not this one's to count
        self._done_before = 0
        self._starved = starved
        self.poll_s = poll_s
        self._http_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="atropos-pacer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self._http.close()

    def read_stats(self) -> dict | None:
        """The API's ``/stats`` now; None if it cannot be read."""
        try:
            return self._read()
        except (httpx.HTTPError, ValueError):
            return None

    def poll_once(self) -> bool:
        """One reading handed to the gateway; False when the API could not be read or counts no
        arrivals (the project's API counts them, ``run-api`` does not)."""
        body = self.read_stats()
        if body is None:
            return False
        done = self._done()
        queued = int(body.get("queued_sequences", 0)) + int(body.get("buffered_sequences", 0))
        served = int(body.get("served_sequences", 0))
        if self._served_before is None or served < self._served_before:
            # the first reading, or an API that restarted and counts from 0: a new baseline
            self._served_before, self._done_before = served, done
        in_trainer = max(0, (served - self._served_before) - (done - self._done_before))
        self._observe(int(body["arrived_sequences"]), queued + in_trainer, self._starved())
        return True

    def _read(self) -> dict | None:
        with self._http_lock:  # the pacer's thread and the trainer's (read_stats) share the client
            response = self._http.get("/stats")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body = response.json()
        if not isinstance(body, dict) or "arrived_sequences" not in body:
            return None
        return body

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            # an API restarting is waited out: the window keeps its last reading meanwhile
            self.poll_once()
