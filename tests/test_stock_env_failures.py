"""Two ways stock Atropos environments fail under today's packages, reproduced with real environment
processes under the launcher's env runner and a real trajectory API: the failure is logged inside
atroposlib's loop, nothing is posted, and the runner's status file says what happened (which the
launcher prints when no step trains; docs: "Stock environments")."""

from __future__ import annotations

import json
import sys
import time

import pytest

from recipe.atropos.launcher.launch import ENV_RUNNER
from tests.conftest import TrajectoryAPI
from tests.processes import start_service


@pytest.fixture
def api(project_api):
    project_api.register_trainer(batch_size=4, max_token_len=256, num_steps=10)
    return project_api


def run_until_errors(tmp_path, api: TrajectoryAPI, module: str, tokenizer: str, errors: int = 2) -> dict:
    """The environment under the env runner until its status file shows ``errors`` errors; that file."""
    status_file = tmp_path / f"{module.rsplit('.', 1)[1]}.status.json"
    command = [sys.executable, str(ENV_RUNNER), "--module", module, "--status-file", str(status_file), "serve",
               "--env.rollout_server_url", api.url, "--env.tokenizer_name", tokenizer,
               "--openai.base_url", "http://127.0.0.1:9/v1", "--openai.server_type", "vllm",
               "--openai.api_key", "x", "--openai.model_name", "m", "--openai.tokenizer_name", tokenizer]
    service = start_service(module, command, tmp_path, env={"TOKENIZER": tokenizer})
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if status_file.is_file():
                status = json.loads(status_file.read_text())
                if status["errors_logged"] >= errors:
                    return status
            time.sleep(0.5)
        raise AssertionError(f"{module} logged fewer than {errors} errors in 180 s: "
                             f"{status_file.read_text() if status_file.is_file() else 'no status file'}")
    finally:
        service.stop(10)


def test_groups_tokenized_by_atroposlib_under_transformers_5_cannot_be_sent(tmp_path, api, tiny_model_dir):
    status = run_until_errors(tmp_path, api, "tests.envs.chat_tokenized", tiny_model_dir)
    assert status["groups_posted"] == 0 and status["env_id"] == 0, status
    assert "BatchEncoding" in status["last_error"], status
    assert api.get("/stats")["arrived_sequences"] == 0


def test_taxi_v3_is_gone_from_gymnasium_1(tmp_path, api, tiny_model_dir):
    status = run_until_errors(tmp_path, api, "tests.envs.taxi", tiny_model_dir)
    assert status["groups_posted"] == 0, status
    assert "Taxi" in status["last_error"], status
    assert api.get("/stats")["arrived_sequences"] == 0
