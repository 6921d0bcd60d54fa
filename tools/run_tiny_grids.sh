#!/usr/bin/env bash
# Every grid's --tiny version, end to end on this machine, then its report, copied into docs/tiny/<grid>/ (the
# report.md, report.csv and figures that docs/tiny_grids.md shows). Resumable: rerun it and finished points are
# skipped. About 2 h on 2 CPU cores.
#   bash tools/run_tiny_grids.sh                  # run folders in runs/reproduce
#   bash tools/run_tiny_grids.sh /scratch/runs    # elsewhere
#   bash tools/run_tiny_grids.sh runs/reproduce fig4 table1   # only these grids
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/reproduce}
shift || true
grids=("$@")
if [ ${#grids[@]} -eq 0 ]; then
  for file in accelerate_configs/experiments/*.yaml; do grids+=("$(basename "$file" .yaml)"); done
fi
for grid in "${grids[@]}"; do
  echo "== $grid"
  python reproduce.py run "$grid" --tiny --runs "$runs"
  python reproduce.py report "$grid" --tiny --runs "$runs"
  mkdir -p "docs/tiny/$grid"
  # the report and its figures (consuming grids draw one figure per point, named after it, beside report.md)
  find "$runs/$grid-tiny" -maxdepth 1 -type f -exec cp {} "docs/tiny/$grid/" \;
done
