"""Largest relative difference between two runs' per-step training losses.

    python bench/compare_losses.py RUN_A RUN_B    # e.g. one process vs. a torchrun mapping
"""

import json
import sys
from pathlib import Path


def losses(run: str) -> dict[int, float]:
    rows = (json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


if __name__ == "__main__":
    a, b = losses(sys.argv[1]), losses(sys.argv[2])
    steps = sorted(set(a) & set(b))
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    print(f"{len(steps)} common steps; largest relative loss difference {worst:.2e}")
