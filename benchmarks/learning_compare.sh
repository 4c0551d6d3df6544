#!/usr/bin/env bash
# The learning runs of docs/results.md: Qwen2.5-Coder-0.5B-Instruct on GSM8K, trained
#   (1) by this project's launcher with the plain gsm8k environment (atropos_grpo_qwen05b_gpu.yaml),
#   (2) by verl's own GRPO (verl.trainer.main_ppo, legacy trainer) with the same model, data, batch,
#       n, lengths, learning rate and vLLM settings, validating before and after,
#   (3) by the launcher with the token-level credit environment (atropos_grpo_qwen05b_credit_gpu.yaml).
# All three start together, a little apart so that no two vLLM engines on one GPU profile memory at
# the same moment: with two GPUs (1) and (3) on GPU 0 and (2) on GPU 1; with one GPU all three on
# it, each engine's gpu_memory_utilization lowered to SHARED_GPU_MEMORY (0.15) and micro-batches to 8
# (memory only: the same samples and optimizer steps). Sharing a GPU makes
# every step slower, not different: these runs compare scores per step, not step times
# (benchmarks/gpu_compare.sh measures those, one run per GPU). Held-out accuracy: verl's run
# validates before training, every run every VAL_EVERY steps (default: at the last step).
# Every run writes its metrics as JSONL (verl's file tracker) to OUT_DIR/NAME.jsonl;
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
. benchmarks/common.sh
read_sizes atropos_grpo_qwen05b_gpu
echo "batch $BATCH x n $N, $PLEN/$RLEN tokens, lr $LR, mini-batch $MINI, $STEPS steps, $GPUS GPU(s)"

VAL_EVERY=${VAL_EVERY:-$STEPS}
SMI=$(memlog "$OUT/gpumem.csv")
date +%s > "$OUT/t0.txt"
DELAY=${START_GAP_S:-100}  # seconds between the first and the last start
if [ "$GPUS" -ge 2 ]; then
  VERL_GPU=1
else
  # three trainers on one card: smaller vLLM pools, and micro-batches of 8, whose logits
  # (8 x 832 tokens x 151,936 vocabulary in fp32, 4 GiB) leave room for the other two
  VERL_GPU=0 MEM=${SHARED_GPU_MEMORY:-0.15} MICRO=8 LPMICRO=8
  echo "one GPU: the three runs share it, gpu_memory_utilization $MEM and micro-batches of 8 each"
fi
SIZES=(actor_rollout_ref.rollout.gpu_memory_utilization="$MEM" actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu="$MICRO"
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu="$LPMICRO" actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu="$LPMICRO")
ours ours_gsm8k atropos_grpo_qwen05b_gpu 0 9001 8000 trainer.test_freq="$VAL_EVERY" "${SIZES[@]}" &
[ "$VERL_GPU" = 0 ] && sleep $(( DELAY / 2 ))
verl_grpo verl_grpo "$VERL_GPU" 1 True &
if [ "${WITH_CREDIT:-1}" = 1 ]; then
  sleep $(( VERL_GPU == 0 ? DELAY / 2 : DELAY ))
  ours ours_credit atropos_grpo_qwen05b_credit_gpu 0 9011 8010 trainer.test_freq="$VAL_EVERY" "${SIZES[@]}" &
fi
wait
kill "$SMI" 2>/dev/null
cat "$OUT/rc.txt"
