"""One Hydra compose per YAML, the typed trainer.atropos keys, and the launcher's wiring."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass

from recipe.atropos.launcher.launch import ENV_RUNNER, Launcher, env_command
from recipe.atropos.main_atropos import check_config
from recipe.atropos.settings import AtroposConfig, EnvServiceConfig, ServicesConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipe" / "atropos" / "config"


def load(name: str, overrides=()):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def first_env_flags(config) -> dict[str, str]:
    """The ``--key value`` flags the launcher gives the config's first environment."""
    spec = ServicesConfig.from_run_config(config).envs[0]
    command = env_command(spec, 0, config, AtroposConfig.from_run_config(config), "http://g")
    flags = command[command.index("serve") + 1:]
    return dict(zip(flags[::2], flags[1::2]))


def test_small_config_is_the_seeds():
    config = load("atropos_grpo_small")
    check_config(config)
    assert config.actor_rollout_ref.model.path == "Qwen/Qwen2.5-3B-Instruct"
    assert config.actor_rollout_ref.rollout.name == "vllm"
    assert (config.actor_rollout_ref.rollout.n, config.actor_rollout_ref.rollout.tensor_model_parallel_size) == (2, 1)
    data = config.data
    assert (data.train_batch_size, data.max_prompt_length, data.max_response_length) == (2, 256, 256)
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


def test_qwen05b_learning_configs_differ_only_in_their_environment():
    plain, credit = load("atropos_grpo_qwen05b_gpu"), load("atropos_grpo_qwen05b_credit_gpu")
    for config in (plain, credit):
        check_config(config)
        assert config.actor_rollout_ref.rollout.name == "vllm"
        assert ServicesConfig.from_run_config(config).envs[0].args["env.max_new_tokens"] == 448
    assert [env.module for env in plain.services.envs] == ["recipe.atropos.envs.gsm8k"]
    assert [env.module for env in credit.services.envs] == ["recipe.atropos.envs.gsm8k_answer_credit"]
    for key in ("data", "actor_rollout_ref.model", "actor_rollout_ref.actor", "algorithm"):
        assert OmegaConf.select(plain, key) == OmegaConf.select(credit, key), key
    assert plain.actor_rollout_ref.rollout.n == credit.actor_rollout_ref.rollout.n == 8
    # the environments serve the problems in the file's order, as verl reads them with data.shuffle=false
    assert plain.data.shuffle is False
    for config in (plain, credit):
        assert first_env_flags(config)["--env.shuffle"] == "false"


def test_the_verl_reward_config_is_the_plain_one_scored_by_verls_reward():
    plain, verl_reward = load("atropos_grpo_qwen05b_gpu"), load("atropos_grpo_qwen05b_verl_reward_gpu")
    check_config(verl_reward)
    for key in ("data", "actor_rollout_ref.model", "actor_rollout_ref.actor", "actor_rollout_ref.rollout.n",
                "algorithm", "trainer.atropos"):
        assert OmegaConf.select(plain, key) == OmegaConf.select(verl_reward, key), key
    plain_env, verl_env = (ServicesConfig.from_run_config(c).envs[0] for c in (plain, verl_reward))
    assert plain_env.module == verl_env.module == "recipe.atropos.envs.gsm8k"
    assert {k: v for k, v in verl_env.args.items() if k != "env.scorer"} == plain_env.args
    assert first_env_flags(verl_reward)["--env.scorer"] == "verl"


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
                        ["trainer.atropos.api_url=http://localhost:9555", "trainer.atropos.gateway_port=0"], tmp_path)
    api, trainer = launcher.services
    at = api.command.index("--host")
    assert api.command[at : at + 4] == ["--host", "127.0.0.1", "--port", "9555"]
    assert "--config-name" in trainer.command and "trainer.atropos.gateway_port=0" in trainer.command
    # the trainer reports the gateway it bound and writes its metrics into the run directory
    assert f"trainer.atropos.gateway_url_file={(tmp_path / 'gateway_url').resolve()}" in trainer.command
    assert f"trainer.atropos.metrics_file={(tmp_path / 'metrics.jsonl').resolve()}" in trainer.command
    assert f"trainer.atropos.batches_file={(tmp_path / 'batches.jsonl').resolve()}" in trainer.command
    # the environments start on the address the trainer reported
    envs = launcher.env_services("http://127.0.0.1:8555")
    assert [s.name for s in envs] == ["gsm8k_0", "gsm8k_answer_credit_0"]
    env = envs[0]
    # the env runner runs the module, writing its status file into the run directory
    assert env.command[1:7] == [str(ENV_RUNNER), "--module", "recipe.atropos.envs.gsm8k",
                                "--status-file", str((tmp_path / "gsm8k_0.status.json").resolve()), "serve"]
    flags = dict(zip(env.command[7::2], env.command[8::2]))
    # each copy sends its own service name as its API key: the gateway counts its requests by it
    assert flags["--openai.api_key"] == "gsm8k_0"
    assert flags["--env.rollout_server_url"] == "http://localhost:9555"
    assert flags["--openai.base_url"] == "http://127.0.0.1:8555/v1"
    assert flags["--env.group_size"] == "4"
    assert flags["--env.max_token_length"] == str(320 + 64)
    assert flags["--env.data_path"].endswith("data/gsm8k/train.parquet")
    # the queue an environment keeps matches the staleness bound (1), and it outlasts stale batches
    assert flags["--env.max_batches_offpolicy"] == "2"
    assert flags["--env.total_steps"] == str(10 * 3)
    # a whole batch of groups may be in flight at once (atroposlib's default is 8 per server)
    assert flags["--env.max_num_workers"] == str(launcher.config.data.train_batch_size)


