# Shared by the GPU benchmarks (sourced): a run's sizes read from its own config, this project's
# launcher, and verl's own GRPO (verl.trainer.main_ppo, legacy trainer) with the same sizes.
# The caller sets OUT, MODEL, DATA, STEPS, LIMIT and PY.

# BATCH N PLEN RLEN LR MINI MICRO LPMICRO MEM SHUFFLE of a config under recipe/atropos/config, so
# verl's run cannot drift from ours
read_sizes() {  # CONFIG_NAME
  read -r BATCH N PLEN RLEN LR MINI MICRO LPMICRO MEM SHUFFLE < <($PY - "$1" <<'PY'
import os, sys
from hydra import compose, initialize_config_dir
with initialize_config_dir(config_dir=os.path.abspath("recipe/atropos/config"), version_base=None):
    c = compose(config_name=sys.argv[1])
a = c.actor_rollout_ref
print(c.data.train_batch_size, a.rollout.n, c.data.max_prompt_length, c.data.max_response_length, a.actor.optim.lr,
      a.actor.ppo_mini_batch_size, a.actor.ppo_micro_batch_size_per_gpu, a.rollout.log_prob_micro_batch_size_per_gpu,
      a.rollout.gpu_memory_utilization, c.data.get("shuffle", True))
PY
)
}

ours() {  # NAME CONFIG GPUS API_PORT GATEWAY_PORT [OVERRIDE ...]: metrics in $OUT/NAME.jsonl
  local name=$1 config=$2 gpus=$3 api=$4 gateway=$5
  shift 5
  ( export CUDA_VISIBLE_DEVICES=$gpus
    timeout -s INT -k 120 "$LIMIT" $PY recipe/atropos/launch_atropos_verl_services.py \
      --config "recipe/atropos/config/$config.yaml" --run-dir "$OUT/$name" \
      actor_rollout_ref.model.path="$MODEL" data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
      trainer.total_training_steps="$STEPS" trainer.atropos.metrics_file="$OUT/$name.jsonl" \
      trainer.atropos.api_url="http://localhost:$api" trainer.atropos.gateway_port="$gateway" "$@" \
      > "$OUT/$name.console.log" 2>&1
    echo "$name: rc=$? at $(date +%s)" >> "$OUT/rc.txt" )
}

verl_grpo() {  # NAME GPUS N_GPUS VALIDATE(True|False): metrics in $OUT/NAME.jsonl
  local name=$1 gpus=$2 n_gpus=$3 validate=$4 test_freq=-1
  [ "$validate" = True ] && test_freq=${VAL_EVERY:-$STEPS}
  ( export CUDA_VISIBLE_DEVICES=$gpus VERL_FILE_LOGGER_PATH="$OUT/$name.jsonl"
    timeout -s INT -k 120 "$LIMIT" $PY -m verl.trainer.main_ppo \
      algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False \
      data.train_files="$DATA/train.parquet" data.val_files="$DATA/test.parquet" \
      data.train_batch_size="$BATCH" data.shuffle="$SHUFFLE" data.max_prompt_length="$PLEN" data.max_response_length="$RLEN" \
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
      reward.num_workers=2 trainer.logger='["console","file"]' trainer.val_before_train="$validate" \
      trainer.test_freq="$test_freq" trainer.save_freq=-1 trainer.n_gpus_per_node="$n_gpus" trainer.nnodes=1 \
      trainer.total_epochs=10 trainer.total_training_steps="$STEPS" trainer.use_v1=False \
      +ray_kwargs.ray_init.include_dashboard=False trainer.project_name=atropos_verl trainer.experiment_name="$name" \
      > "$OUT/$name.console.log" 2>&1
    echo "$name: rc=$? at $(date +%s)" >> "$OUT/rc.txt" )
}

memlog() {  # FILE: GPU memory every 2 s until killed; prints the logger's pid
  nvidia-smi --query-gpu=timestamp,index,memory.used --format=csv,noheader,nounits -lms 2000 > "$1" 2>/dev/null &
  echo $!
}
