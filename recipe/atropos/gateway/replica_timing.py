"""How long the replicas took to answer, step by step.

The trainer's wait for a batch splits into time with nothing in flight at any replica
(``atropos/batch_wait_idle_s``) and time in which the replicas generate. This module
splits the second part, to tell a slow engine from requests that started late:
every request the gateway forwards is timed from when it was sent until its reply
was read, and the trainer takes a summary once a step.

* ``request_s`` (mean and max): one request's time at its replica. Each choice is
  one request (see ``sample_one_by_one``), so these compare with verl's own
  ``timing_s/agent_loop/generate_sequences`` (mean and max).
* ``span_s``: from the first request sent to the last reply read.
* ``start_spread_s``: from the first request sent to the last one sent; near 0
  when a batch's requests all start together.
* ``tokens_per_s``: tokens generated over ``span_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ReplicaTiming:
    """The requests answered since the last summary."""

    requests: int
    request_s_mean: float
    request_s_max: float
    span_s: float
    start_spread_s: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.span_s if self.span_s > 0 else 0.0

    def metrics(self, prefix: str = "atropos/replica/") -> dict[str, float]:
        return {
            f"{prefix}requests": float(self.requests),
            f"{prefix}request_s_mean": self.request_s_mean,
            f"{prefix}request_s_max": self.request_s_max,
            f"{prefix}span_s": self.span_s,
            f"{prefix}start_spread_s": self.start_spread_s,
            f"{prefix}tokens": float(self.tokens),
            f"{prefix}tokens_per_s": self.tokens_per_s,
        }


def generated_tokens(reply: Any) -> int:
    """Tokens a replica's reply generated: usage's count where it gives one, else the choices' token ids."""
    if not isinstance(reply, dict):
        return 0
    usage = reply.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        return usage["completion_tokens"]
    return sum(len(choice.get("token_ids") or []) for choice in reply.get("choices") or [] if isinstance(choice, dict))


class ReplicaClock:
    """Collects each forwarded request's times; :meth:`take` summarises and starts afresh.

    Every method runs on the gateway's event loop.
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._reset()

    def _reset(self) -> None:
        self._count = 0
        self._total_s = 0.0
        self._max_s = 0.0
        self._first_sent: float | None = None
        self._last_sent: float | None = None
        self._last_answered: float | None = None
        self._tokens = 0

    def now(self) -> float:
        return self._clock()

    def note(self, sent: float, answered: float, tokens: int) -> None:
        """One request: when it was sent, when its reply was read, and the tokens it generated."""
        took = answered - sent
        self._count += 1
        self._total_s += took
        self._max_s = max(self._max_s, took)
        self._first_sent = sent if self._first_sent is None else min(self._first_sent, sent)
        self._last_sent = sent if self._last_sent is None else max(self._last_sent, sent)
        self._last_answered = answered if self._last_answered is None else max(self._last_answered, answered)
        self._tokens += tokens

    def take(self) -> ReplicaTiming:
        """The requests answered since the last call (all zero if none)."""
        if self._count == 0:
            summary = ReplicaTiming(0, 0.0, 0.0, 0.0, 0.0, 0)
        else:
            summary = ReplicaTiming(
                requests=self._count,
                request_s_mean=self._total_s / self._count,
                request_s_max=self._max_s,
                span_s=self._last_answered - self._first_sent,
                start_spread_s=self._last_sent - self._first_sent,
                tokens=self._tokens,
            )
        self._reset()
        return summary
