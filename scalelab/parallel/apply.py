"""Apply the axis-rules table to a model: tensor parallel, then FSDP2 over the data ranks.

Nothing here is written per layer type: each weight's logical axes (model.LOGICAL_AXES) and
the table give its placement. In order (as torchtitan does):
  1. tp:      a linear whose output dim maps to tp is ColwiseParallel, whose input dim maps
              to tp is RowwiseParallel; everything else stays whole on every tp rank.
  2. dp/fsdp: `fully_shard` each block, then the root, on the (dp, fsdp) mesh, cutting each
              weight along the dim that maps to fsdp: replicas (dp) of shards (fsdp), HSDP.
              Plain data parallel is the case fsdp = 1 (shards of one rank: nothing is
              gathered), so gradients are all-reduced over dp during backward, block by
              block, overlapped with the blocks still to go, as DDP does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from scalelab.config import UserError
from scalelab.hardware import compute_dtype
from scalelab.parallel.mesh import Parallel
from scalelab.parallel.rules import fsdp_dim, tp_style


def parallelize(model: nn.Module, par: Parallel, dtype: str = "auto",
                entry: str = "forward") -> nn.Module:
    """dtype: train.dtype (FSDP gathers weights in the dtype the matmuls run in).
    entry: the method the training code calls. "hidden" for losses that read
    model.hidden() and lm_head.weight themselves (FSDP gathers the root's weights on entry;
    calling both would gather them twice)."""
    if par.single:
        return model
    if par.sizes["tp"] > 1:
        apply_tp(model, par)
    if par.data_world > 1:
        apply_fsdp(model, par, dtype)
        if entry != "forward":
            from torch.distributed.fsdp import register_fsdp_forward_method
            register_fsdp_forward_method(model, entry)
    return model


def apply_tp(model: nn.Module, par: Parallel) -> None:
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {}
    for name, _ in model.named_parameters():
        style = tp_style(name, par.rules)
        if style is not None:
            plan[name.removesuffix(".weight")] = styles[style]()
    parallelize_module(model, par.mesh["tp"], plan)


def mixed_precision(device: torch.device, dtype: str):
    """FSDP's policy for train.dtype: weights gathered in the compute dtype (bf16 under bf16
    autocast, as the planner assumes; else left fp32), gradients always reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy
    bf16 = compute_dtype(device, dtype) == torch.bfloat16
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, par: Parallel, dtype: str = "auto") -> None:
    from torch.distributed.fsdp import fully_shard

    names = {id(p): n for n, p in model.named_parameters()}
    fsdp = par.sizes["fsdp"]
    for n, p in model.named_parameters():
        if fsdp > 1 and fsdp_dim(n, par.rules) is None and p.ndim > 1:  # a bias: its one dim
            raise UserError(f"parallel.fsdp={fsdp}: the rules give {n} no "
                            "dimension on the fsdp axis (keep parallel.rules.embed = \"fsdp\")")

    def placement(p: nn.Parameter) -> Shard:
        return Shard(fsdp_dim(names[id(p)], par.rules) or 0)

    mesh = par.mesh["dp", "fsdp"] if par.sizes["dp"] > 1 else par.mesh["fsdp"]
    mp = mixed_precision(par.device, dtype)  # on CPU by default all fp32: matches one process
    trunk = getattr(model, "trunk", model)  # a reward/value model: its Transformer's blocks
    for block in trunk.blocks:  # reshard after forward: gather again in backward
        fully_shard(block, mesh=mesh, shard_placement_fn=placement, mp_policy=mp,
                    reshard_after_forward=True)
    # The root (embedding = tied lm_head, final norm) is needed again at the start of
    # backward, so it stays gathered: one all-gather and one reduce-scatter per step.
    fully_shard(model, mesh=mesh, shard_placement_fn=placement, mp_policy=mp,
                reshard_after_forward=False)


def sync_over_replicas(model: nn.Module, now: bool) -> None:
    """Whether this backward all-reduces gradients over dp. Of a step's micro-batches only
    the last need: the others accumulate (their shards are still reduce-scattered over fsdp,
    which keeps gradient memory sharded). A no-op for a model without dp replicas."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_requires_all_reduce(now, recurse=False)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, par: Parallel) -> torch.Tensor:
    """Global gradient norm over every shard, with one scalar all-reduce, then clip.

    Each rank sums the squares of its local shards, weighted by 1 / (number of ranks holding
    an identical copy), so the world-wide sum counts every element exactly once."""
    if par.single:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    total = torch.zeros((), device=par.device, dtype=torch.float32)
    for g in grads:
        if isinstance(g, DTensor):
            copies = par.world // g.device_mesh.size()
            for size, pl in zip(g.device_mesh.shape, g.placements):  # _StridedShard (fsdp
                copies *= size if pl.is_replicate() else 1  # and tp on one dim) is no Shard
            local = g.to_local()
        else:
            copies, local = par.world, g
        total += local.float().square().sum() / copies
    dist.all_reduce(total)
    norm = total.sqrt()
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(scale)
    return norm


def clip_grads(model: nn.Module, max_norm: float, par: Parallel | None,
               params: list | None = None) -> torch.Tensor:
    """After backward (gradients already averaged over the data ranks by FSDP): clip by the
    global norm, which is returned. max_norm 0 (train.grad_clip = 0): no clipping, as in
    nanoGPT; the norm is still returned (logged). One process (par None or single): torch's
    clip over `params` (default: the model's)."""
    max_norm = max_norm or math.inf  # scale min(1, inf / norm) = 1 (0 would zero every grad)
    if par is None or par.single:
        return nn.utils.clip_grad_norm_(model.parameters() if params is None else params,
                                        max_norm)
    return clip_grad_norm_(model, max_norm, par)
