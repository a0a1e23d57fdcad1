#!/usr/bin/env bash
# Set up scalelab in ./.venv (idempotent). Uses a torch that is already installed, else a torch
# wheel lying in a local wheel folder (pip's find-links, e.g. a CPU build), else lets pip pick
# the newest release for this platform. Nothing pins you to one torch version.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
if ! $py -c "import torch" 2>/dev/null; then
  # A local wheel first: an unpinned `pip install torch` may pull a multi-GB CUDA build even
  # on a machine without a GPU.
  wheel=""
  for dir in ${PIP_FIND_LINKS:-} $(pip config get global.find-links 2>/dev/null || true); do
    [ -d "$dir" ] && wheel=$(ls "$dir"/torch-*.whl 2>/dev/null | sort -V | tail -1) && [ -n "$wheel" ] && break
  done
  if [ -n "$wheel" ]; then $py -m pip install -q "$wheel"; else $py -m pip install -q torch; fi
fi
$py -m pip install -q -e ".[dev]"
# A wheel install puts scalelab_lmeval.pth in site-packages (setup.py); an editable one does
# not, so it is copied here: it lets lm-eval's own `lm_eval --model scalelab` find scalelab.
cp scalelab_lmeval.pth "$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
echo "scalelab installed in .venv (torch $($py -c 'import torch; print(torch.__version__)'))"
