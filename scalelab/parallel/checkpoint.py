"""Sharded checkpoints that move between mappings: dcp/ in a checkpoint folder
(torch.distributed.checkpoint: each rank writes its own shards plus a global index, keyed by
parameter name and global shape). Loading reads whatever slices the *current* mapping needs,
so a checkpoint saved under fsdp=2 x tp=2 resumes under dp=4 or in one plain process.
train.checkpoint.Checkpointer owns the folder (atomic rename, RNG, pruning). DIR/model/ is
always one consolidated model.safetensors (full_model_tensors): later stages see no shards.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from scalelab.config import UserError
from scalelab.parallel.mesh import Parallel


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer)}


def first_failure(e: CheckpointException) -> BaseException:
    """DCP wraps each rank's error (with its traceback) in one CheckpointException, which
    every rank raises; this is the first rank's own error."""
    failures = sorted(e.failures.items())
    return failures[0][1][0] if failures else e


def write_sharded(folder: Path, model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer) -> None:
    """Collective: every rank writes its shards of model and optimizer into folder/dcp.
    A write error (a full disk) on any rank is raised as that OSError on every rank."""
    try:
        dcp.save(_state(model, optimizer), checkpoint_id=str(folder / "dcp"))
    except CheckpointException as e:
        cause = first_failure(e)
        if isinstance(cause, OSError):
            raise cause from None
        raise


def read_sharded(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer in place under the current mapping (or in one process)."""
    state = _state(model, optimizer)
    try:
        with warnings.catch_warnings():  # one plain process reading shards is intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    except CheckpointException as e:  # a BaseException, wrapping each rank's error
        cause = first_failure(e)
        why = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        raise UserError(f"{ckpt / 'dcp'}: cannot load this checkpoint ({why})") from None
    except Exception as e:
        raise UserError(f"{ckpt / 'dcp'}: cannot load this checkpoint ({e})") from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def full_model_tensors(model: torch.nn.Module, par: Parallel) -> dict[str, torch.Tensor]:
    """The whole model as CPU tensors on rank 0, a tied weight under both its names
    (collective: every rank must call)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    return sd if par.is_main else {}
