"""Helpers for the end-to-end CPU tests: real processes on loopback, each a service of its own.

A :class:`CPURun` starts what a user would: the trajectory API (``recipe.atropos.api``,
or Atropos's ``run-api``), the
trainer (``python -m recipe.atropos.main_atropos --config-name atropos_grpo_cpu``)
and, when asked, an Atropos environment (``python -m recipe.atropos.envs.... serve``),
through :mod:`tests.processes`. The trainer binds its gateway to a free port and
reports it (``trainer.atropos.gateway_url_file``); its metrics are read from the
JSONL verl's file tracker writes (``trainer.atropos.metrics_file``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from recipe.atropos.launcher.metrics_file import read_step_metrics
from recipe.atropos.launcher.service_process import Service
from tests.conftest import API_SERVERS
from tests.processes import free_port, start_service, wait_until


class CPURun:
    def __init__(self, workdir: Path, model_dir: str):
        self.workdir = workdir
        self.model_dir = model_dir
        self.api_url = f"http://127.0.0.1:{free_port()}"
        self.gateway_url_file = workdir / "gateway_url"
        self.metrics_file = workdir / "metrics.jsonl"
        self.services: dict[str, Service] = {}

    def _start(self, name: str, command: list[str], **kwargs) -> Service:
        self.services[name] = start_service(name, command, self.workdir, **kwargs)
        return self.services[name]

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def start_api(self, server: str = "recipe.atropos.api") -> None:
        port = self.api_url.rsplit(":", 1)[1]
        self._start(
            "api",
            API_SERVERS[server](port, self.workdir / f"api-{port}.sqlite3"),
            ready=lambda: httpx.get(f"{self.api_url}/status").status_code == 200,
        )

    def start_trainer(self, *overrides: str) -> Service:
        # a second run in the same folder (a resumed trainer) must not read the first one's files
        for left_over in (self.gateway_url_file, self.metrics_file):
            left_over.unlink(missing_ok=True)
        return self._start(
            "trainer",
            [
                sys.executable, "-m", "recipe.atropos.main_atropos", "--config-name", "atropos_grpo_cpu",
                f"actor_rollout_ref.model.path={self.model_dir}",
                f"trainer.atropos.api_url={self.api_url}",
                "trainer.atropos.gateway_port=0",
                f"trainer.atropos.gateway_url_file={self.gateway_url_file}",
                f"trainer.atropos.metrics_file={self.metrics_file}",
                "trainer.atropos.timeout=180",
                f"trainer.default_local_dir={self.workdir / 'checkpoints'}",
                *overrides,
            ],
        )

    @property
    def gateway_url(self) -> str:
        """The address the trainer's gateway bound (it picks a free port)."""
        return self.gateway_url_file.read_text().strip()

    def wait_gateway(self, timeout: float = 240) -> None:
        self.wait_for(
            lambda: self.gateway_url_file.is_file() and httpx.get(f"{self.gateway_url}/health").status_code == 200,
            "gateway",
            timeout,
        )

    def start_env(self, module: str, data_path: str, group_size: int = 4, name: str | None = None) -> None:
        self._start(
            name or module.rsplit(".", 1)[1],
            [
                sys.executable, "-m", module, "serve",
                "--env.data_path", data_path, "--env.tokenizer_name", self.model_dir,
                "--env.group_size", str(group_size), "--env.rollout_server_url", self.api_url,
                "--env.max_token_length", "256", "--env.max_new_tokens", "48", "--env.use_wandb", "false",
                "--openai.base_url", f"{self.gateway_url}/v1", "--openai.model_name", "model",
                "--openai.server_type", "vllm", "--openai.api_key", "none",
                "--openai.tokenizer_name", self.model_dir,
                # as the launcher sets it for the default staleness bound of one step
                "--env.max_batches_offpolicy", "2",
            ],
        )

    def wait_for(self, ready, what: str, timeout: float) -> None:
        wait_until(ready, what, timeout, watch=[s for name, s in self.services.items() if name in ("api", "trainer")])

    def wait_registered(self, timeout: float = 240) -> None:
        registered = lambda: httpx.get(f"{self.api_url}/info").json()["batch_size"] > 0  # noqa: E731
        self.wait_for(registered, "trainer registration", timeout)

    def replica_weight_versions(self) -> list[int]:
        replicas = httpx.get(f"{self.gateway_url}/health", timeout=10).json()["replicas"]
        return [state.get("weight_version", -1) for state in replicas.values()]

    def wait_trainer(self, timeout: float = 300) -> int:
        return self.services["trainer"].process.wait(timeout=timeout)

    def train_through(self, env_module: str, data_path: str, *overrides: str) -> dict[int, dict[str, float]]:
        """Start the trainer, then ``env_module`` on its gateway; wait for a clean end; every step's metrics."""
        self.start_trainer(*overrides)
        self.wait_gateway()
        self.start_env(env_module, data_path)
        assert self.wait_trainer() == 0, self.log("trainer")[-4000:]
        return self.steps()

    def steps(self) -> dict[int, dict[str, float]]:
        """Every training step's metrics, from the trainer's metrics file."""
        return read_step_metrics(self.metrics_file)

    def stop(self) -> None:
        for service in reversed(list(self.services.values())):
            service.stop(10)
