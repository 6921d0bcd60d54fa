#!/usr/bin/env bash
# All of this project's GPU work, in one script that fits about 8 minutes on one H200. A session that is lent a
# GPU runs it once (device tool: `bash benchmarks/gpu_session.sh`, timeout 540 s) and records the figures in
# README ("Does it reproduce the paper?", "Speed") and in its issue note.
#
# 1. The fidelity runs at full size: the paper's method (train_distill.py defaults, fp32, batch 256) for ResNet18
#    and VGG11 on the built-in digits and photos, 500 epochs = 10,000 steps each, probed every 25 epochs, all
#    four side by side on the one GPU. Each is capped at $RUN_SECONDS of wall clock: at the cap SIGTERM makes
#    it checkpoint and stop, and its metrics.csv keeps every probe so far (rerunning the script resumes them).
# 2. benchmarks/bench_gpu.py for ResNet18 and VGG11 (images/s, TFLOP/s and % of peak per precision).
# Everything that comes back is packed into $OUT/gpu_session.tar.gz (plus the two text logs beside it).
#
# Smoke test on a CPU (seconds; checks the script, measures nothing):
#   EPOCHS=1 RUN_SECONDS=120 EXTRA="--width 0.125 --train-subset 128 --hidden-dims 32 --bottleneck-dim 8
#   --out-dim 64 --batch-size 64" BENCH="--allow-cpu --steps 1 --repeats 1 --warmup 1 --batch-size 8" \
#   bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu-session}
runs=${RUNS:-runs/gpu}
epochs=${EPOCHS:-500}
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # the device image names its torch interpreter python3; it has no `datasets` (not needed here)
read -r -a extra <<< "${EXTRA:-}"
read -r -a bench <<< "${BENCH:-}"
(nvidia-smi || true) > "$out/session.txt" 2>&1
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$out/session.txt" 2>&1
start=$(date +%s)

for model in resnet18 vgg11; do
  for dataset in digits photos; do
    name=$model-$dataset
    timeout -s TERM -k 30 "${RUN_SECONDS:-330}" "$py" train_distill.py --model "$model" --dataset "$dataset" \
      --epochs "$epochs" --probe-every 25 --probe-standardized --log-every 50 --log-dynamics --checkpoint-every 0 \
      --output-dir "$runs/$name" "${extra[@]}" > "$runs/$name.log" 2>&1 &
  done
done
wait
echo "fidelity runs: $(( $(date +%s) - start )) s" >> "$out/session.txt"

"$py" benchmarks/bench_gpu.py --models resnet18 vgg11 "${bench[@]}" > "$out/bench_gpu.txt" 2>&1
echo "total: $(( $(date +%s) - start )) s" >> "$out/session.txt"
tail -n 3 "$runs"/*.log >> "$out/session.txt" 2>/dev/null
tar czf "$out/gpu_session.tar.gz" "$runs"/*.log $(ls "$runs"/*/{metrics.csv,summary.json,config.json,probe_table.csv,probe_accuracy.png} 2>/dev/null)
cat "$out/session.txt" "$out/bench_gpu.txt"
