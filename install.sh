#!/usr/bin/env bash
# Set up scalelab in ./.venv (idempotent). Uses a torch that is already installed or lies in
# a local wheel folder (pip's find-links) if there is one; otherwise pip picks the newest
# release for this platform. Nothing pins you to one torch version.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip
if ! $py -c "import torch" 2>/dev/null; then
  $py -m pip install -q --no-index torch 2>/dev/null || $py -m pip install -q torch
fi
$py -m pip install -q -e ".[dev]"
echo "scalelab installed in .venv (torch $($py -c 'import torch; print(torch.__version__)'))"
