"""The config.json of a scalelab model folder, checked against its weights before any tensor
is allocated: a damaged or hand-edited folder is bad input (exit 2 naming the file and key),
not a traceback, a hang (n_layer = 10**12) or an allocation of terabytes."""

from __future__ import annotations

import re
from pathlib import Path

from scalelab.config import Config, ModelConfig, UserError, apply_dict

MAX_SEQ_LEN = 1 << 22  # rope tables are allocated for seq_len positions; 4M is already absurd


def checked_model_config(folder: Path, raw, shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    """raw: the parsed config.json; shapes: name -> shape of the tensors in model.safetensors."""
    where = folder / "config.json"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a JSON object of model settings")
    cfg = apply_dict(Config(), {"model": raw}, str(where)).model  # types and ranges, by key
    if cfg.seq_len > MAX_SEQ_LEN:
        raise UserError(f"{where}: 'seq_len' = {cfg.seq_len} is implausible (at most "
                        f"{MAX_SEQ_LEN})")
    # (a reward model's names start with its trunk's prefix)
    layers = {m.group(1) for k in shapes if (m := re.search(r"(?:^|\.)blocks\.(\d+)\.", k))}
    weights = folder / "model.safetensors"
    if len(layers) != cfg.n_layer:
        raise UserError(f"{where}: 'n_layer' = {cfg.n_layer} but {weights} holds "
                        f"{len(layers)} layers")
    embed = next((s for k, s in shapes.items() if re.search(r"(?:^|\.)embed\.weight$", k)),
                 None)
    if embed is not None and embed != (cfg.vocab_size, cfg.d_model):
        raise UserError(f"{where}: 'vocab_size' x 'd_model' = {cfg.vocab_size} x "
                        f"{cfg.d_model} but embed.weight in {weights} is {embed[0]} x "
                        f"{embed[1]}")
    return cfg
