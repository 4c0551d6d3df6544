"""Token-in, token-out sampling and scoring with a transformers causal LM on the CPU.

Log-probs are those of the model's raw distribution (no temperature, no top-p),
as vLLM reports them by default, so a sampled token's log-prob is comparable
with the one verl's actor computes at temperature 1.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList


@dataclass
class Sample:
    """One generated continuation."""

    token_ids: list[int]
    logprobs: list[float]
    # per position: {token id: log-prob} for the sampled token and the top-k, k = the request's logprobs
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" when it ended on an end-of-sequence token, "abort" when cut short


class _Aborted(StoppingCriteria):
    """Stops every row at the next token once ``event`` is set (a weight sync aborts generation)."""

    def __init__(self, event: threading.Event):
        self.event = event
        self.fired = False

    def __call__(self, input_ids, scores, **kwargs):
        self.fired = self.fired or self.event.is_set()
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[int],
    *,
    n: int = 1,
    max_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    logprobs: int = 0,
    stop_token_ids: tuple[int, ...] = (),
    seed: int | None = None,
    abort: threading.Event | None = None,
) -> list[Sample]:
    """Sample ``n`` continuations of ``prompt_ids`` (greedy when ``temperature`` is 0).

    Setting ``abort`` ends them early: what was generated so far comes back, ``finish_reason``
    "abort", as vLLM answers a request aborted for a weight sync.
    """
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    if seed is not None:
        torch.manual_seed(seed)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    do_sample = temperature > 0
    if not do_sample and n > 1:  # greedy: every continuation is the same one
        return sample(model, prompt_ids, n=1, max_tokens=max_tokens, temperature=0, logprobs=logprobs,
                      stop_token_ids=stop_token_ids, abort=abort) * n
    aborted = _Aborted(abort) if abort is not None else None
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_tokens,
        min_new_tokens=0,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=(top_k or None) if do_sample else None,
        num_return_sequences=n,
        eos_token_id=list(stop_token_ids) or None,
        pad_token_id=stop_token_ids[0] if stop_token_ids else None,
        output_logits=True,
        return_dict_in_generate=True,
        stopping_criteria=StoppingCriteriaList([aborted] if aborted else []),
    )
    generated = out.sequences[:, input_ids.shape[1] :]
    # (n, steps, vocab) raw log-probs of every generated position
    step_logprobs = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
    samples = []
    for row in range(n):
        tokens = generated[row].tolist()
        finish = "abort" if aborted is not None and aborted.fired and len(tokens) < max_tokens else "length"
        for position, token in enumerate(tokens):
            if token in stop_token_ids:
                tokens = tokens[: position + 1]
                finish = "stop"
                break
        chosen = step_logprobs[row, torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()
        top = []
        for position, token in enumerate(tokens):
            entries = {token: chosen[position]}
            if logprobs > 0:
                values, ids = step_logprobs[row, position].topk(logprobs)
                entries.update(zip(ids.tolist(), values.tolist()))
            top.append(entries)
        samples.append(Sample(token_ids=tokens, logprobs=chosen, top_logprobs=top, finish_reason=finish))
    return samples


@torch.no_grad()
def prompt_logprobs(model, token_ids: list[int]) -> list[float | None]:
    """log p(token_t | tokens_<t) for every position; ``None`` for the first, as vLLM reports it."""
    ids = torch.tensor([token_ids], dtype=torch.long)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    scores = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return [None] + scores.tolist()
