"""``RayGRPOAtroposTrainer``: verl's legacy ``RayPPOTrainer`` fed by the Atropos trajectory API.

What differs from verl's own loop, and why:

* no training dataset: environments generate and score, the trainer fetches their
  scored groups (``GET /batch``), so ``trainer.total_training_steps`` must be set
  and ``data.val_files`` (optional) only drives verl's validation;
* the next batch is fetched and converted in a background thread while the current
  one trains (:mod:`.prefetch`), then filtered for staleness and padded to the registered
  size by one pipeline (:mod:`.batch_pipeline`) whose pad rows no metric counts;
* advantages come from :func:`.advantages.apply_atropos_advantages` (GRPO merged with
  the environments' token-level advantages) instead of verl's ``compute_advantage``;
* every group's policy lag is measured and bounded (:mod:`.staleness`), and the
  environments generate no more than the trainer will use before it goes stale
  (:mod:`.pacing`); where every group went is counted each step (:mod:`.accounting`);
* with ``actor_rollout_ref.hybrid_engine=false`` the replicas run standalone on their
  own GPUs (verl's disaggregated layout): they keep generating while the actor
  trains, and only the weight sync pauses them.

Everything else is verl's: its workers, ``_compute_old_log_prob``,
``_compute_ref_log_prob``, ``_update_actor``, checkpointing, weight sync through
its checkpoint-engine manager, metrics and trackers.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf, open_dict
from torchdata.stateful_dataloader import StatefulDataLoader
from verl import DataProto
from verl.trainer.ppo.core_algos import agg_loss
from verl.trainer.ppo.metric_utils import compute_throughout_metrics, compute_timing_metrics
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, apply_kl_penalty
from verl.trainer.ppo.utils import create_rl_dataset
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.debug import marked_timer
from verl.utils.metric import reduce_metrics
from verl.utils.tracking import Tracking

from ..gateway.requests import GatewayLimits
from ..gateway.server import GatewayServer
from ..settings import AtroposConfig, max_token_len, registered_batch_size
from .accounting import GroupLedger, accounting_metrics
from .advantages import apply_atropos_advantages
from .batch_log import BatchLog
from .batch_pipeline import IS_PAD, ShapedBatch, convert_groups, shape_batch
from .metrics import atropos_metrics, data_metrics
from .pacing import GenerationPacer, window_sequences
from .prefetch import BatchPrefetcher
from .sync_check import max_logprob_gap, replica_prompt_logprobs
from .trajectory_client import AtroposClient, Registration

logger = logging.getLogger(__name__)


class _NoTrainData:
    """Stands where verl keeps its train dataloader: checkpoints save and load its (empty) state."""

    def __init__(self, steps: int):
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RayGRPOAtroposTrainer(RayPPOTrainer):
    """GRPO on batches from the Atropos trajectory API; see the module docstring."""

    def __init__(self, config, tokenizer, role_worker_mapping, resource_pool_manager, vocab_size: int | None = None,
                 **kwargs):
        self.atropos = AtroposConfig.from_run_config(config)
        # rows of the policy's embedding: a token id outside them would crash the actor, so the
        # converter rejects its group (None: only the tokenizer's size is known)
        self.vocab_size = vocab_size if vocab_size is not None else len(tokenizer)
        self.gateway: GatewayServer | None = None
        self._fixed_probe: tuple[list[int], int] | None = None  # see _weight_sync_gap
        self.policy_version = 0  # the step the replicas' weights were last synced after
        self._untrained: ShapedBatch | None = None  # batches since the last trained step, none of it trainable
        self._batch_log = BatchLog(self.atropos.batches_file)  # every fetched batch's groups and rejections
        self._groups = GroupLedger()  # groups trained and rejected since the run started
        self._pacer: GenerationPacer | None = None
        self.disaggregated = not config.actor_rollout_ref.hybrid_engine
        if not self.disaggregated:
            super().__init__(config, tokenizer, role_worker_mapping, resource_pool_manager, **kwargs)
            return
        # verl's legacy constructor asserts the hybrid layout and reads the flag nowhere else
        # but init_workers, which this class replaces for the standalone layout
        with open_dict(config):
            config.actor_rollout_ref.hybrid_engine = True
        try:
            super().__init__(config, tokenizer, role_worker_mapping, resource_pool_manager, **kwargs)
        finally:
            with open_dict(config):
                config.actor_rollout_ref.hybrid_engine = False
        self.hybrid_engine = False

    def init_workers(self):
        """verl's workers and inference replicas, then the gateway the environments call."""
        if self.disaggregated:
            self._init_standalone_layout()
        else:
            super().init_workers()
        self.gateway = GatewayServer(
            self.llm_server_manager.get_addresses(),
            host=self.atropos.gateway_host,
            port=self.atropos.gateway_port,
            request_timeout=self.atropos.timeout,
            limits=GatewayLimits(
                max_n=self.atropos.gateway_max_n,
                max_tokens=self.atropos.gateway_max_tokens,
                max_concurrency=self._gateway_concurrency(),
            ),
            model_names=self._policy_names(),
            window_settle_s=self.atropos.generation_settle_s,
        )
        self.gateway.start()
        # sized before any environment can call: what is admitted unbounded is never taken back
        self.gateway.size_window(self._generation_window())
        # the replicas are asleep (colocated) or hold no trained weights yet (standalone) until
        # fit() syncs the actor's weights
        self.gateway.pause()
        print(f"inference gateway listening on {self.gateway.url}", flush=True)
        if self.atropos.gateway_url_file:
            # written whole, then renamed: a reader never sees half an address
            target = Path(os.path.expanduser(self.atropos.gateway_url_file))
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_text(self.gateway.url + "\n")
            partial.replace(target)

    def _gateway_concurrency(self) -> int:
        """Single-choice requests the gateway may keep in flight: as configured, else a whole batch."""
        if self.atropos.gateway_max_concurrency is not None:
            return self.atropos.gateway_max_concurrency
        return self.registered_batch_size

    def _policy_names(self) -> tuple[str, ...]:
        """What environments may call the policy at the gateway (the launcher passes the model path)."""
        model = self.config.actor_rollout_ref.model
        paths = {str(model.path), os.path.expanduser(str(model.path))}
        return tuple(sorted(paths | set(self.atropos.gateway_model_names)))

    def _init_standalone_layout(self):
        """The actor (with its reference policy) on the trainer's GPUs, the replicas on their own.

        The actor's pool is ``trainer.nnodes`` x ``trainer.n_gpus_per_node``; verl's
        ``LLMServerManager`` starts ``rollout.nnodes`` x ``rollout.n_gpus_per_node`` /
        (tp x dp x pp) standalone replicas in pools of their own, and the checkpoint
        engine (``rollout.checkpoint_engine.backend``, nccl on GPUs) carries the weights.
        """
        from verl.checkpoint_engine import CheckpointEngineManager
        from verl.single_controller.ray import RayClassWithInitArgs
        from verl.trainer.ppo.utils import Role
        from verl.workers.rollout.llm_server import LLMServerManager

        self.resource_pool_manager.create_resource_pool()
        role = Role.ActorRolloutRef if Role.ActorRolloutRef in self.role_worker_mapping else Role.ActorRollout
        self.actor_rollout_wg = self.ray_worker_group_cls(
            resource_pool=self.resource_pool_manager.get_resource_pool(role),
            ray_cls_with_init=RayClassWithInitArgs(
                cls=self.role_worker_mapping[role], config=self.config.actor_rollout_ref, role=str(role)
            ),
            device_name=self.device_name,
        )
        self.actor_rollout_wg.init_model()
        if self.use_reference_policy:
            # fused into the actor's workers, as in verl's colocated layout
            self.ref_policy_wg = self.actor_rollout_wg
        self.llm_server_manager = LLMServerManager.create(config=self.config)
        self.checkpoint_manager = CheckpointEngineManager(
            config=omega_conf_to_dataclass(self.config.actor_rollout_ref.rollout.checkpoint_engine),
            actor_wg=self.actor_rollout_wg,
            replicas=self.llm_server_manager.get_replicas(),
        )

    # -- set-up ----------------------------------------------------------------------

    def _create_dataloader(self, train_dataset, val_dataset, collate_fn, train_sampler):
        steps = self.config.trainer.total_training_steps
        if not steps or steps <= 0:
            raise ValueError(
                f"trainer.total_training_steps must be a positive number, got {steps}: batches stream from the "
                "Atropos API, so there is no dataset size to derive the number of steps from"
            )
        self.total_training_steps = steps
        self.train_dataset = None
        self.train_dataloader = _NoTrainData(steps)
        if val_dataset is None and self.config.data.get("val_files"):
            val_dataset = create_rl_dataset(
                self.config.data.val_files, self.config.data, self.tokenizer, self.processor
            )
        self.val_dataset = val_dataset
        self.val_dataloader = None
        if val_dataset is not None:
            from verl.utils.dataset.rl_dataset import collate_fn as default_collate_fn

            self.val_dataloader = StatefulDataLoader(
                dataset=val_dataset,
                batch_size=self.config.data.val_batch_size or len(val_dataset),
                num_workers=self.config.data["dataloader_num_workers"],
                shuffle=False,
                drop_last=False,
                collate_fn=collate_fn or default_collate_fn,
            )
        with open_dict(self.config):
            self.config.actor_rollout_ref.actor.optim.total_training_steps = steps

    @property
    def max_token_len(self) -> int:
        """The longest sequence registered with the API and accepted by the converter."""
        return max_token_len(self.config)

    @property
    def registered_batch_size(self) -> int:
        """Sequences per step, as registered with the API; a trained batch is a multiple of it."""
        return registered_batch_size(self.config)

    def registration(self) -> Registration:
        """What the trainer registers with the API: sizes in sequences, and the step it resumed from."""
        trainer = self.config.trainer
        return Registration(
            batch_size=self.registered_batch_size,
            max_token_len=self.max_token_len,
            num_steps=self.total_training_steps,
            starting_step=self.global_steps,
            checkpoint_dir=str(trainer.default_local_dir),
            save_checkpoint_interval=trainer.save_freq,
            wandb_group=str(trainer.experiment_name),
            wandb_project=str(trainer.project_name),
        )

    def _convert(self, groups: list[dict]):
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return convert_groups(
            groups,
            max_token_len=self.max_token_len,
            pad_token_id=pad,
            require_advantages=not self.atropos.fallback_to_grpo,
            vocab_size=self.vocab_size,
            max_group_size=self.registration().batch_size,
        )

    # -- the loop --------------------------------------------------------------------

    def _tracker(self) -> Tracking:
        """verl's trackers of ``trainer.logger``, plus its file tracker on ``trainer.atropos.metrics_file``."""
        backends = list(self.config.trainer.logger)
        if self.atropos.metrics_file:
            path = Path(os.path.expanduser(self.atropos.metrics_file))
            path.parent.mkdir(parents=True, exist_ok=True)
            # verl's FileLogger takes its path from this variable only
            os.environ["VERL_FILE_LOGGER_PATH"] = str(path)
            if "file" not in backends:
                backends.append("file")
        return Tracking(
            project_name=self.config.trainer.project_name,
            experiment_name=self.config.trainer.experiment_name,
            default_backend=backends,
            config=OmegaConf.to_container(self.config, resolve=True),
        )

    def fit(self):
        tracker = self._tracker()
        self.global_steps = 0
        self._load_checkpoint()
        client = AtroposClient.from_config(self.atropos)
        client.register(self.registration())
        prefetcher = BatchPrefetcher(client, self._convert)
        # while the gateway is still closed: the window's baseline must precede every arrival it counts
        self._start_pacing(prefetcher)
        self._sync_weights()
        prefetcher.start()
        # one batch for the first step, one fetched ahead while it trains
        prefetcher.request(min(2, self.total_training_steps - self.global_steps))
        try:
            if self.val_dataloader is not None and self.config.trainer.get("val_before_train", True):
                tracker.log(data=self._validate(), step=self.global_steps)
            self.global_steps += 1
            while self.global_steps <= self.total_training_steps:
                # the steps done: where the trainer registers again if the API restarts without its state
                client.step = self.global_steps - 1
                metrics = self.train_step(prefetcher)
                if metrics is None:
                    continue
                # times the API forgot this trainer (it restarted without its state) and was registered with again
                metrics["atropos/api_reregistrations"] = float(client.reregistrations)
                tracker.log(data=metrics, step=self.global_steps)
                self.global_steps += 1
        finally:
            if self._pacer is not None:
                self._pacer.stop()
            prefetcher.stop()
            client.close()
            self.gateway.stop()
            self._shutdown_dump_executor()

    def train_step(self, prefetcher: BatchPrefetcher) -> dict | None:
        """One GRPO step on the next Atropos batch; ``None`` if every group of it was rejected."""
        metrics, timing_raw = {}, {}
        with marked_timer("step", timing_raw):
            with marked_timer("gen", timing_raw):
                idle_before = self.gateway.idle_seconds()
                prefetched, waited = prefetcher.get()
                # the part of the wait in which the replicas had nothing to generate
                idle_wait = min(waited, self.gateway.idle_seconds() - idle_before)
                # how the replicas answered since the last batch: a slow engine or requests that started late
                replica_timing = self.gateway.take_replica_timing()
            carried = self._untrained
            shaped = shape_batch(
                prefetched.result,
                ledger=self.gateway.ledger,
                # the actor trains from the weights it last synced to the replicas
                actor_version=self.policy_version,
                max_policy_lag_steps=self.atropos.max_policy_lag_steps,
                unit=self.registered_batch_size,
                carried=carried,
            )
            new_rejections = shaped.rejections[len(carried.rejections) if carried else 0 :]
            for rejection in new_rejections:
                logger.warning("%s", rejection)
            self._groups.count_batch(
                trained_groups=0 if shaped.data is None else shaped.num_groups - len(shaped.rejections),
                rejection_reasons=[rejection.reason for rejection in new_rejections],
            )
            self._batch_log.write(
                self.global_steps, prefetched.result.env_ids, new_rejections, trained=shaped.data is not None
            )
            if shaped.data is None:
                logger.warning("step %d: every group of the batch was rejected; fetching another", self.global_steps)
                prefetcher.done_with(prefetched)
                self._untrained = shaped
                prefetcher.request(1)
                return None
            self._untrained = None
            if self.global_steps + 2 <= self.total_training_steps:
                # the batch after the next one (the next is fetched already), taken while this one trains
                prefetcher.request(1)
            batch = self._prepare_batch(shaped.data, metrics)
            if not self.disaggregated:
                with marked_timer("pause_rollout", timing_raw):
                    # environments wait at the gateway while the replicas sleep, train and take new weights
                    self._record_drain(self.gateway.pause(drain=not self.atropos.partial_rollout), metrics)
                    if self.atropos.partial_rollout:
                        # cut short what is in flight; the gateway continues it after the sync
                        self.checkpoint_manager.abort_replicas()
                    self.checkpoint_manager.sleep_replicas()
            batch = self._old_log_probs(batch, metrics, timing_raw)
            if self.use_reference_policy:
                with marked_timer("ref", timing_raw):
                    batch = batch.union(self._compute_ref_log_prob(batch))
            with marked_timer("adv", timing_raw):
                batch = self._advantages(batch, metrics)
            with marked_timer("update_actor", timing_raw):
                actor_output = self._update_actor(batch)
            metrics.update(reduce_metrics(actor_output.meta_info["metrics"]))
            self._maybe_save_checkpoint(timing_raw)
            # trained: room in the generation window for the next batch, generated under the new weights
            prefetcher.done_with(prefetched)
            if self._pacer is not None:
                # the window learns of that room now, not at the pacer's next reading, so the next
                # batch starts the moment the replicas resume
                self._pacer.poll_once()
            self._sync_weights(timing_raw, metrics)
        if self.atropos.check_weight_sync:
            metrics.update(self._weight_sync_gap(batch))
        self._maybe_validate(metrics, timing_raw)

        # from the batch the actor updated on; groups of wholly rejected batches count with this step
        metrics.update(atropos_metrics(shaped, batch, batch_wait_s=waited))
        metrics["atropos/batch_wait_idle_s"] = idle_wait
        metrics.update(replica_timing.metrics())
        metrics.update(self._accounting(prefetcher))
        metrics["atropos/fetch_s"] = prefetched.fetch_s
        metrics["atropos/convert_s"] = prefetched.convert_s
        metrics["training/global_step"] = self.global_steps
        metrics.update(data_metrics(batch))
        metrics.update(compute_timing_metrics(batch=batch, timing_raw=timing_raw))
        n_gpus = self.resource_pool_manager.get_n_gpus()
        if self.disaggregated:
            rollout = self.config.actor_rollout_ref.rollout
            n_gpus += rollout.nnodes * rollout.n_gpus_per_node
        metrics.update(compute_throughout_metrics(batch=batch, timing_raw=timing_raw, n_gpus=n_gpus))
        return metrics

    # -- pacing and accounting ---------------------------------------------------------

    def _generation_window(self) -> int | None:
        return window_sequences(
            self.atropos.generation_window_batches,
            self.registered_batch_size,
            disaggregated=self.disaggregated,
            max_policy_lag_steps=self.atropos.max_policy_lag_steps,
        )

    def _start_pacing(self, prefetcher: BatchPrefetcher) -> None:
        """Keep the gateway's generation window fed from the API (see :mod:`.pacing`)."""
        pacer = GenerationPacer(self.atropos.api_url, self.gateway.observe_downstream,
                                done=lambda: prefetcher.done_sequences,
                                starved=lambda: prefetcher.trainer_waiting)
        # the first reading is the baseline (what arrived before this trainer started is not in the
        # window); the pacer also reads the API's counts for the accounting, window or not
        if not pacer.poll_once():
            logger.warning("the trajectory API's /stats could not be read or has no arrival counts (run-api): "
                           "generation is not paced")
            pacer.stop()
            self.gateway.size_window(None)
            return
        self._pacer = pacer
        window = self._generation_window()
        if window is not None:
            logger.info("generation window: %d sequences (%d registered batches)",
                        window, window // self.registered_batch_size)
        pacer.start()

    def _accounting(self, prefetcher: BatchPrefetcher) -> dict[str, float]:
        api_stats = self._pacer.read_stats() if self._pacer is not None else None
        return accounting_metrics(self._groups, api_stats, prefetcher.unconsumed_groups,
                                  window_stats=self.gateway.window_stats())

    # -- stages ----------------------------------------------------------------------

    @staticmethod
    def _record_drain(drain, metrics: dict) -> None:
        """What the pause before the replicas stop generating cost: requests it let finish, and the wait."""
        metrics["atropos/sync_drained_requests"] = float(drain.requests)
        metrics["atropos/sync_drain_s"] = drain.seconds

    def _sync_weights(self, timing_raw: dict | None = None, metrics: dict | None = None) -> None:
        """The actor's weights to every replica, then the gateway open at the new policy version.

        Standalone replicas are still generating: the gateway drains them first, so
        that each sequence comes from one policy version; or, with
        ``trainer.atropos.partial_rollout``, they are aborted and continued after the sync.
        """
        timing_raw = {} if timing_raw is None else timing_raw
        if self.disaggregated:
            with marked_timer("pause_rollout", timing_raw):
                # with partial_rollout, verl's update_weights aborts what is in flight (and resumes
                # the replicas after), and the gateway continues it: nothing to wait for here
                drain = self.gateway.pause(drain=not self.atropos.partial_rollout)
            if metrics is not None:
                self._record_drain(drain, metrics)
        with marked_timer("update_weights", timing_raw):
            self.checkpoint_manager.update_weights(self.global_steps)
            if self.atropos.partial_rollout and not self.disaggregated:
                # the colocated weight update leaves the engines as the abort left them: paused
                self.checkpoint_manager.resume_generation_replicas()
        self.policy_version = self.global_steps
        self.gateway.resume(self.policy_version)

    def _prepare_batch(self, batch: DataProto, metrics: dict) -> DataProto:
        batch.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        batch.meta_info["global_steps"] = self.global_steps
        if self.config.trainer.balance_batch:
            self._balance_batch(batch, metrics=metrics)
        batch.meta_info["global_token_num"] = torch.sum(batch.batch["attention_mask"], dim=-1).tolist()
        batch.meta_info["images_seqlens"] = []
        return batch

    def _old_log_probs(self, batch: DataProto, metrics: dict, timing_raw: dict) -> DataProto:
        """Recompute old log-probs, or take the environments' inference log-probs where asked."""
        rollout_corr = self.config.algorithm.get("rollout_correction", None)
        if rollout_corr and rollout_corr.get("bypass_mode", False):
            if "rollout_log_probs" in batch.batch.keys():
                from verl.trainer.ppo.rollout_corr_helper import apply_bypass_mode

                apply_bypass_mode(batch, rollout_corr, self.config.actor_rollout_ref.actor.policy_loss)
                return batch
            logger.warning(
                "algorithm.rollout_correction.bypass_mode is on but this batch has no inference_logprobs "
                "from every environment; recomputing old log-probs"
            )
        with marked_timer("old_log_prob", timing_raw):
            old_log_prob, mfu = self._compute_old_log_prob(batch)
        actor = self.config.actor_rollout_ref.actor
        entropy = agg_loss(
            loss_mat=old_log_prob.batch.pop("entropys"),
            loss_mask=batch.batch["response_mask"],
            loss_agg_mode=actor.loss_agg_mode,
            loss_scale_factor=actor.loss_scale_factor,
        )
        metrics.update({"actor/entropy": entropy.item(), "perf/mfu/actor_infer": mfu})
        return batch.union(old_log_prob)

    def _advantages(self, batch: DataProto, metrics: dict) -> DataProto:
        algorithm = self.config.algorithm
        if algorithm.use_kl_in_reward:
            batch, kl_metrics = apply_kl_penalty(batch, kl_ctrl=self.kl_ctrl_in_reward, kl_penalty=algorithm.kl_penalty)
            metrics.update(kl_metrics)
        else:
            batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
        rollout_corr = algorithm.get("rollout_correction", None)
        has_rollout_log_probs = "rollout_log_probs" in batch.batch.keys()
        if rollout_corr is not None and has_rollout_log_probs and not rollout_corr.get("bypass_mode"):
            from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

            batch, is_metrics = compute_rollout_correction_and_add_to_batch(batch, rollout_corr)
            metrics.update(is_metrics)
        return apply_atropos_advantages(
            batch,
            use_advantages=self.atropos.use_advantages,
            norm_adv_by_std_in_grpo=algorithm.get("norm_adv_by_std_in_grpo", True),
        )

    def _weight_sync_gap(self, batch: DataProto) -> dict:
        """Actor vs replica log-probs of the batch's first real sequence, on its trained positions.

        Also the replicas' mean log-prob of one fixed sequence (the first step's probe):
        it changes from step to step only if the replicas' weights do.
        """
        # the whole batch goes through the actor: its micro-batching needs the batch's size
        first_real = int(torch.nonzero(~batch.batch[IS_PAD])[0])
        actor_logprobs = self._compute_old_log_prob(batch)[0].batch["old_log_probs"][first_real]
        probe = batch.select_idxs(np.array([first_real]))
        token_ids = probe.batch["input_ids"][0][probe.batch["attention_mask"][0].bool()].tolist()
        prompt_len = int(probe.batch["attention_mask"][0, : probe.batch["prompts"].shape[1]].sum())
        trained = torch.nonzero(probe.batch["response_mask"][0]).flatten().tolist()
        actor = actor_logprobs[trained].tolist()
        if self._fixed_probe is None:
            self._fixed_probe = (token_ids, prompt_len)
        gaps, fixed = [], []
        for replica in self.gateway.gateway.replicas:
            scores = replica_prompt_logprobs(replica, token_ids)[prompt_len:]
            gaps.append(max_logprob_gap(actor, [scores[i] for i in trained]))
            fixed_ids, fixed_prompt_len = self._fixed_probe
            fixed.append(np.mean(replica_prompt_logprobs(replica, fixed_ids)[fixed_prompt_len:]))
        return {
            "atropos/weight_sync_max_logprob_gap": max(gaps),
            "atropos/weight_sync_fixed_probe_logprob": float(np.mean(fixed)),
        }

    def _maybe_save_checkpoint(self, timing_raw: dict) -> None:
        save_freq = self.config.trainer.save_freq
        last = self.global_steps >= self.total_training_steps
        if save_freq > 0 and (last or self.global_steps % save_freq == 0):
            with marked_timer("save_checkpoint", timing_raw):
                self._save_checkpoint()

    def _maybe_validate(self, metrics: dict, timing_raw: dict) -> None:
        test_freq = self.config.trainer.test_freq
        last = self.global_steps >= self.total_training_steps
        if self.val_dataloader is not None and test_freq > 0 and (last or self.global_steps % test_freq == 0):
            with marked_timer("testing", timing_raw):
                metrics.update(self._validate())

