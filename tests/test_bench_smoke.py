"""The bench scripts' own smoke modes, run as bench/README.md shows them: a library change
that breaks a bench (not imported by any other test) shows up here, not on the next GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ppo_throughput_smoke_runs(tmp_path: Path) -> None:
    # bench/README.md: `python bench/ppo_throughput.py --smoke --json /tmp/ppo-smoke.json`
    # (scalelab alone here: TRL is a bench extra, not a test dependency)
    out = tmp_path / "ppo.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/ppo_throughput.py", "--smoke", "--peers",
                           "scalelab", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())["results"]["scalelab"]
    assert result["steps"] == 2 and result["episodes_per_s"] > 0
