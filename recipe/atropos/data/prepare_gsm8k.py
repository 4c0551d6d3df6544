"""Write verl-format GSM8K parquet files (train and test).

Sources, in the order they are tried with ``--source auto``:

* ``hub``: the ``openai/gsm8k`` dataset through ``datasets`` (needs a network);
* ``jsonl``: a local GSM8K JSONL (``{"question", "answer"}`` per line, ``--jsonl PATH``;
  give ``--test-jsonl`` too, or a share of it becomes the test split);
* ``synthetic``: GSM8K-format problems made offline (``--steps`` sets the difficulty).

Each row: ``data_source`` ("openai/gsm8k", which selects verl's GSM8K rule reward),
``prompt`` (chat messages), ``ability``, ``reward_model.ground_truth`` (the number after
``####``) and ``extra_info`` (split, index, question, answer).

    python -m recipe.atropos.data.prepare_gsm8k --source synthetic --out ~/data/gsm8k
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from .gsm8k_synthetic import make_problems

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
_ANSWER = re.compile(r"####\s*(-?[\d,\.]+)")


def final_answer(solution: str) -> str:
    """The number after ``####`` in a GSM8K solution, without thousands separators."""
    match = _ANSWER.search(solution)
    if match is None:
        raise ValueError(f"no '#### <number>' in the solution: {solution[-80:]!r}")
    return match.group(1).replace(",", "").rstrip(".")


def to_verl_rows(problems: list[dict], split: str) -> list[dict]:
    return [
        {
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{p['question']} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": final_answer(p["answer"])},
            "extra_info": {"split": split, "index": i, "question": p["question"], "answer": p["answer"]},
        }
        for i, p in enumerate(problems)
    ]


def read_jsonl(path: str) -> list[dict]:
    problems = []
    with open(os.path.expanduser(path)) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                row = json.loads(line)
                if "question" not in row or "answer" not in row:
                    raise ValueError(f"{path}:{number}: a row needs 'question' and 'answer'")
                problems.append({"question": row["question"], "answer": row["answer"]})
    return problems


def load_hub() -> tuple[list[dict], list[dict]]:
    import datasets

    data = datasets.load_dataset("openai/gsm8k", "main")
    return [dict(r) for r in data["train"]], [dict(r) for r in data["test"]]


def write_split(rows: list[dict], path: str) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def prepare(source: str, out: str, *, jsonl=None, test_jsonl=None, train_size=2000, test_size=200, steps=1, seed=0,
            max_answer=None, gsm8k_jsonl=False):
    """Write ``train.parquet`` and ``test.parquet`` under ``out`` (and, with ``gsm8k_jsonl``, the
    problems in GSM8K's own format as ``train.jsonl`` and ``test.jsonl``); returns the source used."""
    out = os.path.expanduser(out)
    os.makedirs(out, exist_ok=True)
    if source == "auto":
        source = "jsonl" if jsonl else "hub"
    if source == "hub":
        try:
            train, test = load_hub()
        except Exception as exc:  # no network, no cache: say so and make problems instead
            print(f"could not load openai/gsm8k from the hub ({type(exc).__name__}); using --source synthetic",
                  file=sys.stderr)
            source = "synthetic"
    if source == "jsonl":
        if not jsonl:
            raise ValueError("--source jsonl needs --jsonl PATH")
        train = read_jsonl(jsonl)
        test = read_jsonl(test_jsonl) if test_jsonl else train[-max(1, len(train) // 10):]
        train = train if test_jsonl else train[: -max(1, len(train) // 10)]
    if source == "synthetic":
        problems = make_problems(train_size + test_size, steps=steps, seed=seed, max_answer=max_answer)
        train, test = problems[:train_size], problems[train_size:]
    write_split(to_verl_rows(train, "train"), os.path.join(out, "train.parquet"))
    write_split(to_verl_rows(test, "test"), os.path.join(out, "test.parquet"))
    if gsm8k_jsonl:
        # what Atropos's own GSM8K environment reads, for environments that load data themselves
        for name, problems in (("train", train), ("test", test)):
            with open(os.path.join(out, f"{name}.jsonl"), "w") as handle:
                for problem in problems:
                    handle.write(json.dumps({"question": problem["question"], "answer": problem["answer"]}) + "\n")
    return source, len(train), len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["auto", "hub", "jsonl", "synthetic"], default="auto")
    parser.add_argument("--out", default="~/data/gsm8k", help="folder for train.parquet and test.parquet")
    parser.add_argument("--jsonl", help="GSM8K-format JSONL for --source jsonl")
    parser.add_argument("--test-jsonl", help="test split JSONL for --source jsonl")
    parser.add_argument("--train-size", type=int, default=2000, help="synthetic problems in the train split")
    parser.add_argument("--test-size", type=int, default=200, help="synthetic problems in the test split")
    parser.add_argument("--steps", type=int, default=1, help="reasoning steps per synthetic problem")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-answer", type=int, help="synthetic problems only whose answer is at most this")
    parser.add_argument("--gsm8k-jsonl", action="store_true",
                        help="also write train.jsonl and test.jsonl in GSM8K's own format")
    args = parser.parse_args()
    source, n_train, n_test = prepare(
        args.source, args.out, jsonl=args.jsonl, test_jsonl=args.test_jsonl, train_size=args.train_size,
        test_size=args.test_size, steps=args.steps, seed=args.seed, max_answer=args.max_answer,
        gsm8k_jsonl=args.gsm8k_jsonl,
    )
    print(f"wrote {n_train} train and {n_test} test rows ({source}) to {os.path.expanduser(args.out)}")


if __name__ == "__main__":
    main()
