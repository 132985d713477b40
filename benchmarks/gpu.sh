#!/usr/bin/env bash
# The device script, as run on the GPU machine (see docs/benchmarks.md, "Device script").
#
# Here, first (once per session, on this machine; ~40 MiB, both folders are git-ignored):
#   bash benchmarks/gpu_prepare.sh          # .whl/ (py3.12 wheels the device image lacks), .gpu/cxr-real (Kermany subset)
# Then the device tool's run, with carry [".whl", ".gpu"] and timeout_s 600:
#   bash benchmarks/gpu.sh                  # everything into $OUT: gpu.json, gpu.md, samples.png, pytest.log
# Anywhere, as a sanity run on the CPU:  bash benchmarks/gpu.sh --tiny
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if [ -d .whl ] && ! "$PY" -c "import hydra, optuna" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=.gpu/cxr-real
[ -d ../shared/data/cxr-real ] && DATA=../shared/data/cxr-real
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu.py --out "${OUT:-runs/gpu}" --data-root "$DATA" "$@"
