"""Shared fixtures: a real trajectory API (``recipe.atropos.api`` and Atropos's ``run-api``) on a free loopback port,
real uvicorn apps."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

from recipe.atropos.launcher.service_process import Service
from tests.processes import free_port, start_service


@dataclass
class TrajectoryAPI:
    url: str
    service: Service

    def post(self, path: str, body) -> dict:
        response = httpx.post(f"{self.url}{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> dict:
        response = httpx.get(f"{self.url}{path}", timeout=10)
        response.raise_for_status()
        return response.json()

    def register_trainer(self, batch_size: int, max_token_len: int = 64, num_steps: int = 1000) -> None:
        """Register as a trainer would, then poll ``/batch`` once: environments may register from then on."""
        self.post("/register", {"wandb_group": "g", "wandb_project": "p", "batch_size": batch_size,
                                "max_token_len": max_token_len, "checkpoint_dir": "", "save_checkpoint_interval": -1,
                                "starting_step": 0, "num_steps": num_steps})
        assert self.get("/batch")["batch"] is None

    def register_env(self, name: str, group_size: int, max_token_length: int = 4096) -> int:
        body = {"max_token_length": max_token_length, "desired_name": name, "weight": 1.0, "group_size": group_size}
        answer = self.post("/register-env", body)
        assert answer["status"] == "success", answer
        return answer["env_id"]


# The trajectory APIs the client tests run against: the project's own, and Atropos's.
API_SERVERS = {
    "recipe.atropos.api": lambda port, db: [
        sys.executable, "-m", "recipe.atropos.api", "--host", "127.0.0.1", "--port", str(port), "--db", str(db)
    ],
    "run-api": lambda port, db: [
        sys.executable, "-m", "atroposlib.cli.run_api", "--host", "127.0.0.1", "--port", str(port)
    ],
}


@contextlib.contextmanager
def started_api(server: str, workdir):
    """One of API_SERVERS in a process of its own on a free port, stopped with its session on exit."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = start_service(
        server,
        API_SERVERS[server](port, workdir / "api.sqlite3"),
        workdir,
        ready=lambda: httpx.get(f"{url}/", timeout=1).status_code == 200,
    )
    try:
        yield TrajectoryAPI(url=url, service=service)
    finally:
        service.stop(10)


@pytest.fixture
def project_api(tmp_path):
    """A fresh ``recipe.atropos.api`` process (its ``/stats`` counts what arrived and was served)."""
    with started_api("recipe.atropos.api", tmp_path) as api:
        yield api


@pytest.fixture(params=list(API_SERVERS))
def trajectory_api(request, tmp_path):
    """A fresh API process per test (an empty queue), each of API_SERVERS in turn, stopped with its session."""
    with started_api(request.param, tmp_path) as api:
        yield api


class ServedApp:
    """An ASGI app served by a real uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from recipe.atropos.models.make_tiny_model import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("models") / "tiny-qwen2"))
