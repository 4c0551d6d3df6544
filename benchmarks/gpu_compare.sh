#!/usr/bin/env bash
# The throughput comparison of docs/results.md: this project's launcher against verl's own GRPO
# (verl.trainer.main_ppo, legacy trainer) with the same model, data, batch, n, lengths, learning
# rate and vLLM settings, read from the launcher's config. Needs the vLLM install
# (pip install -e ".[vllm]").
#
#   bash benchmarks/gpu_compare.sh OUT_DIR MODEL_DIR DATA_DIR [STEPS] [SECONDS_PER_RUN] [CONFIG]
#
# Two GPUs: round 1 runs ours on GPU 0 and verl's on GPU 1, started together; round 2 swaps
# them. With LAYOUTS=1 a third round runs the disaggregated layout (vLLM on one GPU, the actor on
# the other) and then verl's own GRPO data-parallel on both. One GPU: ours, then verl's.
# Every run's metrics go to OUT_DIR/NAME.jsonl; benchmarks/compare_runs.py prints, per round,
# the median step time (steps 3 on), trained sequences and tokens per second, the mean response
# length (runs whose answers drift apart take different times a step), the stale-discarded
# share, the batch-wait share of a step, one request's time at the replica, and the ratios. CONFIG defaults to
# atropos_grpo_qwen05b_verl_reward_gpu: the gsm8k environment scored by verl's own GSM8K reward, so
# both trainers reward the same answers and their answers keep alike lengths (a step's time
# follows its tokens).
set -u
OUT=${1:?out dir}; MODEL=${2:?model dir}; DATA=${3:?data dir with train/test.parquet}
STEPS=${4:-20}; LIMIT=${5:-1800}; CONFIG=${6:-atropos_grpo_qwen05b_verl_reward_gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
. benchmarks/common.sh
read_sizes "$CONFIG"
echo "$CONFIG: batch $BATCH x n $N, $PLEN/$RLEN tokens, $STEPS steps, $GPUS GPU(s)"
# ours validates nowhere either: a step is generation and training only
NO_VAL=(trainer.test_freq=-1 trainer.val_before_train=false)

report() {  # LABEL OURS VERL
  $PY benchmarks/compare_runs.py --label "$1: " --ours "$OUT/$2.jsonl" --verl "$OUT/$3.jsonl" \
    --verl-sequences-per-step $(( BATCH * N ))
}

SMI=$(memlog "$OUT/gpumem.csv")
if [ "$GPUS" -ge 2 ]; then
  ours ours_gpu0 "$CONFIG" 0 9001 8000 "${NO_VAL[@]}" & verl_grpo verl_gpu1 1 1 False & wait
  ours ours_gpu1 "$CONFIG" 1 9011 8010 "${NO_VAL[@]}" & verl_grpo verl_gpu0 0 1 False & wait
  report "round 1 (ours GPU 0, verl GPU 1)" ours_gpu0 verl_gpu1
  report "round 2 (ours GPU 1, verl GPU 0)" ours_gpu1 verl_gpu0
  if [ "${LAYOUTS:-0}" = 1 ]; then
    ours ours_disaggregated "$CONFIG" 0,1 9021 8020 "${NO_VAL[@]}" actor_rollout_ref.hybrid_engine=false \
      trainer.n_gpus_per_node=1 actor_rollout_ref.rollout.nnodes=1 actor_rollout_ref.rollout.n_gpus_per_node=1 \
      actor_rollout_ref.rollout.free_cache_engine=false actor_rollout_ref.rollout.checkpoint_engine.backend=nccl
    verl_grpo verl_dp2 0,1 2 False
    report "disaggregated (2 GPUs) against verl data-parallel 2" ours_disaggregated verl_dp2
    $PY benchmarks/compare_runs.py --label "disaggregated against verl on one GPU: " \
      --ours "$OUT/ours_disaggregated.jsonl" --verl "$OUT/verl_gpu1.jsonl" --verl-sequences-per-step $(( BATCH * N ))
  fi
else
  ours ours_gpu0 "$CONFIG" 0 9001 8000 "${NO_VAL[@]}"
  verl_grpo verl_gpu0 0 1 False
  report "one GPU, one after the other" ours_gpu0 verl_gpu0
fi
kill "$SMI" 2>/dev/null
cat "$OUT/rc.txt"
