"""Rollout throughput: scalelab `generate()` vs. Hugging Face `generate` with a static cache.

Same shape for both (GPT-2 124M: 12 x 768, 12 heads, vocab 50304, as a LlamaForCausalLM with
scalelab's SwiGLU width), random weights, batch 64 x 64-token prompts, 128 sampled tokens at
temperature 1 with no top-k/top-p, bf16 weights on CUDA (fp32 on CPU). No EOS, so every system
produces all 128 tokens. On CUDA, "scalelab" is the compiled decode step replayed as a CUDA
graph (what PPO uses); the uncompiled graph and the plain eager loop are timed beside it.
Systems take turns after warm-up; the median new tokens/s is reported.

    python bench/generate_throughput.py [--device cuda|cpu] [--smoke] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scalelab.config import ModelConfig
from scalelab.generate import generate
from scalelab.model import Transformer

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    device_name,
    hf_peer,
    kernel_profile,
    print_profile,
    sdpa_backend,
    set_inductor,
    write_json,
)

FULL = dict(model=dict(n_layer=12, d_model=768, n_head=12, vocab_size=50304, seq_len=256),
            batch=64, prompt=64, new=128)
SMOKE = dict(model=dict(n_layer=2, d_model=64, n_head=4, vocab_size=512, seq_len=64),
             batch=8, prompt=16, new=32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--smoke", action="store_true", help="tiny shape: seconds on a CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time generate(compile=True), the compiled decode step (default: on "
                        "CUDA, as PPO does with train.compile = auto)")
    p.add_argument("--compile-mode", help="experiment: torch.compile mode of the decode step "
                   "(e.g. max-autotune-no-cudagraphs; the CUDA graph is scalelab's own)")
    p.add_argument("--compile-prefill", action="store_true", help="experiment: compile the "
                   "prefill too (scalelab.generate.COMPILE_PREFILL)")
    p.add_argument("--no-fuse", action="store_true", help="experiment: decode with the "
                   "model's own q/k/v and gate/up weights (no FusedProjections)")
    p.add_argument("--decode-attention", choices=["sdpa", "flex"], default="sdpa",
                   help="experiment: scalelab.model.DECODE_ATTENTION for the compiled step")
    p.add_argument("--sdpa", choices=["cudnn", "flash", "efficient", "math"],
                   help="experiment: the only attention backend scalelab's rollouts may use")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="experiment: a torch._inductor.config setting for the compiled step")
    p.add_argument("--profile", action="store_true",
                   help="also profile one call of scalelab's rollouts: the kernels per step")
    p.add_argument("--systems", default="scalelab,scalelab_uncompiled,scalelab_no_graphs,hf_static",
                   help="comma list of the systems to time (experiments: scalelab alone)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per system")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.threads or args.smoke:  # tiny shapes: one thread wastes no time in barriers
        torch.set_num_threads(args.threads or 1)
    inductor = set_inductor(args.inductor)
    import scalelab.generate
    import scalelab.model
    if args.compile_mode:
        scalelab.generate.COMPILE_OPTIONS["mode"] = args.compile_mode
    scalelab.generate.FUSE = not args.no_fuse
    scalelab.generate.COMPILE_PREFILL = args.compile_prefill
    scalelab.model.DECODE_ATTENTION = args.decode_attention
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    shape = SMOKE if args.smoke else FULL
    B, P, N = shape["batch"], shape["prompt"], shape["new"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**shape["model"])).to(device=device, dtype=dtype).eval()
    mc = ours.cfg
    prompts = torch.randint(1, mc.vocab_size, (B, P), generator=torch.Generator().manual_seed(0))
    prompt_lists = prompts.tolist()
    gen = torch.Generator(device=device).manual_seed(0)

    def scalelab_run(graphs: bool, compile: bool = False) -> Callable[[], int]:
        def run() -> int:
            with sdpa_backend(args.sdpa):
                out = generate(ours, prompt_lists, N, pad_id=0, eos_id=None, temperature=1.0,
                               generator=gen, graphs=graphs, compile=compile)
            return sum(len(o) for o in out)
        return run

    # "scalelab" is what PPO runs: on CUDA the compiled step replayed as a CUDA graph.
    compile = cuda if args.compile is None else args.compile
    systems: dict[str, Callable[[], int]] = {"scalelab": scalelab_run(True, compile)}
    if cuda:
        if compile:
            systems["scalelab_uncompiled"] = scalelab_run(True)
        systems["scalelab_no_graphs"] = scalelab_run(False)
    wanted = {s.strip() for s in args.systems.split(",") if s.strip()}
    if unknown := wanted - {*systems, "scalelab_uncompiled", "scalelab_no_graphs", "hf_static"}:
        p.error(f"--systems: unknown {sorted(unknown)}")
    if "scalelab" not in wanted:
        p.error("--systems: scalelab is the one every run times")
    systems = {n: run for n, run in systems.items() if n in wanted}
    unavailable: dict[str, str] = {}
    try:
        if "hf_static" not in wanted:
            raise LookupError("not asked for (--systems)")
        peer = hf_peer(mc).to(device=device, dtype=dtype).eval()
        ids, attn = prompts.to(device), torch.ones_like(prompts).to(device)

        def hf_run() -> int:
            out = peer.generate(input_ids=ids, attention_mask=attn, do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
                                cache_implementation="static", pad_token_id=0,
                                eos_token_id=None)
            return (out.size(1) - P) * B
        systems["hf_static"] = hf_run
    except Exception as e:  # transformers missing or too old: scalelab alone
        unavailable["hf_static"] = f"{type(e).__name__}: {e}"[:300]

    print(f"device {device_name(device)} | torch {torch.__version__} | {dtype} | shape L="
          f"{mc.n_layer} d={mc.d_model} H={mc.n_head} mlp={mc.d_mlp} vocab={mc.vocab_size} | "
          f"batch {B}, prompt {P}, {N} new tokens")
    warm_s: dict[str, float] = {}
    for name in list(systems):  # warm-up: graph capture / HF's compile happen here
        try:
            t0 = time.perf_counter()
            for _ in range(2):
                got = systems[name]()
            sync()
            warm_s[name] = time.perf_counter() - t0
            if got != B * N:
                raise RuntimeError(f"made {got} tokens, expected {B * N}")
        except Exception as e:
            if name == "scalelab":
                raise
            unavailable[name] = f"{type(e).__name__}: {e}"[:300]
            del systems[name]
            print(f"{name} unavailable: {unavailable[name]}")
    times: dict[str, list[float]] = {n: [] for n in systems}
    for _ in range(args.repeats):  # alternate turns: background load hits all alike
        for name, run in systems.items():
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)

    tok_s = {n: B * N / statistics.median(t) for n, t in times.items()}
    print(f"\n{'system':<20}{'new tok/s':>12}{'median s':>10}{'warm-up s':>11}")
    for n in systems:
        print(f"{n:<20}{tok_s[n]:>12,.0f}{statistics.median(times[n]):>10.3f}"
              f"{warm_s[n]:>11.1f}")
    for n, why in unavailable.items():
        print(f"{n:<20} peer unavailable: {why}")
    prof = None
    if args.profile:  # decode steps dominate: count and time the kernels per new token
        prof = kernel_profile(systems["scalelab"], device, per=N)
        print_profile(prof, "new token")
    hf = tok_s.get("hf_static")
    rows = []
    for n in systems:
        if n.startswith("scalelab"):
            rows.append({"name": f"rollouts new tok/s: {n} vs hf static cache", "value": tok_s[n],
                         "unit": "new tok/s", "peer": "hf generate, static cache",
                         "peer_value": hf, "ratio": tok_s[n] / hf if hf else None})
            print(f"{n} / hf_static: " + (f"{tok_s[n] / hf:.2f}x" if hf else "n/a"))
    graphed = "scalelab_uncompiled" if "scalelab_uncompiled" in tok_s else "scalelab"
    for on, off, what in ((graphed, "scalelab_no_graphs", "CUDA graphs"),
                          ("scalelab", "scalelab_uncompiled", "compiled decode step")):
        if on in tok_s and off in tok_s:
            ratio = tok_s[on] / tok_s[off]
            rows.append({"name": f"rollouts new tok/s: {what} on vs off", "value": tok_s[on],
                         "unit": "new tok/s", "peer": off, "peer_value": tok_s[off],
                         "ratio": ratio})
            print(f"{what} on / off: {ratio:.2f}x")

    try:
        import transformers
        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    write_json(args.json, device,
               config={"model": vars(mc), "batch": B, "prompt": P, "new_tokens": N,
                       "dtype": str(dtype), "temperature": 1.0, "repeats": args.repeats,
                       "compile": compile, "compile_mode": args.compile_mode,
                       "fuse": not args.no_fuse, "decode_attention": args.decode_attention,
                       "sdpa": args.sdpa, "compile_prefill": args.compile_prefill,
                       "inductor": inductor},
               rows=rows, tokens_per_s=tok_s, warmup_s=warm_s, seconds=times,
               peer_unavailable=unavailable, profile=prof, transformers=hf_version)


if __name__ == "__main__":
    main()
