"""Offline GSM8K data and the environments' scoring rules."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from recipe.atropos.data import prepare_gsm8k
from recipe.atropos.data.gsm8k_synthetic import make_problems
from recipe.atropos.envs.gsm8k import GSM8KEnv, extract_answer, score_solution
from recipe.atropos.envs.gsm8k_answer_credit import (
    GSM8KAnswerCreditEnv,
    answer_start,
    group_advantages,
    token_advantages,
)


def test_synthetic_problems_are_deterministic_and_correct():
    problems = make_problems(50, steps=2, seed=3)
    assert problems == make_problems(50, steps=2, seed=3)
    assert problems != make_problems(50, steps=2, seed=4)
    for problem in problems:
        # replay the worked steps: every <<a op b=c>> is right and the last c is the answer
        notes = [note.split("=") for note in __import__("re").findall(r"<<([^>]+)>>", problem["answer"])]
        assert len(notes) == 2
        for expression, value in notes:
            assert eval(expression) == int(value)  # noqa: S307 - our own arithmetic
        assert prepare_gsm8k.final_answer(problem["answer"]) == notes[-1][1]


def test_prepare_writes_verl_parquet_from_the_generator(tmp_path):
    source, n_train, n_test = prepare_gsm8k.prepare("synthetic", str(tmp_path), train_size=20, test_size=5)
    assert (source, n_train, n_test) == ("synthetic", 20, 5)
    rows = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert len(rows) == 20
    row = rows[0]
    assert row["data_source"] == "openai/gsm8k"
    assert row["prompt"][0]["role"] == "user" and '"####"' in row["prompt"][0]["content"]
    assert row["reward_model"]["ground_truth"] == prepare_gsm8k.final_answer(row["extra_info"]["answer"])


def test_one_digit_problems_in_gsm8k_jsonl_for_environments_that_read_their_own_data(tmp_path):
    prepare_gsm8k.prepare("synthetic", str(tmp_path), train_size=30, test_size=5, max_answer=9, gsm8k_jsonl=True)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and len((tmp_path / "test.jsonl").read_text().splitlines()) == 5
    assert all(set(row) == {"question", "answer"} for row in rows)
    answers = [int(prepare_gsm8k.final_answer(row["answer"])) for row in rows]
    assert max(answers) <= 9 and len(set(answers)) > 3
    with pytest.raises(ValueError, match="max_answer"):
        make_problems(3, max_answer=0)


def test_prepare_from_a_local_jsonl(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"work\n#### {i},000"}) for i in range(10)))
    source, n_train, n_test = prepare_gsm8k.prepare("auto", str(tmp_path / "out"), jsonl=str(path))
    assert (source, n_train, n_test) == ("jsonl", 9, 1)
    test_rows = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert test_rows[0]["reward_model"]["ground_truth"] == "9000"


def test_a_jsonl_row_without_an_answer_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        prepare_gsm8k.prepare("jsonl", str(tmp_path / "out"), jsonl=str(path))


def test_hub_without_network_falls_back_to_the_generator(tmp_path, monkeypatch):
    def offline():
        raise ConnectionError("no network")

    monkeypatch.setattr(prepare_gsm8k, "load_hub", offline)
    source, n_train, _ = prepare_gsm8k.prepare("hub", str(tmp_path), train_size=4, test_size=2)
    assert (source, n_train) == ("synthetic", 4)


@pytest.mark.parametrize("text, answer", [
    ("3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("#### $12.0", "12"), ("#### -3", "-3"),
    ("first #### 2 then #### 5", "5"), ("no marker 7", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_score_is_exact_match_of_the_final_number():
    assert score_solution("so #### 24", "24") == 1.0
    assert score_solution("so #### 25", "24") == 0.0
    assert score_solution("24", "24") == 0.0


# an answer followed by more than 300 characters of text: verl's reward reads only the last 300
RAMBLING = "3 + 4 = 7\n#### 7\n" + "and then the next question asks about apples. " * 8


@pytest.mark.parametrize("text, last_marker, verl", [
    ("3 + 4 = 7\n#### 7", 1.0, 1.0),
    ("#### 1,000 is wrong", 0.0, 0.0),
    (RAMBLING, 1.0, 0.0),
    ("3 + 4 = 7\n####7", 1.0, 0.0),  # verl's reward wants one space after ####
    ("3 + 4 = 7 so \\boxed{7}", 0.0, 0.0),
])
def test_the_two_scorers_differ_only_in_where_and_how_they_read_the_marker(text, last_marker, verl):
    assert score_solution(text, "7", "last_marker") == last_marker
    assert score_solution(text, "7", "verl") == verl


def test_an_unknown_scorer_is_refused_by_name(tiny_model_dir):
    with pytest.raises(ValueError, match="scorer"):
        score_solution("#### 7", "7", "loose")
    config, _ = GSM8KEnv.config_init()
    with pytest.raises(ValueError, match="scorer"):
        type(config).model_validate({**config.model_dump(), "scorer": "loose"})


@pytest.mark.parametrize("env_class", [GSM8KEnv, GSM8KAnswerCreditEnv])
@pytest.mark.parametrize("scorer, expected", [("last_marker", [1.0, 1.0]), ("verl", [1.0, 0.0])])
def test_the_environments_score_their_groups_with_the_configured_scorer(tiny_model_dir, env_class, scorer, expected):
    config, servers = env_class.config_init()
    config = config.model_copy(update={"tokenizer_name": tiny_model_dir, "group_size": 2, "scorer": scorer})
    env = env_class(config, servers, testing=True)
    texts = ["3 + 4 = 7\n#### 7", RAMBLING]
    tokens = [env.tokenizer.encode(text) for text in texts]

    async def sampled(messages):  # what the gateway would answer: the solutions and their tokens
        nodes = [SimpleNamespace(tokens=[1] + t, masked_tokens=[-100] + t, logprobs=[0.0] + [-0.5] * len(t))
                 for t in tokens]
        return texts, nodes

    env.sample_group = sampled
    group, _ = asyncio.run(env.collect_trajectories(([{"role": "user", "content": "3 + 4?"}], "7")))
    assert group["scores"] == expected


def test_answer_credit_rule():
    pieces = ["Th", "en", " 4", "\n##", "## ", "7"]
    assert answer_start(pieces) == 3
    masks = [-100, -100] + [1] * len(pieces)
    adv = token_advantages(masks, pieces, advantage=2.0, reasoning_weight=0.5)
    assert adv[:2] == [0.0, 0.0]
    assert adv[2:5] == [1.0] * 3  # reasoning: half the solution's advantage
    assert adv[5:] == [2.0] * 3  # from the last ####: all of it
    assert token_advantages([-100, 1, 1], ["a", "b"], -1.0, 0.5) == [0.0, -0.5, -0.5]  # no answer line


def test_answer_credit_is_relative_to_the_group():
    # one right answer among four: GRPO's advantages (std with n - 1), the format credit on top
    right = group_advantages([1.0, 0.0, 0.0, 0.0], [True, True, True, True], format_credit=0.1)
    assert right == pytest.approx([1.5, -0.5, -0.5, -0.5], abs=1e-5)
    # nobody right: the one solution that ends in "#### N" is credited over the others
    fmt = group_advantages([0.0, 0.0, 0.0, 0.0], [True, False, False, False], format_credit=0.1)
    assert fmt[0] > 0 > fmt[1] and fmt[1] == fmt[2] == fmt[3] and sum(fmt) == pytest.approx(0.0, abs=1e-6)
    # every solution formatted (or none) and all scored alike: nothing to learn, whatever was sampled
    assert group_advantages([0.0] * 4, [True] * 4, 0.1) == [0.0] * 4
    assert group_advantages([0.0] * 4, [False] * 4, 0.1) == [0.0] * 4
    assert group_advantages([1.0], [True], 0.1) == [0.0]


@pytest.mark.parametrize("shuffle", [False, True])
def test_the_environment_serves_problems_in_the_file_order_unless_it_shuffles(tmp_path, tiny_model_dir, shuffle):
    prepare_gsm8k.prepare("synthetic", str(tmp_path), train_size=30, test_size=2)
    in_file = [row["prompt"][0]["content"] for row in pq.read_table(tmp_path / "train.parquet").to_pylist()]
    config, servers = GSM8KEnv.config_init()
    config = config.model_copy(update={"data_path": str(tmp_path / "train.parquet"),
                                       "tokenizer_name": tiny_model_dir, "shuffle": shuffle})
    env = GSM8KEnv(config, servers, testing=True)

    async def serve(count):
        await env.setup()
        return [(await env.get_next_item())[0][0]["content"] for _ in range(count)]

    served = asyncio.run(serve(len(in_file)))
    assert sorted(served) == sorted(in_file)  # every problem once
    assert (served == in_file) is (not shuffle)
