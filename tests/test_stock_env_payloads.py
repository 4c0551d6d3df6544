"""Groups as atroposlib's own ``BaseEnv`` builds them reach training: optional fields sent as ``[]`` are absent.

atroposlib's default ``collect_trajectories`` (used by every environment that implements only
``collect_trajectory``) starts ``advantages``, ``ref_logprobs``, ``messages``, ``overrides`` and
``images`` as empty lists and appends only what its items carry. Those groups must train on GRPO
from their scores, not be rejected for "0 entries of 'advantages' for 4 sequences".
"""

from __future__ import annotations

import asyncio
import json

import pytest
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataItem

from recipe.atropos.trainer import batch as B
from recipe.atropos.trainer.trajectory_client import AtroposBatchTimeout, AtroposClient, Registration

GROUP_SIZE = 4
PROMPT = [1, 40, 41, 42]


class OneItemPerCall(BaseEnv):
    """The smallest stock-shaped environment: ``collect_trajectory`` only, the default group assembly."""

    name = "one_item_per_call"

    def __init__(self, config, server_configs, slurm=False, testing=True):
        super().__init__(config, server_configs, slurm=slurm, testing=testing)
        self.calls = 0

    @classmethod
    def config_init(cls):
        raise NotImplementedError("built directly in the test")

    async def setup(self):
        pass

    async def get_next_item(self):
        return None

    async def evaluate(self, *args, **kwargs):
        pass

    async def collect_trajectory(self, item) -> tuple[ScoredDataItem, list]:
        self.calls += 1
        answer = [50 + self.calls, 2]
        scored = ScoredDataItem(
            tokens=PROMPT + answer, masks=[-100] * len(PROMPT) + answer, scores=float(self.calls % 2)
        )
        return scored, []


@pytest.fixture(scope="module")
def stock_group(tiny_model_dir) -> dict:
    """One group from atroposlib's real ``BaseEnv.collect_trajectories``, as JSON would carry it."""
    config = BaseEnvConfig(tokenizer_name=tiny_model_dir, group_size=GROUP_SIZE, use_wandb=False)
    # testing=True: atroposlib's own stand-in server; this env never samples
    env = OneItemPerCall(config, server_configs=[APIServerConfig(model_name="tiny")], testing=True)
    group, backlog = asyncio.run(env.collect_trajectories(item={"question": "?"}))
    assert backlog == []
    return json.loads(json.dumps(group))


def test_basenv_sends_empty_lists_for_fields_no_item_carried(stock_group):
    # the shape this converter must take as it comes (atroposlib 0.4.0)
    for key in ("advantages", "ref_logprobs", "messages", "overrides", "images"):
        assert stock_group[key] == [], key
    assert stock_group["group_overrides"] == {}
    assert len(stock_group["tokens"]) == GROUP_SIZE


def test_empty_optional_lists_are_absent_not_a_length_mismatch(stock_group):
    result = B.groups_to_dataproto([stock_group], max_token_len=16, pad_token_id=0)
    assert result.rejections == []
    data = result.data
    assert len(data) == GROUP_SIZE
    # no advantages: GRPO from the scores; no logprobs: none invented
    assert not data.batch[B.HAS_ATROPOS_ADVANTAGES].any()
    assert "rollout_log_probs" not in data.batch.keys()
    assert list(data.non_tensor_batch[B.OVERRIDES]) == [None] * GROUP_SIZE
    assert data.batch[B.SCORES].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_empty_advantages_without_fallback_is_missing_advantages(stock_group):
    result = B.groups_to_dataproto([stock_group], max_token_len=16, pad_token_id=0, require_advantages=True)
    assert [r.reason for r in result.rejections] == [B.MISSING_ADVANTAGES]


def test_a_partly_filled_list_is_still_a_mismatch(stock_group):
    # an env where only some items carried advantages: the list is shorter than the group
    group = {**stock_group, "advantages": [[0.0] * len(stock_group["tokens"][0])]}
    result = B.groups_to_dataproto([group], max_token_len=16, pad_token_id=0)
    assert [r.reason for r in result.rejections] == [B.ADVANTAGES_LENGTH_MISMATCH]
    assert "1 entries of 'advantages' for 4 sequences" in result.rejections[0].detail


def test_stock_group_through_a_real_api_trains(trajectory_api, stock_group):
    client = AtroposClient(trajectory_api.url, timeout=10, backoff_initial_s=0.02, backoff_max_s=0.2)
    client.register(Registration(batch_size=GROUP_SIZE, max_token_len=16, num_steps=1))
    with pytest.raises(AtroposBatchTimeout):
        client.fetch_batch(timeout=0.05)  # environments may register only after the first /batch
    env_id = trajectory_api.register_env("stock", GROUP_SIZE)
    trajectory_api.post("/scored_data", {**stock_group, "env_id": env_id})
    fetched = client.fetch_batch(timeout=10)
    result = B.groups_to_dataproto(fetched.groups, max_token_len=16, pad_token_id=0)
    assert result.rejections == []
    assert len(result.data) == GROUP_SIZE
