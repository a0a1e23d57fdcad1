"""Pretraining: corpus -> tokenizer -> token files -> next-token prediction."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from scalelab.config import Config, UserError
from scalelab.data.tokens import TokenLoader, load_meta, read_documents, write_token_files
from scalelab.generate import generate
from scalelab.model import Transformer
from scalelab.tokenizer import Tokenizer
from scalelab.train.checkpoint import save_model
from scalelab.train.loop import Run, autocast, fit, pick_device


def prepare_data(cfg: Config, out: Path) -> tuple[Tokenizer, Path]:
    """Train the tokenizer and write token files once per run (reused on --resume)."""
    data_dir, tok_path = out / "data", out / "tokenizer.json"
    if tok_path.exists() and (data_dir / "meta.json").exists():
        return Tokenizer.load(tok_path), data_dir
    docs = read_documents(cfg.data)
    tqdm.write(f"corpus: {len(docs):,} documents; training a {cfg.data.tokenizer_vocab}-token "
               "BPE tokenizer")
    tok = Tokenizer.train(docs, cfg.data.tokenizer_vocab)
    meta = write_token_files(docs, tok, data_dir, cfg.data.val_fraction)
    tmp = out / ".tokenizer.json.tmp"
    tok.save(tmp)
    tmp.replace(tok_path)
    tqdm.write(f"tokens: {meta['train']['tokens']:,} train, {meta['val']['tokens']:,} val")
    return tok, data_dir


def next_token_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batches: list, device: torch.device, ctx) -> float:
    total = 0.0
    for x, y in batches:
        with ctx:
            total += next_token_loss(model, (x.to(device), y.to(device))).item()
    return total / len(batches)


def pretrain(cfg: Config, out: Path, resume: bool = False) -> Path:
    torch.manual_seed(cfg.train.seed)
    run = Run(out, cfg, resume)  # refuses to overwrite an existing run before any work
    device = pick_device(cfg.train.device)
    tok, data_dir = prepare_data(cfg, out)
    if not cfg.model.vocab_size:
        cfg.model.vocab_size = 64 * math.ceil(tok.vocab_size / 64)  # friendlier matmul shapes
    try:
        model = Transformer(cfg.model).to(device)
    except ValueError as e:
        raise UserError(f"[model] config: {e}") from None
    cfg.model = model.cfg  # resolved: every 0 = auto is now explicit
    run.write_config(cfg)
    mc, tc = model.cfg, cfg.train
    tqdm.write(f"model: {model.num_params():,} parameters (non-embedding), "
               f"{model.flops_per_token():.3g} FLOPs/token, device {device}")

    loader = TokenLoader(data_dir, "train", tc.batch_size, mc.seq_len, seed=tc.seed)
    val = TokenLoader(data_dir, "val", tc.batch_size, mc.seq_len).fixed_batches(tc.eval_batches)
    meta = load_meta(data_dir)
    bytes_per_token = meta["val"]["bytes"] / meta["val"]["tokens"]
    ctx = autocast(device, tc.dtype)
    prompt = tok.encode(tc.sample_prompt, bos=True)
    sample_every = tc.sample_every or tc.eval_every

    def evaluate(step: int) -> dict:
        loss = eval_loss(model, val, device, ctx)
        row = {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}
        if step % sample_every == 0 or step == tc.max_steps:
            g = torch.Generator(device=device).manual_seed(tc.seed)
            new = generate(model, [prompt], 48, tok.pad_id, tok.eos_id, temperature=0.8,
                           top_k=50, generator=g)[0]
            row["sample"] = tc.sample_prompt + tok.decode(new)
        return row

    fit(run, cfg, model, loader, device, next_token_loss, evaluate,
        save_model=lambda: save_model(model, tok, out / "model"),
        tokens_per_micro_batch=tc.batch_size * mc.seq_len,
        flops_per_token=model.flops_per_token(), resume=resume)
    return out / "model"
