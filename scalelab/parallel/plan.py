"""The planner: what every (dp, fsdp, tp) mapping of N devices costs, on paper.

Nothing is instantiated: shapes come from the config (rules.weight_shapes), placements from
the axis-rules table, collectives from comm.step_collectives (the same function the CPU test
checks against measured bytes). Assumptions, stated once:
  - global batch = the config's train.batch_size * grad_accum * seq_len tokens (its one-device
    recipe), split over dp x fsdp; each device takes the largest micro-batch that fits and
    accumulates the rest (FSDP gathers and reduce-scatters again every micro-step, replicas
    all-reduce once per step);
  - AdamW with fp32 master weights: 4 (param) + 4 (grad) + 8 (moments) bytes per parameter;
  - compute in the dtype train.dtype resolves to on the planned device, as training resolves
    it (bf16 on GPUs, fp32 on the cpu row by default): FSDP gathers weights and activations
    move in it, gradients are reduced in fp32 (parallel.apply's mixed-precision policy);
  - activations ~34 bytes per token per d_model per layer in bf16, twice that in fp32
    (Korthikanti et al. 2022, flash attention so no T^2 term), 24 of the 34 split by tp
    (8 inside attention, 16 inside the MLP, each where the rules cut it); fp32 logits for
    the loss; a checkpointed block (train.activation_checkpointing) keeps only its fp32
    input, and one block's activations are rebuilt at a time in backward;
  - compute time = matmuls (a tp rank's shards where the rules cut them, whole elsewhere) at
    a measured fraction of peak + causal flash attention at a published fraction of peak +
    everything else as HBM traffic (bytes per token per layer per d_model, calibrated on
    scalelab's own GPT-2 step, eager or compiled per train.compile) + the AdamW update;
    recomputed forwards add their share. The figures and their sources live in the hardware
    table (scalelab/hardware.py);
  - FSDP/DP traffic overlaps compute (forward gathers with forward, the rest with backward);
    tensor-parallel all-reduces sit on the critical path; bandwidth only, no latency term;
  - a ring that leaves a node (node_size devices) runs at the inter-node bandwidth.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, fields, replace

import torch

from scalelab.config import Config, ModelConfig, UserError
from scalelab.hardware import Hardware, compute_dtype, use_compile
from scalelab.model import LOGICAL_AXES, resolve
from scalelab.parallel.ac import MODES, ac_mode, checkpointed_blocks
from scalelab.parallel.comm import Collective, step_collectives
from scalelab.parallel.rules import (
    MESH_AXES,
    Rules,
    local_shape,
    param_key,
    tp_style,
    uneven_fsdp,
    weight_shapes,
    weight_spec,
)

OPTIMIZER_BYTES = 32  # fused AdamW per local parameter: read p, g, m, v; write p, m, v; clip
DTYPE_NAMES = {2: "bf16", 4: "fp32"}
LOGIT_BYTES = 16  # per logit per token: bf16 logits, the fp32 loss copy, its gradient


def compute_times(mc: ModelConfig, tokens: float, body: float, tp_heads: int,
                  params_local: float, compiled: bool, recompute: float,
                  hw: Hardware) -> dict[str, float]:
    """Seconds of each kind of work one device does in a step (no communication) for
    `tokens` tokens. body: the block (+ final norm) parameters this device multiplies by, its
    tp shard of them; tp_heads: the ways tp cuts attention; recompute: the fraction of
    blocks whose forward runs again."""
    head = body_and_head(mc)[1]
    matmul = tokens * (6 * body + 6 * head + recompute * 2 * body)
    # flash attention does the causal half of PaLM's 12*L*H*Q*T
    attention = tokens * 6 * mc.n_layer * mc.d_model * mc.seq_len / tp_heads * (1 + recompute / 3)
    per_d = hw.other_bytes_compiled if compiled else hw.other_bytes_eager
    other = tokens * (mc.n_layer * per_d * mc.d_model * (1 + recompute / 3)
                      + LOGIT_BYTES * mc.vocab_size)
    bandwidth = hw.hbm_bandwidth * hw.hbm_efficiency
    return {"matmul": matmul / (hw.peak_flops * hw.matmul_efficiency),
            "attention": attention / (hw.peak_flops * hw.attention_efficiency),
            "other": other / bandwidth, "optimizer": OPTIMIZER_BYTES * params_local / bandwidth}


def body_and_head(mc: ModelConfig) -> tuple[int, int]:
    """Parameters of the blocks (+ final norm) and of the lm_head (a matmul even when tied)."""
    head = mc.vocab_size * mc.d_model
    return count_params(mc) - head * (1 if mc.tie_embeddings else 2), head


# The measured steps the "other work" figures of the hardware table are solved from: scalelab's
# GPT-2 124M shape (12 x 768, SwiGLU 2048, vocab 50304, tied), batch 12 x 1024, bf16
# autocast, one H200, torch 2.11, 2026-11-27, via bench/train_throughput.py.
CALIBRATION = {
    "compiled": (29.78e-3, "29.78 ms, bench/results/gpu_check-h200-2026-11-27/train.json"),
    "eager": (52.9e-3, "52.9 ms eager in the same session, from the lab's anchor notes"),
}


def calibrate_other_bytes(mc: ModelConfig, tokens: int, step_s: float, compiled: bool,
                          hw: Hardware) -> float:
    """The bytes per token per layer per d_model of non-matmul work that make the time model
    give `step_s` for one device running `tokens` per step (no communication, no AC)."""
    zero = replace(hw, other_bytes_compiled=0.0, other_bytes_eager=0.0)
    left = step_s - sum(compute_times(mc, tokens, body_and_head(mc)[0], 1, count_params(mc),
                                      compiled, 0.0,
                                      zero).values())
    return left * hw.hbm_bandwidth * hw.hbm_efficiency / (tokens * mc.n_layer * mc.d_model)


def plans_compiled(cfg: Config, hw: Hardware) -> bool:
    """train.compile as the planned devices would resolve it ("auto": on for GPUs)."""
    return use_compile(cfg.train.compile, torch.device(hw.device))


def compute_bytes(cfg: Config, hw: Hardware) -> int:
    """Bytes per element of gathered weights and activations: train.dtype as the planned
    devices resolve it (bf16 autocast on GPUs, fp32 on CPU unless set)."""
    bf16 = compute_dtype(torch.device(hw.device), cfg.train.dtype) == torch.bfloat16
    return 2 if bf16 else 4


def tp_cuts(rules: Rules, tp: int) -> tuple[int, int]:
    """The ways tp cuts attention heads and MLP units under the rules (1: each tp rank
    computes them whole)."""
    return tuple(tp if "tp" in rules[part] else 1 for part in ("heads", "mlp"))


def activation_bytes(mc: ModelConfig, tokens_micro: int, cuts: tuple[int, int],
                     ac: bool | str, act_bytes: int = 2) -> float:
    """Activation memory of one micro-batch (Korthikanti et al.; see the module docstring).
    cuts: tp_cuts. Of the 34 bytes, 8 are inside attention and 16 inside the MLP."""
    per_block = tokens_micro * mc.d_model * (10 + 8 / cuts[0] + 16 / cuts[1]) * act_bytes / 2
    n_ckpt = len(checkpointed_blocks(mc.n_layer, ac))
    kept = (mc.n_layer - n_ckpt + (1 if n_ckpt else 0)) * per_block  # + one being rebuilt
    inputs = n_ckpt * tokens_micro * mc.d_model * 4  # fp32 residual stream at block entry
    # logits, their fp32 gradient, and an fp32 copy for the loss unless they are fp32 already
    logits = tokens_micro * mc.vocab_size * (act_bytes + 4 + (4 if act_bytes < 4 else 0))
    return kept + inputs + logits


def model_for_plan(cfg: Config) -> ModelConfig:
    """The resolved model config; vocab 0 (= from the tokenizer) is taken as data.tokenizer_vocab
    rounded up to 64, as pretraining does."""
    mc = resolve(cfg.model)
    if not mc.vocab_size:
        mc.vocab_size = 64 * math.ceil(cfg.data.tokenizer_vocab / 64)
    return mc


def count_params(mc: ModelConfig) -> int:
    return sum(math.prod(s) for s in weight_shapes(mc).values())


def factorizations(n: int) -> list[dict[str, int]]:
    """Every (dp, fsdp, tp) with dp * fsdp * tp = n."""
    return [{"dp": n // tp // fsdp, "fsdp": fsdp, "tp": tp}
            for tp in range(1, n + 1) if n % tp == 0
            for fsdp in range(1, n // tp + 1) if (n // tp) % fsdp == 0]


def axis_bandwidth(axis: str, sizes: dict[str, int], hw: Hardware) -> float:
    """Ring bandwidth of a mesh axis: ranks are laid out tp fastest, then fsdp, then dp."""
    stride = {"tp": 1, "fsdp": sizes["tp"], "dp": sizes["tp"] * sizes["fsdp"]}
    world = math.prod(sizes.values())
    span = world if axis not in stride else stride[axis] * sizes[axis]
    return hw.link_bandwidth if span <= hw.node_size else hw.inter_node_bandwidth


@dataclass
class Estimate:
    sizes: dict[str, int]
    tokens_per_device: float  # tokens each data rank processes per optimizer step
    micro_batch: int  # sequences per forward on one device (the largest that fits)
    grad_accum: int
    memory: dict[str, float]  # bytes per device: params, grads, optimizer, gathered, activations
    compute_s: float
    times: dict[str, float]  # compute_s split: matmul, attention, other, optimizer
    comm: list[Collective]
    comm_s: dict[str, float]  # fwd / bwd (overlappable) and tp (exposed)
    step_s: float
    mfu: float
    tokens_per_s: float  # per device: the global batch over step time and world size
    fits: bool
    why: str = ""
    limit: str = ""  # what keeps it from fitting: "batch", "tp", "fsdp", "rules" or "memory"
    dtype_bytes: int = 2  # of gathered weights and activations (compute_bytes)
    tp_cuts: tuple[int, int] = (1, 1)  # the ways tp cuts attention and the MLP (tp_cuts)

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def name(self) -> str:
        return " x ".join(f"{a}={self.sizes[a]}" for a in MESH_AXES)


def estimate(cfg: Config, sizes: dict[str, int], rules: Rules, hw: Hardware) -> Estimate:
    mc = model_for_plan(cfg)
    tc = cfg.train
    dp, fsdp, tp = sizes["dp"], sizes["fsdp"], sizes["tp"]
    data_world, world = dp * fsdp, dp * fsdp * tp
    global_seqs = tc.batch_size * tc.grad_accum
    seqs = global_seqs / data_world  # per data rank per step
    why, limit = "", ""
    if seqs < 1:
        why, limit = f"global batch of {global_seqs} sequences < {data_world} data ranks", "batch"
    for dim, n in (("heads", mc.n_head), ("kv", mc.n_kv_head), ("mlp", mc.d_mlp)):
        if "tp" in rules[dim] and n % tp and not why:
            why, limit = f"tp={tp} does not divide {dim}={n}", "tp"
    if fsdp > 1 and "fsdp" not in rules["embed"] and not why:  # parallel.apply refuses it
        why, limit = "parallel.rules.embed gives fsdp nothing to cut", "rules"
    if uneven_fsdp(mc, rules, fsdp) and not why:  # training refuses it (check_divisible)
        why, limit = f"fsdp={fsdp} does not divide d_model={mc.d_model}", "fsdp"

    shapes = weight_shapes(mc)
    p_local = sum(math.prod(local_shape(n, s, rules, sizes)) for n, s in shapes.items())
    w = compute_bytes(cfg, hw)
    cuts = tp_cuts(rules, tp)
    # one tp rank's weights, whole over the data ranks: what it multiplies by
    tp_only = {**sizes, "dp": 1, "fsdp": 1}
    full = {n: math.prod(local_shape(n, s, rules, tp_only)) for n, s in shapes.items()}
    gathered = 0.0
    if dp * fsdp > 1:  # FSDP2's working copies: the root plus two blocks (prefetch)
        root = sum(v for n, v in full.items() if not n.startswith("blocks."))
        gathered = w * (root + 2 * sum(v for n, v in full.items() if n.startswith("blocks.0.")))

    def memory_for(micro: int) -> dict[str, float]:
        act = activation_bytes(mc, micro * mc.seq_len, cuts, tc.activation_checkpointing, w)
        return {"params": 4 * p_local, "grads": 4 * p_local, "optimizer": 8 * p_local,
                "gathered": gathered, "activations": act}

    # The largest micro-batch (a divisor of this rank's sequences) whose activations fit.
    n_seqs = max(1, int(seqs))
    micro = next((m for m in range(n_seqs, 0, -1) if n_seqs % m == 0 and
                  sum(memory_for(m).values()) <= hw.memory_bytes), 1)
    accum = n_seqs // micro
    memory = memory_for(micro)
    tokens_micro = micro * mc.seq_len

    # Compute: tp splits the block matmuls and attention the rules cut; the (tied) lm_head is
    # replicated.
    # Whole sequences per rank, as the recommended command runs them: a global batch that
    # does not split evenly (480 over 7 ranks) loses the remainder (format_plan says so).
    tokens = n_seqs * mc.seq_len
    n_ckpt = len(checkpointed_blocks(mc.n_layer, tc.activation_checkpointing))
    recompute = n_ckpt / mc.n_layer
    body = sum(v for n, v in full.items() if n not in ("embed.weight", "lm_head.weight"))
    times = compute_times(mc, tokens, body, cuts[0], p_local, plans_compiled(cfg, hw),
                          recompute, hw)
    compute_s = times["matmul"] + times["attention"] + times["other"]

    comm = step_collectives(mc, sizes, rules, tokens_micro, accum, param_bytes=w, grad_bytes=4,
                            act_bytes=w, recomputed_blocks=n_ckpt)
    comm_s = {"fwd": 0.0, "bwd": 0.0, "tp": 0.0}
    for c in comm:
        t = c.ring_bytes / axis_bandwidth(c.axis, sizes, hw)
        comm_s["tp" if c.axis == "tp" else "fwd" if c.phase == "fwd" else "bwd"] += t
    step_s = (max(compute_s / 3, comm_s["fwd"]) + max(2 * compute_s / 3, comm_s["bwd"])
              + comm_s["tp"] + times["optimizer"])
    global_tokens = (n_seqs * data_world if seqs >= 1 else global_seqs) * mc.seq_len
    mfu = model_flops_per_token(mc) * global_tokens / (step_s * world * hw.peak_flops)
    total = sum(memory.values())
    if not why and total > hw.memory_bytes:  # even at a micro-batch of one sequence
        why, limit = f"needs {total / 1e9:.0f} GB > {hw.memory_bytes / 1e9:.0f} GB", "memory"
    return Estimate(sizes, tokens, micro, accum, memory, compute_s, times, comm, comm_s, step_s,
                    mfu, global_tokens / step_s / world, not why, why, limit, w, cuts)


def model_flops_per_token(mc: ModelConfig) -> float:
    """6N + 12*L*H*Q*T, N counting the lm_head but not the input table (as
    Transformer.flops_per_token does, without building the model)."""
    body, head = body_and_head(mc)
    return 6 * (body + head) + 12 * mc.n_layer * mc.d_model * mc.seq_len


def plan(cfg: Config, world: int, rules: Rules, hw: Hardware) -> list[Estimate]:
    """Every mapping, best first: fitting ones by predicted step time (within 1% of the
    fastest is a tie: the model is not that precise), then by traffic."""
    if world < 1:
        raise UserError(f"--world-size must be at least 1, got {world}")
    ests = [estimate(cfg, s, rules, hw) for s in factorizations(world)]
    fastest = min((e.step_s for e in ests if e.fits), default=1.0)
    return sorted(ests, key=lambda e: (not e.fits, 0 if e.step_s <= 1.01 * fastest else e.step_s,
                                       sum(e.comm_s.values()), e.sizes["tp"], e.sizes["fsdp"]))


def _gb(x: float) -> str:
    return f"{x / 1e9:.1f}"


def format_plan(cfg: Config, world: int, hw: Hardware, ests: list[Estimate],
                limit: int = 20) -> str:
    mc = model_for_plan(cfg)
    tc = cfg.train
    g = tc.batch_size * tc.grad_accum * mc.seq_len
    lines = [f"model: {count_params(mc) / 1e6:,.1f}M parameters ({mc.n_layer} layers, "
             f"d={mc.d_model}, {mc.n_head} heads, vocab {mc.vocab_size}, seq {mc.seq_len}); "
             f"global batch {g:,} tokens",
             f"hardware: {world} x {hw.name} ({hw.peak_flops / 1e12:.3g} TFLOP/s, "
             f"{hw.memory_bytes / 1e9:.3g} GB, {hw.link_bandwidth / 1e9:.3g} GB/s in a node of "
             f"{hw.node_size}, {hw.inter_node_bandwidth / 1e9:.3g} GB/s between nodes)",
             *assumptions(cfg, hw),
             "",
             f"{'mapping':<24} {'tok/rank':>8} {'mem GB':>7} {'(p+g+o':>7} {'act)':>6} "
             f"{'compute':>8} {'comm f/b':>13} {'tp comm':>8} {'step s':>8} {'tok/s/dev':>9} "
             f"{'MFU':>6}  fits"]
    for e in ests[:limit]:
        pgo = e.memory["params"] + e.memory["grads"] + e.memory["optimizer"]
        lines.append(
            f"{e.name:<24} {e.tokens_per_device:>8,.0f} {_gb(e.total_memory):>7} {_gb(pgo):>7} "
            f"{_gb(e.memory['activations']):>6} {e.compute_s:>8.3f} "
            f"{e.comm_s['fwd']:>6.3f}/{e.comm_s['bwd']:<6.3f} {e.comm_s['tp']:>8.3f} "
            f"{e.step_s:>8.3f} {e.tokens_per_s:>9,.0f} {e.mfu:>6.1%}  "
            f"{'yes' if e.fits else 'NO: ' + e.why}")
    if len(ests) > limit:
        lines.append(f"... {len(ests) - limit} more mappings (worse or not fitting)")
    best = ests[0] if ests and ests[0].fits else None
    lines.append("")
    if best is None:
        lines.append("recommended: none fits; " + none_fits(cfg, hw, ests))
    else:
        bound = "compute" if best.compute_s >= 1.5 * best.comm_s["bwd"] else "communication"
        lines.append(f"recommended: {best.name}  (predicted {best.step_s:.3f} s/step, "
                     f"{best.tokens_per_s:,.0f} tokens/s per device, MFU {best.mfu:.1%}, "
                     f"{_gb(best.total_memory)} GB/device, {best.tokens_per_device:,.0f} tokens "
                     f"per data rank per step, {bound}-bound)")
        lines.append(f"  torchrun ... -m scalelab pretrain --config ... --set parallel.dp="
                     f"{best.sizes['dp']} --set parallel.fsdp={best.sizes['fsdp']} "
                     f"--set parallel.tp={best.sizes['tp']} --set train.batch_size="
                     f"{best.micro_batch} --set train.grad_accum={best.grad_accum}")
        ranks = best.sizes["dp"] * best.sizes["fsdp"]
        ran = best.micro_batch * best.grad_accum * ranks
        if ran != tc.batch_size * tc.grad_accum:
            lines.append(f"  global batch {ran} sequences, not the config's "
                         f"{tc.batch_size * tc.grad_accum}: that does not split evenly over "
                         f"{ranks} data ranks")
        lines.append(ac_line(mc, best))
    return "\n".join(lines)


def none_fits(cfg: Config, hw: Hardware, ests: list[Estimate]) -> str:
    """What to change, from why the mappings do not fit. A mapping short of memory is so at
    a micro-batch of one sequence: a smaller batch would not help it."""
    limits = {e.limit for e in ests}
    tips = []
    if "memory" in limits:
        ac = ac_mode(cfg.train.activation_checkpointing)
        tips.append(f"one sequence per device needs over {hw.memory_bytes / 1e9:.3g} GB: use "
                    "more devices (fsdp shards weights and optimizer state)"
                    + (", train.activation_checkpointing=full" if ac != "full" else "")
                    + " or a shorter model.seq_len")
    if "batch" in limits:
        seqs = cfg.train.batch_size * cfg.train.grad_accum
        tips.append(f"{seqs} sequences per step leave data ranks without one: use fewer "
                    "devices or raise train.batch_size x train.grad_accum")
    return "; ".join(tips)


def assumptions(cfg: Config, hw: Hardware) -> list[str]:
    """The efficiency figures the times rest on, with their sources (hardware table)."""
    compiled = plans_compiled(cfg, hw)
    kind = "compiled" if compiled else "eager"
    per_d = hw.other_bytes_compiled if compiled else hw.other_bytes_eager
    default = Hardware("", 0, 0, 0, 0)

    def source(key: str, text: str) -> str:
        return text if getattr(hw, key) == getattr(default, key) else "set by --assume or row"
    text = (f"matmuls at {hw.matmul_efficiency:.1%} of peak ("
            f"{source('matmul_efficiency', 'bf16 8192^3 measured on an H200')}); "
            f"flash attention at {hw.attention_efficiency:.0%} of peak on its causal FLOPs ("
            f"{source('attention_efficiency', 'FlashAttention-2 on H100, FlashAttention-3 paper')}"
            f"); other work {per_d:,.0f} B/token/layer/d_model at {hw.hbm_efficiency:.0%} of HBM "
            f"bandwidth, the {kind} step (train.compile={str(cfg.train.compile).lower()}; "
            + source(f"other_bytes_{kind}", f"calibrated on scalelab's GPT-2 124M step on an "
                     f"H200, {CALIBRATION[kind][1]}") +
            f"); weights gathered and activations in {DTYPE_NAMES[compute_bytes(cfg, hw)]} "
            f"(train.dtype={cfg.train.dtype}); activation checkpointing "
            f"{ac_mode(cfg.train.activation_checkpointing)}; "
            "FSDP/DP traffic overlapped with compute, TP all-reduces exposed")
    head = f"assumed ({hw.name} row of scalelab/hardware.py{'; ' + hw.note if hw.note else ''}):"
    return [head, *textwrap.wrap(text, 94, initial_indent="  ", subsequent_indent="  ")]


def ac_line(mc: ModelConfig, e: Estimate) -> str:
    """Activation memory of one micro-batch of this mapping under each checkpointing mode."""
    tokens = e.micro_batch * mc.seq_len
    gb = {m: _gb(activation_bytes(mc, tokens, e.tp_cuts, m, e.dtype_bytes)) for m in MODES}
    return (f"  activations per device (micro-batch {e.micro_batch} x {mc.seq_len}): "
            + ", ".join(f"{gb[m]} GB with activation_checkpointing={m}" for m in MODES))


def explain(cfg: Config, sizes: dict[str, int], rules: Rules, hw: Hardware) -> str:
    """One mapping as "matmuls on many machines": layer 0's shards on one device, then every
    collective of a step, both generated from the axis-rules table."""
    mc = model_for_plan(cfg)
    e = estimate(cfg, sizes, rules, hw)
    shapes = weight_shapes(mc)
    lines = [f"mapping {e.name} on {math.prod(sizes.values())} devices",
             "rules: " + "  ".join(f"{k}->{','.join(v) or '-'}" for k, v in rules.items()),
             "", "weights of layer 0 (and the shared ones) on one device:",
             f"  {'weight':<26} {'logical axes':<18} {'mesh axes':<14} {'global':>13} "
             f"{'local':>13}  tp"]
    for n, shape in shapes.items():
        if n.startswith("blocks.") and not n.startswith("blocks.0."):
            continue
        spec = weight_spec(n, rules)
        names = ",".join(LOGICAL_AXES[param_key(n)])
        axes = ",".join("+".join(a) or "-" for a in spec)
        loc = local_shape(n, shape, rules, sizes)
        lines.append(f"  {n:<26} {names:<18} {axes:<14} {str(tuple(shape)):>13} "
                     f"{str(tuple(loc)):>13}  {tp_style(n, rules) or '-'}")
    lines += ["", f"collectives of one step (micro-batch {e.micro_batch} x {mc.seq_len} tokens "
              f"per device, {e.grad_accum} micro-steps), {DTYPE_NAMES[e.dtype_bytes]}:",
              f"  {'kind':<15} {'axis':<6} {'n':>4} {'count':>6} {'S each':>10} "
              f"{'sent/device':>12} {'time s':>8}  what"]
    for c in e.comm:
        t = c.ring_bytes / axis_bandwidth(c.axis, sizes, hw)
        lines.append(f"  {c.kind:<15} {c.axis:<6} {c.n:>4} {c.count:>6} {_mb(c.size):>10} "
                     f"{_mb(c.ring_bytes):>12} {t:>8.4f}  {c.phase}: {c.what}")
    lines += ["", "memory/device: " + ", ".join(f"{k} {_gb(v)} GB" for k, v in e.memory.items())
              + f" = {_gb(e.total_memory)} GB" + ("" if e.fits else f"  (NO: {e.why})"),
              ac_line(mc, e),
              f"step: compute {e.compute_s:.3f} s (" + ", ".join(
                  f"{k} {v:.3f}" for k, v in e.times.items() if k != "optimizer") +
              f"), comm fwd {e.comm_s['fwd']:.3f} s / bwd {e.comm_s['bwd']:.3f} s (overlapped), "
              f"tp {e.comm_s['tp']:.3f} s (exposed), optimizer {e.times['optimizer']:.3f} s -> "
              f"{e.step_s:.3f} s, {e.tokens_per_s:,.0f} tokens/s per device, MFU {e.mfu:.1%}",
              *assumptions(cfg, hw)]
    return "\n".join(lines)


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f} MB" if x >= 1e4 else f"{x:.0f} B"


def assume(hw: Hardware, items: list[str]) -> Hardware:
    """The hardware row with `--assume KEY=VALUE` overrides (numbers > 0), e.g.
    matmul_efficiency=0.7 or hbm_bandwidth=2.4e12."""
    numeric = {f.name for f in fields(Hardware) if f.type in ("float", "int")}
    changes: dict[str, float] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in numeric:
            raise UserError(f"--assume {item!r}: expected KEY=VALUE with KEY one of "
                            f"{', '.join(sorted(numeric))}")
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--assume {key}: expected a number > 0, got {raw!r}")
        if key.endswith("_efficiency") and value > 1:
            raise UserError(f"--assume {key}: a fraction of peak, at most 1 (e.g. 0.7 for "
                            f"70%), got {raw!r}")
        if key == "node_size" and value != int(value):  # 0.5 was taken as 0: no node at all
            raise UserError(f"--assume node_size: a whole number of devices, got {raw!r}")
        changes[key] = int(value) if key == "node_size" else value
    return replace(hw, name=hw.name + (" (--assume)" if changes else ""), **changes)


def parse_mapping(text: str, world: int) -> dict[str, int]:
    try:
        dp, fsdp, tp = (int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--explain {text!r}: expected dp,fsdp,tp such as 2,4,1") from None
    if min(dp, fsdp, tp) < 1:
        raise UserError(f"--explain {text}: dp, fsdp and tp must each be at least 1")
    if dp * fsdp * tp != world:
        raise UserError(f"--explain {text}: dp*fsdp*tp must equal --world-size {world}")
    return {"dp": dp, "fsdp": fsdp, "tp": tp}
