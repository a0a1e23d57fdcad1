"""Pretraining: corpus -> tokenizer -> token files -> next-token prediction."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from scalelab.config import Config, TrainConfig, UserError, read_toml
from scalelab.data.tokens import (
    TokenLoader,
    load_meta,
    read_documents,
    split_documents,
    write_token_files,
)
from scalelab.generate import generate
from scalelab.model import Transformer, check_shape
from scalelab.parallel import mesh
from scalelab.parallel.apply import parallelize
from scalelab.parallel.rules import check_divisible
from scalelab.tokenizer import Tokenizer
from scalelab.train.checkpoint import save_full_model
from scalelab.train.loop import Run, fit, mean_loss
from scalelab.train.losses import cross_entropy
from scalelab.train.rundir import claim, same_input


def check_same_data(cfg: Config, saved: Path) -> None:
    """A run's token files are made once: a [data] value changed on --resume would be
    written into its config.toml but never used, so it is refused. So is another
    train.seed: the data order comes from it, and a resumed run must repeat the
    uninterrupted one (post-training stages refuse it through lineage.json)."""
    if not saved.is_file():
        return
    toml = read_toml(saved)
    was = toml.get("train", {}).get("seed")
    if was is not None and was != cfg.train.seed:
        raise UserError(f"--resume: train.seed = {cfg.train.seed!r}, but the run was started "
                        f"with train.seed = {was!r} ({saved}), and a resumed run repeats the "
                        "uninterrupted one only with the same seed; drop the change, or start "
                        "a new run")
    old = toml.get("data", {})
    for key, value in asdict(cfg.data).items():
        if key not in old or old[key] == value:
            continue
        if key in ("source", "val_source") and same_input(old[key], value):
            continue  # a path named from another folder (a sweep resumed elsewhere)
        raise UserError(f"data.{key} = {value!r} differs from {old[key]!r} in {saved}: a "
                        "resumed run keeps the token files it was started on; drop that "
                        "change, or start a new run for new data")


def check_same_model(cfg: Config, saved: Path) -> None:
    """On --resume the checkpoint holds weights of the run's [model] (resolved: 0 = auto is
    explicit in config.toml) and its data position counts windows of model.seq_len tokens:
    every model.* change is refused, each one named."""
    old = read_toml(saved).get("model", {}) if saved.is_file() else {}
    changes = [f"model.{key} = {value!r} (was {old[key]!r})"
               for key, value in asdict(check_shape(cfg.model)).items()
               if key in old and old[key] != value]
    if changes:
        raise UserError(f"--resume: {'; '.join(changes)}: a resumed run keeps the model it "
                        f"was started with ([model] in {saved}); drop the model.* change, or "
                        "start a new run")


def prepare_data(cfg: Config, out: Path, reuse: bool, run: bool = True
                 ) -> tuple[Tokenizer, Path]:
    """Train the tokenizer and write token files once per run (reused on --resume).
    run=False: `out` is no run folder but data shared by several (a sweep's)."""
    data_dir, tok_path = out / "data", out / "tokenizer.json"
    if reuse and tok_path.exists() and (data_dir / "meta.json").exists():
        check_same_data(cfg, out / "config.toml")
        return Tokenizer.load(tok_path), data_dir
    train, val = split_documents(read_documents(cfg.data), cfg.data)
    tqdm.write(f"corpus: {len(train):,} training and {len(val):,} validation documents; "
               f"training a {cfg.data.tokenizer_vocab}-token BPE tokenizer")
    tok = Tokenizer.train(train, cfg.data.tokenizer_vocab)  # validation text stays unseen
    if tok.vocab_size < cfg.data.tokenizer_vocab:
        tqdm.write(f"note: data.tokenizer_vocab is {cfg.data.tokenizer_vocab}, but this corpus "
                   f"supports only {tok.vocab_size} tokens (BPE ran out of pairs to merge); "
                   f"the tokenizer has {tok.vocab_size}")
    if run:  # run.json before the first write: a run interrupted while writing its token
        claim(out, "pretrain", reuse)  # files is still this command's own, to run again
    meta = write_token_files({"train": train, "val": val}, tok, data_dir)
    tok.save(tok_path)  # atomic (Tokenizer.save)
    tqdm.write(f"tokens: {meta['train']['tokens']:,} train, {meta['val']['tokens']:,} val")
    return tok, data_dir


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean next-token loss: losses.cross_entropy (chunked eagerly, plain under compile)."""
    x, y = batch
    if is_sharded(model):  # FSDP gathers the weights in forward(): the plain loss
        logits = model(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
    return cross_entropy(model.hidden(x), model.lm_head.weight, y)


def is_sharded(model: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(model.lm_head.weight, DTensor)


def val_batches(data_dir: Path, tc: TrainConfig, seq_len: int, data_world: int) -> list[tuple]:
    """The held-out windows of train.eval_batches global batches (batch_size x data ranks),
    which every rank evaluates, so val_loss does not depend on the mapping; cut into
    batches of batch_size rows, so an eval forward is no bigger than a training micro-batch
    (under a mesh the loss makes whole logits: a global batch's were data-ranks times as
    many)."""
    whole = TokenLoader(data_dir, "val", tc.batch_size * data_world, seq_len)
    return [(x[i:i + tc.batch_size], y[i:i + tc.batch_size])
            for x, y in whole.fixed_batches(tc.eval_batches)
            for i in range(0, len(x), tc.batch_size)]


def pretrain(cfg: Config, out: Path, resume: bool = False) -> Path:
    """Under torchrun every rank runs this; train.batch_size is per data rank (dp x fsdp)."""
    try:  # a shape that cannot work is refused before the corpus and tokenizer are built
        check_shape(cfg.model)
    except ValueError as e:
        raise UserError(f"[model] config: {e}") from None
    par = mesh.setup(cfg.parallel, cfg.train.device)  # one process: no process group at all
    if not par.single:  # before anything is written, so a bad mesh leaves no half run
        check_divisible(cfg.model, par.rules, par.sizes)
    torch.manual_seed(cfg.train.seed)  # same seed everywhere: every rank builds the same model
    device = par.device
    with par.together():  # rank 0 checks the run folder and writes the data; the rest wait
        if par.is_main:  # (on the CPU, however long), and its bad input is every rank's
            run = Run(out, cfg, resume)  # refuses to overwrite an existing run before any work
            tok, data_dir = prepare_data(cfg, out, reuse=resume)
    if not par.is_main:
        run = Run(out, cfg, resume, write=False)
        tok, data_dir = prepare_data(cfg, out, reuse=True)  # rank 0 made it: just load
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = 64 * math.ceil(tok.vocab_size / 64)  # friendlier matmul shapes
    elif cfg.model.vocab_size < tok.vocab_size:
        raise UserError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the "
                        f"tokenizer's {tok.vocab_size} tokens; leave it 0 to take the "
                        "tokenizer's")
    if resume:
        check_same_model(cfg, out / "config.toml")
    try:
        model = Transformer(cfg.model).to(device)
    except ValueError as e:
        raise UserError(f"[model] config: {e}") from None
    cfg.model = model.cfg  # resolved: every 0 = auto is now explicit (saved by run.begin)
    mc, tc = model.cfg, cfg.train
    say = tqdm.write if par.is_main else (lambda _: None)
    flops_per_token = model.flops_per_token()
    say(f"model: {model.num_params():,} parameters N (a tied embedding counted once), "
        f"{flops_per_token:.3g} FLOPs/token, device {device}")
    if not par.single:
        parallelize(model, par, tc.dtype)
        say("mesh: " + " x ".join(f"{a}={n}" for a, n in par.sizes.items()) +
            f" ({par.world} processes, backend {torch.distributed.get_backend()})")

    loader = TokenLoader(data_dir, "train", tc.batch_size, mc.seq_len, seed=tc.seed,
                         rank=par.data_rank, world=par.data_world, accum=tc.grad_accum)
    meta = load_meta(data_dir)
    if (meta["val"]["tokens"] - 1) // mc.seq_len < tc.batch_size * par.data_world:
        raise UserError(f"{data_dir}: the validation split holds {meta['val']['tokens']:,} "
                        f"tokens ({meta['val']['docs']} documents), too few for one batch of "
                        f"{tc.batch_size * par.data_world} x {mc.seq_len}; raise "
                        f"data.val_fraction (now {cfg.data.val_fraction}), name held-out text "
                        "with data.val_source, or lower train.batch_size / model.seq_len")
    val = val_batches(data_dir, tc, mc.seq_len, par.data_world)
    bytes_per_token = meta["val"]["bytes"] / meta["val"]["tokens"]
    prompt = tok.encode_prompt(tc.sample_prompt)
    sample_every = tc.sample_every or tc.eval_every

    def evaluate(step: int) -> dict:
        loss = mean_loss(model, next_token_loss, val, device, tc.dtype)
        row = {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}
        # Sampling with a KV cache needs whole heads: only in one process.
        if par.single and len(prompt) < mc.seq_len and (step % sample_every == 0 or
                                                        step == tc.max_steps):
            g = torch.Generator(device=device).manual_seed(tc.seed)
            new = generate(model, [prompt], 48, tok.pad_id, tok.eos_id, temperature=0.8,
                           top_k=50, generator=g, vocab_limit=tok.vocab_size)[0]
            row["sample"] = tc.sample_prompt + tok.decode(new)
        return row

    fit(run, cfg, model, loader, device, next_token_loss, evaluate,
        save_model=lambda: save_full_model(model, tok, out / "model", par),  # collective
        tokens_per_micro_batch=tc.batch_size * mc.seq_len * par.data_world,
        flops_per_token=flops_per_token, parallel=None if par.single else par)
    return out / "model"
