"""Run under torchrun by test_mesh_errors.py: bad input on a 2-process mesh (gloo).

    torchrun --nproc-per-node 2 tests/mesh_errors_worker.py BASE

Each case records, per rank, the error it raised (BASE/errors_rank_R.json): a UserError
must reach every rank (only rank 0 prints, and no rank may wait for one that has left).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from scalelab.config import ModelConfig, ParallelConfig, load_config
from scalelab.model import Transformer
from scalelab.parallel import mesh
from scalelab.parallel.apply import parallelize
from scalelab.train.checkpoint import Checkpointer
from scalelab.train.ppo import ppo


def caught(fn) -> str | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is part of what is recorded
        return f"{type(e).__name__}: {e}"
    return None


def corrupt_rng_of_rank_1(base: Path) -> str | None:
    """A dp=2 checkpoint whose rng/rank_1.safetensors is garbage: only rank 1 reads it."""
    par = mesh.setup(ParallelConfig(dp=2), "cpu")
    torch.manual_seed(0)
    model = parallelize(Transformer(ModelConfig(vocab_size=64, seq_len=8, n_layer=1,
                                                n_head=2, d_model=16)), par)
    opt = torch.optim.AdamW(model.parameters())
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


def main() -> None:
    base = Path(sys.argv[1])
    dist.init_process_group("gloo")
    got = {"rng": corrupt_rng_of_rank_1(base), "ppo_tp": reward_model_tp_does_not_divide(base)}
    (base / f"errors_rank_{dist.get_rank()}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
