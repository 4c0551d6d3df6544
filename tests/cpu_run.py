"""Helpers for the end-to-end CPU tests: real processes on loopback, stopped by PID.

A :class:`CPURun` starts what a user would: the trajectory API (``recipe.atropos.api``,
or Atropos's ``run-api``), the
trainer (``python -m recipe.atropos.main_atropos --config-name atropos_grpo_cpu``)
and, when asked, an Atropos environment (``python -m recipe.atropos.envs.... serve``),
each in its own process group with its own log file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import API_SERVERS, free_port

REPO = Path(__file__).resolve().parents[1]
class CPURun:
    def __init__(self, workdir: Path, model_dir: str):
        self.workdir = workdir
        self.model_dir = model_dir
        self.api_url = f"http://127.0.0.1:{free_port()}"
        self.gateway_url = f"http://127.0.0.1:{free_port()}"
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        process = subprocess.Popen(
            command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def start_api(self, server: str = "recipe.atropos.api") -> None:
        port = self.api_url.rsplit(":", 1)[1]
        self._start("api", API_SERVERS[server](port, self.workdir / f"api-{port}.sqlite3"))
        self.wait_for(lambda: httpx.get(f"{self.api_url}/status").status_code == 200, server, 60)

    def start_trainer(self, *overrides: str) -> subprocess.Popen:
        return self._start(
            "trainer",
            [
                sys.executable, "-m", "recipe.atropos.main_atropos", "--config-name", "atropos_grpo_cpu",
                f"actor_rollout_ref.model.path={self.model_dir}",
                f"trainer.atropos.api_url={self.api_url}",
                f"trainer.atropos.gateway_port={self.gateway_url.rsplit(':', 1)[1]}",
                "trainer.atropos.timeout=180",
                f"trainer.default_local_dir={self.workdir / 'checkpoints'}",
                *overrides,
            ],
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None and name in ("api", "trainer"):
                    raise AssertionError(f"{name} exited with {process.returncode} before {what}:\n{self.log(name)[-3000:]}")
            try:
                if ready():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"{what} not ready within {timeout} s")

    def wait_registered(self, timeout: float = 240) -> None:
        self.wait_for(lambda: httpx.get(f"{self.api_url}/info").json()["batch_size"] > 0, "trainer registration", timeout)

    def replica_weight_versions(self) -> list[int]:
        replicas = httpx.get(f"{self.gateway_url}/health", timeout=10).json()["replicas"]
        return [state.get("weight_version", -1) for state in replicas.values()]

    def wait_trainer(self, timeout: float = 300) -> int:
        return self.processes["trainer"].wait(timeout=timeout)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
