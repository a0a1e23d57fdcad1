"""The training loop every stage shares: schedule, accumulation, clipping, logging, evals,
checkpoints and exact resume. A stage supplies only its batches, its loss and its evals."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from scalelab.config import Config, RunFailed, TrainConfig, UserError, dump_toml, read_toml
from scalelab.hardware import autocast, detect, use_compile
from scalelab.hf import add_chat_tokens
from scalelab.io import (
    append_row,
    atomic_write_json,
    atomic_write_text,
    read_json_if_any,
    read_rows,
)
from scalelab.parallel import mesh
from scalelab.parallel.ac import apply_activation_checkpointing
from scalelab.parallel.apply import clip_grads, sync_over_replicas
from scalelab.parallel.rules import check_divisible
from scalelab.train.checkpoint import Checkpointer, load_model
from scalelab.train.monitor import Monitor
from scalelab.train.progress import Progress, say
from scalelab.train.rundir import check_out, claim, release, restart_count, same_input


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    floor = tc.lr * tc.min_lr_ratio
    return floor + (tc.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def one_step(tc: TrainConfig, data_world: int) -> tuple[int, str]:
    """Examples (conversations, pairs, prompts) one optimizer step reads over all data ranks,
    and where that number comes from, for the stages' "too few examples" messages."""
    return (tc.batch_size * data_world * tc.grad_accum,
            f"train.batch_size {tc.batch_size} x {data_world} data rank"
            f"{'s' if data_world > 1 else ''} x train.grad_accum {tc.grad_accum}")


def make_optimizer(model: torch.nn.Module, tc: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW:
    # Weight decay on matrices only; norms (1-D) are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2),
                             fused=device.type == "cuda")


def loss_step(loss_fn: Callable, tc: TrainConfig, device: torch.device) -> Callable:
    """What fit() runs per micro-batch: loss_fn(model, batch), compiled whole (model and loss
    in one graph) when train.compile resolves to on for this device (auto: CUDA only).
    bench/train_throughput.py times this same path."""
    return torch.compile(loss_fn) if use_compile(tc.compile, device) else loss_fn


@torch.no_grad()
def mean_loss(model: torch.nn.Module, loss_fn: Callable, batches: list, device: torch.device,
              dtype: str, units: Callable[[tuple], int] | None = None) -> float:
    """loss_fn(model, batch) averaged over held-out batches, under train.dtype's autocast.
    units(batch): what loss_fn sums over (as fit's loss_units); then the sum over all
    batches divided by their total count, the same however the batches are cut."""
    total = 0.0
    for batch in batches:
        with autocast(device, dtype):
            total += loss_fn(model, tuple(t.to(device) for t in batch)).item()
    return total / (sum(units(b) for b in batches) if units else len(batches))


