"""Run under torchrun by test_parallel_dist.py: several mappings in one launch (saves startup).

    torchrun --nproc-per-node 4 tests/dist_worker.py BASE REF_RUN MAPPING...

MAPPING is dp,fsdp,tp[,grad_accum] (e.g. 2,1,2). For each: pretrain BASE/dp_fsdp_tp[_accum]
from scratch on the reference run's data with the same global batch, and record one step's
collectives against the analytic model (BASE/comm.json). Then resume the fsdp=2 x tp=2 run's
step_10 checkpoint under dp=4 (BASE/resume_dp4), the one-process run's under fsdp=2 x tp=2,
and compare a grouped-query-attention model under tp=4 with its unsharded self
(BASE/gqa_tp.json).
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from scalelab.config import load_config
from scalelab.parallel import mesh
from scalelab.parallel.comm import CommCounter, measure_step, step_collectives, summarize
from scalelab.train.pretrain import pretrain


def config(ref: Path, sizes: tuple[int, int, int], global_batch: int, grad_accum: int = 1):
    dp, fsdp, tp = sizes
    cfg = load_config(ref / "config.toml")
    cfg.parallel.dp, cfg.parallel.fsdp, cfg.parallel.tp = dp, fsdp, tp
    cfg.train.batch_size = global_batch // (dp * fsdp * grad_accum)
    cfg.train.grad_accum = grad_accum
    return cfg


def crashed_at_step_10(src: Path, out: Path) -> None:
    """Rank 0 copies a finished 20-step run as if it had crashed after step 10's checkpoint."""
    if dist.get_rank() == 0:
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("step_20", "model"))
        rows = (src / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text(
            "".join(r + "\n" for r in rows if json.loads(r)["step"] <= 10))
    dist.barrier()


def fresh(out: Path, ref: Path) -> None:
    """Rank 0 copies the reference run's data and tokenizer into a new run folder."""
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copytree(ref / "data", out / "data")
        shutil.copy(ref / "tokenizer.json", out / "tokenizer.json")
    dist.barrier()


def gqa_tp_losses(steps: int = 3, qkv_bias: bool = False,
                  sizes: tuple[int, int, int] = (1, 1, 4)) -> list[tuple[float, float]]:
    """Grouped-query attention (8 query heads, 4 kv heads) under tp=4 (or another mapping
    of dp, fsdp, tp) vs. the same model unsharded in this process: (sharded, plain) loss
    per AdamW step on one fixed batch (the same on every rank)."""
    import torch
    import torch.nn.functional as F

    from scalelab.config import ModelConfig, ParallelConfig
    from scalelab.model import Transformer
    from scalelab.parallel.apply import clip_grad_norm_, parallelize

    mc = ModelConfig(vocab_size=128, seq_len=16, n_layer=2, n_head=8, n_kv_head=4, d_model=32,
                     qkv_bias=qkv_bias)
    par = mesh.setup(ParallelConfig(*sizes), "cpu")
    x = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(0))
    out = []
    for sharded in (True, False):
        torch.manual_seed(0)
        model = Transformer(mc)
        if sharded:
            parallelize(model, par)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for i in range(steps):
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            if sharded:
                clip_grad_norm_(model, 1.0, par)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            out.append((sharded, i, loss.item()))
    return [(a[2], b[2]) for a, b in zip(out[:steps], out[steps:])]


def main() -> None:
    base, ref = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    global_batch = load_config(ref / "config.toml").train.batch_size
    comm = {}
    for spec in sys.argv[3:]:
        dp, fsdp, tp, *accum = (int(x) for x in spec.split(","))
        name = spec.replace(",", "_")
        fresh(base / name, ref)
        cfg = config(ref, (dp, fsdp, tp), global_batch, *accum)
        par = mesh.setup(cfg.parallel, "cpu")
        with CommCounter(par.groups) as cc:  # the whole run: how often it all-reduces over dp
            pretrain(cfg, base / name)
        tc = cfg.train
        measured = summarize(measure_step(cfg.model, par, tc.batch_size, tc.grad_accum))
        predicted = summarize(step_collectives(cfg.model, par.sizes, par.rules,
                                               tc.batch_size * cfg.model.seq_len,
                                               tc.grad_accum))
        comm[name] = {"measured": {"/".join(k): v for k, v in measured.items()},
                      "predicted": {"/".join(k): v for k, v in predicted.items()},
                      "run_dp_all_reduces": sum(r.kind == "all_reduce" and r.axis == "dp"
                                                for r in cc.records)}
    # Resume fsdp=2 x tp=2 at step 10 under dp=4.
    src, out = base / "1_2_2", base / "resume_dp4"
    if src.exists():
        crashed_at_step_10(src, out)
        pretrain(config(ref, (4, 1, 1), global_batch), out, resume=True)
    # Resume the one-process reference run's step_10 (safetensors) under fsdp=2 x tp=2.
    out = base / "resume_ref_fsdp2_tp2"
    crashed_at_step_10(ref, out)
    pretrain(config(ref, (1, 2, 2), global_batch), out, resume=True)
    gqa = gqa_tp_losses()
    bias = gqa_tp_losses(qkv_bias=True, sizes=(1, 2, 2))  # q/k/v biases (Qwen2) under FSDP
    if dist.get_rank() == 0:
        (base / "gqa_tp.json").write_text(json.dumps(gqa))
        (base / "qkv_bias_fsdp_tp.json").write_text(json.dumps(bias))
        (base / "comm.json").write_text(json.dumps(comm, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
