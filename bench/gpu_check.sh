#!/usr/bin/env bash
# fedtt's GPU check in one command (issue 31; what it runs and compares: bench/gpu_check.py).
#
#   bench/gpu_check.sh [--out DIR]             on a machine with one CUDA GPU: under 8 minutes
#   bench/gpu_check.sh --dry-run [--out DIR]   here: the same steps, tiny, on the CPU, with .venv
#
# Needs .gpu-assets/ (wheels and model files; build it here with `.venv/bin/python bench/gpu_assets.py` and
# carry it). On the GPU machine the image's python3 (CUDA torch) is used as it is: the carried wheels go to a
# temporary --target folder without dependency resolution, so nothing is downloaded and torch is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
assets=$PWD/.gpu-assets
if [[ ! -d $assets/wheels || ! -d $assets/site ]]; then
    echo "no $assets: build it with .venv/bin/python bench/gpu_assets.py" >&2
    exit 2
fi
python=python3
if [[ " $* " == *" --dry-run "* ]]; then
    python=.venv/bin/python
else
    site=$(mktemp -d)
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$assets"/wheels/*.whl
    export PYTHONPATH=$site
fi
# The checkout's fedtt and the stand-in model and data packages come first.
export PYTHONPATH=$PWD/src:$assets/site${PYTHONPATH:+:$PYTHONPATH}
# A fresh cache: the 2-layer SmolLM2 converted here must never replace a full one in the user's cache.
FEDTT_CACHE=$(mktemp -d)
export FEDTT_CACHE HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 \
       FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
       RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
trap 'rm -rf "$FEDTT_CACHE" ${site:+"$site"}' EXIT
"$python" bench/gpu_check.py "$@"
