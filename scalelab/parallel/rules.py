"""The hardware-to-axis table: logical axis names -> mesh axes (T5X/MaxText "logical axis rules").

Every weight declares what its dimensions *mean* (`scalelab.model.LOGICAL_AXES`, e.g. wq is
("heads", "embed")). This one table says which mesh axes cut each meaning. Everything else is
derived from it: which linears are column- or row-parallel, which dimension FSDP shards, the
shard shape of every weight, the collectives of a step and the planner's costs. Changing the
parallelism means changing the mesh shape or this table, never the model.

Mesh axes, outermost first: dp (replicas), fsdp (sharded replicas), tp (tensor parallel).
"""

from __future__ import annotations

import math

from scalelab.config import ModelConfig, UserError
from scalelab.model import LOGICAL_AXES, resolve

MESH_AXES = ("dp", "fsdp", "tp")

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("dp", "fsdp"),  # activations: every data rank gets its own rows of the batch
    "length": (),  # no sequence/context parallelism
    "embed": ("fsdp",),  # FSDP cuts every weight along the model dimension (T5X: embed->data)
    "heads": ("tp",),  # Megatron: query heads and their output projection split over tp
    "kv": ("tp",),  # key/value heads likewise (so n_kv_head must divide by tp)
    "mlp": ("tp",),  # MLP hidden units split over tp: w_gate/w_up by column, w_down by row
    "vocab": (),  # embedding and (tied) lm_head stay whole over tp: no vocab-parallel loss
}

# What the implementation (scalelab/parallel/apply.py) can do with each name.
ALLOWED: dict[str, set[tuple[str, ...]]] = {
    "batch": {("dp", "fsdp")},
    "length": {()},
    "embed": {("fsdp",), ()},  # "" only with fsdp=1 (FSDP needs a dim to cut in every weight)
    "heads": {("tp",), ()},
    "kv": {("tp",), ()},
    "mlp": {("tp",), ()},
    "vocab": {()},  # vocab-parallel embedding + loss is not implemented
}

Rules = dict[str, tuple[str, ...]]


def make_rules(overrides: dict[str, str] | None = None) -> Rules:
    """DEFAULT_RULES with `[parallel.rules]` overrides ("fsdp", "tp", "" = replicated)."""
    rules = dict(DEFAULT_RULES)
    for name, value in (overrides or {}).items():
        key = f"parallel.rules.{name}"
        if name not in DEFAULT_RULES:
            raise UserError(f"{key}: unknown logical axis (known: {', '.join(DEFAULT_RULES)})")
        if not isinstance(value, str):
            raise UserError(f"{key}: must be a string of mesh axes such as \"tp\" or \"\"")
        axes = tuple(a.strip() for a in value.split(",") if a.strip())
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise UserError(f"{key}: unknown mesh axis {bad[0]!r} (mesh axes: dp, fsdp, tp)")
        if axes not in ALLOWED[name]:
            ok = " or ".join(repr(",".join(a)) for a in sorted(ALLOWED[name]))
            raise UserError(f"{key}: {value!r} is not supported; use {ok}")
        rules[name] = axes
    if ("tp" in rules["heads"]) != ("tp" in rules["kv"]):
        raise UserError("parallel.rules: heads and kv must both map to tp or neither "
                        "(attention needs matching local query and key heads)")
    return rules


# A reward or value model (train/reward.ScalarModel) is a trunk plus a head with one output:
# the trunk's weights keep their names under "trunk.", the head is cut only along embed.
SCALAR_HEAD_AXES = {"head.weight": ("scalar", "embed"), "head.bias": ("scalar",)}


def param_key(name: str) -> str:
    """'blocks.3.attn.wq.weight' -> 'blocks.attn.wq.weight' (the LOGICAL_AXES key);
    'trunk.blocks.3...' of a scalar model likewise."""
    parts = name.removeprefix("trunk.").split(".")
    return ".".join(parts[:1] + parts[2:]) if parts[0] == "blocks" else ".".join(parts)


