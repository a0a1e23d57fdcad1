"""SFT step throughput: batches packed into fewer rows (sft.pack, the default) vs one
right-padded row per conversation (the peer), on the same batches of built-in task
conversations, measured in alternating turns in one run.

One timed step = the loss `scalelab sft` runs (`sft.masked_loss` through `loop.loss_step`:
compiled when train.compile resolves to on, as on CUDA), backward, AdamW step, zero_grad.
Tokens/s counts real (unpadded) tokens, the same for both, so the ratio is the speed-up a
user sees. Before timing, the first batch's loss is computed both ways: they must agree.

    python bench/sft_throughput.py                       # the demo's SFT shape on CPU
    python bench/sft_throughput.py --device cuda         # the same conversations, gpt2-124m
    python bench/sft_throughput.py --smoke --json x.json # a few seconds: does it all run?
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from scalelab.config import load_config, resolve_config_path
from scalelab.data.batches import pack
from scalelab.data.world import generate_documents
from scalelab.hardware import autocast, pick_device
from scalelab.model import Transformer
from scalelab.tokenizer import Tokenizer
from scalelab.train.loop import loss_step, make_optimizer
from scalelab.train.losses import IGNORE
from scalelab.train.sft import encode_conversations, masked_loss, sft_batch, task_conversations

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="preset or TOML for [model] and [train] (default: tiny on "
                   "CPU, gpt2-124m on CUDA)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="compile the loss (default: the config's train.compile, auto = on "
                   "for CUDA, off on CPU)")
    p.add_argument("--batch-size", type=int, default=32, help="conversations per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per system")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per system")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 steps")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    device = pick_device(args.device)
    name = args.config or ("gpt2-124m" if device.type == "cuda" and not args.smoke else "tiny")
    cfg = load_config(resolve_config_path(name))
    if args.compile is not None:
        cfg.train.compile = args.compile
    if args.smoke:
        cfg.model.n_layer, cfg.model.d_model, cfg.model.n_head = 2, 64, 2
        args.steps, args.warmup = 2, 3  # 3: past the recompiles of new shapes (--compile)
    tok = Tokenizer.train(generate_documents(2000, seed=0), 1024)
    cfg.model.vocab_size = -(-tok.vocab_size // 64) * 64
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device).train()
    T, B = model.cfg.seq_len, args.batch_size
    n = B * (args.warmup + args.steps)
    items = encode_conversations(task_conversations(n, seed=0, chatty_fraction=0.3)[0], tok, T)
    batches = [items[i:i + B] for i in range(0, len(items) - B + 1, B)]
    collate = {"packed": lambda b: pack(b, T, tok.pad_id, IGNORE),
               "padded": lambda b: sft_batch(b, T, tok.pad_id, packing=False)}
    data = {k: [tuple(t.to(device) for t in f(b)) for b in batches] for k, f in collate.items()}
    # One compiled function per layout, as `scalelab sft` has one: a shared one would
    # recompile at every switch between the two and soon give up compiling.
    loss_fns = {"packed": loss_step(lambda m, b: masked_loss(m, b), cfg.train, device),
                "padded": loss_step(lambda m, b: masked_loss(m, b), cfg.train, device)}
    ctx = autocast(device, cfg.train.dtype)
    opt = make_optimizer(model, cfg.train, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with torch.no_grad(), ctx:  # the two layouts must give one loss
        losses = {k: float(masked_loss(model, data[k][0])) for k in data}
    print(f"device {device_name(device)} | torch {torch.__version__} | {name}: "
          f"{model.cfg.n_layer} x {model.cfg.d_model}, seq_len {T} | {B} conversations per step")
    print(f"first batch's loss: packed {losses['packed']:.6f}, padded {losses['padded']:.6f}")

    times: dict[str, list[float]] = {k: [] for k in data}
    for i in range(len(batches)):  # alternate turns: background load hits both alike
        for k in data:
            sync()
            t0 = time.perf_counter()
            with ctx:
                loss = loss_fns[k](model, data[k][i])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    real = [sum(len(x) for x, _ in b) for b in batches[args.warmup:]]
    results = {}
    for k in data:
        computed = statistics.mean(data[k][i][0].numel() for i in range(args.warmup,
                                                                         len(batches)))
        results[k] = {"ms_per_step": statistics.median(times[k]) * 1e3,
                      "tokens_per_s": sum(real) / sum(times[k]),
                      "real_share": statistics.mean(real) / computed}
        r = results[k]
        print(f"{k:<8} {r['ms_per_step']:8.1f} ms/step  {r['tokens_per_s']:10,.0f} real tok/s  "
              f"{r['real_share']:.2f} of the computed tokens real")
    ratio = results["packed"]["tokens_per_s"] / results["padded"]["tokens_per_s"]
    print(f"\npacked / padded tokens/s: {ratio:.3f}")
    write_json(args.json, device, losses=losses, results=results, ratio=ratio)


if __name__ == "__main__":
    main()
