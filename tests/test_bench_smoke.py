"""The bench scripts' own smoke modes, run as bench/README.md shows them: a library change
that breaks a bench (not imported by any other test) shows up here, not on the next GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    """python bench/ARGS from the checkout's root, one thread, as bench/README.md shows."""
    return subprocess.run([sys.executable, *args], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)


def test_ppo_throughput_smoke_runs(tmp_path: Path) -> None:
    # bench/README.md: `python bench/ppo_throughput.py --smoke --json /tmp/ppo-smoke.json`
    # (scalelab alone here: TRL is a bench extra, not a test dependency)
    out = tmp_path / "ppo.json"
    proc = run_bench("bench/ppo_throughput.py", "--smoke", "--peers", "scalelab", "--json",
                     str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())["results"]["scalelab"]
    assert result["steps"] == 2 and result["episodes_per_s"] > 0


def test_comm_bytes_measures_what_the_model_predicts_on_two_processes() -> None:
    # docs/parallelism.md runs it on 4 processes; 2 (dp, fsdp, tp = 2 each) keep it quick
    proc = run_bench("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                     str(29500 + os.getpid() % 1000), "bench/comm_bytes.py", "--steps", "2",
                     "--set", "model.n_layer=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    mappings = [line.split()[0] for line in proc.stdout.splitlines()[2:] if line[:1].isdigit()]
    assert set(mappings) == {"2x1x1", "1x2x1", "1x1x2"}
    assert "largest |measured/model - 1| = 0.0000" in proc.stdout


def test_monitor_overhead_too_few_steps_is_a_clear_error() -> None:
    # tokens/s is the median of the logged 10-step intervals after the first, so --steps 10
    # has none: one line and exit 2, not a StatisticsError traceback
    proc = run_bench("bench/monitor_overhead.py", "--cpu", "--steps", "10", "--rounds", "1")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--steps" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_throughput_smoke_runs_and_both_layouts_give_one_loss(tmp_path: Path) -> None:
    # bench/README.md: `python bench/sft_throughput.py --smoke --json /tmp/sft-smoke.json`
    out = tmp_path / "sft.json"
    proc = run_bench("bench/sft_throughput.py", "--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert abs(data["losses"]["packed"] - data["losses"]["padded"]) < 1e-4
    assert data["results"]["packed"]["real_share"] > 0.8 > data["results"]["padded"]["real_share"]


def test_ppo_packing_smoke_runs_and_both_layouts_agree(tmp_path: Path) -> None:
    # bench/README.md: `python bench/ppo_packing.py --smoke --json /tmp/ppo-packing.json`; the
    # bench exits non-zero if the first step's stats differ between the layouts
    out = tmp_path / "ppo_packing.json"
    proc = run_bench("bench/ppo_packing.py", "--smoke", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "first step's stats agree" in proc.stdout
    assert data["real_share_padded"] < 0.9 and data["ratio"] > 0


def test_kernel_profile_counts_kernels_not_the_annotations_around_them(monkeypatch) -> None:
    # On CUDA, torch.profiler also lists record_function ranges (the optimizer's step) as
    # device events spanning their kernels: counted, they inflated the GPU's busy time.
    from types import SimpleNamespace

    import torch

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import common
    from common import kernel_profile

    def event(name, us, start, annotation=False, device="CUDA"):
        return SimpleNamespace(name=name, device_time_total=us, is_user_annotation=annotation,
                               device_type=SimpleNamespace(name=device),
                               time_range=SimpleNamespace(start=start, end=start + us))

    class FakeProfile:
        def __init__(self, activities):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def events(self):
            return [event(common.PROFILED, 100.0, 0.0, device="CPU"),
                    event("gemm", 30.0, 10.0), event("gemm", 30.0, 40.0),
                    event("adam", 20.0, 75.0),
                    event("Optimizer.step#AdamW.step", 21.0, 74.0, annotation=True)]

    monkeypatch.setattr(torch.profiler, "profile", FakeProfile)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    prof = kernel_profile(lambda: None, torch.device("cuda"), per=2)
    assert prof["count_per_unit"] == 1.5 and prof["busy_us_per_unit"] == 40.0
    assert [(r["name"], r["count"], r["share"]) for r in prof["top"]] == [
        ("gemm", 2, 0.75), ("adam", 1, 0.25)]
    # idle: 0-10 before the first kernel, 70-75 before adam, 95-100 after it
    assert (prof["wall_us"], prof["idle_us"]) == (100.0, 20.0)
    assert [(g["us"], g["after"], g["before"]) for g in prof["gaps"]] == [
        (10.0, "", "gemm"), (5.0, "gemm", "adam"), (5.0, "adam", "")]


def test_idle_gaps_merge_overlapping_spans(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from common import idle_gaps

    # b starts inside a; covered: 5-30 and 42-50, so idle is 5 + 12 + 10 of 60 us
    got = idle_gaps([(15.0, 30.0, "b"), (5.0, 20.0, "a"), (42.0, 50.0, "c")], 0.0, 60.0, top=2)
    assert (got["wall_us"], got["idle_us"]) == (60.0, 27.0)
    assert [(g["us"], g["at_us"], g["after"], g["before"]) for g in got["gaps"]] == [
        (12.0, 30.0, "b", "c"), (10.0, 50.0, "c", "")]
