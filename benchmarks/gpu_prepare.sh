#!/usr/bin/env bash
# Prepares what the device machine lacks (it has torch, timm, scipy, sklearn, pandas; no network):
#   .whl/            py3.12 manylinux wheels of hydra-core, omegaconf, antlr4 runtime, optuna (+ sqlalchemy, alembic,
#                    colorlog, mako, greenlet), pytorch-fid. Ray's wheel (~80 MB) is over the 64 MiB a call may carry:
#                    the device script runs with runtime=inline and skips the Ray GPU test there.
#   .gpu/cxr-real/   every second Kermany image of ../shared/data/cxr-real with its labels.csv rows (~30 MB).
# Both are git-ignored; name them in the device run's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl greenlet \
  $("$PY" - <<'PYEOF'
from importlib.metadata import version
# the versions this checkout's tests run on
print(" ".join(f"{n}=={version(n)}" for n in ("hydra-core", "omegaconf", "optuna", "sqlalchemy", "alembic",
                                             "colorlog", "mako", "pytorch-fid")))
PYEOF
)
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
SRC=${SHARED:-../shared}/data/cxr-real
rm -rf .gpu/cxr-real && mkdir -p .gpu/cxr-real
"$PY" - "$SRC" .gpu/cxr-real <<'PYEOF'
import shutil, sys
from pathlib import Path
import pandas as pd
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
df = pd.read_csv(src / "labels.csv")
col = "file" if "file" in df.columns else df.columns[0]
rows = df[df[col].astype(str).str.startswith("images/kermany_pneumonia/")].iloc[::2]
for f in rows[col]:
    (dst / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / f, dst / f)
rows.to_csv(dst / "labels.csv", index=False)
print(f"{len(rows)} Kermany images -> {dst}")
PYEOF
du -sh .whl .gpu
