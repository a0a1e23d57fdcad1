"""Communication accounting: what a training step sends, measured and predicted.

`CommCounter` is a dispatch mode that sees every collective a step issues, both the c10d ops
(FSDP2) and the functional ones DTensor uses for tensor parallelism, and
records kind, mesh axis, group size and size S (bytes of the whole, unsharded tensor).
`step_collectives` predicts the same list from the config and the axis-rules table alone.

Bytes each device moves on a ring of n: all-gather and reduce-scatter (n-1)/n * S,
all-reduce 2(n-1)/n * S.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from scalelab.config import ModelConfig
from scalelab.parallel.rules import Rules, tp_style, weight_shapes, weight_spec


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | other
    axis: str  # dp | fsdp | tp | dp,fsdp | world | groupN
    n: int  # ranks in the group
    size: float  # S: bytes of the whole tensor
    phase: str  # fwd | bwd | step
    count: int = 1  # identical collectives folded into one row
    what: str = ""

    @property
    def ring_bytes(self) -> float:
        """Bytes one device sends for all `count` of them."""
        f = 2 * (self.n - 1) / self.n if self.kind == "all_reduce" else (self.n - 1) / self.n
        return self.count * f * self.size


def _kind(op_name: str) -> str:
    if "reduce_scatter" in op_name:
        return "reduce_scatter"
    if "allreduce" in op_name or "all_reduce" in op_name:
        return "all_reduce"
    if "allgather" in op_name or "all_gather" in op_name:
        return "all_gather"
    return "other"


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class CommCounter(TorchDispatchMode):
    """with CommCounter(par.groups) as cc: step()  ->  cc.records, one Collective per call
    (phase "bwd" inside autograd's backward, "fwd" for everything else)."""

    def __init__(self, group_axes: dict[frozenset, str] | None = None):
        super().__init__()
        self.group_axes = group_axes or {}
        self.records: list[Collective] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from torch.distributed.tensor import DTensor
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor lower itself to plain collectives first
        ns, op = getattr(func, "namespace", ""), getattr(func, "_opname", "")
        if ns in ("c10d", "_c10d_functional") and (
                _kind(op) != "other" or any(k in op for k in ("broadcast", "all_to_all"))):
            self.records.append(self._record(op, ns, [*args, *kwargs.values()]))
        return func(*args, **kwargs)

    def _record(self, op: str, ns: str, args) -> Collective:
        kind = _kind(op)
        from torch.distributed.distributed_c10d import _resolve_process_group
        if ns == "_c10d_functional":  # (input, [reduce_op,] [group_size,] group_name)
            pg = _resolve_process_group(next(a for a in args if isinstance(a, str)
                                             and a not in ('sum', 'avg')))
            size = _nbytes(args[0]) * (pg.size() if kind == "all_gather" else 1)
        else:  # c10d: (output, input, group, ...) or (tensors, group, ...)
            from torch.distributed import ProcessGroup
            pg = ProcessGroup.unbox(next(a for a in args if isinstance(a, torch.ScriptObject)))
            size = _nbytes(args[1] if kind == "reduce_scatter" else args[0])
        phase = "bwd" if torch._C._current_graph_task_id() != -1 else "fwd"
        try:
            ranks = frozenset(dist.get_process_group_ranks(pg))
        except (ValueError, RuntimeError, KeyError):
            ranks = frozenset()
        axis = self.group_axes.get(ranks, f"group{pg.size()}")
        return Collective(kind, axis, pg.size(), size, phase, 1, op)


def summarize(rows: list[Collective]) -> dict[tuple[str, str], float]:
    """{(kind, axis): ring bytes per device} summed over the rows."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for r in rows:
        out[(r.kind, r.axis)] += r.ring_bytes
    return dict(out)


def step_collectives(cfg: ModelConfig, sizes: dict[str, int], rules: Rules,
                     tokens: int, grad_accum: int = 1, param_bytes: int = 4,
                     grad_bytes: int = 4, act_bytes: int = 4,
                     recomputed_blocks: int = 0) -> list[Collective]:
    """The collectives of one optimizer step, predicted from the config and the table.

    tokens: tokens in one micro-batch of one data rank (batch_size * seq_len).
    recomputed_blocks: blocks under activation checkpointing (parallel.ac).
    """
    dp, fsdp, tp = sizes["dp"], sizes["fsdp"], sizes["tp"]
    shapes = weight_shapes(cfg)
    # Elements of each weight one tp rank holds, grouped as FSDP groups them (block / root).
    block_numel: dict[int, int] = defaultdict(int)
    root_numel = 0
    for name, shape in shapes.items():
        split = any("tp" in axes for axes in weight_spec(name, rules))  # q/k/v biases too
        numel = math.prod(shape) // (tp if split else 1)
        if name.startswith("blocks."):
            block_numel[int(name.split(".")[1])] += numel
        else:
            root_numel += numel
    L, d = cfg.n_layer, cfg.d_model
    rows: list[Collective] = []
    if tp > 1:  # Megatron: row-parallel outputs all-reduced forward, col-parallel inputs back
        styles = [tp_style(n, rules) for n in shapes if n.startswith("blocks.0.")]
        act = tokens * d * act_bytes
        rows += [Collective("all_reduce", "tp", tp, act, "fwd", L * grad_accum *
                            styles.count("rowwise"), "row-parallel output (wo, w_down)"),
                 Collective("all_reduce", "tp", tp, act, "bwd", L * grad_accum *
                            styles.count("colwise"), "col-parallel input grad (wq,wk,wv,...)")]
        # A checkpointed block's forward runs again in backward, up to the last activation
        # its backward needs: all its row-parallel all-reduces but a final one (w_down's
        # output only feeds the residual add). Measured on gloo: 1 per block, 1 with mlp="".
        again = styles.count("rowwise") - (tp_style("blocks.0.mlp.w_down.weight", rules)
                                           == "rowwise")
        if recomputed_blocks and again:
            rows.append(Collective("all_reduce", "tp", tp, act, "bwd",
                                   recomputed_blocks * grad_accum * again,
                                   "row-parallel output recomputed (wo)"))
    if fsdp > 1:  # blocks: gather fwd, gather again bwd, reduce-scatter; root: once each
        blk = block_numel[0]
        rows += [Collective("all_gather", "fsdp", fsdp, blk * param_bytes, "fwd", L * grad_accum,
                            "block weights"),
                 Collective("all_gather", "fsdp", fsdp, blk * param_bytes, "bwd", L * grad_accum,
                            "block weights, resharded after forward"),
                 Collective("reduce_scatter", "fsdp", fsdp, blk * grad_bytes, "bwd",
                            L * grad_accum, "block grads"),
                 Collective("all_gather", "fsdp", fsdp, root_numel * param_bytes, "fwd",
                            grad_accum, "embedding (= lm_head), final norm"),
                 Collective("reduce_scatter", "fsdp", fsdp, root_numel * grad_bytes, "bwd",
                            grad_accum, "embedding, final norm grads")]
    if dp > 1:  # replicas (of shards, or whole when fsdp = 1): grads averaged over dp in the
        # backward of a step's last micro-batch (parallel.apply.sync_over_replicas)
        rows += [Collective("all_reduce", "dp", dp, block_numel[0] * grad_bytes / fsdp, "bwd",
                            L, "block grads (shards) over replicas"),
                 Collective("all_reduce", "dp", dp, root_numel * grad_bytes / fsdp, "bwd", 1,
                            "root grads (shards) over replicas")]
    if dp * fsdp * tp > 1:  # over the world group (named after the axis if one spans it)
        world = dp * fsdp * tp
        axis = next((a for a, n in sizes.items() if n == world), "world")
        rows.append(Collective("all_reduce", axis, world, 4, "step", 1,
                               "grad-norm (one fp32 scalar)"))
    return rows


def measure_step(mc: ModelConfig, par, batch_size: int, grad_accum: int = 1
                 ) -> list[Collective]:
    """Record one training step of a fresh model as the training loop runs it: grad_accum
    micro-batches forward and backward (dp all-reduce in the last), then the clip."""
    import torch.nn.functional as F

    from scalelab.model import Transformer
    from scalelab.parallel.apply import clip_grads, parallelize, sync_over_replicas
    torch.manual_seed(0)
    model = parallelize(Transformer(mc).to(par.device), par)
    g = torch.Generator().manual_seed(par.data_rank)
    x = torch.randint(0, mc.vocab_size, (batch_size, mc.seq_len + 1), generator=g)
    x = x.to(par.device)
    with CommCounter(par.groups) as cc:
        for i in range(grad_accum):
            sync_over_replicas(model, i == grad_accum - 1)
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
        clip_grads(model, 1.0, par)
    return cc.records
