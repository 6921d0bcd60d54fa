#!/usr/bin/env bash
# All of this project's GPU work, in one script that fits about 8 minutes on one H200. A session that is lent a
# GPU runs it once (device tool: `bash benchmarks/gpu_session.sh`, timeout 540 s) and records the figures in
# README ("Does it reproduce the paper?", "Speed") and in its issue note.
#
# 1. The fidelity runs at full size: the paper's method (train_distill.py defaults, fp32, batch 256) for ResNet18
#    and VGG11 on the built-in digits and photos, 500 epochs = 10,000 steps each, probed every 25 epochs, all
#    four side by side on the one GPU. Each is capped at $RUN_SECONDS of wall clock: at the cap SIGTERM makes
#    it checkpoint and stop, and its metrics.csv keeps every probe so far (rerunning the script resumes them).
#    Beside them, two short ResNet18 digits runs (alpha 1e-10 and 1, $LAND_EPOCHS = 10 epochs) for the landscape.
# 2. landscape.py on the plane teacher / alpha = 1e-10 student / alpha = 1 student (Fig. 6, right) of the short
#    runs: an 11 x 11 grid on all 6,000 digits images, fp32 (TF32 off), capped at $LANDSCAPE_SECONDS; its
#    landscape.json has the measured seconds per grid point, from which README derives the full-scale cost.
# 3. benchmarks/bench_gpu.py for ResNet18 and VGG11 (images/s, TFLOP/s and % of peak per precision).
# Everything that comes back is packed into $OUT/gpu_session.tar.gz (plus the two text logs beside it).
#
# Smoke test on a CPU (seconds; checks the script, measures nothing):
#   EPOCHS=1 RUN_SECONDS=120 EXTRA="--width 0.125 --train-subset 128 --hidden-dims 32 --bottleneck-dim 8
#   --out-dim 64 --batch-size 64" BENCH="--allow-cpu --steps 1 --repeats 1 --warmup 1 --batch-size 8" \
#   LANDSCAPE="--resolution 3 --train-images 64 --test-images 32" bash benchmarks/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-runs/gpu-session}
runs=${RUNS:-runs/gpu}
epochs=${EPOCHS:-500}
mkdir -p "$out" "$runs"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # the device image names its torch interpreter python3; it has no `datasets` (not needed here)
read -r -a extra <<< "${EXTRA:-}"
read -r -a bench <<< "${BENCH:-}"
read -r -a land <<< "${LANDSCAPE:-}"
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
# The landscape's two trained points: short full-size ResNet18 runs on digits (alpha 1e-10 and 1, one teacher)
# that finish within the cap, so they have a student/ (the capped 500-epoch runs above stop at a checkpoint).
for alpha in 1e-10 1; do
  timeout -s TERM -k 30 "${RUN_SECONDS:-330}" "$py" train_distill.py --model resnet18 --dataset digits \
    --alpha "$alpha" --epochs "${LAND_EPOCHS:-10}" --probe-every 0 --checkpoint-every 0 \
    --output-dir "$runs/land-a$alpha" "${extra[@]}" > "$runs/land-a$alpha.log" 2>&1 &
done
wait
echo "fidelity runs: $(( $(date +%s) - start )) s" >> "$out/session.txt"

if [ -d "$runs/land-a1e-10/student" ] && [ -d "$runs/land-a1/student" ]; then
  timeout -s TERM -k 30 "${LANDSCAPE_SECONDS:-120}" "$py" landscape.py --resolution 11 \
    --points "$runs/land-a1e-10:teacher" "$runs/land-a1e-10:student" "$runs/land-a1:student" \
    --output-dir "$runs/landscape-digits" "${land[@]}" > "$runs/landscape-digits.log" 2>&1
  echo "landscape: exit $?, $(( $(date +%s) - start )) s" >> "$out/session.txt"
else
  echo "landscape: skipped (a short digits run did not finish within the cap)" >> "$out/session.txt"
fi

"$py" benchmarks/bench_gpu.py --models resnet18 vgg11 "${bench[@]}" > "$out/bench_gpu.txt" 2>&1
echo "total: $(( $(date +%s) - start )) s" >> "$out/session.txt"
tail -n 3 "$runs"/*.log >> "$out/session.txt" 2>/dev/null
shopt -s nullglob
results=("$runs"/*.log "$runs"/*/{metrics.csv,summary.json,config.json,probe_table.csv,probe_accuracy.png,landscape.csv,landscape.json,landscape.png})
tar czf "$out/gpu_session.tar.gz" "${results[@]}"
cat "$out/session.txt" "$out/bench_gpu.txt"
