#!/bin/bash
# Issue 32: the whole GPU test suite at .head (today's changes: routing statistics on the device, the pinned batch copy).
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cut -c1-60 COMMIT
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu -rs --durations=8 2>&1 | tail -30 | cut -c1-220
echo "== end at ${SECONDS}s"
