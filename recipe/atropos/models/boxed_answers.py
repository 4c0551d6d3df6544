"""Teach the tiny model one habit: end every reply with ``The answer is \\boxed{D}``, D a random digit.

A random model never writes an answer an environment can parse, so an environment
that drops groups whose scores are all equal (atroposlib's ``gsm8k_server.py``)
never sends a group. After this, the tiny model answers a question whose answer is
one digit right about one time in ten, whatever the prompt: groups of mixed scores,
as a real model gives. It learns no arithmetic; it is for CPU runs of such
environments, nothing more.
"""

from __future__ import annotations

import random

import torch

REPLY = "The answer is \\boxed{{{digit}}}"


def _example(tokenizer, rng: random.Random) -> tuple[list[int], int]:
    """One chat (prompt of random printable text, reply with a random digit) and where the reply starts."""
    length = rng.randint(20, 1200)
    question = "".join(chr(rng.randint(32, 126)) for _ in range(length))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    reply = REPLY.format(digit=rng.randint(0, 9)) + tokenizer.eos_token
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return prompt_ids + reply_ids, len(prompt_ids)


def teach_boxed_answers(model, tokenizer, steps: int = 400, batch_size: int = 8, seed: int = 0) -> float:
    """Train ``model`` in place on replies only; returns the last step's loss."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        examples = [_example(tokenizer, rng) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for row, (ids, reply_start) in enumerate(examples):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, reply_start : len(ids)] = torch.tensor(ids[reply_start:])
            attention[row, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())
