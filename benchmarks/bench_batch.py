"""Throughput of batch conversion + advantage merge on one core.

Builds a synthetic batch as ``GET /batch`` returns it (Python lists, groups of 8,
half the groups with token-level advantages and inference log-probs), then times
``groups_to_dataproto`` followed by ``apply_atropos_advantages`` and prints tokens/s.

    python benchmarks/bench_batch.py                 # 512 sequences x 2048 tokens
    python benchmarks/bench_batch.py --sequences 64 --tokens 512 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from recipe.atropos.trainer.advantages import apply_atropos_advantages
from recipe.atropos.trainer.batch import groups_to_dataproto


def synthetic_groups(sequences: int, tokens: int, group_size: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    groups = []
    for g in range(sequences // group_size):
        prompt_len = rng.randint(tokens // 8, tokens // 4)
        prompt = [rng.randrange(32000) for _ in range(prompt_len)]
        group = {"tokens": [], "masks": [], "scores": [], "env_id": g % 2}
        with_advantages = g % 2 == 0
        if with_advantages:
            group["advantages"], group["inference_logprobs"] = [], []
        for _ in range(group_size):
            seq = prompt + [rng.randrange(32000) for _ in range(tokens - prompt_len)]
            # A tool-output span in the middle of the response is context, not trained.
            tool = range(prompt_len + 32, prompt_len + 64)
            mask = [-100 if (t < prompt_len or t in tool) else tok for t, tok in enumerate(seq)]
            group["tokens"].append(seq)
            group["masks"].append(mask)
            group["scores"].append(rng.random())
            if with_advantages:
                group["advantages"].append([rng.uniform(-1, 1) for _ in range(tokens)])
                group["inference_logprobs"].append([-rng.random() for _ in range(tokens)])
        groups.append(group)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(1)  # the figure is per core
    groups = synthetic_groups(args.sequences, args.tokens, args.group_size)
    total_tokens = args.sequences * args.tokens
    seconds = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        result = groups_to_dataproto(groups, max_token_len=args.tokens, pad_token_id=0)
        apply_atropos_advantages(result.data)
        seconds.append(time.perf_counter() - started)
        assert not result.rejections, result.rejections[0]
    best, median = min(seconds), statistics.median(seconds)
    print(
        f"batch: {args.sequences} sequences x {args.tokens} tokens, groups of {args.group_size}, half with advantages"
    )
    print(f"convert+merge: median {median * 1e3:.1f} ms, best {best * 1e3:.1f} ms over {args.repeats} runs")
    print(
        f"throughput: {total_tokens / median:,.0f} tokens/s (median), "
        f"{total_tokens / best:,.0f} tokens/s (best), 1 thread"
    )


if __name__ == "__main__":
    main()
