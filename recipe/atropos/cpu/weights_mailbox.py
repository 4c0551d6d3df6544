"""The mailbox of the ``object_store`` checkpoint engine (``recipe/atropos/cpu/object_store_engine.py``).

A small async Ray actor, one per weight sync, that hands the buckets' object
references from the sender to every receiver, in order. Its process imports this
module and its package, and neither imports anything but asyncio (``cpu/__init__``
registers nothing: that is ``cpu/register.py``'s job), so a mailbox starts in a
fraction of a second on every sync.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


@dataclass
class _PostedBucket:
    # the bucket's ObjectRef, inside a list so Ray hands the reference on instead of fetching the bucket
    ref_holder: list
    is_last: bool
    takers_left: int


class WeightsMailbox:
    """Ray actor: the buckets of one weight sync, by index, until every receiver has taken them."""

    def __init__(self, max_pending_buckets: int):
        self._max_pending = max_pending_buckets
        self._buckets: dict[int, _PostedBucket] = {}
        self._changed = asyncio.Condition()

    async def post(self, index: int, ref_holder: list, is_last: bool, receivers: int) -> None:
        """Keep a bucket for ``receivers`` takers; waits while too many are still being taken."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._buckets) < self._max_pending)
            self._buckets[index] = _PostedBucket(ref_holder, is_last, receivers)
            self._changed.notify_all()

    async def take(self, index: int) -> tuple[list, bool]:
        """Bucket ``index`` (waiting until it is posted) and whether it is the sync's last."""
        async with self._changed:
            await self._changed.wait_for(lambda: index in self._buckets)
            bucket = self._buckets[index]
            bucket.takers_left -= 1
            if bucket.takers_left == 0:
                del self._buckets[index]  # the takers hold the reference from here on
                self._changed.notify_all()
            return bucket.ref_holder, bucket.is_last
