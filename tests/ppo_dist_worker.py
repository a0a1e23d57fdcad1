"""Run under torchrun by test_ppo_mesh.py: PPO on a 4-process mesh.

    torchrun --nproc-per-node 4 tests/ppo_dist_worker.py BASE REFS

REFS/ppo is the one-process run with ppo.rollout_shards=2. Under dp=2 x tp=2 and
fsdp=2 x tp=2 (rollout_shards left at 0: one chunk per data rank, so 2 as well) PPO trains
on the same global rollout batch (BASE/ppo_<dp>_<fsdp>_<tp>). Then the fsdp=2 x tp=2 run,
cut back as if killed after step 7, resumes under dp=2 x tp=2 (BASE/ppo_resumed).
Every rank records the responses it sampled (or got from its tp group) per chunk seed in
RUN/responses/rank_R.json, to compare with the one-process run's.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import torch.distributed as dist

import scalelab.train.ppo as ppo_module
from scalelab.config import load_config

RECORDS: list[dict] = []
_sample = ppo_module.sample_responses


def recording_sample(*args, **kwargs):
    responses = _sample(*args, **kwargs)
    chunks = args[4]
    RECORDS.append({"seeds": chunks.seeds, "responses": responses})
    return responses


ppo_module.sample_responses = recording_sample


def run_ppo(refs: Path, out: Path, sizes, resume: bool = False) -> None:
    cfg = load_config(refs / "ppo" / "config.toml")
    cfg.parallel.dp, cfg.parallel.fsdp, cfg.parallel.tp = sizes
    cfg.ppo.rollout_shards = 0  # one chunk per data rank: 2, as the one-process run's
    RECORDS.clear()
    t0 = time.perf_counter()
    ppo_module.ppo(cfg, refs / "base", refs / "rm", "builtin:tasks", out, resume=resume)
    (out / "responses").mkdir(exist_ok=True)
    (out / "responses" / f"rank_{dist.get_rank()}.json").write_text(json.dumps(RECORDS))
    if dist.get_rank() == 0:
        print(f"{out.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def killed_after_step_7(src: Path, out: Path) -> None:
    """What a kill -9 during step 8 leaves: checkpoints up to step 5, rows up to step 7."""
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(src, out, ignore=shutil.ignore_patterns("step_10", "model",
                                                                "responses"))
        rows = (src / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text(
            "".join(r + "\n" for r in rows if json.loads(r)["step"] <= 7))
    dist.barrier()


def main() -> None:
    base, refs = Path(sys.argv[1]), Path(sys.argv[2])
    for sizes in [(2, 1, 2), (1, 2, 2)]:
        run_ppo(refs, base / f"ppo_{'_'.join(map(str, sizes))}", sizes)
    killed_after_step_7(base / "ppo_1_2_2", base / "ppo_resumed")
    run_ppo(refs, base / "ppo_resumed", (2, 1, 2), resume=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
