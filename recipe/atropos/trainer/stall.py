"""Why ``GET /batch`` keeps answering "no batch": the trajectory API's queue, read and explained.

Atropos's ``run-api`` forms a batch only from whole groups, packed to the largest
queued group's size. A group larger than the registered batch (or groups whose
sizes do not pack into it) therefore blocks every batch after it, and the API goes
on answering ``{"batch": null}`` with groups queued. Seen from the trainer that
looks exactly like slow environments, so after ``trainer.atropos.stall_timeout_s``
the client reads ``/status``, ``/info`` and ``/status-env`` and asks
:func:`diagnose` which it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueueState:
    """What the API holds, as its ``/status``, ``/info`` and ``/status-env`` report it."""

    current_step: int
    queue_size: int  # groups
    batch_size: int  # sequences, as registered
    # the largest queued group in sequences (``/status-env``'s ``max_group_size``); None when no
    # environment is registered to ask about
    max_group_size: int | None = None


@dataclass(frozen=True)
class Diagnosis:
    stalled: bool  # True: the queue will never form a batch by itself
    cause: str


def diagnose(state: QueueState, waited_s: float) -> Diagnosis:
    """Whether a queue that formed no batch for ``waited_s`` seconds is stalled, and why."""
    waiting = f"GET /batch formed no batch for {waited_s:.0f} s"
    if state.queue_size == 0:
        return Diagnosis(
            False,
            f"{waiting} and no group is queued: no environment has posted scored groups to the API in that time. "
            "Are the environments running, registered and pointed at this API (env.rollout_server_url)?",
        )
    if state.max_group_size is not None and state.max_group_size > state.batch_size:
        return Diagnosis(
            True,
            f"{waiting}: a queued group holds {state.max_group_size} sequences, more than the registered "
            f"batch_size={state.batch_size}. The API never splits a group, so it cannot form a batch with it, and "
            f"the {state.queue_size} groups queued with it wait forever. Fix the environment that sends it (its "
            "group size must divide data.train_batch_size x actor_rollout_ref.rollout.n) and restart the API.",
        )
    if state.queue_size >= state.batch_size:
        # every group holds at least one sequence, so these are at least a batch's worth
        largest = "" if state.max_group_size is None else f" (the largest of {state.max_group_size} sequences)"
        return Diagnosis(
            True,
            f"{waiting} although {state.queue_size} groups{largest} are queued, at least the "
            f"batch_size={state.batch_size} sequences a batch needs: the API packs groups to the largest queued "
            "group's size and never splits one, so a group larger than the batch, or group sizes that do not "
            "pack into it, block every batch. Check the group sizes the environments send (GET /latest_example) "
            "and restart the API.",
        )
    largest = "" if state.max_group_size is None else f" (the largest of {state.max_group_size} sequences)"
    return Diagnosis(
        False,
        f"{waiting}: {state.queue_size} groups{largest} are queued, fewer than a batch of "
        f"batch_size={state.batch_size} sequences needs; waiting for the environments to post more.",
    )
