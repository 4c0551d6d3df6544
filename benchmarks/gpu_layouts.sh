#!/usr/bin/env bash
# Colocated on one GPU against disaggregated on two (docs/results.md, "Two GPUs"): the same
# model, data, batch and steps through the launcher, one run after the other on one machine.
# Needs two GPUs and the vLLM install (pip install -e ".[vllm]").
#
#   bash benchmarks/gpu_layouts.sh OUT_DIR MODEL_DIR DATA_DIR [STEPS]
#
# OUT_DIR gets colocated/ and disaggregated/ (a log per service) and prints the median step time
# of each (steps 3 on, verl's timing_s/step) and the speedup.
set -u
OUT=${1:?out dir}; MODEL=${2:?model dir}; DATA=${3:?data dir with train/test.parquet}; STEPS=${4:-20}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
COMMON=(actor_rollout_ref.model.path="$MODEL" data.train_files="$DATA/train.parquet" trainer.total_training_steps="$STEPS")

t0=$(date +%s)
CUDA_VISIBLE_DEVICES=${COLOCATED_GPU:-0} $PY recipe/atropos/launch_atropos_verl_services.py \
  --config recipe/atropos/config/atropos_grpo_smollm2_gpu.yaml --run-dir "$OUT/colocated" \
  "${COMMON[@]}" data.val_files="$DATA/test.parquet" > "$OUT/colocated_console.log" 2>&1
echo "colocated (1 GPU): rc=$? after $(( $(date +%s) - t0 )) s"

t0=$(date +%s)
$PY recipe/atropos/launch_atropos_verl_services.py \
  --config recipe/atropos/config/atropos_grpo_smollm2_disagg_gpu.yaml --run-dir "$OUT/disaggregated" \
  "${COMMON[@]}" > "$OUT/disaggregated_console.log" 2>&1
echo "disaggregated (2 GPUs): rc=$? after $(( $(date +%s) - t0 )) s"

$PY - "$OUT" <<'PY'
import glob, statistics, sys
from recipe.atropos.launcher.metrics_file import read_step_metrics

medians = {}
for layout in ("colocated", "disaggregated"):
    files = glob.glob(f"{sys.argv[1]}/{layout}/metrics.jsonl")
    steps = read_step_metrics(files[0]) if files else {}
    times = [m["timing_s/step"] for s, m in sorted(steps.items()) if s >= 3 and "timing_s/step" in m]
    lags = [m.get("atropos/policy_lag_steps", float("nan")) for m in steps.values()]
    if not times:
        print(f"{layout}: no step metrics found")
        continue
    medians[layout] = statistics.median(times)
    print(f"{layout}: {len(steps)} steps, median step {medians[layout]:.2f} s (steps 3-{max(steps)}), "
          f"mean policy lag {statistics.fmean(lags):.2f}")
if len(medians) == 2:
    print(f"speedup colocated / disaggregated: {medians['colocated'] / medians['disaggregated']:.2f}x")
PY
