"""The training loop every stage shares: schedule, accumulation, clipping, logging, evals,
checkpoints and exact resume. A stage supplies only its batches, its loss and its evals."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from scalelab.config import Config, TrainConfig, UserError, dump_toml
from scalelab.hardware import autocast, detect, pick_device
from scalelab.train.checkpoint import (
    atomic_write_text,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from scalelab.train.monitor import Monitor
from scalelab.train.progress import Progress
from scalelab.train.rundir import claim


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    floor = tc.lr * tc.min_lr_ratio
    return floor + (tc.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, tc: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms (1-D) are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=device.type == "cuda")


def loss_step(loss_fn: Callable, tc: TrainConfig) -> Callable:
    """What fit() runs per micro-batch: loss_fn(model, batch), compiled whole (model and loss
    in one graph) when train.compile is on. bench/train_throughput.py times this same path."""
    return torch.compile(loss_fn) if tc.compile else loss_fn


def load_any_checkpoint(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        parallel=None) -> dict:
    """A checkpoint saved by one process (safetensors) or under a mesh (sharded, DCP)."""
    from scalelab.parallel.checkpoint import is_sharded, load_sharded, load_single_into_mesh
    if is_sharded(ckpt):
        return load_sharded(ckpt, model, optimizer)
    if parallel is not None:
        return load_single_into_mesh(ckpt, model, optimizer)
    return load_checkpoint(ckpt, model, optimizer)


class Run:
    """A run directory: config.toml, metrics.jsonl, model/, checkpoints/."""

    def __init__(self, out: Path, cfg: Config, resume: bool, write: bool = True,
                 stage: str = "pretrain"):
        # write=False: a non-zero rank of a parallel run, which writes nothing.
        self.out, self.metrics, self.write = out, out / "metrics.jsonl", write
        if not write:
            return
        # New, empty, or this stage's own run (see rundir.check_out); else exit 2 untouched.
        claim(out, stage, resume)
        self.write_config(cfg)

    def write_config(self, cfg: Config) -> None:
        if not self.write:
            return
        atomic_write_text(self.out / "config.toml", dump_toml(cfg))

    def log(self, row: dict) -> None:
        if not self.write:
            return
        with self.metrics.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (and any torn last line)."""
        if not self.write or not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.metrics, "".join(line + "\n" for line in keep))


def start_stage(cfg: Config, out: Path, resume: bool, stage: str, parent: Path, **lineage):
    """What every post-training stage does first: seed, claim the run folder, load the model
    it starts from, save the resolved config and where the model came from (lineage.json).
    Returns (run, device, model, tokenizer)."""
    from scalelab.train.checkpoint import load_model
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # N processes would each train a copy into the same folder
        raise UserError(f"{stage} runs in one process (WORLD_SIZE is {world}): only pretrain "
                        "spreads over a device mesh so far; run this stage without torchrun")
    torch.manual_seed(cfg.train.seed)
    run = Run(out, cfg, resume, stage=stage)
    device = pick_device(cfg.train.device)
    model, tok = load_model(parent, device)
    from scalelab.hf import add_chat_tokens
    add_chat_tokens(model, tok)  # an imported folder without a chat template gets role tokens
    cfg.model = model.cfg
    run.write_config(cfg)
    record = {"stage": stage, "parent": str(parent), **{k: str(v) for k, v in lineage.items()}}
    atomic_write_text(out / "lineage.json", json.dumps(record))
    return run, device, model, tok


def rewind(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader,
           mon: Monitor, parallel=None) -> int:
    """Back to the last checkpoint, but with the data position of now: the batches that led
    to the anomaly are skipped. Returns the step to continue from."""
    ckpt = list_checkpoints(run.out)[-1]
    data_now = loader.state_dict()
    meta = load_any_checkpoint(ckpt, model, optimizer, parallel)
    loader.load_state_dict(data_now)
    run.truncate_metrics(meta["step"])
    mon.load_state_dict(meta.get("monitor"), rewinding=True)
    return meta["step"]


