#!/usr/bin/env bash
# Figs. 9 and 10 at a CPU scale on the built-in photos (docs/imp_lmc.md, "Photos at a CPU scale"): two α = 0
# ResNet18 students at quarter width (--repeat 0 and 1: each with its own random teacher, 632 AdamW steps),
# then the supervised recipe of imp.py / lmc.py with every round shortened to E epochs, where E is where the
# dense network plateaus. Run the stages in order; each is resumable (a rerun skips what finished and continues
# what was interrupted), so the study survives interruptions. The two students, Fig. 9's two arms and
# Fig. 10's two starts are independent runs: they go side by side, each with half the cores (OMP_NUM_THREADS
# overrides), each logging to a .log file beside its folder.
#   bash benchmarks/lottery_photos.sh RUNS students        # the two students
#   bash benchmarks/lottery_photos.sh RUNS plateau [E ...]  # dense round 0 from θ_S at E epochs (default 10 20 40);
#                                                           # E = the first whose doubling gains < 1 point
#   bash benchmarks/lottery_photos.sh RUNS fig10 E         # LMC: 2 students x 3 data orders per start
#   bash benchmarks/lottery_photos.sh RUNS fig9 E          # IMP: 8 rounds (16.8 % of the weights), student and init l = 0
# fig9 E continues the plateau run at E epochs (same student and recipe, so the same fingerprint and folder).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:?usage: lottery_photos.sh RUNS students|plateau [E ...]|fig10 E|fig9 E}
stage=${2:?name a stage: students, plateau, fig10 or fig9}
epochs=${3:-}
case $stage in
  students|plateau|fig9|fig10) ;;
  *) echo "lottery_photos.sh: unknown stage '$stage' (students, plateau, fig10 or fig9)" >&2; exit 2 ;;
esac
if [[ $stage == fig9 || $stage == fig10 ]] && ! [[ $epochs =~ ^[1-9][0-9]*$ ]]; then
  echo "lottery_photos.sh: $stage needs E, the epochs of every round or copy (a positive integer), got '$epochs'" >&2
  exit 2
fi
students=("$runs/student-r0" "$runs/student-r1")
mkdir -p "$runs"
half=${OMP_NUM_THREADS:-$(( $(nproc) > 1 ? $(nproc) / 2 : 1 ))}
pids=()
logs=()
finish() {  # wait for the side-by-side runs; the stage fails, with the failing run's last line, if one of them did
  local i
  for i in "${!pids[@]}"; do  # the last line that is not a progress bar's redraw (tqdm ends those with \r)
    wait "${pids[$i]}" || { echo "failed: $(tr '\r' '\n' < "${logs[$i]}" | grep -v '^ *$' | tail -n 1)" \
                                 "(log: ${logs[$i]})" >&2
                            kill "${pids[@]}" 2>/dev/null; exit 1; }  # the other run checkpoints on SIGTERM
  done
}
case $stage in
  students)
    for r in 0 1; do
      echo "student $r: log ${students[$r]}.log"
      OMP_NUM_THREADS=$half python train_distill.py --dataset photos --model resnet18 --width 0.25 --batch-size 64 \
        --epochs 8 --alpha 0 --repeat "$r" --probe-every 4 --probe-standardized --checkpoint-every 1 \
        --output-dir "${students[$r]}" > "${students[$r]}.log" 2>&1 &
      pids+=($!) logs+=("${students[$r]}.log")
    done
    finish ;;
  plateau)
    [ $# -gt 2 ] || set -- "$1" "$2" 10 20 40
    for e in "${@:3}"; do
      python imp.py --student "${students[0]}" --dense-only --starts init --rewind-epochs 0 --epochs "$e" \
        --output-dir "$runs/imp-e$e"
    done ;;
  fig9)  # each start has its own subfolder, so the two arms share the output folder (as imp_array.sbatch's jobs do)
    for start in student init; do
      echo "arm $start, l = 0: log $runs/imp-e$epochs-$start.log"
      OMP_NUM_THREADS=$half python imp.py --student "${students[0]}" --starts "$start" --rewind-epochs 0 --rounds 8 \
        --epochs "$epochs" --output-dir "$runs/imp-e$epochs" > "$runs/imp-e$epochs-$start.log" 2>&1 &
      pids+=($!) logs+=("$runs/imp-e$epochs-$start.log")
    done
    finish
    python imp.py --report-only --output-dir "$runs/imp-e$epochs" ;;
  fig10)  # the two starts side by side into the one folder (each start's copies have their own subfolders), then
          # one pass over both starts: it finds every copy finished and interpolates all the pairs into the tables
    for start in student init; do
      echo "start $start: log $runs/lmc-e$epochs-$start.log"
      OMP_NUM_THREADS=$half python lmc.py --student "${students[@]}" --starts "$start" --copies 3 --epochs "$epochs" \
        --output-dir "$runs/lmc-e$epochs" > "$runs/lmc-e$epochs-$start.log" 2>&1 &
      pids+=($!) logs+=("$runs/lmc-e$epochs-$start.log")
    done
    finish
    python lmc.py --student "${students[@]}" --copies 3 --epochs "$epochs" --output-dir "$runs/lmc-e$epochs" ;;
esac
