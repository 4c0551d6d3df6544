"""An environment that never produces a group: every attempt fails inside atroposlib's loop, which logs and goes on."""

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig


class SilentEnv(BaseEnv):
    name = "silent"

    @classmethod
    def config_init(cls):
        return BaseEnvConfig(use_wandb=False), [APIServerConfig()]

    async def setup(self):
        pass

    async def get_next_item(self):
        return {"question": "?"}

    async def collect_trajectories(self, item):
        raise RuntimeError("this environment never builds a group")

    async def evaluate(self, *args, **kwargs):
        pass


if __name__ == "__main__":
    SilentEnv.cli()
