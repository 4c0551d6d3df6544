#!/usr/bin/env bash
# The GPU comparison of docs/results.md: this project's launcher, then verl's own GRPO
# (verl.trainer.main_ppo, legacy trainer) with the same model, batch, n, lengths and vLLM
# settings, one after the other on the same GPU. Needs the vLLM install (pip install -e ".[vllm]").
#
#   bash benchmarks/gpu_compare.sh OUT_DIR MODEL_DIR DATA_DIR [STEPS]
#
# OUT_DIR gets ours/ (a log per service, metrics.jsonl), native.log, native_metrics.jsonl and
# gpumem_{ours,native}.csv; plot with
#   python scripts/plot_metrics.py --ours OUT_DIR/ours/metrics.jsonl --native OUT_DIR/native_metrics.jsonl
set -u
OUT=${1:?out dir}; MODEL=${2:?model dir}; DATA=${3:?data dir with train/test.parquet}; STEPS=${4:-40}
PY=${PYTHON:-python3}
mkdir -p "$OUT"

memlog() { nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 1000 > "$1" 2>/dev/null & echo $!; }
peak() { sort -t, -k2 -n "$1" | tail -1 | cut -d, -f2; }

SMI=$(memlog "$OUT/gpumem_ours.csv"); t0=$(date +%s)
$PY recipe/atropos/launch_atropos_verl_services.py --config recipe/atropos/config/atropos_grpo_smollm2_gpu.yaml \
  --run-dir "$OUT/ours" actor_rollout_ref.model.path="$MODEL" \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" trainer.total_training_steps="$STEPS" \
  > "$OUT/ours_console.log" 2>&1
echo "ours: rc=$? after $(( $(date +%s) - t0 )) s, peak GPU memory $(peak "$OUT/gpumem_ours.csv") MiB"
kill "$SMI" 2>/dev/null

SMI=$(memlog "$OUT/gpumem_native.csv"); t0=$(date +%s)
VERL_FILE_LOGGER_PATH="$OUT/native_metrics.jsonl" $PY -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False \
  data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
  data.train_batch_size=8 data.max_prompt_length=256 data.max_response_length=256 \
  data.filter_overlong_prompts=True data.truncation=error data.dataloader_num_workers=0 \
  actor_rollout_ref.model.path="$MODEL" actor_rollout_ref.model.use_remove_padding=False \
  +actor_rollout_ref.model.override_config.attn_implementation=sdpa \
  actor_rollout_ref.actor.optim.lr=1e-5 actor_rollout_ref.actor.ppo_mini_batch_size=8 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.3 actor_rollout_ref.rollout.n=4 \
  actor_rollout_ref.rollout.enforce_eager=True actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.rollout.agent.num_workers=2 actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4 \
  reward.num_workers=2 trainer.logger='["console","file"]' trainer.val_before_train=False trainer.test_freq=-1 \
  trainer.save_freq=-1 trainer.n_gpus_per_node=1 trainer.nnodes=1 trainer.total_epochs=1 \
  trainer.total_training_steps="$STEPS" trainer.use_v1=False +ray_kwargs.ray_init.include_dashboard=False \
  > "$OUT/native.log" 2>&1
echo "native: rc=$? after $(( $(date +%s) - t0 )) s, peak GPU memory $(peak "$OUT/gpumem_native.csv") MiB"
kill "$SMI" 2>/dev/null
