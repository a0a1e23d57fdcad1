"""Checkpoints that move between mappings.

Under a mesh, DIR/checkpoints/step_N/ holds dcp/ (torch.distributed.checkpoint: each rank
writes its own shards plus a global index, keyed by parameter name and global shape) and
state.json (step, data position, the mapping it was saved under). Loading reads whatever
slices the *current* mapping needs, so a checkpoint saved under fsdp=2 x tp=2 resumes under
dp=4 or in one plain process (DCP needs no process group to load).

DIR/model/ is always one consolidated model.safetensors, so `scalelab generate` and later
stages never see shards.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from scalelab.config import UserError
from scalelab.parallel.mesh import Parallel
from scalelab.train.checkpoint import (
    fresh_tmp,
    list_checkpoints,
    read_json,
    read_tensors,
    replace_dir,
    save_model,
    tied_names,
)


def is_sharded(ckpt: Path) -> bool:
    return (ckpt / "dcp").is_dir()


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {"model": get_model_state_dict(model),
            "optim": get_optimizer_state_dict(model, optimizer),
            "rng": {"cpu": torch.get_rng_state()}}


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, state: dict, keep: int,
                 par: Parallel) -> Path:
    """Every rank calls this; each writes its shards, rank 0 the metadata and the rename."""
    final = run_dir / "checkpoints" / f"step_{step}"
    tmp = final.with_name(f".{final.name}.tmp")
    if par.is_main:
        fresh_tmp(final)
    par.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=str(tmp / "dcp"))
    if par.is_main:
        meta = {"step": step, "mapping": par.sizes, **state}
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        replace_dir(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    par.barrier()
    return final


def load_sharded(ckpt: Path, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG in place under the current mapping; return state.json."""
    meta = read_json(ckpt / "state.json")
    state = _state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(ckpt / "dcp"))
    except Exception as e:  # DCP raises a CheckpointException wrapping per-rank errors
        raise UserError(f"{ckpt / 'dcp'}: cannot load this checkpoint ({e})") from None
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    torch.set_rng_state(state["rng"]["cpu"])
    return meta


def load_single_into_mesh(ckpt: Path, model: torch.nn.Module,
                          optimizer: torch.optim.Optimizer) -> dict:
    """A one-process checkpoint (whole tensors in safetensors, optimizer state keyed by
    position) loaded into a sharded model: every rank reads the file and keeps its slices."""
    meta = read_json(ckpt / "state.json")
    weights = read_tensors(ckpt / "model.safetensors")
    for name in tied_names(model):  # lm_head.weight (or trunk.lm_head.weight) is embed's
        weights.setdefault(name, weights.get(name.replace("lm_head", "embed")))
    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=full)
    # Position i in the saved optimizer state = i-th parameter of the param groups, in order.
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state: dict[str, dict] = {}
    for key, v in read_tensors(ckpt / "state.safetensors").items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(order[int(idx)], {})[name] = v
    groups, start = [], 0
    for g in meta["param_groups"]:
        groups.append({**g, "params": order[start: start + len(g["params"])]})
        start += len(g["params"])
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=full)
    return meta


def full_model_tensors(model: torch.nn.Module, par: Parallel) -> dict[str, torch.Tensor]:
    """The whole model as plain CPU tensors on rank 0 (collective: every rank must call)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    for name in tied_names(model):
        sd.pop(name, None)
    return {k: v.contiguous() for k, v in sd.items()} if par.is_main else {}


def save_full_model(model: torch.nn.Module, tok, final: Path, par: Parallel,
                    extra_json: dict[str, dict] | None = None) -> None:
    """DIR/model as one safetensors file, from one process or a mesh (collective: every rank
    calls; rank 0 writes)."""
    if par.single:
        return save_model(model, tok, final, extra_json=extra_json)
    tensors = full_model_tensors(model, par)
    if par.is_main:
        save_model(model, tok, final, tensors, extra_json=extra_json)
    par.barrier()
