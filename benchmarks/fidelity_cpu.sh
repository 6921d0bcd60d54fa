#!/usr/bin/env bash
# The CPU fidelity runs behind README "Does it reproduce the paper?": the paper's method (train_distill.py
# defaults: AdamW lr 1e-3, CE, tau 1, alpha 1e-10, weight-normalised head, out-dim 65536) on the built-in
# datasets, at the CPU-scale proxy --width 0.25 --batch-size 64 (same learning rate), fp32.
#
#   bash benchmarks/fidelity_cpu.sh resnet18 [RUNS_DIR]     # queue A: the ResNet18 runs, one after another
#   bash benchmarks/fidelity_cpu.sh vgg11 [RUNS_DIR]        # queue B: the VGG11 runs
#
# Each queue uses one thread, so the two fit side by side on 2 cores. A finished run is skipped and an
# interrupted one resumes from its checkpoint (train_distill.py's own rules), so rerunning a queue after a
# stop continues where it was. Order = priority: the main runs first, then the variants (8 epochs; a variant run for longer is compared at epoch 8 all the same).
# 79 steps per epoch (5,000 images at batch 64): 38 epochs = 3,002 steps, 25 = 1,975, 8 = 632 (the variants: compared with the main run at epoch 8).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-}
case "$model" in resnet18|vgg11) ;; *) echo "usage: fidelity_cpu.sh resnet18|vgg11 [RUNS_DIR]" >&2; exit 2;; esac
runs=${2:-runs/fidelity}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
common=(--model "$model" --width 0.25 --batch-size 64 --probe-every 2 --probe-standardized --checkpoint-every 2
        --keep-checkpoints 1 --log-every 25)

distil() {  # distil NAME EPOCHS EXTRA_FLAGS...
  local name=$1 epochs=$2
  shift 2
  echo "== $(date -u +%H:%M:%S) $model $name"
  python train_distill.py "${common[@]}" --epochs "$epochs" --output-dir "$runs/$model-$name" "$@"
}

distil photos 38 --dataset photos --log-dynamics
distil digits 25 --dataset digits --log-dynamics
if [ "$model" = vgg11 ]; then  # Fig. 4: locality alpha (the main run is alpha 1e-10)
  for a in 0 1 0.01 0.1 0.5; do distil "photos-alpha$a" 8 --dataset photos --alpha "$a"; done
else  # Fig. 5 (noise inputs), the official head and the official weight-decay quirk
  distil photos-noise 8 --dataset photos --input-noise
  distil photos-official 8 --dataset photos --bottleneck official
  distil photos-official-wd 8 --dataset photos --bottleneck official --bias-weight-decay 0.01
fi
echo "== $(date -u +%H:%M:%S) $model queue done"
