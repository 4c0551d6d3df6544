"""Which queued groups form the next batch: pure functions, no I/O.

The protocol's rules (atroposlib 0.4.0's ``run-api``): a batch holds exactly
``batch_size`` sequences; groups are never split; groups of different sizes are
combined only in "packs" that add up to the largest group size queued (so sizes
that divide it, e.g. powers of two, always combine); an environment registered
with ``min_batch_allocation`` gets at least that share of every batch, or no batch
is formed.

What differs: the groups are considered oldest first. "Oldest" is the policy
version that generated a group where the group names one, else the number of
batches the API had served when it arrived (an upper bound on the weights that
generated it), with arrival order breaking ties. The trainer's staleness bound
discards groups by age, so serving the oldest first discards the fewest.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class QueuedGroup:
    """What batch formation needs to know of one queued group (its body stays in the store)."""

    seq: int  # arrival order, unique
    size: int  # sequences in the group
    env_id: int | None
    policy_version: int | None
    arrival_step: int  # batches served before it arrived

    @property
    def age_key(self) -> tuple[int, int]:
        version = self.policy_version if self.policy_version is not None else self.arrival_step
        return (version, self.seq)


def oldest_first(groups: Iterable[QueuedGroup]) -> list[QueuedGroup]:
    return sorted(groups, key=lambda group: group.age_key)


def packed(groups: Sequence[QueuedGroup], pack_size: int, by_env: bool = False) -> list[QueuedGroup]:
    """The groups that complete packs of ``pack_size`` sequences, in the order their packs complete.

    Groups of one size are collected until they fill a pack; a size that does not divide
    ``pack_size`` never does. With ``by_env`` a pack holds groups of one environment only.
    """
    pending: dict[tuple, list[QueuedGroup]] = defaultdict(list)
    ready = []
    for group in groups:
        bucket = pending[(group.env_id if by_env else None, group.size)]
        bucket.append(group)
        if len(bucket) * group.size == pack_size:
            ready.extend(bucket)
            bucket.clear()
    return ready


def _fill(candidates: Iterable[QueuedGroup], room: int, taken: set[int]) -> list[QueuedGroup]:
    """Take candidates in order while they fit in ``room`` sequences."""
    chosen = []
    for group in candidates:
        if room == 0:
            break
        if group.seq in taken or group.size > room:
            continue
        chosen.append(group)
        taken.add(group.seq)
        room -= group.size
    return chosen


def form_batch(
    queue: Sequence[QueuedGroup],
    batch_size: int,
    min_allocations: dict[int, float] | None = None,
) -> list[QueuedGroup] | None:
    """The groups of the next batch, oldest first, or ``None`` if no batch can be formed yet.

    Args:
        queue: every queued group, in any order.
        batch_size: sequences per batch (the trainer's registration).
        min_allocations: env_id -> least share of a batch (0..1), for connected
            environments registered with ``min_batch_allocation``.
    """
    if not queue or batch_size <= 0 or sum(group.size for group in queue) < batch_size:
        return None
    ordered = oldest_first(queue)
    pack_size = max(group.size for group in ordered)
    if not min_allocations:
        batch = _fill(packed(ordered, pack_size), batch_size, set())
        return batch if sum(group.size for group in batch) == batch_size else None
    return _form_with_minimums(ordered, batch_size, pack_size, min_allocations)


def _form_with_minimums(
    ordered: list[QueuedGroup], batch_size: int, pack_size: int, min_allocations: dict[int, float]
) -> list[QueuedGroup] | None:
    # Only groups of a known environment count here, packed per environment.
    with_env = [group for group in ordered if group.env_id is not None]
    packable = packed(with_env, pack_size, by_env=True)
    packable_by_env: dict[int, list[QueuedGroup]] = defaultdict(list)
    for group in packable:
        packable_by_env[group.env_id].append(group)
    queued_envs = {group.env_id for group in with_env}

    minimums: dict[int, int] = {}
    for env_id, share in min_allocations.items():
        wanted = int(batch_size * share)
        if wanted <= 0:
            continue
        if env_id not in queued_envs or not packable_by_env.get(env_id):
            return None  # its minimum cannot be met yet
        minimums[env_id] = wanted
    total_minimum = sum(minimums.values())
    if total_minimum > batch_size:
        # shrink every minimum in proportion, but to no less than one of the env's groups
        scale = batch_size / total_minimum
        for env_id, wanted in list(minimums.items()):
            smallest = min(group.size for group in packable_by_env[env_id])
            minimums[env_id] = max(smallest, int(wanted * scale))

    taken: set[int] = set()
    batch: list[QueuedGroup] = []
    for env_id, wanted in minimums.items():
        got = 0
        for group in packable_by_env[env_id]:
            if got >= wanted:
                break
            room = batch_size - sum(g.size for g in batch)
            if group.size <= room:
                batch.append(group)
                taken.add(group.seq)
                got += group.size
    room = batch_size - sum(group.size for group in batch)
    batch += _fill(packable, room, taken)
    if sum(group.size for group in batch) != batch_size:
        return None
    return sorted(batch, key=lambda group: group.age_key)


def sizes_summing_to(sizes: Sequence[int], target: int) -> list[int]:
    """Indices of ``sizes`` (earliest preferred) that add up to ``target``; empty if none do.

    Used for an environment whose groups arrive smaller than its registered group
    size: they wait until some of them add up to one group of the registered size.
    """
    if target <= 0:
        return []
    running, chosen = 0, []
    for index, size in enumerate(sizes):
        if running + size <= target:
            chosen.append(index)
            running += size
            if running == target:
                return chosen
    # no prefix-greedy fit: the subset with the earliest members, by dynamic programming
    reachable: dict[int, list[int]] = {0: []}
    for index, size in enumerate(sizes):
        for total in sorted(reachable, reverse=True):
            new_total = total + size
            if new_total <= target and new_total not in reachable:
                reachable[new_total] = reachable[total] + [index]
        if target in reachable:
            return reachable[target]
    return []
