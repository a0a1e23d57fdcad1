"""Accelerator numbers used for MFU and (later) the parallelism planner. One small table."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # dense bf16 matmul FLOP/s from the datasheet (no sparsity)
    memory_bytes: float
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s per device, one direction, inside a node


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("h100", 989e12, 80e9, 3.35e12, 450e9),
    "h200": Hardware("h200", 989e12, 141e9, 4.8e12, 450e9),
    "a100": Hardware("a100", 312e12, 80e9, 2.0e12, 300e9),
}


def detect(device: torch.device) -> Hardware | None:
    """The table entry for this device, or None (CPU, unknown GPU): then no MFU is shown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((hw for key, hw in HARDWARE.items() if key in name), None)
