#!/usr/bin/env bash
# On a lent GPU machine: install the wheels carried in .whl/ (made here by scripts/gpu_wheels.sh) the way
# /work/.library/device/README.md says, check the imports, then run scripts/gpu_check.py with its results under OUT_DIR.
#   bash scripts/gpu_check.sh OUT_DIR [gpu_check.py options]       e.g. bash scripts/gpu_check.sh $OUT --profile
#   (all parts a-f, 490 s budget: run it with timeout_s 560), or   bash scripts/gpu_check.sh $OUT --parts c --budget 100
# PYTHON picks the interpreter (default python3: the one that holds torch there). docs/gpu_check.md has the whole call.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [gpu_check.py options]}
shift
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check.sh: installing .whl/*.whl failed" >&2; exit 3; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, lightning, hydra, omegaconf, diffusers; print('gpu_check.sh: torch', torch.__version__, \
'lightning', lightning.__version__, 'hydra', hydra.__version__, 'diffusers', diffusers.__version__, 'GPU', \
torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
  || { echo "gpu_check.sh: a package is missing (carry .whl: bash scripts/gpu_wheels.sh here)" >&2; exit 4; }
exec "$PY" scripts/gpu_check.py --out "$out" "$@"
