"""Run under torchrun by test_mesh_errors.py: bad input on a 2-process mesh (gloo).

    torchrun --nproc-per-node 2 tests/mesh_errors_worker.py BASE

Each case records, per rank, the error it raised (BASE/errors_rank_R.json): a UserError
must reach every rank (only rank 0 prints, and no rank may wait for one that has left).
"""

import errno
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from scalelab.config import ModelConfig, ParallelConfig, load_config
from scalelab.model import Transformer
from scalelab.parallel import mesh
from scalelab.parallel.apply import parallelize
from scalelab.train import checkpoint
from scalelab.train.checkpoint import Checkpointer
from scalelab.train.ppo import ppo


def caught(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is part of what is recorded
        return f"{type(e).__name__}: {e}"
    return None


def dp2_model(par: mesh.Parallel) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = parallelize(Transformer(ModelConfig(vocab_size=64, seq_len=8, n_layer=1,
                                                n_head=2, d_model=16)), par)
    return model, torch.optim.AdamW(model.parameters())


def corrupt_rng_of_rank_1(base: Path) -> str | None:
    """A dp=2 checkpoint whose rng/rank_1.safetensors is garbage: only rank 1 reads it."""
    par = mesh.setup(ParallelConfig(dp=2), "cpu")
    model, opt = dp2_model(par)
    ckpts = Checkpointer(base / "run", parallel=par)
    ckpts.save(1, model, opt, {})
    if par.is_main:
        (base / "run/checkpoints/step_1/rng/rank_1.safetensors").write_text("garbage")
    par.barrier()
    return caught(lambda: ckpts.load(model, opt))


def reward_model_tp_does_not_divide(base: Path) -> str | None:
    """PPO under tp=2 with a reward model of 1 head (the policy has 2)."""
    cfg = load_config(overrides=["parallel.tp=2", "train.device=cpu", "train.max_steps=1",
                                 "ppo.rollout_batch=4", "ppo.samples_per_prompt=2",
                                 "ppo.max_new_tokens=4", "ppo.n_prompts=8"])
    return caught(lambda: ppo(cfg, base / "base", base / "rm1", "builtin:tasks",
                              base / "ppo"))


def full_disk_on_rank_1(base: Path) -> str | None:
    """Saving a dp=2 checkpoint, rank 1 alone finds the disk full writing its
    rng/rank_1.safetensors (rank 0 wrote everything it had to)."""
    par = mesh.setup(ParallelConfig(dp=2), "cpu")
    model, opt = dp2_model(par)
    real = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if par.rank == 1 and "rank_1" in path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, *args, **kwargs)
    checkpoint.save_file = save_file
    try:
        return caught(lambda: Checkpointer(base / "full", parallel=par).save(
            1, model, opt, {}))
    finally:
        checkpoint.save_file = real


def rank_0_works_long(base: Path) -> str | None:
    """Rank 0 alone works (samples preferences, writes token files) for longer than a
    collective of the run's process group may wait (here 1 s; NCCL's: minutes): the other
    ranks wait in together() and barrier() without timing out."""
    par = mesh.setup(ParallelConfig(dp=2), "cpu")
    c10d._set_pg_timeout(timedelta(seconds=1))  # the default group's, as NCCL's would be

    def wait() -> None:
        with par.together():
            if par.is_main:
                time.sleep(2)
        if par.is_main:
            time.sleep(2)
        par.barrier()
    return caught(wait)


def main() -> None:
    base = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # a hang fails, soon
    got = {"rng": corrupt_rng_of_rank_1(base), "ppo_tp": reward_model_tp_does_not_divide(base),
           "full": full_disk_on_rank_1(base), "wait": rank_0_works_long(base)}
    (base / f"errors_rank_{dist.get_rank()}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
