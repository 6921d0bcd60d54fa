#!/usr/bin/env bash
# Full width on 2 CPU cores (docs/fidelity.md, "Full width on a CPU"): the paper's networks (--width 1: ResNet18,
# and VGG11 without batch norm) with the paper's method in fp32 at batch 64 (the paper's learning rate), 26 epochs
# = 2,054 steps each on the built-in photos and digits, probed every 2 epochs with raw and standardised features,
# a checkpoint every epoch. One run after another, VGG11 first (whether it recovers from its early collapse is the
# open question); a rerun skips finished runs and resumes an interrupted one from its checkpoint, so the queue
# survives interruptions (rerun into the same RUNS). Then: python benchmarks/fidelity_report.py --runs RUNS --prefix fullwidth
#   bash benchmarks/fidelity_fullwidth.sh [RUNS [DATASET:MODEL ...]]   # default RUNS: runs/fullwidth, all four
# Naming runs lets two or three queues share the cores, e.g. one per run with OMP_NUM_THREADS=1 each.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/fullwidth}
specs=("${@:2}")
[ ${#specs[@]} -gt 0 ] || specs=(photos:vgg11 digits:vgg11 photos:resnet18 digits:resnet18)
for spec in "${specs[@]}"; do
  dataset=${spec%%:*}
  model=${spec##*:}
  echo "== $(date -u +%H:%M:%S) $dataset $model"
  python train_distill.py --dataset "$dataset" --model "$model" --batch-size 64 --epochs 26 --probe-every 2 \
    --probe-standardized --checkpoint-every 1 --output-dir "$runs/$model-$dataset"
done
