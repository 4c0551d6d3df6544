"""Start every service of a run from one YAML, watch them, and stop exactly what was started.

    python recipe/atropos/launch_atropos_verl_services.py --config recipe/atropos/config/atropos_grpo_cpu.yaml
    python recipe/atropos/launch_atropos_verl_services.py --config FILE.yaml trainer.total_training_steps=20
    python recipe/atropos/launch_atropos_verl_services.py --config FILE.yaml --dry-run

In order, each checked with a real request before the next starts:

1. the trajectory API on ``trainer.atropos.api_url`` - ``GET /status``: this project's
   ``recipe.atropos.api`` (durable queue in the run directory), or Atropos's ``run-api``
   with ``services.api: run-api``;
2. the trainer (``python -m recipe.atropos.main_atropos`` with the same YAML and overrides),
   which brings up the inference replicas and the gateway, writes the gateway's address to
   ``<run dir>/gateway_url`` (with ``trainer.atropos.gateway_port=0``, the port it got) -
   ``GET {gateway}/health``; on a GPU this takes minutes (vLLM start-up), so the wait is
   ``services.startup_timeout_s`` and progress is printed;
3. the environments of ``services.envs``, on that gateway - each registered with the API. Each
   runs under :mod:`.env_runner` with the interpreter ``services.envs[i].python`` names (default
   this one), which wires its server config whatever form ``config_init`` returns.

The launcher reads the same typed config as the trainer (:mod:`recipe.atropos.settings`).
One log per service goes into the run directory, and the trainer's metrics into
``<run dir>/metrics.jsonl`` (verl's file tracker). While training runs the launcher
prints each step's mean environment score from that file and a status line per service. On the
trainer's normal end, on Ctrl-C, SIGTERM or SIGHUP, or when a service dies for good, it stops
the processes it started (each service is a session of its own: that session and nothing else),
names a service that died with its last log lines, and exits non-zero on failure. A watchdog
(:mod:`.orphans`) stops them too if the launcher itself is killed. A run that trains nothing (no
step within ``services.first_step_timeout_s`` of the environments registering, or
``services.max_rejected_batches`` wholly rejected batches in a row) is stopped the same way, with
what each environment did (:mod:`.progress_watch`).

An environment that dies is started again (``services.env_restarts``, with backoff), and so is
this project's API (``services.api_restarts``: its queue is on disk and the trainer waits for
it); ``run-api`` keeps its queue in memory, so its death stops the run, saying so
(:mod:`.supervision`).
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

import httpx
from hydra import compose, initialize_config_dir

from ..settings import AtroposConfig, EnvServiceConfig, ServicesConfig, max_token_len
from .metrics_file import MetricsFollower, summary
from .orphans import Watchdog
from .progress_watch import ProgressWatch, env_views, gateway_stats, read_batches, stall_report
from .service_process import Service
from .supervision import RestartPolicy, Supervisor


def load_config(config_file: Path, overrides: list[str]):
    if not config_file.is_file():
        raise SystemExit(f"--config {config_file}: no such file")
    with initialize_config_dir(config_dir=str(config_file.parent.resolve()), version_base=None):
        return compose(config_name=config_file.stem, overrides=overrides)


# How many API batches an environment may fill per training step (see env_command).
ENV_STEPS_PER_TRAINER_STEP = 10


# Runs each environment unmodified, wires its server config whatever form config_init returns, and
# writes a status file (env_id, groups posted, errors atroposlib swallowed): see env_runner.py.
ENV_RUNNER = Path(__file__).with_name("env_runner.py")


def env_command(
    spec: EnvServiceConfig,
    index: int,
    config,
    atropos: AtroposConfig,
    gateway_url: str,
    *,
    name: str | None = None,
    status_file: Path | None = None,
) -> list[str]:
    """The environment (``--module`` or an Atropos checkout's ``--script``) under the env runner, wired to this run.

    ``name`` (a copy's service name) becomes the API key it sends, so the gateway counts its
    requests apart from the other environments'.
    """
    if spec.module:
        entry = ["--module", spec.module]
    elif spec.script:
        script = Path(os.path.expanduser(spec.script))
        if not script.is_absolute():
            base = os.environ.get("ATROPOS_PATH")
            script = Path(base) / script if base else script
        if not script.is_file():
            raise SystemExit(
                f"services.envs[{index}].script {spec.script}: not found at {script}"
                + ("" if os.environ.get("ATROPOS_PATH") else "; set ATROPOS_PATH to your Atropos checkout")
            )
        entry = ["--script", str(script)]
    else:
        raise SystemExit(f"services.envs[{index}] needs 'module' or 'script'")
    python = env_interpreter(spec, index)
    model = os.path.expanduser(config.actor_rollout_ref.model.path)
    use_wandb = "wandb" in list(config.trainer.logger)
    args = {
        "env.rollout_server_url": atropos.api_url.rstrip("/"),
        "env.tokenizer_name": model,
        "env.group_size": config.actor_rollout_ref.rollout.n,
        "env.max_token_length": max_token_len(config),
        # The API counts every batch it forms, and a batch the trainer rejects (stale, malformed)
        # does not train: environments that stopped at the trainer's step count would leave it
        # waiting. They keep going instead, and the launcher stops them when the trainer is done.
        "env.total_steps": ENV_STEPS_PER_TRAINER_STEP * config.trainer.total_training_steps,
        "env.use_wandb": str(use_wandb).lower(),
        # atroposlib keeps 8 groups in flight per server by default; a step takes train_batch_size
        # groups, so let a whole batch be sampled at once (on an H200 this halved the wait for a batch)
        "env.max_num_workers": config.data.train_batch_size,
        "openai.base_url": f"{gateway_url}/v1",
        "openai.server_type": "vllm",
        "openai.model_name": model,
        "openai.tokenizer_name": model,
        # the gateway needs no key; it counts each environment's requests by the one it sends
        "openai.api_key": name or spec.service_name,
    }
    if atropos.max_batches_offpolicy is not None:
        # queue no more batches than the trainer may still train within the staleness bound
        args["env.max_batches_offpolicy"] = atropos.max_batches_offpolicy
    args.update(spec.args)
    command = [python, str(ENV_RUNNER), *entry]
    if status_file is not None:
        command += ["--status-file", str(status_file)]
    command.append("serve")
    for key, value in args.items():
        # YAML's false is Python's False; the environments' command lines read "false"
        command += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return command


def env_interpreter(spec: EnvServiceConfig, index: int) -> str:
    """``services.envs[i].python`` (checked to exist), or the launcher's own interpreter."""
    if not spec.python:
        return sys.executable
    python = Path(os.path.expanduser(spec.python))
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise SystemExit(
            f"services.envs[{index}].python {spec.python}: no executable interpreter at {python}; "
            "see 'An interpreter per environment' in docs/atropos_integration.rst"
        )
    return str(python)


def api_command(server: str, host: str, port: int, run_dir: Path, model_path: str) -> list[str]:
    """The command of the trajectory API: ``recipe.atropos.api`` (default) or Atropos's ``run-api``.

    ``recipe.atropos.api`` keeps its queue in ``run_dir/api.sqlite3`` (restarting it with the
    same command loses nothing) and refuses token ids beyond the model's vocabulary.
    """
    if server == "run-api":
        return [sys.executable, "-m", "atroposlib.cli.run_api", "--host", host, "--port", str(port)]
    command = [sys.executable, "-m", "recipe.atropos.api", "--host", host, "--port", str(port)]
    command += ["--db", str(run_dir / "api.sqlite3")]
    model_config = Path(os.path.expanduser(model_path)) / "config.json"
    if model_config.is_file():
        vocab_size = json.loads(model_config.read_text()).get("vocab_size")
        if isinstance(vocab_size, int) and vocab_size > 0:
            command += ["--vocab-size", str(vocab_size)]
    return command


def registered_envs(api_url: str, expected: int) -> int:
    """How many of the first ``expected`` environment ids the API knows.

    For ``recipe.atropos.api``, which answers 404 for an id it does not know; Atropos's
    ``run-api`` answers such a request with a server error (see :func:`api_in_use`).
    """
    count = 0
    for env_id in range(expected):
        response = httpx.request("GET", f"{api_url}/status-env", json={"env_id": env_id}, timeout=5)
        if response.status_code != 200:
            break
        count += 1
    return count


def api_in_use(api_url: str) -> bool:
    """The run has begun: the trainer has taken a batch or groups are queued (``GET /status``).

    The readiness probe for ``run-api``, which has no request that says how many environments
    registered without a server error for an id it does not know yet.
    """
    status = httpx.get(f"{api_url}/status", timeout=5).json()
    return status["current_step"] > 0 or status["queue_size"] > 0


def _absolute(path) -> Path:
    return Path(os.path.expanduser(str(path))).resolve()


class Launcher:
    def __init__(self, config_file: Path, overrides: list[str], run_dir: Path | None = None):
        self.config = load_config(config_file, overrides)
        try:
            self.atropos = AtroposConfig.from_run_config(self.config)
            self.settings = ServicesConfig.from_run_config(self.config)
        except Exception as exc:  # a typo or a bad value: name it before anything starts
            raise SystemExit(f"--config {config_file}: {exc}") from exc
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = run_dir or Path(os.path.expanduser(self.settings.run_dir)) / stamp
        self.api_url = self.atropos.api_url.rstrip("/")
        # where the trainer reports its gateway's address and writes its metrics
        # (absolute: the trainer runs in other working directories, Hydra's and Ray's)
        self.gateway_url_file = _absolute(self.atropos.gateway_url_file or self.run_dir / "gateway_url")
        self.metrics_file = _absolute(self.atropos.metrics_file or self.run_dir / "metrics.jsonl")
        self.batches_file = _absolute(self.atropos.batches_file or self.run_dir / "batches.jsonl")
        self.gateway_url: str | None = None  # known once the trainer has bound it
        self.total_steps = self.config.trainer.total_training_steps
        self.services = self._services(config_file, overrides)
        self._stopping = None
        self.steps_trained = 0
        self._envs_registered_at: float | None = None
        self.progress = ProgressWatch(
            self.settings.first_step_timeout_s, self.settings.max_rejected_batches, self.batches_file
        )
        self.supervisor = Supervisor(self.run_dir / "restarts.json")
        self.watchdog = Watchdog(self.run_dir)

    def _services(self, config_file: Path, overrides: list[str]) -> list[Service]:
        """The API and the trainer; the environments follow once the gateway's address is known."""
        api = urlparse(self.api_url)
        # "localhost" is bound as 127.0.0.1: the API never listens beyond this machine unless configured to
        host = "127.0.0.1" if api.hostname == "localhost" else api.hostname
        port = api.port or 80
        return [
            Service(
                "api",
                api_command(self.settings.api, host, port, self.run_dir, self.config.actor_rollout_ref.model.path),
                self.run_dir / "api.log",
                ready=lambda: httpx.get(f"{self.api_url}/status", timeout=5).status_code == 200,
            ),
            Service(
                "trainer",
                [
                    sys.executable, "-m", "recipe.atropos.main_atropos",
                    "--config-path", str(config_file.parent.resolve()), "--config-name", config_file.stem,
                    *overrides,
                    f"trainer.atropos.gateway_url_file={self.gateway_url_file}",
                    f"trainer.atropos.metrics_file={self.metrics_file}",
                    f"trainer.atropos.batches_file={self.batches_file}",
                    f"hydra.run.dir={self.run_dir / 'hydra'}",
                ],
                self.run_dir / "trainer.log",
                ready=self._gateway_answers,
                # the trainer is Ray's driver: SIGINT lets it shut its Ray cluster down
                stop_signal=signal.SIGINT,
            ),
        ]

    def env_services(self, gateway_url: str) -> list[Service]:
        """One service per copy of each ``services.envs`` entry, wired to this run's API and ``gateway_url``."""
        services = []
        for index, spec in enumerate(self.settings.envs):
            for copy in range(spec.count):
                name = f"{spec.service_name}_{copy}"
                command = env_command(
                    spec, index, self.config, self.atropos, gateway_url,
                    name=name, status_file=self.env_status_file(name),
                )
                services.append(Service(name, command, self.run_dir / f"{name}.log"))
        return services

    def env_status_file(self, name: str) -> Path:
        """Where the env runner of service ``name`` writes its status (env_id, groups posted, errors)."""
        return _absolute(self.run_dir / f"{name}.status.json")

    def _gateway_answers(self) -> bool:
        """The trainer has reported its gateway's address and the gateway answers there."""
        if self.gateway_url is None:
            if not self.gateway_url_file.is_file():
                return False
            self.gateway_url = self.gateway_url_file.read_text().strip()
        return httpx.get(f"{self.gateway_url}/health", timeout=5).status_code == 200

    # -- running ---------------------------------------------------------------------

    def dry_run(self) -> None:
        print(f"run directory: {self.run_dir}")
        # with gateway_port 0 the port is the trainer's to pick: shown as 0 here
        for service in self.services + self.env_services(self.atropos.gateway_url):
            print(f"[{service.name}] {shlex.join(service.command)}")

    def run(self) -> int:
        # SIGHUP: the terminal closed or the SSH connection dropped; the run stops as on Ctrl-C
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.watchdog.start()
        try:
            print(f"[launcher] logs in {self.run_dir}", flush=True)
            failure = self._start_all() or self._watch()
        finally:
            self._stop_all()
            self.watchdog.stop()
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
        self.gateway_url_file.unlink(missing_ok=True)  # an address left by an earlier run is no answer
        for service in list(self.services):
            print(f"[launcher] starting {service.name}: {shlex.join(service.command)}", flush=True)
            self._start(service)
            failure = self._wait_ready(service.name, service.is_ready)
            if failure or self._stopping is not None:
                return failure
        print(f"[launcher] the trainer's gateway is {self.gateway_url}", flush=True)
        envs = self.env_services(self.gateway_url)
        for service in envs:
            print(f"[launcher] starting {service.name}: {shlex.join(service.command)}", flush=True)
            self.services.append(service)
            self._start(service)
        if not envs:
            return None
        if self.settings.api == "run-api":
            failure = self._wait_ready(
                f"{len(envs)} environment(s) sending groups", lambda: api_in_use(self.api_url)
            )
        else:
            failure = self._wait_ready(
                f"{len(envs)} environment(s) registered with the API",
                lambda: registered_envs(self.api_url, len(envs)) == len(envs),
            )
        self._envs_registered_at = time.monotonic()
        return failure

    def _start(self, service: Service) -> None:
        service.start()
        self.watchdog.record(service.pid)  # its session id: the watchdog's to stop if the launcher dies

    def _wait_ready(self, what: str, ready) -> str | None:
        started = time.monotonic()
        last_note = started
        while not ready():
            if self._stopping is not None:
                return None
            dead = self._supervise()
            if dead:
                return dead
            now = time.monotonic()
            if now - started > self.settings.startup_timeout_s:
                return f"{what} not ready after {self.settings.startup_timeout_s:.0f} s (services.startup_timeout_s)"
            if now - last_note >= 15:
                print(f"[launcher] waiting for {what}: {now - started:.0f} s", flush=True)
                last_note = now
            time.sleep(0.5)
        print(f"[launcher] {what} ready after {time.monotonic() - started:.1f} s", flush=True)
        return None

    def _restart_policy(self, service: Service) -> tuple[str, RestartPolicy] | None:
        """How a dead ``service`` may be restarted: environments, and this project's API."""
        if service.name == "trainer":
            return None
        if service.name == "api":
            if self.settings.api == "run-api":
                return None
            return "api", RestartPolicy(self.settings.api_restarts, self.settings.env_restart_backoff_s)
        return "env", RestartPolicy(self.settings.env_restarts, self.settings.env_restart_backoff_s)

    def _supervise(self) -> str | None:
        """Restart what died and may be restarted; why the run must fail, with the last log lines, if it must."""
        for service in self.services:
            code = service.exit_code()
            # an environment ends by itself (exit 0) once the API has formed its last batch
            if code is None or (code == 0 and service.name not in ("api", "trainer")):
                continue
            if self.supervisor.pending(service.name):
                continue
            policy = self._restart_policy(service)
            if policy is None:
                if service.name == "api":
                    return (
                        f"api (run-api) exited with {code}: run-api keeps its queue in memory, so every group "
                        "it had queued is lost; the run stops (services.api: recipe.atropos.api keeps its queue "
                        f"on disk and is restarted). Its last log lines:\n{service.last_lines()}"
                    )
                return f"{service.name} exited with {code}; its last log lines:\n{service.last_lines()}"
            kind, restart_policy = policy
            failure = self.supervisor.on_death(service.name, kind, restart_policy, code)
            if failure:
                return f"{failure}; its last log lines:\n{service.last_lines()}"
        by_name = {service.name: service for service in self.services}
        for name in self.supervisor.due_now():
            service = by_name[name]
            service.stop(grace_s=2)  # whatever of its session outlived it
            print(f"[launcher] restarting {name} (restart {self.supervisor.restarts[name]})", flush=True)
            self._start(service)
        return None

    def _watch(self) -> str | None:
        trainer = next(s for s in self.services if s.name == "trainer")
        steps, last_status = MetricsFollower(self.metrics_file), time.monotonic()
        while self._stopping is None:
            self._echo_steps(steps)
            code = trainer.exit_code()
            if code is not None:
                self._echo_steps(steps)
                if code == 0:
                    return None
                return f"trainer exited with {code}; its last log lines:\n{trainer.last_lines(40)}"
            dead = self._supervise()
            if dead:
                return dead
            stalled = self._stalled()
            if stalled:
                return stalled
            if time.monotonic() - last_status >= self.settings.status_interval_s:
                print(self._status_line(), flush=True)
                last_status = time.monotonic()
            time.sleep(0.5)
        return None

    def _stalled(self) -> str | None:
        """A report naming each environment's part, once the run has clearly stopped making progress."""
        if self._envs_registered_at is None:
            return None
        cause = self.progress.stall_cause(time.monotonic() - self._envs_registered_at, self.steps_trained)
        return None if cause is None else self.stall_report(cause)

    def stall_report(self, cause: str) -> str:
        names = [s.name for s in self.services if s.name not in ("api", "trainer")]
        stats = gateway_stats(self.gateway_url)
        views = env_views(names, {n: self.env_status_file(n) for n in names}, stats, read_batches(self.batches_file))
        return stall_report(cause, views, stats)

    def _echo_steps(self, steps: MetricsFollower) -> None:
        for step, metrics in sorted(steps.new_steps().items()):
            self.steps_trained += 1
            print(f"[trainer] {summary(step, metrics, total_steps=self.total_steps)}", flush=True)

    def _status_line(self) -> str:
        parts = []
        try:
            status = httpx.get(f"{self.api_url}/status", timeout=5).json()
            parts.append(f"api: step {status['current_step']}, {status['queue_size']} groups queued")
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            parts.append(f"api: no answer ({type(exc).__name__})")
        for service in self.services[1:]:
            code = service.exit_code()
            state = "running" if code is None else "finished" if code == 0 else f"exited {code}"
            parts.append(f"{service.name}: {state}")
        if self.supervisor.restarts:
            parts.append(f"restarts: {self.supervisor.summary()}")
        return "[status] " + " | ".join(parts)

    def _stop_all(self) -> None:
        for service in reversed(self.services):
            if service.process is not None:
                service.stop(self.settings.stop_grace_s)


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
