"""Run under torchrun by test_posttrain_mesh.py: SFT, reward and DPO on a 4-process mesh.

    torchrun --nproc-per-node 4 tests/posttrain_dist_worker.py BASE REFS DATA

REFS holds the one-process runs (sft, reward, dpo; global batch 8, grad_accum 1). Under
dp=2 x tp=2 and fsdp=2 x tp=2 each stage trains the same global batch as 2 data ranks x 2
micro-batches of 2 (BASE/<stage>_<dp>_<fsdp>_<tp>). Then each fsdp=2 x tp=2 run, cut back
as if killed after step 7 (its step_5 checkpoint and rows up to step 7 remain), resumes
under dp=2 x tp=2 (BASE/<stage>_resumed), and the one-process SFT run's step_5 checkpoint
resumes under fsdp=2 x tp=2 (BASE/sft_from_one).
"""

import json
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

from scalelab.config import load_config
from scalelab.train.dpo import dpo
from scalelab.train.reward import train_reward
from scalelab.train.sft import sft

MAPPINGS = [(2, 1, 2), (1, 2, 2)]


def killed_after_step_7(src: Path, out: Path) -> None:
    """What a kill -9 during step 8 leaves: checkpoints up to step 5, rows up to step 7."""
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("step_10", "model"))
        rows = (src / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text(
            "".join(r + "\n" for r in rows if json.loads(r)["step"] <= 7))
    dist.barrier()


def run_stage(stage: str, ref: Path, out: Path, sizes, base: Path, data: str,
              resume: bool = False) -> None:
    cfg = load_config(ref / "config.toml")
    cfg.parallel.dp, cfg.parallel.fsdp, cfg.parallel.tp = sizes
    cfg.train.batch_size, cfg.train.grad_accum = 2, 2  # x 2 data ranks = the one-process 8
    train = {"sft": sft, "reward": train_reward, "dpo": dpo}[stage]
    t0 = time.perf_counter()
    train(cfg, base, data, out, resume=resume)
    if dist.get_rank() == 0:
        print(f"{out.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main() -> None:
    base, refs, data = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    model = refs / "base"
    specs = {"sft": data, "reward": "builtin:tasks",
             "dpo": str(refs / "reward" / "preferences.jsonl")}
    for sizes in MAPPINGS:
        for stage, spec in specs.items():
            out = base / f"{stage}_{'_'.join(map(str, sizes))}"
            run_stage(stage, refs / stage, out, sizes, model, spec)
    for stage, spec in specs.items():
        out = base / f"{stage}_resumed"
        killed_after_step_7(base / f"{stage}_1_2_2", out)
        run_stage(stage, refs / stage, out, (2, 1, 2), model, spec, resume=True)
    out = base / "sft_from_one"
    killed_after_step_7(refs / "sft", out)
    run_stage("sft", refs / "sft", out, (1, 2, 2), model, data, resume=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
