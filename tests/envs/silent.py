"""An environment that never produces a group: every attempt fails inside atroposlib's loop, which logs and goes on."""

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig


class SilentEnv(BaseEnv):
    name = "silent"

    @classmethod
    def config_init(cls):
        # the API needs a name to register it by (atroposlib sends wandb_name)
        return BaseEnvConfig(use_wandb=False, wandb_name="silent"), [APIServerConfig()]

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
