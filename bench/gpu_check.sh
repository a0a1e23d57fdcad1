#!/usr/bin/env bash
# The one prepared GPU check: rollouts, PPO and pretraining throughput, each against a peer
# measured in the same run, written as JSON into OUT_DIR (plus a log per benchmark).
#
#   bash bench/gpu_check.sh OUT_DIR          # on a CUDA machine, under 8 minutes on an H100/H200
#   bash bench/gpu_check.sh OUT_DIR --cpu    # smoke mode: tiny shapes on CPU, to test this script
#   bash bench/gpu_check.sh OUT_DIR --experiments   # only the experiments below (10-18 min)
#   BENCHES="generate ppo" bash bench/gpu_check.sh OUT_DIR   # only these runs
#
# It uses whatever python has torch (PYTHON=... to choose) and imports scalelab from this
# checkout, so nothing needs installing. Peers (transformers, trl) are optional: a missing one
# is recorded in the JSON as unavailable, with the reason.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--cpu] [--experiments]}
shift
mode= experiments=
for flag in "$@"; do
  case $flag in
    --cpu) mode=--cpu ;;
    --experiments) experiments=1 ;;
    *) echo "unknown flag $flag (expected --cpu or --experiments)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Peer wheels (bench/peer_wheels.sh) travel in .whl where the GPU image lacks them.
if ls .whl/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/peer-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/peer-site"
fi
if [ "$mode" = "--cpu" ]; then  # compiled too, as on a GPU: the compile paths get exercised
  args=(--device cpu --smoke --compile); scale=3
else
  args=(--device cuda); scale=1
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
if torch.cuda.is_available():  # can masked attention (packing) keep a fused kernel with GQA?
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(256, 256, dtype=torch.bool, device="cuda").tril()
    for backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, enable_gqa=True)
            info[f"masked_gqa_{backend.lower()}"] = "ok"
        except Exception as e:
            info[f"masked_gqa_{backend.lower()}"] = f"refused: {e}"[:200]
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PY

# name, script, seconds allowed (times $scale on CPU), extra arguments. The checks are the
# issue's three benchmarks, each with its peer (train: the gpt2-124m preset, micro-batch 24);
# the generate and train runs also profile the kernels of one call / step, and where the GPU
# sat idle between them (the longest gaps, named by the kernels around them). The experiments
# time scalelab alone, each to compare with its check of the same run, most wanted first: the
# decode step attending through FlexAttention's decoding kernel (model.DECODE_ATTENTION =
# "flex"); the prefill compiled too (generate.COMPILE_PREFILL: its eager kernels are launched
# one by one from Python); the compiled forward and backward of pretraining replayed as CUDA
# graphs (what mode="reduce-overhead" does: no launch gaps); a micro-batch of 48 instead of
# 24 (larger micro-batches at the same global batch); inductor's GEMM autotuning (Triton
# matmul templates, which can fuse the elementwise work around them) for pretraining; SFT
# packed vs padded (packing is adopted, measured on CPU only: on CUDA its masked attention
# cannot use the flash kernel); PPO with the chunked token log-probs under compile; inductor's
# coordinate-descent tuning for the decode step and for pretraining. The experiments take about
# 10-18 minutes in all, more than one lease's 15 minutes with the checks. A plan for one lease,
# most wanted first (two calls, each under 10 minutes; OUT is the call's output folder):
#   bash bench/gpu_check.sh OUT/check; BENCHES="generate_flex generate_prefill" \
#     bash bench/gpu_check.sh OUT/exp --experiments
#   BENCHES="train_cudagraphs train_mb48 train_autotune" bash bench/gpu_check.sh OUT/exp2 \
#     --experiments
# Measured and settled (bench/results/gpu_check-h200-2026-11-28 and -28b): FusedProjections
# (on; its baseline is `generate --no-fuse`); decode attention as plain sums, or SDPA's
# efficient kernel, instead of the cuDNN one torch picks (no faster); cuDNN for pretraining
# (torch's pick already); inductor's freezing (weights as constants: stale once PPO trains);
# GEMM autotuning of the decode step (max-autotune-no-cudagraphs: 60.9k against 71.6k).
checks=(
  "generate generate 110 --profile"
  "ppo ppo 170"
  "train train 120 --profile"
)
extras=(
  "generate_flex generate 90 --systems scalelab --decode-attention flex"
  "generate_prefill generate 120 --systems scalelab --compile-prefill --profile"
  "train_cudagraphs train 150 --peers scalelab --inductor triton.cudagraphs=True --steps 10 --warmup 3"
  "train_mb48 train 150 --peers scalelab --batch-size 48 --steps 10 --warmup 3"
  "train_autotune train 300 --peers scalelab --inductor max_autotune=True --steps 10 --warmup 3"
  "sft sft 150 --steps 10 --warmup 3"
  "ppo_chunked ppo 170 --peers scalelab --logprobs chunked"
  "generate_cdt generate 150 --systems scalelab --inductor coordinate_descent_tuning=True"
  "train_cdt train 150 --peers scalelab --inductor coordinate_descent_tuning=True --steps 10 --warmup 3"
)
if [ -n "$experiments" ]; then runs=("${extras[@]}"); else runs=("${checks[@]}"); fi
status=0
for line in "${runs[@]}"; do
  read -r name bench limit extra <<<"$line"
  [ -n "${BENCHES:-}" ] && [[ " $BENCHES " != *" $name "* ]] && continue
  echo "== $name ($(date +%T))"
  # shellcheck disable=SC2086  # $extra is a list of arguments
  timeout $((limit * scale)) $py "bench/${bench}_throughput.py" "${args[@]}" $extra \
    --json "$out/$name.json" > "$out/$name.log" 2>&1
  rc=$?
  tail -n 8 "$out/$name.log"
  echo "   ($name: exit $rc at $(date +%T))"
  [ $rc -ne 0 ] && { echo "!! $name exited $rc"; status=1; }
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
    if "rows" not in data:  # the train and PPO benches: their results per system
        for name, r in data.get("results", {}).items():
            unit = "tok/s" if "tokens_per_s" in r else "episodes/s"
            val = r.get("tokens_per_s", r.get("episodes_per_s"))
            mfu = f"MFU {r['mfu']:.1%}" if r.get("mfu") else ""
            print(f"{f.stem + ': ' + name:<46} {val:>12.4g} {'':>12} {'':>7}  {unit}  {mfu}")
    for r in data.get("rows", []):
        val, peer, ratio = (r.get(k) for k in ("value", "peer_value", "ratio"))
        num = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        name = r["name"].replace("rollouts new tok/s: ", f"{f.stem}: ")
        print(f"{name[:46]:<46} {num(val, '.4g'):>12} {num(peer, '.4g'):>12} "
              f"{num(ratio, '.2f'):>7}  {r.get('unit', '')}  [{r.get('peer', '')}]")
PY
exit $status
