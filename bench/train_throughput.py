"""Training-step throughput of scalelab's Transformer vs. a same-shape HF LlamaForCausalLM.

One timed step = forward, cross-entropy loss, backward, AdamW step, zero_grad. scalelab's
step is the one `scalelab pretrain` runs (`next_token_loss` through `loop.loss_step`: chunked
cross-entropy, and with --compile model and loss compiled together). The systems
run in alternating turns (scalelab, hf, scalelab, hf, ...) and each reports its median
ms/step, so background load hits both alike. FLOPs use scalelab's 6N + 12*L*H*Q*T for both.

    python bench/train_throughput.py                       # tiny preset on CPU
    python bench/train_throughput.py --device cuda         # GPT-2 124M shape, 12 x 1024, compiled
    python bench/train_throughput.py --smoke --json x.json # a few seconds: does it all run?
    python bench/train_throughput.py --config tiny --set model.d_model=256 \
        --seq-len 256 --batch-size 16 --vocab 4096         # the reference shape
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from scalelab.cli import resolve_config_path
from scalelab.config import Config, load_config
from scalelab.hardware import autocast, detect, pick_device, use_compile
from scalelab.model import Transformer
from scalelab.train.loop import loss_step, make_optimizer
from scalelab.train.pretrain import next_token_loss

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    device_name,
    force_chunked_losses,
    hf_peer,
    kernel_profile,
    print_profile,
    sdpa_backend,
    set_inductor,
    write_json,
)


def _plain(model, batch):  # full logits and F.cross_entropy, as nanoGPT does
    logits = model(batch[0])
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch[1].reshape(-1))


EXPERIMENTS = {"plain": _plain}  # --loss: other than pretrain's own (chunked: that, forced)


def make_step(model: torch.nn.Module, cfg: Config, device: torch.device, x: torch.Tensor,
              y: torch.Tensor, hf: bool, compile: bool, loss: str = "auto",
              sdpa: str | None = None) -> Callable[[], None]:
    """A closure doing one full training step on the fixed batch (x, y)."""
    model.to(device).train()
    opt = make_optimizer(model, cfg.train, device)
    ctx = autocast(device, cfg.train.dtype)
    if hf:  # forward and loss compiled together, as scalelab's (and nanoGPT's) step is
        def hf_loss(m, batch):
            logits = m(input_ids=batch[0], use_cache=False).logits
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch[1].reshape(-1))
        loss_fn = torch.compile(hf_loss) if compile else hf_loss
    else:  # "auto": exactly what `scalelab pretrain` runs per micro-batch
        loss_fn = loss_step(EXPERIMENTS.get(loss, next_token_loss), cfg.train, device)

    def step() -> None:
        with ctx, sdpa_backend(sdpa):
            loss = loss_fn(model, (x, y))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="TOML path or preset name (default: tiny on CPU, "
                   "gpt2-124m on CUDA)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--vocab", type=int, help="vocab size (default: config's, else 4096)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile both systems (default: the config's train.compile, "
                   "auto = on for CUDA, off on CPU)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per system")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per system")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and 3 steps: checks that everything runs")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave)")
    p.add_argument("--peers", default="scalelab,hf", help="comma list of: scalelab, hf")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of scalelab's: the kernels that took the time")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--loss", default="auto", choices=["auto", "chunked", *EXPERIMENTS],
                   help="scalelab's loss: auto = what pretrain runs (chunked eagerly, plain "
                        "under compile); chunked or plain = that one always (experiments)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="experiment: a torch._inductor.config setting (e.g. "
                        "coordinate_descent_tuning=True)")
    p.add_argument("--sdpa", choices=["cudnn", "flash", "efficient", "math"],
                   help="experiment: the only attention backend both systems may use")
    args = p.parse_args()
    inductor = set_inductor(args.inductor)
    if args.loss == "chunked":
        force_chunked_losses()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    name = args.config or ("gpt2-124m" if device.type == "cuda" and not args.smoke else "tiny")
    cfg = load_config(resolve_config_path(name), args.set)
    mc, tc = cfg.model, cfg.train
    if args.compile is not None:  # else the config's train.compile (default auto: CUDA only)
        tc.compile = args.compile
    elif args.smoke:
        tc.compile = False
    args.compile = use_compile(tc.compile, device)  # what loss_step decides, for the HF peer
    if args.smoke:  # a handful of seconds on 2 CPU cores
        mc.n_layer, mc.d_model, mc.n_head, mc.d_mlp = 2, 64, 2, 0
        args.seq_len, args.batch_size = args.seq_len or 32, args.batch_size or 4
        args.vocab = args.vocab or 512
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    mc.vocab_size = args.vocab or mc.vocab_size or 4096
    mc.seq_len = args.seq_len or mc.seq_len
    tc.batch_size = args.batch_size or tc.batch_size
    tc.dtype = args.dtype
    peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    if unknown := set(peers) - {"scalelab", "hf"}:
        p.error(f"--peers: unknown {sorted(unknown)} (choose from scalelab, hf)")
    if "hf" in peers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers is not installed (pip install -e .[bench]): "
                  "running scalelab alone")
            peers.remove("hf")

    torch.manual_seed(0)
    ours = Transformer(mc)
    mc = ours.cfg  # resolved: explicit n_kv_head and d_mlp
    if "hf" in peers and mc.mlp != "swiglu":
        print(f"warning: model.mlp={mc.mlp!r} but the HF peer is SwiGLU; shapes differ")
    B, T = tc.batch_size, mc.seq_len
    data = torch.randint(mc.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1].to(device), data[:, 1:].to(device)
    models = {"scalelab": ours, "hf": hf_peer(mc, use_cache=False) if "hf" in peers else None}
    params = {n: sum(q.numel() for q in models[n].parameters()) for n in peers}
    steps = {n: make_step(models[n], cfg, device, x, y, n == "hf", args.compile, args.loss,
                          args.sdpa) for n in peers}
    fpt = ours.flops_per_token(T)  # same FLOP count for both: 6N + 12LHQT, N = ours
    hw = detect(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    print(f"device {device_name(device)} | torch {torch.__version__} | dtype {args.dtype} | "
          f"compile {args.compile}")
    print(f"shape: L={mc.n_layer} d={mc.d_model} H={mc.n_head} kv={mc.n_kv_head} "
          f"mlp={mc.d_mlp} vocab={mc.vocab_size} tied={mc.tie_embeddings} | "
          f"batch {B} x {T} tokens | {fpt / 1e6:.2f} MFLOP/token")
    unavailable = {}
    if "hf" in peers:  # first (compiling) step of the peer: if it cannot run, say so and go on
        try:
            steps["hf"]()
        except Exception as e:  # noqa: BLE001
            unavailable["hf"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"hf: peer unavailable: {unavailable['hf']}")
            peers.remove("hf")
    times: dict[str, list[float]] = {n: [] for n in peers}
    for i in range(args.warmup + args.steps):  # alternate turns: fair under background load
        for n in peers:
            sync()
            t0 = time.perf_counter()
            steps[n]()
            sync()
            if i >= args.warmup:
                times[n].append(time.perf_counter() - t0)

    results = {}
    for n in peers:
        sec = statistics.median(times[n])
        tflops = fpt * B * T / sec / 1e12
        results[n] = {"params": params[n], "ms_per_step": sec * 1e3, "tokens_per_s": B * T / sec,
                      "tflops": tflops, "mfu": tflops * 1e12 / hw.peak_flops if hw else None,
                      "ms_min": min(times[n]) * 1e3, "ms_max": max(times[n]) * 1e3}
    print(f"\n{'system':<10}{'params':>12}{'ms/step':>10}{'min..max ms':>18}"
          f"{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
    for n, r in results.items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        spread = f"{r['ms_min']:.1f}..{r['ms_max']:.1f}"
        print(f"{n:<10}{r['params']:>12,}{r['ms_per_step']:>10.1f}{spread:>18}"
              f"{r['tokens_per_s']:>12,.0f}{r['tflops']:>10.3f}{mfu:>8}")
    ratio = None
    if len(results) == 2:
        ratio = results["scalelab"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        print(f"\nscalelab / hf tokens/s: {ratio:.3f}")
    else:
        print("\nscalelab / hf tokens/s: n/a")

    extra = {}
    if args.profile and "scalelab" in steps:
        extra["profile"] = kernel_profile(steps["scalelab"], device, per=1, top=25)
        print_profile(extra["profile"], "step")
    if "hf" in peers:
        import transformers
        extra["transformers"] = transformers.__version__
    write_json(args.json, device,
               config={"model": vars(mc), "batch_size": B, "seq_len": T, "dtype": args.dtype,
                       "compile": args.compile, "loss": args.loss,
                       "threads": torch.get_num_threads(), "steps": args.steps,
                       "warmup": args.warmup, "inductor": inductor, "sdpa": args.sdpa},
               flops_per_token=fpt, results=results, ratio_scalelab_over_hf=ratio,
               unavailable=unavailable, **extra)


if __name__ == "__main__":
    main()
