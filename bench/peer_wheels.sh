#!/usr/bin/env bash
# Download the pure-Python wheels TRL's PPO peer needs on a GPU box whose image has torch,
# transformers, accelerate, pyarrow and pandas but not trl or datasets (Python 3.12 there).
# Usage: bash bench/peer_wheels.sh [DIR]   (default .whl); then, on the GPU box:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
dir=${1:-.whl}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "trl==1.10.0" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
ls "$dir"
