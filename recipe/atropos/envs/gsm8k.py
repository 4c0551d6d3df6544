"""GSM8K as an Atropos environment, reading verl-format parquet.

Each item is one problem; the policy (through the inference gateway, atroposlib's
``server_type: vllm``) writes ``group_size`` step-by-step solutions; a solution
scores 1.0 when the number after its ``####`` equals the reference answer, else 0.0.
Which ``####`` is read is the ``scorer`` setting: ``last_marker`` (the default) reads the last
one anywhere in the solution; ``verl`` scores with verl's own GSM8K reward, which reads only the
solution's last 300 characters and wants ``#### N`` with one space, so a solution that writes on
after its answer scores 0 there, as it does in a run of verl's own GRPO.
Tokens, loss masks and inference log-probs come from atroposlib's managed server,
so what is trained is exactly what was sampled.

    python -m recipe.atropos.envs.gsm8k serve \\
        --env.data_path ~/data/gsm8k/train.parquet --env.tokenizer_name ~/models/tiny-qwen2 \\
        --env.group_size 4 --openai.base_url http://localhost:8000/v1 --openai.model_name model
"""

from __future__ import annotations

import os
import random
import re
from typing import Literal, get_args

import pyarrow.parquet as pq
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import Field
from verl.utils.reward_score import gsm8k as verl_gsm8k

_FINAL_NUMBER = re.compile(r"####\s*\$?(-?[\d,]*\.?\d+)")


def extract_answer(text: str) -> str | None:
    """The number after the last ``####`` in a solution, normalised (no commas, no trailing .0)."""
    matches = _FINAL_NUMBER.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


Scorer = Literal["last_marker", "verl"]
SCORERS = get_args(Scorer)


def score_solution(text: str, ground_truth: str, scorer: Scorer = "last_marker") -> float:
    """1.0 if the solution's answer is the reference answer, else 0.0, as ``scorer`` reads it."""
    if scorer == "verl":
        return float(verl_gsm8k.compute_score(text, str(ground_truth).strip()))
    if scorer != "last_marker":
        raise ValueError(f"unknown GSM8K scorer {scorer!r}; one of {', '.join(SCORERS)}")
    return 1.0 if extract_answer(text) == str(ground_truth).strip() else 0.0


class GSM8KEnvConfig(BaseEnvConfig):
    data_path: str = Field(
        default="~/data/gsm8k/train.parquet", description="verl-format GSM8K parquet the problems come from"
    )
    max_new_tokens: int = Field(default=256, description="longest solution the policy may write")
    temperature: float = Field(default=1.0, description="sampling temperature of the solutions")
    shuffle: bool = Field(
        default=True,
        description="serve the problems in a seeded random order; false: in the file's order, as verl's "
        "data.shuffle=false feeds them, so a run of verl's own GRPO can see the same prompts at the same steps",
    )
    shuffle_seed: int = Field(default=0, description="seed of the order problems are served in")
    scorer: Scorer = Field(
        default="last_marker",
        description="last_marker: the number after the last '####' anywhere in the solution; verl: verl's own "
        "GSM8K reward ('#### N' in the last 300 characters), the reward verl's own GRPO trains on",
    )


class GSM8KEnv(BaseEnv):
    name = "gsm8k"
    env_config_cls = GSM8KEnvConfig

    @classmethod
    def config_init(cls) -> tuple[GSM8KEnvConfig, list[APIServerConfig]]:
        env_config = GSM8KEnvConfig(
            tokenizer_name=os.path.expanduser("~/models/tiny-qwen2"),
            # the name the environment registers under with the trajectory API
            wandb_name=cls.name,
            group_size=4,
            use_wandb=False,
            rollout_server_url="http://localhost:9001",
            total_steps=1000,
            batch_size=8,
            max_token_length=256,
            steps_per_eval=1_000_000,
            # a group whose solutions all score the same still trains through token-level credit
            ensure_scores_are_not_same=False,
        )
        server = APIServerConfig(
            model_name="model", base_url="http://localhost:8000/v1", api_key="none", server_type="vllm"
        )
        return env_config, [server]

    async def setup(self):
        path = os.path.expanduser(self.config.data_path)
        rows = pq.read_table(path, columns=["prompt", "reward_model"]).to_pylist()
        if not rows:
            raise ValueError(f"{path} holds no problems")
        if self.config.shuffle:
            random.Random(self.config.shuffle_seed).shuffle(rows)
        self.problems = [(row["prompt"], str(row["reward_model"]["ground_truth"])) for row in rows]
        self.next_index = 0

    async def get_next_item(self):
        item = self.problems[self.next_index % len(self.problems)]
        self.next_index += 1
        return item

    def prompt_text(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    async def sample_group(self, messages: list[dict]):
        """``group_size`` solutions with their tokens, masks and log-probs, as the gateway sampled them."""
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            completion = await managed.completion(
                prompt=self.prompt_text(messages),
                n=self.config.group_size,
                max_tokens=self.config.max_new_tokens,
                temperature=self.config.temperature,
            )
            nodes = managed.get_state()["nodes"]
        return [choice.text for choice in completion.choices], nodes

    async def collect_trajectories(self, item):
        messages, ground_truth = item
        texts, nodes = await self.sample_group(messages)
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[])
        for text, node in zip(texts, nodes):
            group["tokens"].append(node.tokens)
            group["masks"].append(node.masked_tokens)
            group["inference_logprobs"].append(node.logprobs)
            group["scores"].append(score_solution(text, ground_truth, self.config.scorer))
        return group, []

    async def evaluate(self, *args, **kwargs):
        # Evaluation runs in verl (data.val_files); the environment only serves training groups.
        return None


if __name__ == "__main__":
    GSM8KEnv.cli()
