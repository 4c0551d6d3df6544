"""One Hydra compose per YAML, the typed trainer.atropos keys, and the launcher's wiring."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from verl.utils.config import omega_conf_to_dataclass

from recipe.atropos.launch_atropos_verl_services import Launcher, env_command
from recipe.atropos.main_atropos import check_config
from recipe.atropos.settings import AtroposConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipe" / "atropos" / "config"


def load(name: str, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_small_config_is_the_seeds():
    config = load("atropos_grpo_small")
    check_config(config)
    assert config.actor_rollout_ref.model.path == "Qwen/Qwen2.5-3B-Instruct"
    assert config.actor_rollout_ref.rollout.name == "vllm"
    assert (config.actor_rollout_ref.rollout.n, config.actor_rollout_ref.rollout.tensor_model_parallel_size) == (2, 1)
    assert (config.data.train_batch_size, config.data.max_prompt_length, config.data.max_response_length) == (2, 256, 256)
    assert list(config.trainer.logger) == ["console", "wandb"]
    assert config.algorithm.adv_estimator == "grpo" and not config.critic.get("enable")
    atropos = omega_conf_to_dataclass(config.trainer.atropos)
    assert isinstance(atropos, AtroposConfig)
    assert (atropos.api_url, atropos.use_advantages, atropos.fallback_to_grpo) == ("http://localhost:9001", True, True)
    assert atropos.gateway_url == "http://127.0.0.1:8000"


def test_cpu_config():
    config = load("atropos_grpo_cpu", ["actor_rollout_ref.model.lora_rank=8"])
    check_config(config)
    assert config.actor_rollout_ref.rollout.name == "cpu"
    assert config.trainer.device == "cpu" and config.actor_rollout_ref.actor.strategy == "fsdp2"
    assert config.ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM == "cpu"
    assert list(config.trainer.logger) == ["console"]
    assert config.actor_rollout_ref.model.lora_rank == 8
    assert [env.module for env in config.services.envs] == [
        "recipe.atropos.envs.gsm8k", "recipe.atropos.envs.gsm8k_answer_credit"]


def test_a_typo_in_trainer_atropos_fails_at_start_up():
    config = load("atropos_grpo_cpu", ["+trainer.atropos.use_advantage=false"])
    with pytest.raises(Exception, match="unexpected keyword argument 'use_advantage'"):
        omega_conf_to_dataclass(config.trainer.atropos)


@pytest.mark.parametrize("override, message", [
    ("algorithm.adv_estimator=gae", "algorithm.adv_estimator=grpo"),
    ("trainer.use_v1=true", "trainer.use_v1=false"),
])
def test_unsupported_settings_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        check_config(load("atropos_grpo_cpu", [override]))


def test_the_disaggregated_config_passes_the_layout_checks():
    config = load("atropos_grpo_smollm2_disagg_gpu")
    check_config(config)
    assert not config.actor_rollout_ref.hybrid_engine
    assert config.actor_rollout_ref.rollout.checkpoint_engine.backend == "nccl"
    assert config.algorithm.rollout_correction.rollout_is == "token"


@pytest.mark.parametrize("override, message", [
    ("actor_rollout_ref.rollout.nnodes=0", "actor_rollout_ref.rollout.nnodes"),
    ("actor_rollout_ref.rollout.checkpoint_engine.backend=naive", "checkpoint_engine.backend=nccl"),
    ("actor_rollout_ref.rollout.free_cache_engine=true", "free_cache_engine=false"),
    ("data.val_files=/data/test.parquet", "data.val_files=null"),
])
def test_a_misconfigured_disaggregated_layout_is_named(override, message):
    with pytest.raises(ValueError, match=message):
        check_config(load("atropos_grpo_smollm2_disagg_gpu", [override]))


def test_launcher_wires_envs_to_this_runs_api_gateway_and_sizes(tmp_path):
    launcher = Launcher(CONFIG_DIR / "atropos_grpo_cpu.yaml",
                        ["trainer.atropos.api_url=http://localhost:9555", "trainer.atropos.gateway_port=8555"], tmp_path)
    names = [s.name for s in launcher.services]
    assert names == ["api", "trainer", "gsm8k_0", "gsm8k_answer_credit_0"]
    api, trainer, env = launcher.services[:3]
    at = api.command.index("--host")
    assert api.command[at : at + 4] == ["--host", "127.0.0.1", "--port", "9555"]
    assert "--config-name" in trainer.command and "trainer.atropos.gateway_port=8555" in trainer.command
    flags = dict(zip(env.command[4::2], env.command[5::2]))
    assert flags["--env.rollout_server_url"] == "http://localhost:9555"
    assert flags["--openai.base_url"] == "http://127.0.0.1:8555/v1"
    assert flags["--env.group_size"] == "4"
    assert flags["--env.max_token_length"] == str(320 + 64)
    assert flags["--env.data_path"].endswith("data/gsm8k/train.parquet")
    # the queue an environment keeps matches the staleness bound (1), and it outlasts stale batches
    assert flags["--env.max_batches_offpolicy"] == "2"
    assert flags["--env.total_steps"] == str(10 * 3)


def test_a_stock_env_script_is_found_under_atropos_path(tmp_path, monkeypatch):
    config = load("atropos_grpo_cpu")
    script = tmp_path / "environments" / "gsm8k_server.py"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.setenv("ATROPOS_PATH", str(tmp_path))
    command = env_command({"script": "environments/gsm8k_server.py"}, 0, config, "http://a", "http://g")
    assert command[1:3] == [str(script), "serve"]
    monkeypatch.delenv("ATROPOS_PATH")
    with pytest.raises(SystemExit, match="set ATROPOS_PATH"):
        env_command({"script": "environments/gsm8k_server.py"}, 0, config, "http://a", "http://g")
