#!/usr/bin/env bash
# The Python wheels a lent GPU machine lacks for scripts/gpu_check.py, downloaded into .whl/ (git-ignored) to travel
# there with `carry: [".whl"]` (docs/gpu_check.md). That machine has torch 2.11, lightning 2.6.6, torchmetrics,
# numpy, PyYAML, rich, matplotlib, scikit-learn, safetensors, huggingface-hub, requests, regex, filelock, pillow and
# zipp (the package list in /work/.library/device/KINDS.md), but not these:
#   hydra-core, omegaconf, antlr4-python3-runtime   gencli composes its configs with Hydra (omegaconf 2.3 pins antlr 4.9.*)
#   diffusers, importlib-metadata                   the peer loop (scripts/peers/peer_diffusers.py); diffusers 0.35.2 as
#                                                   in issue 14's measurement; importlib-metadata is its one missing need
# Everything else gencli imports on that path is there (scripts/gpu_check.py's docstring and docs/gpu_check.md say
# how that was checked). Hydra's plugin scan also finds gencli's own Optuna sweeper (src/hydra_plugins), whose
# import of optuna fails there: Hydra only warns, and no check part uses a sweeper, so optuna stays behind.
#
#   bash scripts/gpu_wheels.sh        # then: du -sh .whl (about 4 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
WHEELS=(
  hydra-core==1.3.8
  omegaconf==2.3.1
  antlr4-python3-runtime==4.9.3
  diffusers==0.35.2
  importlib-metadata==9.1.0
)
git check-ignore -q .whl/x || { echo ".whl/ is not git-ignored: add /.whl/ to .gitignore first" >&2; exit 1; }
mkdir -p .whl
# antlr4-python3-runtime 4.9.3 exists only as a source archive: build its (pure-Python) wheel here
if ! ls .whl/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1; then
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl antlr4-python3-runtime==4.9.3 \
    || "$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
fi
for w in "${WHEELS[@]}"; do
  [[ $w == antlr4-python3-runtime==* ]] && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$w"
done
# one version of each: two wheels of one package stop the whole install there
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[[ -z $dupes ]] || { echo "more than one wheel of: $dupes (remove the old ones from .whl/)" >&2; exit 1; }
ls -l .whl/
du -ch .whl/*.whl | tail -1
