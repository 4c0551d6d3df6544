"""The gateway's replica clock: one summary per step of how the replicas answered."""

from __future__ import annotations

import pytest

from recipe.atropos.gateway.replica_timing import ReplicaClock, generated_tokens


def test_a_summary_covers_the_requests_since_the_last_one():
    clock = ReplicaClock(clock=lambda: 0.0)
    clock.note(sent=10.0, answered=13.0, tokens=300)
    clock.note(sent=10.5, answered=17.5, tokens=448)
    clock.note(sent=12.0, answered=13.0, tokens=20)
    timing = clock.take()
    assert (timing.requests, timing.tokens) == (3, 768)
    assert timing.request_s_mean == pytest.approx((3.0 + 7.0 + 1.0) / 3)
    assert timing.request_s_max == 7.0
    assert timing.span_s == 7.5  # first sent at 10.0, last answered at 17.5
    assert timing.start_spread_s == 2.0  # the last request started 2 s after the first
    assert timing.tokens_per_s == pytest.approx(768 / 7.5)
    empty = clock.take()
    assert (empty.requests, empty.span_s, empty.tokens_per_s) == (0, 0.0, 0.0)


def test_generated_tokens_from_usage_or_from_the_choices():
    assert generated_tokens({"usage": {"completion_tokens": 12}, "choices": [{"token_ids": [1]}]}) == 12
    assert generated_tokens({"choices": [{"token_ids": [1, 2, 3]}, {"token_ids": [4]}]}) == 4
    assert generated_tokens({"choices": [{"text": "no ids"}]}) == 0
    assert generated_tokens(["not", "a", "reply"]) == 0
