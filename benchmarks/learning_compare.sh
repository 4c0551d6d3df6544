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
. benchmarks/common.sh
read_sizes atropos_grpo_qwen05b_gpu
echo "batch $BATCH x n $N, $PLEN/$RLEN tokens, lr $LR, mini-batch $MINI, $STEPS steps, $GPUS GPU(s)"

SMI=$(memlog "$OUT/gpumem.csv")
date +%s > "$OUT/t0.txt"
if [ "$GPUS" -ge 2 ]; then
  ours ours_gsm8k atropos_grpo_qwen05b_gpu 0 9001 8000 trainer.test_freq="$STEPS" &
  verl_grpo verl_grpo 1 1 True &
  if [ "${WITH_CREDIT:-1}" = 1 ]; then
    sleep "${CREDIT_DELAY_S:-100}"
    ours ours_credit atropos_grpo_qwen05b_credit_gpu 0 9011 8010 trainer.test_freq="$STEPS" &
  fi
  wait
else
  ours ours_gsm8k atropos_grpo_qwen05b_gpu 0 9001 8000 trainer.test_freq="$STEPS"
  verl_grpo verl_grpo 0 1 True
  [ "${WITH_CREDIT:-1}" = 1 ] && ours ours_credit atropos_grpo_qwen05b_credit_gpu 0 9011 8010 trainer.test_freq="$STEPS"
fi
kill "$SMI" 2>/dev/null
cat "$OUT/rc.txt"
