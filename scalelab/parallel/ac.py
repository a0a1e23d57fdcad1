"""Activation checkpointing, applied from outside the model (as torchtitan does).

`train.activation_checkpointing`:
  "none"       keep every activation for backward (fastest, most memory);
  "full"       keep only each block's input; backward runs the block's forward again;
  "selective"  checkpoint every second block (half the recompute, about half the saving).
true means "full", false "none".

Each chosen `model.Block` keeps its class and its parameter names (state dicts, checkpoints,
the axis rules and FSDP/TP hooks see nothing new): only its `forward` is replaced, per
instance, by one that runs the original under `torch.utils.checkpoint` when gradients are
being recorded. FSDP's gather and TP's hooks wrap `forward` from outside, so they run once
in forward and the recompute sees the gathered weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from scalelab.model import Block

MODES = ("none", "full", "selective")


def ac_mode(setting: bool | str) -> str:
    """"none", "full" or "selective" from the config value (true = full, false = none;
    config.py let nothing else through)."""
    return ("full" if setting else "none") if isinstance(setting, bool) else setting


def checkpointed_blocks(n_layer: int, setting: bool | str) -> list[int]:
    """Which block indices recompute their activations in backward."""
    every = {"none": 0, "full": 1, "selective": 2}[ac_mode(setting)]
    return list(range(0, n_layer, every)) if every else []


def apply_activation_checkpointing(model: nn.Module, setting: bool | str) -> int:
    """Checkpoint the model's blocks per the setting; returns how many are checkpointed.
    Applying it twice changes nothing."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    chosen = checkpointed_blocks(len(blocks), setting)
    for i in chosen:
        block = blocks[i]
        if "forward" in vars(block):  # already wrapped
            continue
        plain = block.forward  # the bound class method

        def forward(*args, _plain=plain, **kwargs):
            if not torch.is_grad_enabled():  # eval, generation: nothing to save anyway
                return _plain(*args, **kwargs)
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return len(chosen)