def test_a_stock_env_script_is_found_under_atropos_path(tmp_path, monkeypatch):
    config = load("atropos_grpo_cpu")
    script = tmp_path / "environments" / "gsm8k_server.py"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.setenv("ATROPOS_PATH", str(tmp_path))
    atropos = AtroposConfig.from_run_config(config)
    spec = EnvServiceConfig(script="environments/gsm8k_server.py")
    command = env_command(spec, 0, config, atropos, "http://g")
    assert command[:5] == [sys.executable, str(ENV_RUNNER), "--script", str(script), "serve"]
    monkeypatch.delenv("ATROPOS_PATH")
    with pytest.raises(SystemExit, match="set ATROPOS_PATH"):
        env_command(spec, 0, config, atropos, "http://g")


def test_the_services_config_is_typed_and_its_defaults_live_in_one_place():
    services = ServicesConfig.from_run_config(load("atropos_grpo_cpu"))
    assert services.startup_timeout_s == 600  # the CPU config's own value
    assert (services.run_dir, services.status_interval_s, services.stop_grace_s) == ("outputs/services", 30, 20)
    assert [(env.service_name, env.count) for env in services.envs] == [("gsm8k", 1), ("gsm8k_answer_credit", 1)]
    assert services.envs[0].args["env.data_path"].endswith("data/gsm8k/train.parquet")  # interpolation resolved
    # the shared YAML states the dataclass's defaults, so plain overrides of every key work
    shared = ServicesConfig.from_run_config(load("atropos_grpo_cpu", ["services.startup_timeout_s=900"]))
    assert (shared.run_dir, shared.startup_timeout_s, shared.status_interval_s, shared.stop_grace_s) == (
        ServicesConfig.run_dir, ServicesConfig.startup_timeout_s, ServicesConfig.status_interval_s,
        ServicesConfig.stop_grace_s)
    faster = ServicesConfig.from_run_config(load("atropos_grpo_cpu", ["services.status_interval_s=5"]))
    assert faster.status_interval_s == 5
    gpu = ServicesConfig.from_run_config(load("atropos_grpo_smollm2_gpu"))
    assert (gpu.startup_timeout_s, gpu.status_interval_s, gpu.stop_grace_s) == (1200, 60, 30)
    assert [env.module for env in gpu.envs] == [env.module for env in services.envs]


@pytest.mark.parametrize("override, message", [
    ("+services.startup_timeout=5", "startup_timeout"),
    ("services.stop_grace_s=soon", "stop_grace_s"),
    ("+services.envs.0.script=x.py", "exactly one of 'module' or 'script'"),
])
def test_a_bad_services_key_fails_at_start_up_naming_it(override, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        Launcher(CONFIG_DIR / "atropos_grpo_cpu.yaml", [override], tmp_path)


def test_an_environment_runs_with_the_interpreter_it_names(tmp_path):
    config = load("atropos_grpo_cpu")
    atropos = AtroposConfig.from_run_config(config)
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    spec = EnvServiceConfig(module="recipe.atropos.envs.gsm8k", python=str(python))
    assert env_command(spec, 0, config, atropos, "http://g")[0] == str(python)
    spec = EnvServiceConfig(module="recipe.atropos.envs.gsm8k", python=str(tmp_path / "nowhere" / "python"))
    with pytest.raises(SystemExit, match=r"services.envs\[3\].python .*: no executable interpreter"):
        env_command(spec, 3, config, atropos, "http://g")


def test_the_upstream_service_files_compose(tmp_path):
    for services in ("upstream_blackjack", "upstream_gsm8k"):
        settings = ServicesConfig.from_run_config(load("atropos_grpo_cpu", [f"services={services}"]))
        assert [env.script.startswith("environments/") for env in settings.envs] == [True]
        assert (settings.first_step_timeout_s, settings.max_rejected_batches) == (240, 3)
