#!/usr/bin/env bash
# Regenerates requirements.lock, the exact environment README installs and CI tests, from the ranges in
# requirements.txt and requirements-dev.txt. One file for Linux, macOS and Windows (--universal), Python 3.11+.
# Needs uv (`pip install uv`). Review the diff, then run the test suite before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile requirements-dev.txt --universal --python-version 3.11 \
  --constraint tools/lock-constraints.txt --no-header --quiet --output-file requirements.lock
{ printf '# Exact versions README installs and CI tests. Regenerate with: bash tools/lock.sh\n'; cat requirements.lock; } > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pinned packages)"