def fit(run: Run, cfg: Config, model: torch.nn.Module, loader, device: torch.device,
        loss_fn: Callable[[torch.nn.Module, tuple], torch.Tensor],
        evaluate: Callable[[int], dict] | None = None,
        save_model: Callable[[], None] | None = None,
        tokens_per_micro_batch: int = 0, flops_per_token: float = 0.0,
        resume: bool = False, parallel=None,
        count_tokens: Callable[[tuple], int] | None = None) -> None:
    """Train `model` for cfg.train.max_steps optimizer steps.

    loader.next_batch() gives a micro-batch (tensors, moved to `device` here);
    loss_fn(model, batch) returns the mean loss; evaluate(step) returns a metrics row
    (val_loss, ...); save_model() writes DIR/model. Logged "step" = optimizer steps done.
    parallel: a scalelab.parallel.mesh.Parallel when the model is spread over a mesh (every
    rank runs this loop; gradients are synced and clipped over the mesh, rank 0 logs).
    count_tokens(batch): the real (unpadded) tokens of a micro-batch, for stages whose
    batches vary in length; without it or tokens_per_micro_batch, no tokens_per_s is logged.
    """
    tc = cfg.train
    optimizer = make_optimizer(model, tc, device)
    main = parallel is None or parallel.is_main
    if main and tc.max_steps < tc.warmup_steps:
        tqdm.write(f"note: train.max_steps ({tc.max_steps}) is shorter than train.warmup_steps "
                   f"({tc.warmup_steps}): the learning rate only climbs to "
                   f"{lr_at(tc.max_steps - 1, tc):.3g} (train.lr is {tc.lr:g}) and never "
                   "decays; lower train.warmup_steps for a full schedule")
    hw = detect(device)
    n_dev = 1 if parallel is None else parallel.world
    mon = Monitor(cfg.monitor, run.out, main, resume, flops_per_token=flops_per_token,
                  peak_flops=hw.peak_flops * n_dev if hw is not None else 0.0)
    start = 0
    if resume:
        ckpts = list_checkpoints(run.out)
        if not ckpts:
            raise UserError(f"{run.out}: --resume given but no checkpoint in "
                            f"{run.out / 'checkpoints'}")
        meta = load_any_checkpoint(ckpts[-1], model, optimizer, parallel)
        loader.load_state_dict(meta["loader"])
        start = meta["step"]
        run.truncate_metrics(start)
        mon.load_state_dict(meta.get("monitor"))
        mon.step = start
        if main:
            tqdm.write(f"resumed from {ckpts[-1]} (step {start})")
            mon.event({"event": "resumed", "step": start,
                       "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))})
    elif evaluate is not None:
        with mon.clock("eval"):
            first = {"step": 0, **evaluate(0)}
            run.log(first)
        if main:
            mon.mirror(first)

    ctx = autocast(device, tc.dtype)
    step_fn = loss_step(loss_fn, tc)
    bar = Progress(tc.max_steps, start, "train", enabled=main)
    tokens_since = 0
    model.train()
    step = start
    mon.start(tc.max_steps)
    while step < tc.max_steps:
        lr = lr_at(step, tc) * mon.lr_scale(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, step_tokens = torch.zeros((), device=device), 0
        for _ in range(tc.grad_accum):
            with mon.clock("data"):
                mon.stall(step + 1)
                batch = loader.next_batch()
            step_tokens += count_tokens(batch) if count_tokens else tokens_per_micro_batch
            batch = mon.poison(step + 1, tuple(t.to(device, non_blocking=True) for t in batch))
            with ctx:
                loss = mon.corrupt(step + 1, step_fn(model, batch) / tc.grad_accum)
            loss.backward()
            loss_sum += loss.detach()
        if parallel is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        else:
            from scalelab.parallel.apply import clip_grad_norm_, sync_grads
            sync_grads(model, parallel)  # dp all-reduce (FSDP reduced in backward already)
            grad_norm = clip_grad_norm_(model, tc.grad_clip, parallel)
        if parallel is not None and mon.enabled:  # every rank must judge the same numbers
            loss_sum = parallel.mean_over_data(loss_sum)
        seen = mon.check(step + 1, loss_sum, grad_norm)  # None: healthy
        if seen is None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mon.step_done(step + 1)
        if seen is not None and mon.act(seen, bool(list_checkpoints(run.out))) == "rewind":
            with mon.clock("rewind"):
                step = rewind(run, model, optimizer, loader, mon, parallel)
            run.log(mon.rewound(seen, step))
            bar.goto(step)
            tokens_since = 0
            continue
        if seen is not None:
            run.log(mon.skipped(seen))
        done = step + 1
        if seen is None:  # tokens of updates that stand (a rewind restores the count)
            tokens_since += step_tokens
            mon.tokens += step_tokens
        bar.update(1)

        if done % tc.log_every == 0 or done == tc.max_steps:
            if parallel is not None and not mon.enabled:  # data ranks saw different rows
                loss_sum = parallel.mean_over_data(loss_sum)
            loss_val = loss_sum.item()  # the only host sync of a step without the monitor
            if not math.isfinite(loss_val) and not mon.enabled:
                raise RuntimeError(f"loss is {loss_val} at step {done}; lower train.lr?")
            dt = max(1e-9, mon.busy_seconds())  # train + data: not eval, checkpoints
            row = {"step": done, "loss": loss_val, "lr": lr, "grad_norm": float(grad_norm)}
            if mon.tokens:  # 0 = this stage does not count its tokens: say nothing
                row.update(tokens=mon.tokens, tokens_per_s=tokens_since / dt)
            if flops_per_token and mon.tokens:
                row["model_tflops"] = flops_per_token * tokens_since / dt / 1e12
                if mon.peak_flops:
                    row["mfu"] = row["model_tflops"] * 1e12 / mon.peak_flops
            row.update(mon.interval_row())
            run.log(row)
            mon.logged(row)
            post = {"loss": f"{loss_val:.3f}"}
            if "tokens_per_s" in row:
                post["tok/s"] = f"{row['tokens_per_s']:,.0f}"
            if "mfu" in row:
                post["mfu"] = f"{row['mfu']:.1%}"
            bar.set_postfix(post)
            tokens_since = 0

        if evaluate is not None and (done % tc.eval_every == 0 or done == tc.max_steps):
            with mon.clock("eval"):
                model.eval()
                row = evaluate(done)
                model.train()
            run.log({"step": done, **row})
            if main:
                mon.mirror({"step": done, **row})
                bar.write(f"step {done}: " + "  ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v!r}"
                    for k, v in row.items()))
        if done % tc.checkpoint_every == 0 or done == tc.max_steps:
            with mon.clock("checkpoint"):
                if save_model is not None:
                    save_model()
                state = {"loader": loader.state_dict(), "monitor": mon.state_dict()}
                if parallel is None:
                    save_checkpoint(run.out, done, model, optimizer, state,
                                    tc.keep_checkpoints)
                else:
                    from scalelab.parallel.checkpoint import save_sharded
                    save_sharded(run.out, done, model, optimizer, state,
                                 tc.keep_checkpoints, parallel)
        step = done
    bar.close()
    mon.finish()