def weight_spec(name: str, rules: Rules) -> tuple[tuple[str, ...], ...]:
    """Mesh axes per dimension of a weight, e.g. wq -> (("tp",), ("fsdp",)). A name the
    table does not know ("scalar": a head's single output) stays whole."""
    axes = SCALAR_HEAD_AXES.get(name) or LOGICAL_AXES[param_key(name)]
    return tuple(rules.get(axis, ()) for axis in axes)


def tp_style(name: str, rules: Rules) -> str | None:
    """'colwise' if tp cuts a linear's output dim, 'rowwise' if its input dim, else None."""
    spec = weight_spec(name, rules)
    if len(spec) != 2 or "tp" not in spec[0] + spec[1]:
        return None
    return "colwise" if "tp" in spec[0] else "rowwise"


def fsdp_dim(name: str, rules: Rules) -> int | None:
    """Which dimension FSDP shards (None: the table gives this weight no fsdp dim)."""
    return next((d for d, axes in enumerate(weight_spec(name, rules)) if "fsdp" in axes), None)


def local_shape(name: str, shape: tuple[int, ...], rules: Rules,
                sizes: dict[str, int]) -> tuple[int, ...]:
    """The shard of a weight one device holds (ceil, as FSDP pads uneven shards)."""
    return tuple(math.ceil(n / math.prod(sizes[a] for a in axes))
                 for n, axes in zip(shape, weight_spec(name, rules)))


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Global shape of every weight of the model, from the config alone (no tensors)."""
    c = resolve(cfg)
    hd = c.d_model // c.n_head
    shapes = {"embed.weight": (c.vocab_size, c.d_model)}
    for i in range(c.n_layer):
        b = f"blocks.{i}."
        shapes |= {b + "attn_norm.weight": (c.d_model,),
                   b + "attn.wq.weight": (c.n_head * hd, c.d_model),
                   b + "attn.wk.weight": (c.n_kv_head * hd, c.d_model),
                   b + "attn.wv.weight": (c.n_kv_head * hd, c.d_model),
                   b + "attn.wo.weight": (c.d_model, c.n_head * hd),
                   b + "mlp_norm.weight": (c.d_model,)}
        if c.qkv_bias:
            shapes |= {b + "attn.wq.bias": (c.n_head * hd,),
                       b + "attn.wk.bias": (c.n_kv_head * hd,),
                       b + "attn.wv.bias": (c.n_kv_head * hd,)}
        if c.mlp == "swiglu":
            shapes[b + "mlp.w_gate.weight"] = (c.d_mlp, c.d_model)
        shapes |= {b + "mlp.w_up.weight": (c.d_mlp, c.d_model),
                   b + "mlp.w_down.weight": (c.d_model, c.d_mlp)}
    shapes["final_norm.weight"] = (c.d_model,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.d_model)
    return shapes


def uneven_fsdp(cfg: ModelConfig, rules: Rules, fsdp: int) -> bool:
    """Whether fsdp would cut the model dimension unevenly (FSDP2 refuses that)."""
    return "fsdp" in rules["embed"] and resolve(cfg).d_model % fsdp != 0


def check_divisible(cfg: ModelConfig, rules: Rules, sizes: dict[str, int],
                    model: str = "") -> None:
    """TP must split heads and MLP units evenly, and FSDP the model dimension: FSDP2 pads
    an uneven cut of a weight's first dimension only, and embed is the second of most
    (wq, w_up, the embedding). model: which model the message names, where a stage shards
    more than one (PPO's reward model)."""
    c = resolve(cfg)
    tp, fsdp = sizes["tp"], sizes["fsdp"]
    if uneven_fsdp(c, rules, fsdp):
        raise UserError(f"{model}parallel.fsdp={fsdp} does not divide d_model={c.d_model} "
                        "(FSDP cuts every weight along embed, and cannot pad a cut of a "
                        "weight's second dimension); pick an fsdp that divides d_model")
    for dim, n in (("heads", c.n_head), ("kv", c.n_kv_head), ("mlp", c.d_mlp)):
        if "tp" in rules[dim] and n % tp:
            raise UserError(f"{model}parallel.tp={tp} does not divide {dim} ({n}); pick a tp that "
                            f"divides n_head={c.n_head}, n_kv_head={c.n_kv_head} and "
                            f"d_mlp={c.d_mlp}")
