"""Where every generated group went: trained, rejected, refused, or still waiting.

Counted at the end of each step, in groups, cumulative over the run:

    arrived  = refused at the API's door + accepted
    accepted = served to the trainer + queued at the API
    served   = trained + rejected by the trainer + fetched ahead (not trained yet)

so ``arrived = trained + rejected + refused + queued + fetched ahead`` holds at every
step up to a batch in transit, and exactly once the run has ended. In sequences, the
gateway's window adds what never became a group: sequences returned to an environment
that never arrived (``dropped_by_env``: the environment dropped the group).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class GroupLedger:
    """The trainer's side: groups trained and rejected (by reason) since the run started."""

    trained: int = 0
    rejected: Counter = field(default_factory=Counter)

    def count_batch(self, trained_groups: int, rejection_reasons: list[str]) -> None:
        self.trained += trained_groups
        self.rejected.update(rejection_reasons)


def accounting_metrics(ledger: GroupLedger, api_stats: dict | None, fetched_ahead_groups: int,
                       window_stats=None) -> dict[str, float]:
    """``atropos/accounting/*`` (groups) and ``atropos/generation/*`` (sequences) of one step.

    Args:
        ledger: the trainer's cumulative counts.
        api_stats: the project's API ``GET /stats`` (None with ``run-api``: API-side counts left out).
        fetched_ahead_groups: groups the prefetch took off the API's queue and no step trained yet.
        window_stats: the gateway's :class:`~recipe.atropos.gateway.admission.AdmissionStats`.
    """
    metrics = {
        "atropos/accounting/trained_groups": float(ledger.trained),
        "atropos/accounting/rejected_groups": float(sum(ledger.rejected.values())),
        "atropos/accounting/fetched_ahead_groups": float(fetched_ahead_groups),
    }
    for reason, count in sorted(ledger.rejected.items()):
        metrics[f"atropos/accounting/rejected/{reason}"] = float(count)
    if api_stats is not None:
        counters = api_stats.get("envs", {}).values()
        refused = sum(count for c in counters for name, count in c.items() if name.startswith("refused/"))
        accepted = sum(c.get("accepted", 0) for c in counters)
        metrics["atropos/accounting/arrived_groups"] = float(accepted + refused)
        metrics["atropos/accounting/refused_groups"] = float(refused)
        metrics["atropos/accounting/served_groups"] = float(sum(c.get("served", 0) for c in counters))
        metrics["atropos/accounting/queued_groups"] = float(
            api_stats.get("queue_size", 0) + api_stats.get("buffered_groups", 0)
        )
    if window_stats is not None:
        stats = asdict(window_stats)
        # -1: no window
        metrics["atropos/generation/window_sequences"] = float(-1 if stats["window"] is None else stats["window"])
        for name in SEQUENCE_COUNTS:
            metrics[f"atropos/generation/{name}_sequences"] = float(stats[name])
        metrics["atropos/generation/held_requests"] = float(stats["held_total"])
        metrics["atropos/generation/held_s"] = float(stats["held_s"])
        metrics["atropos/generation/escapes"] = float(stats["escapes"])
    return metrics


# the gateway window's counts in sequences, logged as atropos/generation/<name>_sequences
SEQUENCE_COUNTS = ("admitted", "returned", "arrived", "dropped", "in_flight", "unsettled", "downstream")
