#!/usr/bin/env bash
# The diagnosis behind README "Why a full-size VGG11 student collapses first": 20 steps (one epoch of digits at
# batch 256) of the full-size BN-free VGG11, logging every step with per-layer dynamics, probing before and after.
# One variable changes per run. `--lr 1e-4` is a diagnostic only (it is not the paper's method).
#
#   bash benchmarks/fidelity_diagnose.sh [RUNS_DIR]      # ~5 min per run on one thread; a finished run is skipped
#   python benchmarks/fidelity_report.py --runs runs/diag --prefix diag
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/diag}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
c=(--dataset digits --model vgg11 --epochs 1 --log-every 1 --log-dynamics --probe-every 0 --probe-standardized)
python train_distill.py "${c[@]}" --output-dir "$runs/vgg11-default"
python train_distill.py "${c[@]}" --output-dir "$runs/vgg11-width0.25" --width 0.25
python train_distill.py "${c[@]}" --output-dir "$runs/vgg11-official" --bottleneck official
python train_distill.py "${c[@]}" --output-dir "$runs/vgg11-alpha0" --alpha 0
python train_distill.py "${c[@]}" --output-dir "$runs/vgg11-lr1e-4" --lr 1e-4
