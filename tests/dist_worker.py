"""Run under torchrun by test_parallel_dist.py: several mappings in one launch (saves startup).

    torchrun --nproc-per-node 4 tests/dist_worker.py BASE REF_RUN MAPPING...

MAPPING is dp,fsdp,tp (e.g. 2,1,2). For each: pretrain BASE/dp_fsdp_tp from scratch on the
reference run's data with the same global batch, and record one step's collectives against
the analytic model (BASE/comm.json). Then resume the fsdp=2 x tp=2 run's step_10 checkpoint
under dp=4 (BASE/resume_dp4), and the one-process run's under fsdp=2 x tp=2.
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from scalelab.config import load_config
from scalelab.parallel import mesh
from scalelab.parallel.comm import measure_step, step_collectives, summarize
from scalelab.train.pretrain import pretrain


def config(ref: Path, sizes: tuple[int, int, int], global_batch: int):
    dp, fsdp, tp = sizes
    cfg = load_config(ref / "config.toml")
    cfg.parallel.dp, cfg.parallel.fsdp, cfg.parallel.tp = dp, fsdp, tp
    cfg.train.batch_size = global_batch // (dp * fsdp)
    return cfg


def fresh(out: Path, ref: Path) -> None:
    """Rank 0 copies the reference run's data and tokenizer into a new run folder."""
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copytree(ref / "data", out / "data")
        shutil.copy(ref / "tokenizer.json", out / "tokenizer.json")
    dist.barrier()


def main() -> None:
    base, ref = Path(sys.argv[1]), Path(sys.argv[2])
    dist.init_process_group("gloo")
    global_batch = load_config(ref / "config.toml").train.batch_size
    comm = {}
    for spec in sys.argv[3:]:
        sizes = tuple(int(x) for x in spec.split(","))
        name = "_".join(map(str, sizes))
        fresh(base / name, ref)
        cfg = config(ref, sizes, global_batch)
        pretrain(cfg, base / name)
        par = mesh.setup(cfg.parallel, "cpu")
        measured = summarize(measure_step(cfg.model, par, cfg.train.batch_size))
        predicted = summarize(step_collectives(cfg.model, par.sizes, par.rules,
                                               cfg.train.batch_size * cfg.model.seq_len))
        comm[name] = {"measured": {"/".join(k): v for k, v in measured.items()},
                      "predicted": {"/".join(k): v for k, v in predicted.items()}}
    # Resume fsdp=2 x tp=2 at step 10 under dp=4.
    src, out = base / "1_2_2", base / "resume_dp4"
    if src.exists():
        if dist.get_rank() == 0:
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("step_20", "model"))
            rows = (src / "metrics.jsonl").read_text().splitlines()
            (out / "metrics.jsonl").write_text(
                "".join(r + "\n" for r in rows if json.loads(r)["step"] <= 10))
        dist.barrier()
        pretrain(config(ref, (4, 1, 1), global_batch), out, resume=True)
    # Resume the one-process reference run's step_10 (safetensors) under fsdp=2 x tp=2.
    out = base / "resume_ref_fsdp2_tp2"
    if dist.get_rank() == 0:
        shutil.copytree(ref, out, ignore=shutil.ignore_patterns("step_20", "model"))
        rows = (ref / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text(
            "".join(r + "\n" for r in rows if json.loads(r)["step"] <= 10))
    dist.barrier()
    pretrain(config(ref, (1, 2, 2), global_batch), out, resume=True)
    if dist.get_rank() == 0:
        (base / "comm.json").write_text(json.dumps(comm, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
