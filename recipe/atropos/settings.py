"""The typed config tree both processes read (one place for every default).

* :class:`AtroposConfig`, ``trainer.atropos``: Hydra builds it through ``_target_`` for
  the trainer; the launcher builds the same object from the same YAML.
* :class:`ServicesConfig`, ``services``: what the launcher starts beside the trainer.
* :func:`max_token_len` and :func:`registered_batch_size`: the sizes the trainer registers
  with the API, which the launcher hands on to the environments.

An unknown key or a value of the wrong type fails at start-up instead of deep in a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf
from verl.base_config import BaseConfig
from verl.utils.config import omega_conf_to_dataclass


@dataclass
class AtroposConfig(BaseConfig):
    """How the trainer talks to the Atropos trajectory API and uses what it sends.

    Attributes:
        api_url: base URL of the trajectory API (``run-api``).
        timeout: seconds for one HTTP call, and the longest wait for a full batch.
        use_advantages: train on the token-level advantages a group carries.
        fallback_to_grpo: a group without advantages gets GRPO advantages from
            its scores; if false such a group is rejected (counted, not trained).
        max_retries: retries of one call after a connection error, a 5xx or a
            body that is not JSON, before the call fails.
        backoff_initial_s: first pause between retries and between polls of an
            empty ``/batch``; it doubles up to ``backoff_max_s``.
        backoff_max_s: longest pause between retries and polls.
        api_outage_s: how long a call keeps retrying while the API cannot be reached (a
            restart of the API): connection errors and 5xx are retried, beyond ``max_retries``,
            until this many seconds have passed; then the call fails.
        gateway_host: address the inference gateway listens on.
        gateway_port: port of the inference gateway (0: any free port).
        check_weight_sync: after every weight sync, score one trained sequence on the
            actor and on every replica and log the largest log-prob gap
            (``atropos/weight_sync_max_logprob_gap``); costs one extra forward pass.
        max_policy_lag_steps: the staleness bound. A group trains only if the weights
            that generated it are at most this many actor updates behind the actor
            (``atropos/policy_lag_steps``); older groups are rejected as
            ``policy_lag_exceeded``. -1: no bound. The launcher also caps each
            environment's queue (``env.max_batches_offpolicy``) to this plus one batch,
            so little is generated only to be rejected.
        metrics_file: JSONL file of every step's metrics, written by verl's own file tracker
            (one ``{"step": N, "data": {...}}`` per line); null: only ``trainer.logger``'s
            backends. The launcher sets it to ``<run dir>/metrics.jsonl`` and reads it.
        gateway_url_file: file the trainer writes the gateway's address into once it
            listens (with ``gateway_port: 0``, the port it was given); null: none. The
            launcher sets it to ``<run dir>/gateway_url`` and reads it.
        batches_file: JSONL file with one line per batch the trainer fetched: its groups and
            rejections by environment and reason, and whether it trained; null: none. The
            launcher sets it to ``<run dir>/batches.jsonl`` and reads it to name an environment
            whose every group is rejected.
        gateway_max_n: most choices one gateway request may ask for (``n``); more is
            refused with HTTP 400 naming ``n``.
        gateway_max_tokens: most new tokens one gateway request may ask for
            (``max_tokens``, ``max_new_tokens``, ``max_completion_tokens``).
        gateway_max_concurrency: most single-choice sub-requests the gateway has in
            flight at once, gateway-wide, for requests that ask for ``n`` > 1 (each choice
            is sampled by its own request); a caller asking for many choices waits behind
            this limit instead of holding every connection. null: a whole training batch
            (``data.train_batch_size`` x ``rollout.n``), so generation is not throttled.
        gateway_model_names: names environments may call the policy by, besides the
            replicas' own model ids and ``actor_rollout_ref.model.path``; any other name is
            refused with HTTP 404, as vLLM refuses it.
        stall_timeout_s: how long ``GET /batch`` may keep answering "no batch" before
            the trainer reads the API's ``/status`` (and ``/status-env``) and reports
            why: a queue that holds enough groups for a batch but never forms one (a
            group larger than the batch, groups that cannot be packed) ends the run
            with :class:`~recipe.atropos.trainer.trajectory_client.AtroposBatchStalled` naming the cause;
            an empty or short queue is logged as a warning, again every
            ``stall_timeout_s``, until ``timeout``.
        generation_window_batches: generation sized to demand: the gateway holds
            environments' requests while the sequences generated and not yet trained fill
            this many registered batches (:mod:`~recipe.atropos.trainer.pacing`). None: 1
            colocated, 1 + ``max_policy_lag_steps`` with standalone replicas; 0: no window.
        partial_rollout: at a weight sync, abort the requests in flight (verl's
            ``abort_all_requests``) instead of waiting for them, and continue them under the
            new weights (:mod:`~recipe.atropos.gateway.partial_rollout`); a sequence then
            carries the oldest version it was sampled under.
        generation_settle_s: a sequence returned to an environment that has not arrived
            at the API this many seconds later counts as dropped by the environment, and
            its room in the window is given back.
    """

    api_url: str = "http://localhost:9001"
    timeout: float = 600.0
    use_advantages: bool = True
    fallback_to_grpo: bool = True
    max_retries: int = 5
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 2.0
    api_outage_s: float = 120.0
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    check_weight_sync: bool = False
    max_policy_lag_steps: int = 1
    metrics_file: str | None = None
    gateway_url_file: str | None = None
    batches_file: str | None = None
    gateway_max_n: int = 64
    gateway_max_tokens: int = 16384
    gateway_max_concurrency: int | None = None
    gateway_model_names: list[str] = field(default_factory=lambda: ["model"])
    stall_timeout_s: float = 120.0
    generation_window_batches: int | None = None
    generation_settle_s: float = 5.0
    partial_rollout: bool = False

    @property
    def gateway_url(self) -> str:
        """The gateway's address as configured (with ``gateway_port: 0`` only the trainer knows the port)."""
        return f"http://{self.gateway_host}:{self.gateway_port}"

    @property
    def max_batches_offpolicy(self) -> int | None:
        """How many batches an environment may queue ahead: no more than the bound lets train; None if unbounded."""
        return None if self.max_policy_lag_steps < 0 else self.max_policy_lag_steps + 1

    @classmethod
    def from_run_config(cls, config) -> AtroposConfig:
        """``trainer.atropos`` of a composed run config, as the trainer builds it."""
        return omega_conf_to_dataclass(config.trainer.atropos, cls)

    def __post_init__(self):
        if not self.api_url.startswith(("http://", "https://")):
            raise ValueError(
                f"trainer.atropos.api_url must be an http(s) URL, got {self.api_url!r}; "
                "set it to the trajectory API's address, e.g. http://localhost:9001"
            )
        if self.timeout <= 0:
            raise ValueError(f"trainer.atropos.timeout must be > 0 seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise ValueError(f"trainer.atropos.max_retries must be >= 0, got {self.max_retries}")
        if not 0 <= self.gateway_port < 65536:
            raise ValueError(f"trainer.atropos.gateway_port must be a port number, got {self.gateway_port}")
        if self.max_policy_lag_steps < -1:
            raise ValueError(
                "trainer.atropos.max_policy_lag_steps must be >= 0 (or -1 for no bound), "
                f"got {self.max_policy_lag_steps}"
            )
        for name in ("gateway_max_n", "gateway_max_tokens", "gateway_max_concurrency"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"trainer.atropos.{name} must be >= 1, got {getattr(self, name)}")
        if self.generation_window_batches is not None and self.generation_window_batches < 0:
            raise ValueError(
                "trainer.atropos.generation_window_batches must be >= 0 (0: no window) or null, "
                f"got {self.generation_window_batches}"
            )
        if self.generation_settle_s <= 0:
            raise ValueError(f"trainer.atropos.generation_settle_s must be > 0 seconds, got {self.generation_settle_s}")
        if self.stall_timeout_s <= 0:
            raise ValueError(f"trainer.atropos.stall_timeout_s must be > 0 seconds, got {self.stall_timeout_s}")
        if not 0 < self.backoff_initial_s <= self.backoff_max_s:
            raise ValueError(
                "trainer.atropos.backoff_initial_s must be > 0 and <= trainer.atropos.backoff_max_s, "
                f"got {self.backoff_initial_s} and {self.backoff_max_s}"
            )


def max_token_len(config) -> int:
    """The longest sequence the trainer registers with the API and accepts: prompt plus response."""
    return config.data.max_prompt_length + config.data.max_response_length


def registered_batch_size(config) -> int:
    """Sequences per training step, as registered with the API: prompts x ``rollout.n``."""
    return config.data.train_batch_size * config.actor_rollout_ref.rollout.n


@dataclass
class EnvServiceConfig:
    """One Atropos environment the launcher starts (``services.envs[i]``).

    Attributes:
        name: the service's name in logs (default: the module's or script's last part).
        module: ``python -m MODULE serve``.
        script: or an Atropos checkout's script, relative to ``$ATROPOS_PATH``.
        count: how many copies to run.
        python: the interpreter that runs it (default: the launcher's own). An environment is a
            process of its own that speaks HTTP, so it may run in another virtual environment,
            e.g. one with the transformers 4 / gymnasium an older environment was written for.
        args: extra ``--env.*`` / ``--openai.*`` flags, over the ones the launcher wires.
    """

    name: str | None = None
    module: str | None = None
    script: str | None = None
    count: int = 1
    python: str | None = None
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def service_name(self) -> str:
        return self.name or (self.module or self.script or "env").rsplit(".", 1)[-1].rsplit("/", 1)[-1]


# The trajectory APIs the launcher can start (services.api).
API_SERVERS = ("recipe.atropos.api", "run-api")


@dataclass
class ServicesConfig:
    """``services``: what the launcher starts beside the trainer, and how patiently.

    Attributes:
        api: the trajectory API: ``recipe.atropos.api`` (this project's: oldest-first batches, groups
            checked at the door, a queue that survives restarts) or ``run-api`` (Atropos's own).
        run_dir: one folder per run under this one, with a log per service.
        startup_timeout_s: longest wait for a service's health check (minutes on a GPU).
        status_interval_s: seconds between the status lines printed while training.
        stop_grace_s: seconds a service gets to stop before what is left of it is killed.
        first_step_timeout_s: once the environments are registered, the longest wait for the
            first trained step; past it the launcher stops the run and names, per environment,
            what it saw (0: wait for ever, up to ``trainer.atropos.timeout``).
        max_rejected_batches: stop the run after this many batches in a row of which every
            group was rejected, naming the environments and reasons (0: never).
        env_restarts: how many times an environment that died is started again; one more death
            fails the run, naming it.
        env_restart_backoff_s: pause before an environment's first restart; it doubles with each.
        api_restarts: how many times ``recipe.atropos.api`` is started again when it dies (its
            queue is on disk); ``run-api`` keeps its queue in memory and is never restarted.
        node_ip: the address Ray's node is started on (its agents listen there): ``127.0.0.1`` by
            default; a multi-node run sets this machine's address.
        envs: the environments.
    """

    api: str = "recipe.atropos.api"
    run_dir: str = "outputs/services"
    startup_timeout_s: float = 900.0
    status_interval_s: float = 30.0
    stop_grace_s: float = 20.0
    first_step_timeout_s: float = 240.0
    max_rejected_batches: int = 3
    env_restarts: int = 3
    env_restart_backoff_s: float = 2.0
    api_restarts: int = 3
    node_ip: str = "127.0.0.1"
    envs: list[EnvServiceConfig] = field(default_factory=list)

    @classmethod
    def from_run_config(cls, config) -> ServicesConfig:
        """``services`` of a composed run config, typed (interpolations resolved); defaults if absent."""
        raw = config.get("services")
        given = OmegaConf.create({} if raw is None else OmegaConf.to_container(raw, resolve=True))
        typed = OmegaConf.merge(OmegaConf.structured(cls), given)
        services = OmegaConf.to_object(typed)
        if services.api not in API_SERVERS:
            raise ValueError(f"services.api must be one of {', '.join(API_SERVERS)}; got {services.api!r}")
        for key in ("env_restarts", "api_restarts"):
            if getattr(services, key) < 0:
                raise ValueError(f"services.{key} must be >= 0, got {getattr(services, key)}")
        for index, env in enumerate(services.envs):
            if bool(env.module) == bool(env.script):
                raise ValueError(f"services.envs[{index}] needs exactly one of 'module' or 'script'")
            if env.count < 1:
                raise ValueError(f"services.envs[{index}].count must be >= 1, got {env.count}")
        if services.first_step_timeout_s < 0:
            raise ValueError(f"services.first_step_timeout_s must be >= 0, got {services.first_step_timeout_s}")
        if services.max_rejected_batches < 0:
            raise ValueError(f"services.max_rejected_batches must be >= 0, got {services.max_rejected_batches}")
        return services
