"""What the throughput benches share: the device's name, the HF peer model, and the knobs for
GPU experiments (inductor settings, the attention backend, a kernel profile)."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from scalelab.config import ModelConfig


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def write_json(path: Path | None, device: torch.device, **fields) -> None:
    """A bench's results as JSON at `path` (nothing without one), after when, on what and by
    which command they were measured."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    head = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": device_name(device), "torch": torch.__version__,
            "command": " ".join(["python", *sys.argv])}
    path.write_text(json.dumps({**head, **fields}, indent=2) + "\n")
    print(f"wrote {path}")


def force_chunked_losses() -> None:
    """Experiment: the chunked cross-entropy and token log-probs under torch.compile too,
    where scalelab takes the plain forms (`scalelab.train.losses.PLAIN_MAX_LOGITS`)."""
    import scalelab.train.losses
    scalelab.train.losses.PLAIN_MAX_LOGITS = 0


def hf_peer(mc: ModelConfig, **extra) -> torch.nn.Module:
    """LlamaForCausalLM with scalelab's (resolved) shape: same layers, heads, MLP, vocab, ties."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = ({"rope_parameters": {"rope_type": "default", "rope_theta": mc.rope_theta}}
            if int(transformers.__version__.split(".")[0]) >= 5 else {"rope_theta": mc.rope_theta})
    hc = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.d_model,
                     intermediate_size=mc.d_mlp, num_hidden_layers=mc.n_layer,
                     num_attention_heads=mc.n_head, num_key_value_heads=mc.n_kv_head,
                     max_position_embeddings=mc.seq_len, rms_norm_eps=mc.norm_eps,
                     tie_word_embeddings=mc.tie_embeddings, attention_bias=False,
                     mlp_bias=False, hidden_act="silu", **rope, **extra)
    return LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")


def set_inductor(settings: list[str]) -> dict:
    """Experiments: "KEY=VALUE" pairs set on torch._inductor.config (dotted keys reach its
    sub-configs, e.g. triton.cudagraphs=False); VALUE is a Python literal. Returns them."""
    import ast

    import torch._inductor.config as inductor

    done = {}
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--inductor {item!r}: expected KEY=VALUE")
        *path, last = key.strip().split(".")
        target = inductor
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, last):
            raise SystemExit(f"--inductor {key}: torch._inductor.config has no such setting")
        value = ast.literal_eval(text.strip())
        setattr(target, last, value)
        done[key.strip()] = value
    return done


def sdpa_backend(name: str | None):
    """A context that limits F.scaled_dot_product_attention to one backend (None: torch's
    choice), e.g. "cudnn" for cuDNN's attention on Hopper GPUs."""
    if not name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([backends[name]])


PROFILED = "bench/profiled"  # the range kernel_profile puts around the profiled call


def kernel_profile(fn: Callable[[], object], device: torch.device, per: int,
                   top: int = 15, gaps: int = 8) -> dict:
    """Run fn once under torch.profiler; the kernels (CUDA) or operators (CPU) that took the
    most time, and how many ran and how long they took in all per unit of work (per: e.g.
    decode steps in the call). Also where the device sat idle: `wall_us` from fn's start to
    its end (after a sync), `idle_us` of it with nothing running, and the longest `gaps`
    between one kernel (operator) and the next, named by the two, since a gap is the host
    still busy with what comes next (Python, a sync, an uncompiled stretch)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function(PROFILED):
            fn()
            if cuda:
                torch.cuda.synchronize()
    every = prof.events()
    outer = next(e for e in every if e.name == PROFILED and e.device_type.name == "CPU")
    if cuda:  # device kernels: events that ran on the GPU, one per launch. Not the GPU-side
        # spans of record_function ranges (e.g. Optimizer.step#AdamW.step): they would count
        # the kernels inside them twice.
        events = [e for e in every if e.device_type.name == "CUDA"
                  and not getattr(e, "is_user_annotation", False)]
        timed = [(e.name, e.device_time_total) for e in events]
    else:  # operators at the top of fn's stack only, so nothing is counted twice
        events = [e for e in every if e.cpu_parent is outer]
        timed = [(e.name, e.cpu_time_total) for e in events]
    totals: dict[str, list[float]] = {}
    for name, us in timed:
        entry = totals.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    busy_us = sum(us for _, us in timed)
    rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in events]
    return {"what": "cuda kernels" if cuda else "cpu operators", "per": per,
            "count_per_unit": len(timed) / per, "busy_us_per_unit": busy_us / per,
            **idle_gaps(spans, outer.time_range.start, outer.time_range.end, gaps),
            "top": [{"name": n[:120], "count": c, "us_total": round(us, 1),
                     "share": us / busy_us if busy_us else None} for n, (c, us) in rows]}


def idle_gaps(spans: list[tuple[float, float, str]], start: float, end: float, top: int
              ) -> dict:
    """From (start, end, name) intervals inside [start, end] (us): the wall time, the time
    nothing ran, and the `top` longest stretches with nothing running, each named by the
    interval before it ("" at the start) and the one after it ("" at the end)."""
    spans = sorted(spans)
    found, covered, last, prev = [], 0.0, start, ""
    for s, e, name in spans:
        if s > last:
            found.append({"us": round(s - last, 1), "at_us": round(last - start, 1),
                          "after": prev[:80], "before": name[:80]})
        if e > last:
            covered += e - max(s, last)
            last, prev = e, name
    if end > last:
        found.append({"us": round(end - last, 1), "at_us": round(last - start, 1),
                      "after": prev[:80], "before": ""})
    return {"wall_us": round(end - start, 1), "idle_us": round(end - start - covered, 1),
            "gaps": sorted(found, key=lambda g: -g["us"])[:top]}


def print_profile(prof: dict, unit: str) -> None:
    print(f"\nprofile ({prof['what']}): {prof['count_per_unit']:.1f} per {unit}, "
          f"{prof['busy_us_per_unit']:.1f} us busy per {unit}")
    for r in prof["top"]:
        print(f"  {r['share'] or 0:6.1%} {r['count']:6d} x  {r['name'][:90]}")
    if "wall_us" in prof:
        print(f"idle {prof['idle_us']:.0f} of {prof['wall_us']:.0f} us of the profiled call "
              f"({prof['idle_us'] / max(prof['wall_us'], 1e-9):.1%}); longest gaps:")
        for g in prof["gaps"]:
            print(f"  {g['us']:9.1f} us at {g['at_us']:9.1f}: after {g['after'][:40]!r} "
                  f"before {g['before'][:40]!r}")
