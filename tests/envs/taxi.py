"""An environment that asks gymnasium for ``Taxi-v3`` on every episode, as atroposlib's gym_taxi.py does.
gymnasium 1.x (atroposlib leaves it unpinned) has only ``Taxi-v4``: every episode fails, and
atroposlib logs the error and tries the next, posting nothing."""

import gymnasium
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig


class TaxiEnv(BaseEnv):
    name = "taxi"

    @classmethod
    def config_init(cls):
        return BaseEnvConfig(use_wandb=False, wandb_name="taxi", group_size=2), [APIServerConfig()]

    async def setup(self):
        pass

    async def get_next_item(self):
        return {"seed": 0}

    async def collect_trajectories(self, item):
        gymnasium.make("Taxi-v3")
        raise AssertionError("unreachable: Taxi-v3 is gone from gymnasium 1.x")

    async def evaluate(self, *args, **kwargs):
        pass


if __name__ == "__main__":
    TaxiEnv.cli()