class Run:
    """A run directory: run.json, config.toml, lineage.json, metrics.jsonl, model/,
    checkpoints/. Nothing of it is written before begin(), which fit() calls once the inputs
    and, on --resume, the checkpoint have loaded: a run that fails before leaves its folder
    (and the config of its next plain --resume) as it was."""

    def __init__(self, out: Path, cfg: Config, resume: bool, write: bool = True,
                 stage: str = "pretrain", lineage: dict | None = None):
        # write=False: a non-zero rank of a parallel run, which writes nothing.
        self.out, self.metrics, self.write = out, out / "metrics.jsonl", write
        self.cfg, self.resume, self.stage, self.lineage = cfg, resume, stage, lineage
        if write:  # new, empty, or this stage's own run (rundir.check_out); else exit 2
            check_out(out, stage, resume)

    def begin(self) -> None:
        """Claim the folder, save the resolved config (and where the model came from)."""
        if not self.write:
            return
        claim(self.out, self.stage, self.resume)
        atomic_write_text(self.out / "config.toml", dump_toml(self.cfg))
        if self.lineage is not None:
            atomic_write_json(self.out / "lineage.json", self.lineage, indent=None)

    def log(self, row: dict) -> None:
        if not self.write:
            return
        append_row(self.metrics, row)

    def truncate_metrics(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from (and any torn last line)."""
        if not self.write or not self.metrics.exists():
            return
        keep = [row for row in read_rows(self.metrics) if row.get("step", 0) <= step]
        atomic_write_text(self.metrics, "".join(json.dumps(row) + "\n" for row in keep))


def start_stage(cfg: Config, out: Path, resume: bool, stage: str, parent: Path, **lineage):
    """What every post-training stage does first: start the mesh (one process without
    torchrun), seed, check the run folder, load the model it starts from (whole, on every
    rank: the stage shards it with parallelize() once it has made its copies) and take its
    [model] as the run's. Nothing is written yet: Run.begin writes config.toml and
    lineage.json once the stage's inputs (and checkpoint) are good.
    Returns (run, par, model, tokenizer)."""
    par = mesh.setup(cfg.parallel, cfg.train.device)
    torch.manual_seed(cfg.train.seed)  # the same on every rank: copies and heads agree
    record = {"stage": stage, **{k: _where(v) for k, v in dict(parent=parent, **lineage).items()},
              **run_seeds(cfg, stage)}
    run = Run(out, cfg, resume, write=par.is_main, stage=stage, lineage=record)
    if resume:
        check_same_inputs(out, record)
    model, tok = load_model(parent, par.device)
    add_chat_tokens(model, tok)  # an imported folder without a chat template gets role tokens
    if not par.single:
        check_divisible(model.cfg, par.rules, par.sizes)
    cfg.model = model.cfg  # the parent's architecture, always (config.check_stage_overrides)
    return run, par, model, tok


def _where(v) -> str:
    """A model folder as an absolute path (lineage.json then reads the same from any working
    folder); a spec such as builtin:gold as given."""
    return str(Path(v).resolve()) if Path(v).exists() else str(v)


def run_seeds(cfg: Config, stage: str) -> dict[str, int]:
    """The seeds a stage draws from: train.seed (data order, initial heads) and its own
    section's (sft.seed: built-in examples; reward.seed: sampled answers; ppo.seed: rollouts).
    Part of the lineage record, so --resume refuses another seed like another --data."""
    own = getattr(cfg, stage, None)
    return {"train.seed": cfg.train.seed,
            **({f"{stage}.seed": own.seed} if hasattr(own, "seed") else {})}


def check_same_inputs(out: Path, record: dict) -> None:
    """--resume with another model to start from (or another reward model, or other --data
    or --prompts) would splice two runs into one folder and, for PPO and DPO, swap the
    reference model unseen; another seed (train.seed, ...) would not repeat the run it
    continues: refused. A record without a key (an older run) is not compared."""
    was = read_json_if_any(out / "lineage.json")
    for key, now in record.items():
        old = was.get(key)
        if old is None or (same_input(old, now) if isinstance(old, str) else old == now):
            continue
        if "." in key:  # a config key: train.seed, ...
            raise UserError(f"--resume {out}: {key} = {now!r}, but the run was started with "
                            f"{key} = {old!r} (lineage.json), and a resumed run repeats the "
                            "uninterrupted one only with the same seed; drop the change, or "
                            "start a new --out")
        what = "model it started from" if key == "parent" else f"--{key} it used"
        raise UserError(f"--resume {out}: the {what} was {old} (lineage.json), not {now}; "
                        "resume with the same one, or start a new --out")


def read_toml_if_any(path: Path) -> dict:
    """A run's own config.toml, or {} when it is missing or unreadable."""
    try:
        return read_toml(path)
    except UserError:
        return {}


def start_or_resume(run: Run, ckpts: Checkpointer, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, loader, mon: Monitor) -> dict:
    """On --resume: model, optimizer, RNG, data position and monitor from the last
    checkpoint; returns its state.json (the stage's own state too), {} on a fresh start.
    Then, inputs and checkpoint known good, the run folder is written (Run.begin)."""
    meta = ckpts.load(model, optimizer) if run.resume else {}
    if meta:
        loader.load_state_dict(meta["loader"])
    run.begin()
    ckpts.drop_unfinished()  # what a killed run was writing: the folder is ours now
    if meta:
        run.truncate_metrics(meta["step"])
        mon.load_state_dict(meta.get("monitor"))
        mon.step = meta["step"]
        if mon.main:
            tqdm.write(f"resumed from {ckpts.latest()} (step {meta['step']})")
            mon.event({"event": "resumed", "step": meta["step"],
                       "restart": restart_count()})
    return meta


def rewind(run: Run, ckpts: Checkpointer, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, loader, mon: Monitor) -> int:
    """Back to the last checkpoint, but with the data position of now: the batches that led
    to the anomaly are skipped. Returns the step to continue from."""
    data_now = loader.state_dict()
    meta = ckpts.load(model, optimizer)
    loader.load_state_dict(data_now)
    run.truncate_metrics(meta["step"])
    mon.load_state_dict(meta.get("monitor"), rewinding=True)
    return meta["step"]


class Step:
    """One optimizer step of a stage, as fit() runs it; the runtime does the rest (schedule,
    monitor verdicts, logging, evals, checkpoints, resume). SupervisedStep serves pretrain,
    SFT, reward and DPO; ppo.py supplies PPO's (rollouts, then clipped updates). A step has:
      lr_at(step) -> the learning rate before the monitor's scale;
      update(step, optimizer, mon) -> optimizer step `step` + 1 with the lr set: the anomaly
        seen (a dict for mon.act), or None when healthy;
      row(done, lr, mon) -> the metrics row after step `done`, or None on steps not logged
        (every rank calls it: it may be collective under a mesh)."""
    desc = "train"  # the progress bar's label
    can_rewind = True  # on an anomaly the monitor may go back to the last checkpoint

    def __init__(self, state: dict | None = None):
        self.state = state or {}  # the stage's own state: in checkpoints, back on resume


class SupervisedStep(Step):
    """grad_accum micro-batches of loss_fn(model, batch), gradients synced and clipped over the
    mesh, the monitor's verdict, the update; a row every train.log_every steps. See fit()."""

    def __init__(self, model: torch.nn.Module, loader, loss_fn: Callable, tc: TrainConfig,
                 device: torch.device, parallel, tokens_per_micro_batch: int,
                 flops_per_token: float, count_tokens: Callable | None,
                 loss_units: Callable | None):
        super().__init__()
        self.model, self.loader, self.tc, self.device, self.parallel = \
            model, loader, tc, device, parallel
        self.step_fn, self.ctx = loss_step(loss_fn, tc, device), autocast(device, tc.dtype)
        self.tokens_per_micro_batch, self.flops_per_token = tokens_per_micro_batch, \
            flops_per_token
        self.count_tokens, self.loss_units = count_tokens, loss_units
        if (parallel is None or parallel.is_main) and tc.max_steps < tc.warmup_steps:
            tqdm.write(f"note: train.max_steps ({tc.max_steps}) is shorter than "
                       f"train.warmup_steps ({tc.warmup_steps}): the learning rate only climbs "
                       f"to {lr_at(tc.max_steps - 1, tc):.3g} (train.lr is {tc.lr:g}) and "
                       "never decays; lower train.warmup_steps for a full schedule")

    def lr_at(self, step: int) -> float:
        return lr_at(step, self.tc)

    def update(self, step: int, optimizer: torch.optim.Optimizer, mon: Monitor) -> dict | None:
        tc, parallel, device = self.tc, self.parallel, self.device
        loss_sum, batches = torch.zeros((), device=device), []
        with mon.clock("data"):
            for _ in range(tc.grad_accum):
                mon.stall(step + 1)
                batches.append(self.loader.next_batch())
        # Counts summed over data ranks in one all-reduce: the loss's units (sum / global
        # count, see fit) and, for stages whose rows vary, the step's tokens.
        units = sum(self.loss_units(b) for b in batches) if self.loss_units else 0
        step_tokens = sum(self.count_tokens(b) for b in batches) if self.count_tokens else \
            self.tokens_per_micro_batch * tc.grad_accum  # pretraining's is global already
        if parallel is not None and (self.loss_units or self.count_tokens):
            units, summed = parallel.sum_over_data(units, step_tokens)
            step_tokens = summed if self.count_tokens else step_tokens
        scale = 1 / tc.grad_accum
        if self.loss_units is not None:
            scale = (1 if parallel is None else parallel.data_world) / max(units, 1)
        for i, batch in enumerate(batches):
            batch = mon.poison(step + 1, tuple(t.to(device, non_blocking=True) for t in batch))
            with self.ctx:
                loss = mon.corrupt(step + 1, self.step_fn(self.model, batch) * scale)
            if parallel is not None:  # all-reduce over dp in the last backward only
                sync_over_replicas(self.model, i == len(batches) - 1)
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_grads(self.model, tc.grad_clip, parallel)
        if parallel is not None and mon.enabled:  # every rank must judge the same numbers
            loss_sum = parallel.mean_over_data(loss_sum)
        seen = mon.check(step + 1, loss_sum, grad_norm)  # None: healthy
        if seen is None:
            optimizer.step()
            mon.count_tokens(step_tokens)  # of updates that stand (a rewind restores them)
        optimizer.zero_grad(set_to_none=True)
        self.loss_sum, self.grad_norm = loss_sum, grad_norm
        return seen

    def row(self, done: int, lr: float, mon: Monitor) -> dict | None:
        tc, loss_sum = self.tc, self.loss_sum
        if done % tc.log_every and done != tc.max_steps:
            return None
        if self.parallel is not None and not mon.enabled:  # data ranks saw different rows
            loss_sum = self.parallel.mean_over_data(loss_sum)
        loss_val = loss_sum.item()  # the only host sync of a step without the monitor
        if not math.isfinite(loss_val) and not mon.enabled:
            raise RunFailed(f"loss is {loss_val} at step {done} (monitor.enabled = false: no "
                            "step was judged); lower train.lr, or turn the monitor on")
        dt = max(1e-9, mon.busy_seconds())  # train + data: not eval, checkpoints
        row = {"step": done, "loss": loss_val, "lr": lr, "grad_norm": float(self.grad_norm)}
        if mon.tokens:  # 0 = this stage does not count its tokens: say nothing
            row.update(tokens=mon.tokens, tokens_per_s=mon.interval_tokens / dt)
        if self.flops_per_token and mon.tokens:
            row["model_tflops"] = self.flops_per_token * mon.interval_tokens / dt / 1e12
            if mon.peak_flops:
                row["mfu"] = row["model_tflops"] * 1e12 / mon.peak_flops
        row.update(mon.interval_row())
        return row


# What the progress bar shows of a logged row, where the row has it.
SHOWN = (("loss", "loss", ".3f"), ("tokens_per_s", "tok/s", ",.0f"), ("mfu", "mfu", ".1%"),
         ("objective/scores", "score", ".2f"), ("objective/kl", "kl", ".2f"),
         ("gold_reward", "gold", ".2f"))


def fit(run: Run, cfg: Config, model: torch.nn.Module, loader, device: torch.device,
        loss_fn: Callable[[torch.nn.Module, tuple], torch.Tensor] | None = None,
        evaluate: Callable[[int], dict] | None = None,
        save_model: Callable[[], None] | None = None,
        tokens_per_micro_batch: int = 0, flops_per_token: float = 0.0, parallel=None,
        count_tokens: Callable[[tuple], int] | None = None,
        loss_units: Callable[[tuple], int] | None = None, step: Step | None = None) -> None:
    """Train `model` for cfg.train.max_steps optimizer steps.

    loader.next_batch() gives a micro-batch (tensors, moved to `device` here);
    loss_fn(model, batch) returns the mean loss; evaluate(step) returns a metrics row
    (val_loss, ...); save_model() writes DIR/model. Logged "step" = optimizer steps done.
    parallel: a scalelab.parallel.mesh.Parallel when the model is spread over a mesh (every
    rank runs this loop; gradients are synced and clipped over the mesh, rank 0 logs).
    count_tokens(batch): the real (unpadded) tokens of a micro-batch (summed over data ranks
    under a mesh), for stages whose batches vary in length; without it or
    tokens_per_micro_batch, no tokens_per_s is logged.
    loss_units(batch): what the loss averages over in a micro-batch (assistant tokens,
    pairs); then loss_fn returns the SUM over them, and the step's loss is that sum over all
    micro-batches and data ranks divided by their global count, so the weighting of each
    token does not depend on grad_accum or the mapping. Without it, loss_fn's mean is
    averaged over micro-batches (right when every micro-batch holds as many units).
    step: a stage's own optimizer step (PPO's) instead of the SupervisedStep of loss_fn;
    `loader` then only needs state_dict/load_state_dict (its place is checkpointed).
    """
    tc = cfg.train
    apply_activation_checkpointing(model, tc.activation_checkpointing)  # names, class unchanged
    optimizer = make_optimizer(model, tc, device)
    main = parallel is None or parallel.is_main
    stage = step or SupervisedStep(model, loader, loss_fn, tc, device, parallel,
                                   tokens_per_micro_batch, flops_per_token, count_tokens,
                                   loss_units)
    hw = detect(device)
    n_dev = 1 if parallel is None else parallel.world
    mon = Monitor(cfg.monitor, run.out, main, run.resume, flops_per_token=flops_per_token,
                  peak_flops=hw.peak_flops * n_dev if hw is not None else 0.0)
    ckpts = Checkpointer(run.out, tc.keep_checkpoints, parallel)
    planned = read_toml_if_any(run.out / "config.toml").get("train", {}).get("max_steps") \
        if run.resume else None  # before start_or_resume writes this run's config.toml
    meta = start_or_resume(run, ckpts, model, optimizer, loader, mon)
    stage.state.update({k: meta[k] for k in stage.state if k in meta})
    if meta and main and planned not in (None, tc.max_steps):
        at = meta["step"]
        say(f"note: train.max_steps is {tc.max_steps}, was {planned}: the learning-rate "
            f"schedule now ends at step {tc.max_steps}, so at step {at} the lr goes from "
            f"{optimizer.param_groups[0]['lr']:.4g} to {stage.lr_at(at) * mon.lr_scale(at):.4g}")
    if not run.resume and evaluate is not None:
        with mon.clock("eval"):
            first = {"step": 0, **evaluate(0)}
            run.log(first)
        if main:
            mon.mirror(first)

    bar = Progress(tc.max_steps, meta.get("step", 0), stage.desc, enabled=main)
    model.train()
    at = meta.get("step", 0)  # optimizer steps done
    mon.start(tc.max_steps)
    while at < tc.max_steps:
        lr = stage.lr_at(at) * mon.lr_scale(at)
        for group in optimizer.param_groups:
            group["lr"] = lr
        seen = stage.update(at, optimizer, mon)
        mon.step_done(at + 1)
        if seen is not None and mon.act(seen, stage.can_rewind and
                                        ckpts.latest() is not None) == "rewind":
            with mon.clock("rewind"):
                at = rewind(run, ckpts, model, optimizer, loader, mon)
                row = mon.rewound(seen, at)
                ckpts.restate(at, {"loader": loader.state_dict(), "monitor": mon.state_dict()})
            run.log(row)
            bar.goto(at)
            continue
        if seen is not None:
            run.log(mon.skipped(seen))
        done = at + 1
        bar.update(1)
        row = stage.row(done, lr, mon)
        if row is not None:
            run.log(row)
            mon.logged(row)
            bar.set_postfix({name: format(row[k], spec) for k, name, spec in SHOWN if k in row})

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
                mon.checkpointed()  # (before its state is taken: the rewinds count restarts)
                ckpts.save(done, model, optimizer, {"loader": loader.state_dict(),
                                                    "monitor": mon.state_dict(), **stage.state})
        at = done
    bar.close()
    mon.finish()
    release(run.out)  # the run folder is written: another command may take it now
