"""Start every service of a run from one YAML, watch them, and stop exactly what was started.

    python recipe/atropos/launch_atropos_verl_services.py --config recipe/atropos/config/atropos_grpo_cpu.yaml
    python recipe/atropos/launch_atropos_verl_services.py --config FILE.yaml trainer.total_training_steps=20
    python recipe/atropos/launch_atropos_verl_services.py --config FILE.yaml --dry-run

In order, each checked with a real request before the next starts:

1. the trajectory API on ``trainer.atropos.api_url`` - ``GET /status``: this project's
   ``recipe.atropos.api`` (durable queue in the run directory), or Atropos's ``run-api``
   with ``services.api: run-api``;
2. the trainer (``python -m recipe.atropos.main_atropos`` with the same YAML and overrides),
   which brings up the inference replicas and the gateway - ``GET {gateway}/health``; on a
   GPU this takes minutes (vLLM start-up), so the wait is ``services.startup_timeout_s``
   and progress is printed;
3. the environments of ``services.envs`` - each registered with the API.

One log per service goes into the run directory. While training runs the launcher
prints each step's mean environment score and a status line per service. On the
trainer's normal end, on Ctrl-C, or when any service dies, it stops the processes
it started (each service is a session of its own: that session and nothing else),
names a service that died with its last log lines, and exits non-zero on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recipe.atropos.console_metrics import parse_step_line, summary
from recipe.atropos.services import Service


def load_config(config_file: Path, overrides: list[str]):
    if not config_file.is_file():
        raise SystemExit(f"--config {config_file}: no such file")
    with initialize_config_dir(config_dir=str(config_file.parent.resolve()), version_base=None):
        return compose(config_name=config_file.stem, overrides=overrides)


# How many API batches an environment may fill per training step (see env_command).
ENV_STEPS_PER_TRAINER_STEP = 10


def env_command(spec, index: int, config, api_url: str, gateway_url: str) -> list[str]:
    """``python -m MODULE serve`` (or an Atropos checkout's script) wired to this run's API and gateway."""
    if spec.get("module"):
        entry = ["-m", spec["module"]]
    elif spec.get("script"):
        script = Path(os.path.expanduser(spec["script"]))
        if not script.is_absolute():
            base = os.environ.get("ATROPOS_PATH")
            script = Path(base) / script if base else script
        if not script.is_file():
            raise SystemExit(
                f"services.envs[{index}].script {spec['script']}: not found at {script}"
                + ("" if os.environ.get("ATROPOS_PATH") else "; set ATROPOS_PATH to your Atropos checkout")
            )
        entry = [str(script)]
    else:
        raise SystemExit(f"services.envs[{index}] needs 'module' or 'script'")
    model = os.path.expanduser(config.actor_rollout_ref.model.path)
    use_wandb = "wandb" in list(config.trainer.logger)
    args = {
        "env.rollout_server_url": api_url,
        "env.tokenizer_name": model,
        "env.group_size": config.actor_rollout_ref.rollout.n,
        "env.max_token_length": config.data.max_prompt_length + config.data.max_response_length,
        # The API counts every batch it forms, and a batch the trainer rejects (stale, malformed)
        # does not train: environments that stopped at the trainer's step count would leave it
        # waiting. They keep going instead, and the launcher stops them when the trainer is done.
        "env.total_steps": ENV_STEPS_PER_TRAINER_STEP * config.trainer.total_training_steps,
        "env.use_wandb": str(use_wandb).lower(),
        "openai.base_url": f"{gateway_url}/v1",
        "openai.server_type": "vllm",
        "openai.model_name": model,
        "openai.tokenizer_name": model,
        "openai.api_key": "none",
    }
    max_lag = config.trainer.atropos.max_policy_lag_steps
    if max_lag >= 0:
        # queue no more batches than the trainer may still train within the staleness bound
        args["env.max_batches_offpolicy"] = max_lag + 1
    args.update({key: value for key, value in (spec.get("args") or {}).items()})
    command = [sys.executable, *entry, "serve"]
    for key, value in args.items():
        command += [f"--{key}", str(value)]
    return command


# The trajectory APIs the launcher can start (services.api).
API_SERVERS = ("recipe.atropos.api", "run-api")


def api_command(server: str, host: str, port: int, run_dir: Path, model_path: str) -> list[str]:
    """The command of the trajectory API: ``recipe.atropos.api`` (default) or Atropos's ``run-api``.

    ``recipe.atropos.api`` keeps its queue in ``run_dir/api.sqlite3`` (restarting it with the
    same command loses nothing) and refuses token ids beyond the model's vocabulary.
    """
    if server == "run-api":
        return [sys.executable, "-m", "atroposlib.cli.run_api", "--host", host, "--port", str(port)]
    if server != "recipe.atropos.api":
        raise SystemExit(f"services.api must be one of {', '.join(API_SERVERS)}; got {server!r}")
    command = [sys.executable, "-m", "recipe.atropos.api", "--host", host, "--port", str(port)]
    command += ["--db", str(run_dir / "api.sqlite3")]
    model_config = Path(os.path.expanduser(model_path)) / "config.json"
    if model_config.is_file():
        vocab_size = json.loads(model_config.read_text()).get("vocab_size")
        if isinstance(vocab_size, int) and vocab_size > 0:
            command += ["--vocab-size", str(vocab_size)]
    return command


def registered_envs(api_url: str, expected: int) -> int:
    """How many of the first ``expected`` environment ids the API knows."""
    count = 0
    for env_id in range(expected):
        response = httpx.request("GET", f"{api_url}/status-env", json={"env_id": env_id}, timeout=5)
        if response.status_code != 200:
            break
        count += 1
    return count


class Launcher:
    def __init__(self, config_file: Path, overrides: list[str], run_dir: Path | None = None):
        self.config = load_config(config_file, overrides)
        settings = self.config.get("services") or OmegaConf.create({})
        self.startup_timeout_s = float(settings.get("startup_timeout_s", 900))
        self.status_interval_s = float(settings.get("status_interval_s", 30))
        self.stop_grace_s = float(settings.get("stop_grace_s", 20))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = run_dir or Path(os.path.expanduser(settings.get("run_dir", "outputs/services"))) / stamp
        atropos = self.config.trainer.atropos
        self.api_url = atropos.api_url.rstrip("/")
        self.gateway_url = f"http://{atropos.gateway_host}:{atropos.gateway_port}"
        self.total_steps = self.config.trainer.total_training_steps
        self.services = self._services(config_file, overrides, settings)
        self._stopping = None

    def _services(self, config_file: Path, overrides: list[str], settings) -> list[Service]:
        api = urlparse(self.api_url)
        # "localhost" is bound as 127.0.0.1: the API never listens beyond this machine unless configured to
        host = "127.0.0.1" if api.hostname == "localhost" else api.hostname
        port = api.port or 80
        services = [
            Service(
                "api",
                api_command(
                    settings.get("api", "recipe.atropos.api"),
                    host,
                    port,
                    self.run_dir,
                    self.config.actor_rollout_ref.model.path,
                ),
                self.run_dir / "api.log",
                ready=lambda: httpx.get(f"{self.api_url}/status", timeout=5).status_code == 200,
            ),
            Service(
                "trainer",
                [
                    sys.executable, "-m", "recipe.atropos.main_atropos",
                    "--config-path", str(config_file.parent.resolve()), "--config-name", config_file.stem,
                    *overrides, f"hydra.run.dir={self.run_dir / 'hydra'}",
                ],
                self.run_dir / "trainer.log",
                ready=lambda: httpx.get(f"{self.gateway_url}/health", timeout=5).status_code == 200,
                # the trainer is Ray's driver: SIGINT lets it shut its Ray cluster down
                stop_signal=signal.SIGINT,
            ),
        ]
        for index, spec in enumerate(settings.get("envs") or []):
            name = spec.get("name") or (spec.get("module") or spec.get("script")).rsplit(".", 1)[-1].rsplit("/", 1)[-1]
            for copy in range(int(spec.get("count", 1))):
                command = env_command(spec, index, self.config, self.api_url, self.gateway_url)
                services.append(Service(f"{name}_{copy}", command, self.run_dir / f"{name}_{copy}.log"))
        return services

    # -- running ---------------------------------------------------------------------

    def dry_run(self) -> None:
        print(f"run directory: {self.run_dir}")
        for service in self.services:
            print(f"[{service.name}] {shlex.join(service.command)}")

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[launcher] logs in {self.run_dir}", flush=True)
        try:
            failure = self._start_all() or self._watch()
        finally:
            self._stop_all()
        if self._stopping is not None and failure is None:
            print(f"[launcher] stopped on {signal.Signals(self._stopping).name}; every service was stopped", flush=True)
            return 0
        if failure:
            print(f"[launcher] FAILED: {failure}", flush=True)
            return 1
        print("[launcher] training finished; every service was stopped", flush=True)
        return 0

    def _on_signal(self, signum, frame) -> None:
        self._stopping = signum

    def _start_all(self) -> str | None:
        envs = [s for s in self.services if s.name not in ("api", "trainer")]
        for service in self.services:
            print(f"[launcher] starting {service.name}: {shlex.join(service.command)}", flush=True)
            service.start()
            if service.name in ("api", "trainer"):
                failure = self._wait_ready(service.name, service.is_ready)
                if failure:
                    return failure
        if envs:
            return self._wait_ready(
                f"{len(envs)} environment(s) registered with the API",
                lambda: registered_envs(self.api_url, len(envs)) == len(envs),
            )
        return None

    def _wait_ready(self, what: str, ready) -> str | None:
        started = time.monotonic()
        last_note = started
        while not ready():
            if self._stopping is not None:
                return None
            dead = self._dead_service()
            if dead:
                return dead
            now = time.monotonic()
            if now - started > self.startup_timeout_s:
                return f"{what} not ready after {self.startup_timeout_s:.0f} s (services.startup_timeout_s)"
            if now - last_note >= 15:
                print(f"[launcher] waiting for {what}: {now - started:.0f} s", flush=True)
                last_note = now
            time.sleep(0.5)
        print(f"[launcher] {what} ready after {time.monotonic() - started:.1f} s", flush=True)
        return None

    def _dead_service(self) -> str | None:
        """A service that stopped when it should not have, with its last log lines."""
        for service in self.services:
            code = service.exit_code()
            # an environment ends by itself (exit 0) once the API has formed its last batch
            if code is None or (code == 0 and service.name not in ("api", "trainer")):
                continue
            return f"{service.name} exited with {code}; its last log lines:\n{service.last_lines()}"
        return None

    def _watch(self) -> str | None:
        trainer = next(s for s in self.services if s.name == "trainer")
        read_at, last_status = 0, time.monotonic()
        while self._stopping is None:
            read_at = self._echo_steps(trainer, read_at)
            code = trainer.exit_code()
            if code is not None:
                self._echo_steps(trainer, read_at)
                if code == 0:
                    return None
                return f"trainer exited with {code}; its last log lines:\n{trainer.last_lines(40)}"
            dead = self._dead_service()
            if dead:
                return dead
            if time.monotonic() - last_status >= self.status_interval_s:
                print(self._status_line(), flush=True)
                last_status = time.monotonic()
            time.sleep(0.5)
        return None

    def _echo_steps(self, trainer: Service, read_at: int) -> int:
        try:
            with open(trainer.log_path, errors="replace") as log:
                log.seek(read_at)
                chunk = log.read()
        except FileNotFoundError:
            return read_at
        complete = chunk.rfind("\n") + 1
        for line in chunk[:complete].splitlines():
            parsed = parse_step_line(line)
            if parsed is not None:
                print(f"[trainer] {summary(*parsed, total_steps=self.total_steps)}", flush=True)
        return read_at + len(chunk[:complete].encode(errors="replace"))

    def _status_line(self) -> str:
        parts = []
        try:
            status = httpx.get(f"{self.api_url}/status", timeout=5).json()
            parts.append(f"api: step {status['current_step']}, {status['queue_size']} groups queued")
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            parts.append(f"api: no answer ({type(exc).__name__})")
        for service in self.services[1:]:
            code = service.exit_code()
            parts.append(f"{service.name}: {'running' if code is None else 'finished' if code == 0 else f'exited {code}'}")
        return "[status] " + " | ".join(parts)

    def _stop_all(self) -> None:
        for service in reversed(self.services):
            if service.process is not None:
                service.stop(self.stop_grace_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path, help="the run's YAML (a Hydra config)")
    parser.add_argument("--run-dir", type=Path, help="folder for the logs (default: services.run_dir/<time>)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for the trainer")
    args = parser.parse_args(argv)
    launcher = Launcher(args.config, args.overrides, args.run_dir)
    if args.dry_run:
        launcher.dry_run()
        return 0
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
