#!/usr/bin/env bash
# The learning runs of docs/results.md: Qwen2.5-Coder-0.5B-Instruct on GSM8K, trained
#   (1) by this project's launcher with the plain gsm8k environment (atropos_grpo_qwen05b_gpu.yaml),
#   (2) by verl's own GRPO (verl.trainer.main_ppo, legacy trainer) with the same model, data, batch,
#       n, lengths, learning rate and vLLM settings, validating before and after,
#   (3) by the launcher with the token-level credit environment (atropos_grpo_qwen05b_credit_gpu.yaml).
# With two GPUs: (1) and (3) on GPU 0, (2) on GPU 1, all started together ((3) a little later so
# the two vLLM engines on GPU 0 do not profile memory at the same moment). With one GPU: one
# after the other. Every run writes its metrics as JSONL (verl's file tracker) to OUT_DIR/NAME.jsonl;
# plot the score per step of all of them with
#   python scripts/plot_metrics.py --learning ours=OUT_DIR/ours_gsm8k.jsonl verl=OUT_DIR/verl_grpo.jsonl \
#       credit=OUT_DIR/ours_credit.jsonl --png score.png
#
#   bash benchmarks/learning_compare.sh OUT_DIR MODEL_DIR DATA_DIR [STEPS] [SECONDS_PER_RUN]
# WITH_CREDIT=0 leaves run (3) out.
set -u
OUT=${1:?out dir}; MODEL=${2:?model dir}; DATA=${3:?data dir with train/test.parquet}
STEPS=${4:-60}; LIMIT=${5:-3000}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
OUT=$(cd "$OUT" && pwd)
# read from the run's own config, so verl's run below cannot drift from ours
read -r BATCH N PLEN RLEN LR MINI MICRO LPMICRO MEM < <($PY - <<'PY'
import os
from hydra import compose, initialize_config_dir
with initialize_config_dir(config_dir=os.path.abspath("recipe/atropos/config"), version_base=None):
    c = compose(config_name="atropos_grpo_qwen05b_gpu")
a = c.actor_rollout_ref
print(c.data.train_batch_size, a.rollout.n, c.data.max_prompt_length, c.data.max_response_length, a.actor.optim.lr,
      a.actor.ppo_mini_batch_size, a.actor.ppo_micro_batch_size_per_gpu, a.rollout.log_prob_micro_batch_size_per_gpu,
      a.rollout.gpu_memory_utilization)
PY
)
echo "batch $BATCH x n $N, $PLEN/$RLEN tokens, lr $LR, mini-batch $MINI, $STEPS steps, $GPUS GPU(s)"

memlog() { nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader,nounits -lms 2000 > "$1" 2>/dev/null & echo $!; }

ours() {  # NAME CONFIG GPU API_PORT GATEWAY_PORT
  local name=$1 config=$2 gpu=$3
  ( export CUDA_VISIBLE_DEVICES=$gpu
    timeout -s INT -k 120 "$LIMIT" $PY recipe/atropos/launch_atropos_verl_services.py \
      --config "recipe/atropos/config/$config.yaml" --run-dir "$OUT/$name" \
      actor_rollout_ref.model.path="$MODEL" data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
      trainer.total_training_steps="$STEPS" trainer.test_freq="$STEPS" trainer.atropos.metrics_file="$OUT/$name.jsonl" \
      trainer.atropos.api_url="http://localhost:$4" trainer.atropos.gateway_port="$5" \
      > "$OUT/$name.console.log" 2>&1
    echo "$name: rc=$? at $(date +%s)" >> "$OUT/rc.txt" )
}

verl_grpo() {  # GPU
  ( export CUDA_VISIBLE_DEVICES=$1 VERL_FILE_LOGGER_PATH="$OUT/verl_grpo.jsonl"
    timeout -s INT -k 120 "$LIMIT" $PY -m verl.trainer.main_ppo \
      algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False \
      data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
      data.train_batch_size="$BATCH" data.max_prompt_length="$PLEN" data.max_response_length="$RLEN" \
      data.filter_overlong_prompts=True data.truncation=error data.dataloader_num_workers=0 \
      actor_rollout_ref.model.path="$MODEL" actor_rollout_ref.model.use_remove_padding=False \
      +actor_rollout_ref.model.override_config.attn_implementation=sdpa \
      actor_rollout_ref.actor.optim.lr="$LR" actor_rollout_ref.actor.ppo_mini_batch_size="$MINI" \
      actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$MICRO" actor_rollout_ref.actor.use_kl_loss=False \
      actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
      actor_rollout_ref.rollout.gpu_memory_utilization="$MEM" actor_rollout_ref.rollout.n="$N" \
      actor_rollout_ref.rollout.enforce_eager=True actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$LPMICRO" \
      actor_rollout_ref.rollout.val_kwargs.do_sample=False actor_rollout_ref.rollout.val_kwargs.n=1 \
      actor_rollout_ref.rollout.agent.num_workers=2 actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu="$LPMICRO" \
      reward.num_workers=2 trainer.logger='["console","file"]' trainer.val_before_train=True trainer.test_freq="$STEPS" \
      trainer.save_freq=-1 trainer.n_gpus_per_node=1 trainer.nnodes=1 trainer.total_epochs=10 \
      trainer.total_training_steps="$STEPS" trainer.use_v1=False +ray_kwargs.ray_init.include_dashboard=False \
      trainer.project_name=atropos_verl trainer.experiment_name=verl_grpo_qwen05b \
      > "$OUT/verl_grpo.console.log" 2>&1
    echo "verl_grpo: rc=$? at $(date +%s)" >> "$OUT/rc.txt" )
}

SMI=$(memlog "$OUT/gpumem.csv")
date +%s > "$OUT/t0.txt"
if [ "$GPUS" -ge 2 ]; then
  ours ours_gsm8k atropos_grpo_qwen05b_gpu 0 9001 8000 &
  verl_grpo 1 &
  if [ "${WITH_CREDIT:-1}" = 1 ]; then
    sleep "${CREDIT_DELAY_S:-100}"
    ours ours_credit atropos_grpo_qwen05b_credit_gpu 0 9011 8010 &
  fi
  wait
else
  ours ours_gsm8k atropos_grpo_qwen05b_gpu 0 9001 8000
  verl_grpo 0
  [ "${WITH_CREDIT:-1}" = 1 ] && ours ours_credit atropos_grpo_qwen05b_credit_gpu 0 9011 8010
fi
kill "$SMI" 2>/dev/null
cat "$OUT/rc.txt"
