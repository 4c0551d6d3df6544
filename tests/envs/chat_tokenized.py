"""An environment that builds its groups the way many stock Atropos environments do: atroposlib's
``tokenize_for_trainer`` on a chat. Under transformers 5 that hands back the tokens as a
``BatchEncoding``, which atroposlib cannot send; it logs the error and goes on, posting nothing."""

import os

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer


class ChatTokenizedEnv(BaseEnv):
    name = "chat_tokenized"

    @classmethod
    def config_init(cls):
        config = BaseEnvConfig(use_wandb=False, wandb_name="chat_tokenized", group_size=2,
                               tokenizer_name=os.environ["TOKENIZER"], ensure_scores_are_not_same=False)
        return config, [APIServerConfig()]

    async def setup(self):
        pass

    async def get_next_item(self):
        return {"question": "1 + 1?"}

    async def collect_trajectories(self, item):
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        for answer in ("2", "3"):
            chat = [{"role": "user", "content": item["question"]}, {"role": "assistant", "content": answer}]
            tokenized = tokenize_for_trainer(self.tokenizer, chat)
            group["tokens"].append(tokenized["tokens"])
            group["masks"].append(tokenized["masks"])
            group["scores"].append(1.0 if answer == "2" else 0.0)
        return group, []

    async def evaluate(self, *args, **kwargs):
        pass


if __name__ == "__main__":
    ChatTokenizedEnv.cli()
