#!/usr/bin/env bash
# The portable GPU check (README "GPUs"): on a GPU machine with Python, torch + torchvision and no
# network, from the kit `make gpu-kit` built (copied over whole):
#
#     bash KIT/project/scripts/gpu_check.sh [OUT.json]      # PYTHON=... picks the interpreter (python3)
#
# Installs the kit's wheels into a temporary folder (pip --no-index --no-deps --target: nothing
# outside it changes), checks that side4video imports there (DALI may be absent), then runs
# scripts/gpu_check.py: the GPU tests that need no DALI and `bench vite` case c on the GPU with and
# without offload_param, all into one JSON (default ./gpu_check.json). Exit 2 where torch sees no GPU.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kit=$(cd "$here/../.." && pwd)
out=$(realpath -m "${1:-gpu_check.json}")
py=${PYTHON:-python3}
[ -d "$kit/wheels" ] || { echo "gpu_check: no wheels/ in $kit (run it from a kit built by make gpu-kit)"; exit 2; }
work=$(mktemp -d "${TMPDIR:-/tmp}/side4video-gpu-check.XXXXXX")
start=$(date +%s)
"$py" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$work/site" "$kit"/wheels/*.whl
cp -r "$kit/project" "$work/project"
echo "gpu_check: kit installed into $work/site in $(( $(date +%s) - start )) s"
export PYTHONPATH="$work/site:$work/project" PATH="$work/site/bin:$PATH" PYTHONDONTWRITEBYTECODE=1
cd "$work/project"
exec "$py" scripts/gpu_check.py --out "$out" --kit "$kit"
