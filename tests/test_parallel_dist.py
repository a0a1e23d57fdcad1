"""Multi-process CPU (gloo) runs under torchrun: every mapping trains like one process.

One torchrun launch of 4 processes trains the same 20 steps under several mappings (see
dist_worker.py), so the whole file costs a couple of torchrun start-ups."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli, tiny_sets

from scalelab.config import load_config

# dp,fsdp,tp[,grad_accum]: the last accumulates two micro-batches, so its dp all-reduce must
# come once per step (in the last backward) while fsdp reduce-scatters every micro-batch.
MAPPINGS = ["4,1,1", "1,4,1", "1,1,4", "2,1,2", "1,2,2", "2,2,1", "2,2,1,2"]
ROOT = Path(__file__).resolve().parents[1]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def max_rel_diff(a: dict, b: dict) -> float:
    assert set(b) <= set(a) and b
    return max(abs(a[k] - b[k]) / abs(a[k]) for k in b)


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(29500 + os.getpid() % 1000), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    ref = base / "ref"  # one process, global batch 8: the run every mapping must reproduce
    r = run_cli("pretrain", "--config", "tiny", "--out", str(ref), "--max-steps", "20",
                *tiny_sets(), "--set", "model.n_head=4")
    assert r.returncode == 0, r.stderr
    r = torchrun(4, str(ROOT / "tests" / "dist_worker.py"), str(base), str(ref), *MAPPINGS)
    assert r.returncode == 0, r.stderr[-3000:]
    return base, ref


@pytest.mark.parametrize("mapping", MAPPINGS)
def test_every_mapping_matches_one_process(runs, mapping):
    base, ref = runs
    run = base / mapping.replace(",", "_")
    got = losses(run)
    assert sorted(got) == list(range(1, 21))
    assert max_rel_diff(losses(ref), got) < 1e-4
    assert (run / "model" / "model.safetensors").is_file()  # consolidated by rank 0


def test_collective_bytes_match_the_cost_model(runs):
    base, _ = runs
    comm = json.loads((base / "comm.json").read_text())
    assert set(comm) == {m.replace(",", "_") for m in MAPPINGS}
    for name, c in comm.items():
        assert set(c["measured"]) == set(c["predicted"]), name
        for key, want in c["predicted"].items():
            assert abs(c["measured"][key] - want) <= 0.10 * want, (name, key)
    assert "all_reduce/tp" in comm["1_1_4"]["measured"]  # the table really sent tp traffic
    assert "reduce_scatter/fsdp" in comm["1_2_2"]["measured"]
    # Training itself: 20 steps of 2 micro-batches all-reduce each block's and the root's
    # gradients over dp once per step, not once per micro-batch.
    n_layer = load_config(runs[1] / "config.toml").model.n_layer
    assert comm["2_2_1_2"]["run_dp_all_reduces"] == 20 * (n_layer + 1)


def test_fsdp_tp_checkpoint_resumes_in_one_process_and_under_dp4(runs, tmp_path):
    base, ref = runs
    want = losses(ref)
    assert max_rel_diff(want, losses(base / "resume_dp4")) < 1e-4
    src, one = base / "1_2_2", tmp_path / "one"
    shutil.copytree(src, one, ignore=shutil.ignore_patterns("step_20", "model"))
    rows = (src / "metrics.jsonl").read_text().splitlines()
    (one / "metrics.jsonl").write_text("".join(r + "\n" for r in rows
                                               if json.loads(r)["step"] <= 10))
    r = run_cli("pretrain", "--out", str(one), "--resume", "--set", "parallel.fsdp=1",
                "--set", "parallel.tp=1", "--set", "train.batch_size=8")
    assert r.returncode == 0, r.stderr
    got = losses(one)
    assert got[11] == pytest.approx(want[11], rel=1e-5)
    assert max_rel_diff(want, got) < 1e-4


def test_one_process_checkpoint_resumes_under_fsdp_tp(runs):
    base, ref = runs
    got = losses(base / "resume_ref_fsdp2_tp2")
    assert got[11] == pytest.approx(losses(ref)[11], rel=1e-5)
    assert max_rel_diff(losses(ref), got) < 1e-4


@pytest.mark.parametrize("record", ["gqa_tp", "qkv_bias_fsdp_tp"])
def test_sharded_variants_train_like_one_process(runs, record):
    """Grouped-query attention under tp=2, and a model with q/k/v biases (Qwen2) under
    fsdp=2 x tp=2: the same losses as one process."""
    base, _ = runs
    pairs = json.loads((base / f"{record}.json").read_text())
    assert len(pairs) == 3 and pairs[0][0] != pairs[2][0]  # it trained
    for sharded, plain in pairs:
        assert sharded == pytest.approx(plain, rel=1e-5)


def test_sharded_model_export_generates(runs):
    base, _ = runs
    r = run_cli("generate", "--model", str(base / "1_2_2" / "model"), "--prompt", "Mia has",
                "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("Mia has"), r.stderr
