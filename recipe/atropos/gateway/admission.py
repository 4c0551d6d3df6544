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
of a batch, with nothing allowed to fill it. The trainer sizes the window (one batch when the
replicas sleep while the actor trains; one more per step of staleness allowed when
they keep generating) and reports what has arrived at the API and what it has not
consumed yet (:meth:`observe`).

Held requests are let through in turns across clients (an environment copy is known by the
API key it sends): when room frees, the held request of the client whose last admission is
oldest goes first, and a client's own requests keep their order. One environment with many
workers cannot take every turn from another, and with one environment this is first come,
first served.

A full window can also hold the very request a batch needs: the API forms a batch only
with each environment's ``min_batch_allocation``, so if one environment filled the window,
another's group must still come. So while the trainer waits for a batch (``starved``)
and nothing is moving (nothing in flight, nothing returned and unsettled) for
``quiet_s``, one held request is let through (``escapes``); at most one per quiet spell.

Environments drop some groups without sending them (atroposlib's envs drop a group
whose scores are all equal, for one): such sequences never arrive. A sequence that
has not arrived ``settle_s`` seconds after it was returned is counted as dropped by
its environment, and its room in the window is given back, so a run whose
environments drop most groups still gets its batches.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass

from .request_stats import ANONYMOUS


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
    escapes: int  # requests let through a full window because the trainer starved with nothing moving


@dataclass(eq=False)  # each held request is its own ticket, whoever else holds one like it
class _Ticket:
    """A held request, and whose it is."""

    client: str


def _check_window(window: int | None) -> None:
    if window is not None and window <= 0:
        raise ValueError(f"the generation window must hold at least one sequence, got {window}")


class GenerationWindow:
    """The window of outstanding sequences; every method runs on the gateway's event loop."""

    def __init__(self, window: int | None = None, settle_s: float = 5.0, quiet_s: float = 1.0,
                 clock=time.monotonic):
        _check_window(window)
        if settle_s <= 0:
            raise ValueError(f"settle_s must be > 0 seconds, got {settle_s}")
        self.window = window
        self.settle_s = settle_s
        self.quiet_s = quiet_s
        self._clock = clock
        self._starved = False  # the trainer waits for a batch, as last reported
        self._quiet_since: float | None = clock()  # since when nothing is in flight or unsettled
        self._in_flight = 0
        self._returned: deque[list] = deque()  # [returned at, sequences not arrived yet], oldest first
        self._downstream = 0
        self._arrived_seen: int | None = None  # the API's cumulative count when last observed
        self._counts = {"admitted": 0, "returned": 0, "arrived": 0, "dropped": 0, "held_total": 0, "escapes": 0}
        self._held_s = 0.0
        self._held: list[_Ticket] = []  # requests waiting for room, in arrival order
        self._turns = itertools.count()
        self._last_turn: dict[str, int] = {}  # client -> the turn of its latest admission
        self._changed = asyncio.Condition()

    @property
    def outstanding(self) -> int:
        self._expire()
        return self._in_flight + sum(entry[1] for entry in self._returned) + self._downstream

    def _has_room(self, count: int) -> bool:
        if self.window is None or self.outstanding < self.window:
            return True
        if self._quiet_for() >= self.quiet_s and self._starved:
            self._counts["escapes"] += 1
            return True
        return False

    def _quiet_for(self) -> float:
        self._expire()
        moving = self._in_flight > 0 or bool(self._returned)
        if moving:
            self._quiet_since = None
        elif self._quiet_since is None:
            self._quiet_since = self._clock()
        return 0.0 if self._quiet_since is None else self._clock() - self._quiet_since

    def _next_held(self) -> _Ticket:
        """The held request whose turn it is: its client's last admission is the oldest (of a client's
        own, the earliest: ``min`` keeps the first of equals, and ``_held`` is in arrival order)."""
        return min(self._held, key=lambda ticket: self._last_turn.get(ticket.client, -1))

    async def acquire(self, count: int, client: str = ANONYMOUS) -> None:
        """Wait until ``count`` more sequences fit the window and it is ``client``'s turn, then count
        them in flight."""
        async with self._changed:
            # a request that finds others held waits its turn, even if room just freed
            if self._held or not self._has_room(count):
                ticket = _Ticket(client)
                started = self._clock()
                self._held.append(ticket)
                self._counts["held_total"] += 1
                try:
                    while not (self._next_held() is ticket and self._has_room(count)):
                        # woken by any change; the timeout lets unsettled sequences expire
                        try:
                            await asyncio.wait_for(self._changed.wait(), timeout=self._next_expiry())
                        except asyncio.TimeoutError:
                            pass
                finally:
                    self._held.remove(ticket)
                    self._held_s += self._clock() - started
                    # the next in line may go now (or, if this one was cancelled, instead of it)
                    self._changed.notify_all()
            self._in_flight += count
            self._quiet_since = None
            self._counts["admitted"] += count
            self._last_turn[client] = next(self._turns)

    async def release(self, count: int, returned: int | None = None) -> None:
        """``count`` sequences left the replicas; ``returned`` of them (default all) went to the environment."""
        returned = count if returned is None else returned
        async with self._changed:
            self._in_flight -= count
            if returned > 0:
                self._returned.append([self._clock(), returned])
                self._counts["returned"] += returned
            self._changed.notify_all()

    async def observe(self, arrived_total: int, downstream: int, starved: bool = False) -> None:
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
            self._starved = starved
            self._quiet_for()  # starts the quiet spell's clock when nothing moves any more
            self._changed.notify_all()

    async def resize(self, window: int | None) -> None:
        _check_window(window)
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
            held_requests=len(self._held),
            held_total=self._counts["held_total"],
            held_s=self._held_s,
            escapes=self._counts["escapes"],
        )

    def _expire(self) -> None:
        deadline = self._clock() - self.settle_s
        while self._returned and self._returned[0][0] <= deadline:
            self._counts["dropped"] += self._returned.popleft()[1]

    def _next_expiry(self) -> float:
        """Seconds until something may change by time alone: an expiry, or a quiet spell long enough."""
        waits = [self.settle_s]
        if self._returned:
            waits.append(self._returned[0][0] + self.settle_s - self._clock())
        if self._starved and self._quiet_since is not None:
            waits.append(self._quiet_since + self.quiet_s - self._clock())
        return max(0.01, min(waits))
