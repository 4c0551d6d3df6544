"""GSM8K with token-level credit: the environment sends its own advantages.

The rule, per solution i of a group (s_i its score, f_i 1 if it ends in a ``#### <number>``
line, else 0):

* its reward is ``r_i = s_i + format_credit * f_i``, and its advantage ``A_i`` is that reward
  normalised within the group, as GRPO does: ``(r_i - mean r) / (std r + 1e-6)``;
* answer tokens (from the last ``####`` to the end) get ``A_i``, reasoning tokens (the solution
  before it) ``reasoning_weight * A_i``.

So a group in which no solution is right still teaches the answer format (the solutions that end
in ``#### N`` are credited over those that do not), and the answer line carries more of the
outcome than the reasoning. The format credit is relative to the group: a group whose solutions
all end in ``#### N`` (or none does) gets no format credit. An absolute credit (every formatted
solution +format_credit whatever the others did) rewards whatever was sampled: on a GPU run it
collapsed the policy's entropy and shortened answers to a bare ``#### N``. Prompt positions get
0 (they are not trained). The trainer uses these advantages in place of GRPO's for every
sequence of the group.

Measured against the plain ``gsm8k`` environment (docs/results.md, run 5), this rule learns less:
in a group with no right answer, one formatted solution of eight gets the advantage a right answer
gets under GRPO, and the policy learnt short ``#### N`` guesses.

    python -m recipe.atropos.envs.gsm8k_answer_credit serve --env.data_path ... --openai.base_url ...
"""

from __future__ import annotations

import statistics

from pydantic import Field

from .gsm8k import GSM8KEnv, GSM8KEnvConfig, extract_answer, score_solution

ANSWER_MARKER = "####"


class AnswerCreditConfig(GSM8KEnvConfig):
    reasoning_weight: float = Field(default=0.5, description="share of the solution's advantage on reasoning tokens")
    format_credit: float = Field(default=0.1, description="reward for ending in a '#### N' line, beside the score")


def answer_start(token_texts: list[str]) -> int:
    """Index of the token where the last ``####`` begins; ``len(token_texts)`` if there is none."""
    text = "".join(token_texts)
    at = text.rfind(ANSWER_MARKER)
    if at < 0:
        return len(token_texts)
    position = 0
    for index, piece in enumerate(token_texts):
        if position + len(piece) > at:
            return index
        position += len(piece)
    return len(token_texts)


def group_advantages(scores: list[float], formatted: list[bool], format_credit: float) -> list[float]:
    """Each solution's advantage: score plus format credit, normalised within the group as GRPO does."""
    rewards = [score + (format_credit if has_answer else 0.0) for score, has_answer in zip(scores, formatted)]
    mean = sum(rewards) / len(rewards)
    # verl's GRPO: torch.std (n - 1), so a group of one has no spread and no advantage
    spread = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    return [(reward - mean) / (spread + 1e-6) for reward in rewards]


def token_advantages(
    masks: list[int], token_texts: list[str], advantage: float, reasoning_weight: float
) -> list[float]:
    """One advantage per position of the full sequence (0 on prompt positions)."""
    trained = [i for i, m in enumerate(masks) if m != -100]
    start = answer_start(token_texts)
    advantages = [0.0] * len(masks)
    for k, position in enumerate(trained):
        advantages[position] = advantage if k >= start else reasoning_weight * advantage
    return advantages


class GSM8KAnswerCreditEnv(GSM8KEnv):
    name = "gsm8k_answer_credit"
    env_config_cls = AnswerCreditConfig

    @classmethod
    def config_init(cls):
        env_config, servers = super().config_init()
        fields = env_config.model_dump()
        fields["wandb_name"] = cls.name
        return AnswerCreditConfig(**fields), servers

    async def collect_trajectories(self, item):
        messages, ground_truth = item
        texts, nodes = await self.sample_group(messages)
        scores = [score_solution(text, ground_truth, self.config.scorer) for text in texts]
        formatted = [extract_answer(text) is not None for text in texts]
        advantages = group_advantages(scores, formatted, self.config.format_credit)
        group = {"tokens": [], "masks": [], "scores": scores, "inference_logprobs": [], "advantages": []}
        for node, advantage in zip(nodes, advantages):
            completion = [t for t, m in zip(node.tokens, node.masked_tokens) if m != -100]
            pieces = [self.tokenizer.decode([t]) for t in completion]
            group["tokens"].append(node.tokens)
            group["masks"].append(node.masked_tokens)
            group["inference_logprobs"].append(node.logprobs)
            group["advantages"].append(
                token_advantages(node.masked_tokens, pieces, advantage, self.config.reasoning_weight)
            )
        return group, []


if __name__ == "__main__":
    GSM8KAnswerCreditEnv.cli()
