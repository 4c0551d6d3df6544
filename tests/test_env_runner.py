"""The env runner wires an unmodified environment's server config whatever form ``config_init`` returns.

atroposlib 0.4.0 applies ``--openai.*`` only to a list of one ``APIServerConfig``: an environment
whose ``config_init`` returns a bare ``APIServerConfig`` (atroposlib's gsm8k server does) is given
servers on localhost:9004-9007 instead and waits for them for ever. Each case runs a real
environment process whose ``setup()`` writes the servers it was given and exits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from atroposlib.envs.base import APIServerConfig, ServerBaseline

from recipe.atropos.launcher.env_runner import as_server_list
from recipe.atropos.launcher.launch import ENV_RUNNER

GATEWAY = "http://127.0.0.1:8555/v1"

ENV_SCRIPT = """
import json, os
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ServerBaseline


class ServersSeen(BaseEnv):
    name = "servers_seen"

    @classmethod
    def config_init(cls):
        env_config = BaseEnvConfig(tokenizer_name=os.environ["TOKENIZER"], use_wandb=False)
        return env_config, {servers}

    async def setup(self):
        seen = [[s.config.base_url, s.config.api_key] for s in self.server.servers]
        with open(os.environ["SEEN"], "w") as handle:
            json.dump(seen, handle)
        os._exit(0)

    async def get_next_item(self):
        return None

    async def evaluate(self, *args, **kwargs):
        return None


if __name__ == "__main__":
    ServersSeen.cli()
"""

FORMS = {
    "bare APIServerConfig": 'APIServerConfig(model_name="m", base_url="http://localhost:9001/v1", api_key="x")',
    "ServerBaseline": "ServerBaseline(model_name='m')",
    "list of two": '[APIServerConfig(model_name="m", base_url="http://a:1/v1"), '
                   'APIServerConfig(model_name="m", base_url="http://b:2/v1")]',
}


def servers_seen(tmp_path: Path, tokenizer: str, servers: str, through_runner: bool) -> list:
    script = tmp_path / "servers_seen.py"
    script.write_text(textwrap.dedent(ENV_SCRIPT).replace("{servers}", servers))
    seen = tmp_path / "seen.json"
    flags = ["serve", "--openai.base_url", GATEWAY, "--openai.api_key", "servers_seen_0",
             "--openai.server_type", "vllm", "--openai.tokenizer_name", tokenizer, "--env.use_wandb", "false"]
    if through_runner:
        command = [sys.executable, str(ENV_RUNNER), "--script", str(script),
                   "--status-file", str(tmp_path / "status.json"), *flags]
    else:
        command = [sys.executable, str(script), *flags]
    env = {"TOKENIZER": tokenizer, "SEEN": str(seen), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert seen.is_file(), f"the environment did not reach setup():\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return json.loads(seen.read_text())


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_of_config_init_reaches_the_gateway(tmp_path, tiny_model_dir, form):
    assert servers_seen(tmp_path, tiny_model_dir, FORMS[form], through_runner=True) == [[GATEWAY, "servers_seen_0"]]
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["groups_posted"] == 0 and status["env_id"] is None  # it stopped before registering


def test_without_the_runner_a_bare_config_ignores_the_gateway(tmp_path, tiny_model_dir):
    # what atroposlib does on its own: four servers on localhost, --openai.base_url ignored
    seen = servers_seen(tmp_path, tiny_model_dir, FORMS["bare APIServerConfig"], through_runner=False)
    assert [url for url, _ in seen] == [f"http://localhost:{port}/v1" for port in (9004, 9005, 9006, 9007)]


def test_server_config_forms_in_process():
    bare = APIServerConfig(model_name="m", base_url="http://x/v1")
    assert as_server_list(bare, "env.py") == [bare]
    assert as_server_list([], "env.py")[0].base_url == APIServerConfig().base_url
    baseline = as_server_list(ServerBaseline(model_name="m"), "env.py")
    assert len(baseline) == 1 and type(baseline[0]) is APIServerConfig and baseline[0].model_name == "m"
    with pytest.raises(SystemExit, match=r"env\.py: config_init\(\) returned server configs of type dict"):
        as_server_list({"base_url": "x"}, "env.py")
    with pytest.raises(SystemExit, match="first server config is a str"):
        as_server_list(["http://x"], "env.py")
