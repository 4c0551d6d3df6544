"""GSM8K with token-level credit: the environment sends its own advantages.

The rule, per solution i of a group (s_i its score, m the group's mean score):

* answer tokens (from the last ``####`` to the end) get ``s_i - m``;
* reasoning tokens (the solution before it) get ``reasoning_weight * (s_i - m)``;
* every solution token also gets ``+format_credit`` when the solution ends in a
  ``#### <number>`` line and ``-format_credit`` when it does not.

So a group whose solutions all score the same still teaches the answer format,
and the answer line carries more of the outcome than the reasoning. Prompt
positions get 0 (they are not trained). The trainer uses these advantages in
place of GRPO's for every sequence of the group.

    python -m recipe.atropos.envs.gsm8k_answer_credit serve --env.data_path ... --openai.base_url ...
"""

from __future__ import annotations

from pydantic import Field

from .gsm8k import GSM8KEnv, GSM8KEnvConfig, extract_answer, score_solution

ANSWER_MARKER = "####"


class AnswerCreditConfig(GSM8KEnvConfig):
    reasoning_weight: float = Field(default=0.5, description="share of the outcome advantage on reasoning tokens")
    format_credit: float = Field(default=0.1, description="advantage for ending (or not) in a '#### N' line")


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


def token_advantages(
    masks: list[int], token_texts: list[str], score: float, group_mean: float, has_answer: bool,
    reasoning_weight: float, format_credit: float,
) -> list[float]:
    """One advantage per position of the full sequence (0 on prompt positions)."""
    trained = [i for i, m in enumerate(masks) if m != -100]
    start = answer_start(token_texts)
    outcome = score - group_mean
    shaping = format_credit if has_answer else -format_credit
    advantages = [0.0] * len(masks)
    for k, position in enumerate(trained):
        weight = 1.0 if k >= start else reasoning_weight
        advantages[position] = weight * outcome + shaping
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
        scores = [score_solution(text, ground_truth) for text in texts]
        mean = sum(scores) / len(scores)
        group = {"tokens": [], "masks": [], "scores": scores, "inference_logprobs": [], "advantages": []}
        for text, node, score in zip(texts, nodes, scores):
            completion = [t for t, m in zip(node.tokens, node.masked_tokens) if m != -100]
            pieces = [self.tokenizer.decode([t]) for t in completion]
            group["tokens"].append(node.tokens)
            group["masks"].append(node.masked_tokens)
            group["inference_logprobs"].append(node.logprobs)
            group["advantages"].append(
                token_advantages(
                    node.masked_tokens, pieces, score, mean, extract_answer(text) is not None,
                    self.config.reasoning_weight, self.config.format_credit,
                )
            )
        return group, []


if __name__ == "__main__":
    GSM8KAnswerCreditEnv.cli()
