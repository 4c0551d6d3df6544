"""Fetch and convert the next Atropos batch in the background while the current one trains.

Batches are fetched only on request: every ``GET /batch`` that returns data takes
it off the API's queue and advances the API's step, so fetching more than the
trainer will use would lose data. The trainer asks for one batch per step plus
one ahead, and for a replacement when every group of a batch was rejected.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .batch import ConversionResult
from .trajectory_client import AtroposClient

logger = logging.getLogger(__name__)


@dataclass
class PrefetchedBatch:
    result: ConversionResult
    fetch_s: float  # time the background thread spent waiting on the API
    convert_s: float  # validation + conversion time, off the training thread
    sequences: int = 0  # as fetched, before any rejection


class BatchPrefetcher:
    """One background thread that fetches (``GET /batch``) and converts batches on request."""

    def __init__(self, client: AtroposClient, convert: Callable[[list[dict]], ConversionResult]):
        self._client = client
        self._convert = convert
        self._requests = threading.Semaphore(0)
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        # groups fetched and not yet trained (or rejected) by a step
        self._unconsumed_groups = 0
        self._done = 0  # sequences of every batch a step finished with
        self._lock = threading.Lock()
        self._waiting = threading.Event()  # set while the training thread waits in get()
        self._thread = threading.Thread(target=self._run, name="atropos-prefetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request(self, count: int = 1) -> None:
        """Ask for ``count`` more batches, delivered in order by :meth:`get`."""
        for _ in range(count):
            self._requests.release()

    def get(self) -> tuple[PrefetchedBatch, float]:
        """The next requested batch and how long this call waited for it.

        Re-raises, in the training thread, any error the background fetch hit.
        """
        started = time.monotonic()
        self._waiting.set()
        try:
            item = self._ready.get()
        finally:
            self._waiting.clear()
        waited = time.monotonic() - started
        if isinstance(item, BaseException):
            raise item
        return item, waited

    def done_with(self, item: PrefetchedBatch) -> None:
        """The step that took ``item`` trained it or rejected all of it: it no longer waits anywhere."""
        with self._lock:
            self._unconsumed_groups -= item.result.num_groups
            self._done += item.sequences

    @property
    def done_sequences(self) -> int:
        """Sequences of every batch a step trained or rejected whole, since this prefetcher started.

        A batch counts as done when its step says so (:meth:`done_with`), not when it is
        handed over: while it trains, generation for the next one must not start in the
        colocated layout, where it would be in flight when the replicas go to sleep.
        """
        with self._lock:
            return self._done

    @property
    def trainer_waiting(self) -> bool:
        """Whether the training thread is blocked for its next batch (not merely fetching ahead)."""
        return self._waiting.is_set()

    @property
    def unconsumed_groups(self) -> int:
        """Groups taken off the API's queue that no step has finished with yet."""
        with self._lock:
            return self._unconsumed_groups

    def stop(self) -> None:
        self._stop.set()
        self._requests.release()  # wake the thread if it waits for a request
        self._thread.join(timeout=self._client.timeout + 5)

    def _run(self) -> None:
        while True:
            self._requests.acquire()
            if self._stop.is_set():
                return
            try:
                started = time.monotonic()
                fetched = self._client.fetch_batch(cancel=self._stop)
                if fetched is None:
                    return
                with self._lock:
                    self._unconsumed_groups += len(fetched.groups)
                converted_at = time.monotonic()
                result = self._convert(fetched.groups)
                self._ready.put(
                    PrefetchedBatch(
                        result=result,
                        fetch_s=converted_at - started,
                        convert_s=time.monotonic() - converted_at,
                        sequences=fetched.num_sequences,
                    )
                )  # its rejections are logged once, by the step that shapes it
            except BaseException as exc:  # handed to the training thread, which raises it
                self._ready.put(exc)
                return
