"""Which weights generated each sequence, and how stale a group is when it trains.

The gateway sees every tokens-in request an environment makes, and the trainer
tells it which weights the replicas hold (the step they were synced after). So the
gateway records, for each sequence it returns (prompt tokens + sampled tokens), the
policy version that produced it. When the trainer later receives that sequence
from the trajectory API - the environment sends back exactly those tokens - it looks
the version up and knows how many updates the actor has made since.

``policy lag`` of a group = the actor's version when the group trains minus the
oldest version among its sequences. Sequences the gateway never saw (an environment
that re-tokenises text from the OpenAI routes, say) have no version; they are
counted, not guessed.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def sequence_key(token_ids: Sequence[int]) -> bytes:
    """A fixed-size key for a token sequence (the ledger holds many, so not the tokens themselves)."""
    return hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=16).digest()


class PolicyVersionLedger:
    """Bounded, thread-safe map from generated sequence to the policy version that sampled it.

    Written by the gateway's event loop, read by the trainer's thread. The oldest
    entries go first once ``capacity`` is reached: by then their groups have been
    trained or are far beyond any staleness bound.
    """

    def __init__(self, capacity: int = 200_000):
        if capacity <= 0:
            raise ValueError(f"the policy-version ledger needs a capacity > 0, got {capacity}")
        self.capacity = capacity
        self._versions: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, token_ids: Sequence[int], version: int) -> None:
        key = sequence_key(token_ids)
        with self._lock:
            # the same tokens sampled twice: keep the older version, the conservative one
            if key in self._versions:
                version = min(version, self._versions[key])
            self._versions[key] = version
            self._versions.move_to_end(key)
            while len(self._versions) > self.capacity:
                self._versions.popitem(last=False)

    def version_of(self, token_ids: Sequence[int]) -> int | None:
        with self._lock:
            return self._versions.get(sequence_key(token_ids))

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)


@dataclass(frozen=True)
class GroupLag:
    """One group's staleness: ``lag`` is None when none of its sequences is in the ledger."""

    lag: int | None
    known_sequences: int
    sequences: int


def group_lag(ledger: PolicyVersionLedger, sequences: Sequence[Sequence[int]], actor_version: int) -> GroupLag:
    """Lag of one group when trained by an actor at ``actor_version``: from its oldest known sequence."""
    versions = [v for v in (ledger.version_of(tokens) for tokens in sequences) if v is not None]
    lag = actor_version - min(versions) if versions else None
    return GroupLag(lag=lag, known_sequences=len(versions), sequences=len(sequences))
