"""Collective bytes of one training step, measured vs. the analytic model, for every mapping.

Run it under torchrun (CPU/gloo works):

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 4 bench/comm_bytes.py --config tiny

For each (dp, fsdp, tp) with product = world size, it builds the model, applies the mapping
from the axis-rules table, records one step (forward, backward, grad sync, clip) with
CommCounter and prints, per collective kind and mesh axis, the bytes each device sends
(ring: all-gather/reduce-scatter (n-1)/n*S, all-reduce 2(n-1)/n*S) next to
scalelab.parallel.comm.step_collectives. Then it times a few steps of each mapping
(median ms; noisy on a shared CPU).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from scalelab.cli import resolve_config_path
from scalelab.config import load_config
from scalelab.model import Transformer
from scalelab.parallel import mesh
from scalelab.parallel.apply import clip_grads, parallelize
from scalelab.parallel.comm import measure_step, step_collectives, summarize
from scalelab.parallel.plan import factorizations


def time_steps(cfg, par, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = parallelize(Transformer(cfg.model), par)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.model.vocab_size, (batch, cfg.model.seq_len + 1))
    times = []
    for _ in range(steps):
        dist.barrier()
        t0 = time.perf_counter()
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        clip_grads(model, 1.0, par)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = load_config(resolve_config_path(args.config), args.set)
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = 64 * math.ceil(cfg.data.tokenizer_vocab / 64)
    mc = cfg.model
    say = print if rank == 0 else (lambda *a: None)
    say(f"# {world} processes (gloo, CPU), torch {torch.__version__}; model {args.config}: "
        f"{mc.n_layer} layers, d={mc.d_model}, {mc.n_head} heads, vocab {mc.vocab_size}, "
        f"seq {mc.seq_len}; global batch {args.global_batch} sequences; fp32")
    say(f"{'mapping':<12} {'collective':<22} {'measured B':>12} {'model B':>12} {'ratio':>6}"
        f" {'calls':>6}")
    worst, timing = 0.0, {}
    for sizes in factorizations(world):
        cfg.parallel.dp, cfg.parallel.fsdp, cfg.parallel.tp = sizes.values()
        par = mesh.setup(cfg.parallel, "cpu")
        name = "x".join(str(sizes[a]) for a in ("dp", "fsdp", "tp"))
        if mc.n_head % sizes["tp"] or args.global_batch % par.data_world:
            say(f"{name:<12} skipped (tp does not divide heads, or batch not divisible)")
            continue
        batch = args.global_batch // par.data_world
        records = measure_step(mc, par, batch)
        measured = summarize(records)
        predicted = summarize(step_collectives(mc, par.sizes, par.rules, batch * mc.seq_len))
        for key in sorted(set(measured) | set(predicted)):
            m, p = measured.get(key, 0.0), predicted.get(key, 0.0)
            calls = sum(1 for r in records if (r.kind, r.axis) == key)
            ratio = m / p if p else float("inf")
            worst = max(worst, abs(ratio - 1))
            say(f"{name:<12} {'/'.join(key):<22} {m:>12,.0f} {p:>12,.0f} {ratio:>6.3f} "
                f"{calls:>6}")
        timing[name] = time_steps(cfg, par, batch, args.steps)
    say(f"largest |measured/model - 1| = {worst:.4f}")
    say("median ms/step (dp x fsdp x tp): " +
        ", ".join(f"{k} {v:.0f}" for k, v in timing.items()))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
