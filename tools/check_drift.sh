#!/usr/bin/env bash
# Drift check: install the NEWEST releases that requirements.txt / requirements-dev.txt allow into a scratch
# virtual environment (ignoring requirements.lock and any local pip caps) and run the test suite there, so that a
# new release of torch, pandas, pytest, ... that breaks the project is found here before a user meets it.
#   bash tools/check_drift.sh                 # whole default suite; extra arguments go to pytest
#   DRIFT_VENV=/tmp/drift bash tools/check_drift.sh -x tests/test_data.py   # reuse a scratch venv
# Prints the packages whose newest release differs from the lock, then pytest's result. Exit status: pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DRIFT_VENV:-$(mktemp -d)/venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1  # no machine-wide constraints: the newest releases
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet --upgrade --upgrade-strategy eager -r requirements-dev.txt
"$venv/bin/python" - <<'PY'
import re
from importlib.metadata import distributions
from packaging.markers import Marker
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {}  # the lock's pin for THIS interpreter and platform (lines carry environment markers)
for name, version, marker in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)(?:\s*;\s*(.+))?$", open("requirements.lock").read(), re.M):
    if not marker or Marker(marker).evaluate():
        locked[norm(name)] = version
installed = {norm(d.metadata["Name"]): d.version.split("+")[0] for d in distributions()}  # 2.14.1+cu130 is 2.14.1
newer = sorted((n, v, installed[n]) for n, v in locked.items() if n in installed and installed[n] != v)
print(f"{len(newer)} package(s) differ from requirements.lock:" if newer else "the newest releases equal the lock")
for name, old, new in newer:
    print(f"  {name}: {old} -> {new}")
PY
echo "running the suite in $venv"
"$venv/bin/python" -m pytest -q "$@"
