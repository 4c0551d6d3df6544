"""How much the environments may generate: a window of sequences the trainer will use.

Atropos environments generate as fast as the replicas answer and queue what they
score at the trajectory API; left alone they run far ahead of the trainer, and what
they generate beyond the staleness bound is thrown away. The gateway sees every
generation request, so it holds requests (they wait, they do not fail) once the
sequences generated and not yet consumed by the trainer fill a window of
``window`` sequences:

    outstanding = in flight at the replicas
                + returned to an environment and not yet arrived at the API
                + arrived at the API and not yet consumed by the trainer

A request for ``n`` choices is admitted while ``outstanding < window``, so the window
may be overshot by at most one request (``n - 1`` sequences): held to the letter, a
window that is not a multiple of the group size would leave the API one group short
of a batch, with nothing allowed to fill it. The
trainer sizes the window (one batch when the replicas sleep while the actor trains;
one more per step of staleness allowed when they keep generating) and reports what
has arrived at the API and what it has not consumed yet (:meth:`observe`).

Environments drop some groups without sending them (atroposlib's envs drop a group
whose scores are all equal, for one): such sequences never arrive. A sequence that
has not arrived ``settle_s`` seconds after it was returned is counted as dropped by
its environment, and its room in the window is given back, so a run whose
environments drop most groups still gets its batches.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionStats:
    """Cumulative counts, in sequences, since the gateway started."""

    window: int | None
    admitted: int  # started at a replica
    returned: int  # answered to an environment
    arrived: int  # seen arriving at the trajectory API (accepted or refused there)
    dropped: int  # returned, never arrived within settle_s: dropped by the environment
    in_flight: int
    unsettled: int  # returned, neither arrived nor counted dropped yet
    downstream: int  # arrived and not yet consumed by the trainer, as last reported
    held_requests: int  # requests waiting for room now
    held_total: int  # requests that had to wait, ever
    held_s: float  # seconds requests spent waiting, summed


class GenerationWindow:
    """The window of outstanding sequences; every method runs on the gateway's event loop."""

    def __init__(self, window: int | None = None, settle_s: float = 5.0, clock=time.monotonic):
        if window is not None and window <= 0:
            raise ValueError(f"the generation window must hold at least one sequence, got {window}")
        if settle_s <= 0:
            raise ValueError(f"settle_s must be > 0 seconds, got {settle_s}")
        self.window = window
        self.settle_s = settle_s
        self._clock = clock
        self._in_flight = 0
        self._returned: deque[list] = deque()  # [returned at, sequences not arrived yet], oldest first
        self._downstream = 0
        self._arrived_seen: int | None = None  # the API's cumulative count when last observed
        self._counts = {"admitted": 0, "returned": 0, "arrived": 0, "dropped": 0, "held_total": 0}
        self._held_s = 0.0
        self._waiting = 0
        self._changed = asyncio.Condition()

    @property
    def outstanding(self) -> int:
        self._expire()
        return self._in_flight + sum(entry[1] for entry in self._returned) + self._downstream

    def _has_room(self, count: int) -> bool:
        if self.window is None:
            return True
        return self.outstanding < self.window

    async def acquire(self, count: int) -> None:
        """Wait until ``count`` more sequences fit the window, then count them in flight."""
        async with self._changed:
            if not self._has_room(count):
                started = self._clock()
                self._waiting += 1
                self._counts["held_total"] += 1
                try:
                    while not self._has_room(count):
                        # woken by any change; the timeout lets unsettled sequences expire
                        try:
                            await asyncio.wait_for(self._changed.wait(), timeout=self._next_expiry())
                        except asyncio.TimeoutError:
                            pass
                finally:
                    self._waiting -= 1
                    self._held_s += self._clock() - started
            self._in_flight += count
            self._counts["admitted"] += count

    async def release(self, count: int, returned: int | None = None) -> None:
        """``count`` sequences left the replicas; ``returned`` of them (default all) went to the environment."""
        returned = count if returned is None else returned
        async with self._changed:
            self._in_flight -= count
            if returned > 0:
                self._returned.append([self._clock(), returned])
                self._counts["returned"] += returned
            self._changed.notify_all()

    async def observe(self, arrived_total: int, downstream: int) -> None:
        """What the trainer read: sequences that ever arrived at the API, and those not consumed yet.

        Arrivals settle the oldest returned sequences first; the first report only sets
        the baseline (what arrived before this gateway started is not its business).
        """
        async with self._changed:
            if self._arrived_seen is None or arrived_total < self._arrived_seen:
                # a first report, or an API that restarted with fewer counted: a new baseline
                self._arrived_seen = arrived_total
            new = arrived_total - self._arrived_seen
            self._arrived_seen = arrived_total
            self._counts["arrived"] += new
            while new > 0 and self._returned:
                settled = min(new, self._returned[0][1])
                self._returned[0][1] -= settled
                new -= settled
                if self._returned[0][1] == 0:
                    self._returned.popleft()
            self._downstream = max(0, downstream)
            self._changed.notify_all()

    async def resize(self, window: int | None) -> None:
        if window is not None and window <= 0:
            raise ValueError(f"the generation window must hold at least one sequence, got {window}")
        async with self._changed:
            self.window = window
            self._changed.notify_all()

    def stats(self) -> AdmissionStats:
        self._expire()
        return AdmissionStats(
            window=self.window,
            admitted=self._counts["admitted"],
            returned=self._counts["returned"],
            arrived=self._counts["arrived"],
            dropped=self._counts["dropped"],
            in_flight=self._in_flight,
            unsettled=sum(entry[1] for entry in self._returned),
            downstream=self._downstream,
            held_requests=self._waiting,
            held_total=self._counts["held_total"],
            held_s=self._held_s,
        )

    def _expire(self) -> None:
        deadline = self._clock() - self.settle_s
        while self._returned and self._returned[0][0] <= deadline:
            self._counts["dropped"] += self._returned.popleft()[1]

    def _next_expiry(self) -> float:
        if not self._returned:
            return self.settle_s
        return max(0.01, self._returned[0][0] + self.settle_s - self._clock())
