"""Did the inference replicas really take the actor's new weights?

After a weight sync the trainer can score one sequence of the batch on both
sides: the actor's log-probs (verl's ``compute_log_prob``) and each replica's
(``prompt_logprobs`` on ``/v1/completions``, which vLLM and the CPU backend both
serve). Equal log-probs mean the replicas generate from the weights just trained.
"""

from __future__ import annotations

import httpx


def replica_prompt_logprobs(replica_url: str, token_ids: list[int], timeout: float = 60.0) -> list[float | None]:
    """log p(token_t | tokens_<t) at every position as the replica computes it (``None`` at 0)."""
    body = {"prompt": token_ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    response = httpx.post(f"{replica_url}/v1/completions", json=body, timeout=timeout)
    response.raise_for_status()
    entries = response.json()["choices"][0]["prompt_logprobs"]
    if entries is None or len(entries) != len(token_ids):
        raise ValueError(f"{replica_url} returned no prompt log-probs for {len(token_ids)} tokens")
    scores: list[float | None] = [None]
    for token, entry in zip(token_ids[1:], entries[1:]):
        value = entry[str(token)]
        scores.append(value["logprob"] if isinstance(value, dict) else float(value))
    return scores


def max_logprob_gap(actor: list[float], replica: list[float]) -> float:
    if len(actor) != len(replica) or not actor:
        raise ValueError(f"cannot compare {len(actor)} actor log-probs with {len(replica)} replica log-probs")
    return max(abs(a - r) for a, r in zip(actor, replica))
