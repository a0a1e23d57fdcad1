#!/usr/bin/env bash
# The one prepared GPU check: rollouts, PPO and pretraining throughput, each against a peer
# measured in the same run, written as JSON into OUT_DIR (plus a log per benchmark).
#
#   bash bench/gpu_check.sh OUT_DIR          # on a CUDA machine, under 8 minutes on an H100/H200
#   bash bench/gpu_check.sh OUT_DIR --cpu    # smoke mode: tiny shapes on CPU, to test this script
#
# It uses whatever python has torch (PYTHON=... to choose) and imports scalelab from this
# checkout, so nothing needs installing. Peers (transformers, trl) are optional: a missing one
# is recorded in the JSON as unavailable, with the reason.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--cpu]}
mode=${2:-}
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Peer wheels (bench/peer_wheels.sh) travel in .whl where the GPU image lacks them.
if ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/peer-site"
fi
if [ "$mode" = "--cpu" ]; then
  args=(--device cpu --smoke); limit=300
else
  args=(--device cuda); limit=${BENCH_LIMIT:-170}
fi

$py - "$out/env.json" <<'PY'
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0)
        if torch.cuda.is_available() else platform.processor() or "cpu"}
for name in ("transformers", "trl", "tokenizers", "safetensors"):
    try:
        info[name] = __import__(name).__version__
    except Exception as e:  # recorded, not fatal: peers are optional
        info[name] = f"unavailable: {type(e).__name__}: {e}"[:200]
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PY

status=0
for bench in ${BENCHES:-ppo train generate}; do
  echo "== $bench ($(date +%T))"
  timeout "$limit" $py "bench/${bench}_throughput.py" "${args[@]}" --json "$out/$bench.json" \
    > "$out/$bench.log" 2>&1
  rc=$?
  tail -n 15 "$out/$bench.log"
  [ $rc -ne 0 ] && { echo "!! $bench exited $rc"; status=1; }
done

# One summary table from the JSON files (each bench writes {"rows": [{name, value, unit,
# peer, peer_value, ratio}, ...]}).
$py - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"\n{'benchmark':<46} {'scalelab':>12} {'peer':>12} {'ratio':>7}")
for f in sorted(out.glob("*.json")):
    if f.name == "env.json":
        continue
    data = json.loads(f.read_text())
    if "rows" not in data:  # a bench without the row format: show its JSON as it is
        print(f.stem, json.dumps(data)[:1500])
    for r in data.get("rows", []):
        val, peer, ratio = (r.get(k) for k in ("value", "peer_value", "ratio"))
        num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(f"{r['name'][:46]:<46} {num(val, '.4g'):>12} {num(peer, '.4g'):>12} "
              f"{num(ratio, '.2f'):>7}  {r.get('unit', '')}  [{r.get('peer', '')}]")
PY
exit $status
