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
    node_size: int = 8  # devices joined by the fast links
    inter_node_bandwidth: float = 50e9  # bytes/s per device between nodes (400 Gb/s NIC each)


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("h100", 989e12, 80e9, 3.35e12, 450e9, 8, 50e9),
    "h200": Hardware("h200", 989e12, 141e9, 4.8e12, 450e9, 8, 50e9),
    "a100": Hardware("a100", 312e12, 80e9, 2.0e12, 300e9, 8, 25e9),
    # One process on one core of a small CPU box, gloo over shared memory: rough numbers
    # (about 100 GFLOP/s of model FLOPs on 2 cores) for planning CPU test runs.
    "cpu": Hardware("cpu", 50e9, 16e9, 20e9, 2e9, 2, 0.5e9),
}


def detect(device: torch.device) -> Hardware | None:
    """The table entry for this device, or None (CPU, unknown GPU): then no MFU is shown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((hw for key, hw in HARDWARE.items() if key in name), None)
