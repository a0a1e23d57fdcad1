"""The device and precision policy (which device, which autocast) and the accelerator table
used for MFU and the parallelism planner."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from scalelab.config import UserError

# What a training step achieves, beside the datasheet: the planner's time model
# (scalelab/parallel/plan.py) and where each default comes from. Edit a row, or pass
# `scalelab plan --assume KEY=VALUE`, to plan with other figures.
MATMUL_EFFICIENCY = 808 / 989  # bf16 8192^3 matmul, 808 TFLOP/s measured on one H200
#   (docs/ANCHORS figure, 2026-11-26); the H100 SXM has the same tensor cores and clocks
ATTENTION_EFFICIENCY = 0.35  # flash attention, fraction of peak on its causal FLOPs:
#   FlashAttention-2 on H100 (the FlashAttention-3 paper, Shah et al. 2024, gives ~35%)
HBM_EFFICIENCY = 0.9  # elementwise kernels: 4.3 of 4.8 TB/s device-to-device on one H200
# Everything that is neither a matmul nor attention (norms, rotary, SwiGLU, residual adds,
# casts, kernel launches), as bytes of HBM traffic per token per layer per unit of d_model.
# Calibrated, not counted: the one unknown solved from scalelab's own GPT-2 124M step on one
# H200 (bench/results/gpu_check-h200-2026-11-27/train.json: compiled 29.78 ms; eager 52.9 ms
# in the same session's peer table) with the three figures above held fixed;
# tests/test_parallel.py re-derives both from those measurements.
OTHER_BYTES_EAGER = 1389.0
OTHER_BYTES_COMPILED = 507.0


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 matmul FLOP/s from the datasheet (no sparsity)
    memory_bytes: float
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s per device, one direction, inside a node
    node_size: int = 8  # devices joined by the fast links
    inter_node_bandwidth: float = 50e9  # bytes/s per device between nodes (400 Gb/s NIC each)
    matmul_efficiency: float = MATMUL_EFFICIENCY
    attention_efficiency: float = ATTENTION_EFFICIENCY
    hbm_efficiency: float = HBM_EFFICIENCY
    other_bytes_eager: float = OTHER_BYTES_EAGER
    other_bytes_compiled: float = OTHER_BYTES_COMPILED
    note: str = ""
    device: str = "cuda"  # the torch device type: how train.dtype and train.compile resolve


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("h100", 989e12, 80e9, 3.35e12, 450e9, 8, 50e9),
    "h200": Hardware("h200", 989e12, 141e9, 4.8e12, 450e9, 8, 50e9),
    # H100 PCIe: 114 SMs at lower clocks (datasheet: 1,513 TFLOP/s bf16 with sparsity, so
    # 756 dense), HBM2e at 2.0 TB/s; cards talk over PCIe Gen5 (NVLink bridges join pairs)
    "h100-pcie": Hardware("h100-pcie", 756e12, 80e9, 2.0e12, 64e9, 8, 50e9,
                          note="links: PCIe Gen5, not NVLink"),
    # torchtitan's benchmark machine (Meta Grand Teton): H100 SXM with 96 GB of HBM2e at
    # 2.4 TB/s, run at a 500 W power limit. Its real peak lies between SXM and NVL and is not
    # published; torchtitan quotes MFU against the SXM figure, and so do we.
    "h100-500w": Hardware("h100-500w", 989e12, 95 * 2**30, 2.4e12, 450e9, 8, 50e9,
                          note="peak unknown (power-capped); SXM figure used"),
    # A100: matmul and attention fractions are the H100 defaults, not measured here.
    "a100": Hardware("a100", 312e12, 80e9, 2.0e12, 300e9, 8, 25e9,
                     note="efficiencies are the H100/H200 defaults, not measured on A100"),
    # One process on one core of a small CPU box, gloo over shared memory: rough numbers
    # (about 100 GFLOP/s of model FLOPs on 2 cores, everything included) for planning CPU
    # test runs: the peak is already an achieved rate (attention at 0.5 of it on its causal
    # half = all of PaLM's attention FLOPs at the rate), so nothing else is charged.
    "cpu": Hardware("cpu", 50e9, 16e9, 20e9, 2e9, 2, 0.5e9, matmul_efficiency=1.0,
                    attention_efficiency=0.5, other_bytes_eager=0.0, other_bytes_compiled=0.0,
                    note="peak = measured model FLOP/s per core, all work included",
                    device="cpu"),
}


def detect(device: torch.device) -> Hardware | None:
    """The table entry for this device, or None (CPU, unknown GPU): then no MFU is shown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower().replace(" ", "-")
    found = [key for key in HARDWARE if key in name]  # "h100-pcie" before "h100"
    return HARDWARE[max(found, key=len)] if found else None


def pick_device(name: str, key: str = "train.device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"{key} {name!r}: unknown device (auto, cpu, cuda, cuda:N, mps)") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{key} {name!r}: torch sees no CUDA GPU on this machine "
                        f"(torch {torch.__version__}); use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"{key} {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key} {name!r}: MPS is not available here; use cpu or auto")
    return dev


def compute_dtype(device: torch.device, dtype: str) -> torch.dtype:
    """What matmuls run in for train.dtype: bf16 on GPUs by default, fp32 on CPU (exact and
    reproducible)."""
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return torch.bfloat16 if bf16 else torch.float32


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """train.compile resolved for a device: "auto" compiles on CUDA only (on CPU and MPS the
    compile time is rarely paid back, and CPU runs stay exact and quick to start)."""
    if setting == "auto":
        return device.type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise UserError(f"train.compile: expected auto, true or false, got {setting!r}")


def autocast(device: torch.device, dtype: str):
    """bf16 autocast where compute_dtype says bf16; else plain fp32."""
    if compute_dtype(device, dtype) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
