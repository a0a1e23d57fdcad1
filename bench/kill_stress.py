"""Kill -9 every training stage at random moments, resume it, and compare with a run that was
never interrupted.

    python bench/kill_stress.py --kills 20 --out /tmp/kill_stress [--stages pretrain,sft,...]

For each stage (pretrain, sft, reward, dpo, ppo; tiny CPU settings) the script:
1. runs it once uninterrupted (the reference);
2. runs it again, killing the process with SIGKILL --kills times: half of the kills at a
   random moment of the run, half the moment a checkpoint or model folder is being written
   (a hidden `.step_N.tmp` / `.model.tmp` folder appears); after each kill it checks every
   checkpoint and the model folder on disk (a file that cannot be read is "corrupt") and
   starts the run again with --resume (from scratch when no checkpoint exists yet);
3. lets the last attempt finish and compares its metrics.jsonl with the reference: every
   number except timings must be identical (CPU, fp32: resume is exact).
Two more jobs run the same way: `sweep` (a toy `scalelab sweep` of two sizes; it resumes by
being run again) and `track` (`track model add` of two models, then `track run`, into one
SQLite registry; each command is run again after a kill). After every kill the registry must
pass SQLite's integrity check and open as a scalelab registry; at the end `track status` (and
the sweep's sweep.json) must equal the uninterrupted job's.
Prints a table per stage: kills, kills that landed during a write, corrupt checkpoints,
mismatched metric values, and exits 1 when any is non-zero. Results are kept per stage in
OUT/results.json, so a rerun with the same --out does only the stages not yet done.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = ["model.seq_len=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32",
        "data.n_docs=2000", "data.tokenizer_vocab=400", "train.batch_size=8",
        "train.eval_every=10", "train.eval_batches=2", "train.log_every=1",
        "train.checkpoint_every=5", "train.warmup_steps=5"]
TIMING = ("per_s", "time/", "tflops", "mfu", "seconds")  # keys that differ run to run
SWEEP = """[model]
seq_len = 32
[data]
n_docs = 800
tokenizer_vocab = 300
[train]
batch_size = 8
lr = 3e-3
warmup_steps = 2
eval_batches = 2
log_every = 2
[sweep]
name = "ks"
tokens_per_param = 0.3
lr_width = 32
min_steps = 8
sizes = [{n_layer = 1, d_model = 16, n_head = 2}, {n_layer = 1, d_model = 32, n_head = 2}]
experiments = [{name = "add1", task = "builtin:addition?digits=1&n=8", threshold = 0.9},
               {name = "older", task = "builtin:older?n=8", threshold = 0.99}]
"""
TRACK_EXPERIMENTS = [("add1", "builtin:addition?digits=1&n=12", "0.9"),
                     ("story1", "builtin:story?steps=1&n=12", "0.8"),
                     ("older", "builtin:older?n=12", "0.99")]
TRAINING = ("pretrain", "sft", "reward", "dpo", "ppo")


def sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def stage_args(stage: str, prep: Path) -> list[str]:
    post = sets(["train.eval_every=5", "train.checkpoint_every=2", "train.batch_size=8",
                 "train.log_every=1"])
    return {
        "pretrain": ["pretrain", "--config", "tiny", "--max-steps", "30", *sets(TINY),
                     "--set", "model.seq_len=96"],
        "sft": ["sft", "--base", str(prep / "pre/model"), "--data", "builtin:tasks",
                "--max-steps", "12", *post, "--set", "sft.n_examples=400"],
        "reward": ["reward", "--base", str(prep / "sft/model"), "--data", "builtin:tasks",
                   "--max-steps", "8", *post, "--set", "reward.n_prompts=120",
                   "--set", "reward.max_new_tokens=8"],
        "dpo": ["dpo", "--policy", str(prep / "sft/model"), "--data",
                str(prep / "rm/preferences.jsonl"), "--max-steps", "8", *post,
                "--set", "train.batch_size=4"],
        "ppo": ["ppo", "--policy", str(prep / "sft/model"), "--reward", str(prep / "rm/model"),
                "--prompts", "builtin:tasks", "--max-steps", "6", *post,
                "--set", "ppo.rollout_batch=8", "--set", "ppo.max_new_tokens=8",
                "--set", "ppo.n_prompts=64"],
    }[stage]


def command(stage: str, prep: Path, out: Path, resume: bool) -> list[str]:
    return [sys.executable, "-m", "scalelab", *stage_args(stage, prep), "--out", str(out),
            *(["--resume"] if resume else [])]


def has_checkpoint(out: Path) -> bool:
    return (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step_*"))


def job(stage: str, prep: Path, out: Path) -> list[list[str]]:
    """The commands of one job, in order; a killed command is simply run again (training
    stages: with --resume once a checkpoint exists)."""
    if stage in TRAINING:
        return [command(stage, prep, out, has_checkpoint(out))]
    cli, reg = [sys.executable, "-m", "scalelab"], ["--registry", str(out / "registry.db")]
    if stage == "sweep":
        return [[*cli, "sweep", "--config", str(prep / "sweep.toml"), "--out",
                 str(out / "sweep"), *reg]]
    return [[*cli, "track", "model", "add", str(prep / "pre/model"), "--name", "base", *reg],
            [*cli, "track", "model", "add", str(prep / "sft/model"), "--name", "chat", *reg],
            [*cli, "track", "run", *reg]]


def fresh(stage: str, out: Path) -> None:
    """An empty job folder (the tracker's: a registry with its experiments, set up unkilled)."""
    shutil.rmtree(out, ignore_errors=True)
    if stage in ("sweep", "track"):
        out.mkdir(parents=True)
    if stage == "track":
        for name, task, threshold in TRACK_EXPERIMENTS:
            run([sys.executable, "-m", "scalelab", "track", "experiment", "add", "--name", name,
                 "--task", task, "--threshold", threshold, "--registry",
                 str(out / "registry.db")])


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")


def prepare(prep: Path, stages: list[str]) -> None:
    """The models the post-training stages and the tracker start from (made once, never
    killed; only those the chosen stages need)."""
    need = {"pretrain": 0, "sweep": 0, "sft": 1, "reward": 2, "track": 2, "dpo": 3, "ppo": 3}
    deepest = max(need[s] for s in stages)
    if deepest >= 1 and not (prep / "pre/model").is_dir():
        run(command("pretrain", prep, prep / "pre", False))
    if deepest >= 2 and not (prep / "sft/model").is_dir():
        run(command("sft", prep, prep / "sft", False))
    if deepest >= 3 and not (prep / "rm/model").is_dir():
        run(command("reward", prep, prep / "rm", False))
    prep.mkdir(parents=True, exist_ok=True)
    (prep / "sweep.toml").write_text(SWEEP)


def run_folders(out: Path) -> list[Path]:
    """The training run folders of a job (the sweep's: one per size)."""
    return sorted((out / "sweep/runs").glob("*")) if (out / "sweep").is_dir() else [out]


def writing(out: Path) -> bool:
    """A checkpoint or model folder is being written right now."""
    return any(any((o / "checkpoints").glob(".step_*.tmp")) or (o / ".model.tmp").exists()
               for o in run_folders(out))


def check_registry(path: Path) -> list[str]:
    """SQLite's own integrity check, then the scalelab schema (a registry killed before its
    tables were created is empty, not corrupt)."""
    import sqlite3
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(path, timeout=60)
        try:
            verdict = db.execute("PRAGMA integrity_check").fetchone()[0]
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
            if verdict != "ok":
                return [f"{path}: integrity_check says {verdict}"]
            if tables:
                from scalelab.track.registry import Registry
                Registry(path).close()  # the schema version row and tables are there
        finally:
            db.close()
    except Exception as e:  # noqa: BLE001 - anything unreadable counts
        return [f"{path}: {e}"]
    return []


def check_disk(out: Path) -> list[str]:
    """Every finished checkpoint, model folder and registry must load; returns what did not."""
    bad = check_registry(out / "registry.db")
    for folder in run_folders(out):
        bad += check_run(folder)
    return bad


def check_run(out: Path) -> list[str]:
    from scalelab.io import read_json, read_tensors
    from scalelab.train.rundir import list_checkpoints
    bad = []
    folders = list_checkpoints(out) + ([out / "model"] if (out / "model").is_dir() else [])
    for folder in folders:
        try:
            read_tensors(folder / "model.safetensors")
            if (folder / "state.json").exists() or folder.parent.name == "checkpoints":
                meta = read_json(folder / "state.json")
                assert isinstance(meta["step"], int)
                read_tensors(folder / "state.safetensors")
            else:
                read_json(folder / "config.json")
        except Exception as e:  # noqa: BLE001 - anything unreadable counts
            bad.append(f"{folder}: {e}")
    return bad


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def outcome(stage: str, out: Path) -> list[dict]:
    """What must not depend on kills: a training stage's metrics rows; for the sweep and
    the tracker the sizes, the fit, the registry's models, latest results and predictions."""
    if stage in TRAINING:
        return rows(out)
    from scalelab.track.commands import status
    from scalelab.track.registry import Registry
    reg = Registry(out / "registry.db")
    got = [{"status": status(reg)}]
    got += [{"experiment": r["experiment"], "model": r["model"], "metrics": r["metrics"],
             "passed": r["passed"], "samples": r["samples"]} for r in reg.latest().values()]
    got += [{k: m[k] for k in m.keys() if k not in ("id", "created", "path")}
            for m in reg.models()]
    got += [{k: p[k] for k in p.keys() if k not in ("id", "time")} for p in reg.predictions()]
    reg.close()
    if stage == "sweep":
        sw = json.loads((out / "sweep/sweep.json").read_text())
        got += [*sw["sizes"], {"fit": sw["scaling_law"]}]
    return got


def strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(t in k for t in TIMING)}


def mismatches(a: list[dict], b: list[dict]) -> int:
    """Values (not timings) that differ between two runs' metrics, row by row."""
    if len(a) != len(b):
        return abs(len(a) - len(b)) + sum(strip(x) != strip(y) for x, y in zip(a, b))
    bad = 0
    for x, y in zip(a, b):
        x, y = strip(x), strip(y)
        bad += sum(x.get(k) != y.get(k) for k in set(x) | set(y))
    return bad


def stress(stage: str, prep: Path, root: Path, kills: int, rng: random.Random) -> dict:
    ref = root / f"{stage}_ref"
    fresh(stage, ref)
    t0 = time.perf_counter()
    for cmd in job(stage, prep, ref):
        run(cmd)
    t_ref = time.perf_counter() - t0
    out = root / f"{stage}_killed"
    fresh(stage, out)
    stats = {"stage": stage, "kills": 0, "during_write": 0, "corrupt": 0, "fresh_starts": 0,
             "finished_early": 0, "reference_s": t_ref}
    problems: list[str] = []
    due = 0  # the job's command to run next
    while stats["kills"] < kills:
        if stage in TRAINING and not has_checkpoint(out) and out.exists():
            fresh(stage, out)  # killed before its first checkpoint: start over
            stats["fresh_starts"] += 1
        proc = subprocess.Popen(job(stage, prep, out)[due], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        # half the kills wait for a checkpoint or model folder being written (the tracker
        # writes none: its kills all land at random, in evaluations and registry writes)
        at_write = stage != "track" and rng.random() < 0.5
        deadline = time.perf_counter() + rng.uniform(0.3, t_ref)
        while proc.poll() is None:
            if (writing(out) if at_write else time.perf_counter() >= deadline):
                break
            time.sleep(0.002 if at_write else 0.01)
        if proc.poll() is not None:  # it finished (or failed) before the kill
            err = proc.stderr.read()
            proc.stderr.close()
            if proc.returncode != 0:
                problems.append(f"attempt exited {proc.returncode}: {err[-500:]}")
                break
            due += 1
            if due == len(job(stage, prep, out)):  # the whole job is done: again, so that
                stats["finished_early"] += 1      # every kill lands in a live job
                fresh(stage, out)
                due = 0
            continue
        during = writing(out)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        stats["kills"] += 1
        stats["during_write"] += during
        bad = check_disk(out)
        stats["corrupt"] += len(bad)
        problems += bad
    if stage in TRAINING and not has_checkpoint(out):
        fresh(stage, out)
    for cmd in job(stage, prep, out)[due:]:
        run(cmd)
    bad = check_disk(out)
    stats["corrupt"] += len(bad)
    problems += bad
    stats["mismatches"] = mismatches(outcome(stage, ref), outcome(stage, out))
    stats["problems"] = problems
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="kills per stage")
    ap.add_argument("--out", default="/tmp/scalelab_kill_stress")
    ap.add_argument("--stages", default="pretrain,sft,reward,dpo,ppo,sweep,track")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    stages = args.stages.split(",")
    unknown = set(stages) - {*TRAINING, "sweep", "track"}
    if unknown:
        ap.error(f"--stages: unknown {', '.join(sorted(unknown))}")
    prepare(root / "prep", stages)
    # Resumable: each finished stage is kept in OUT/results.json; a rerun with the same --out
    # skips the stages already stressed with at least --kills kills.
    done_file = root / "results.json"
    done = {r["stage"]: r for r in json.loads(done_file.read_text())} \
        if done_file.exists() else {}
    results = []
    for stage in stages:
        if done.get(stage, {}).get("kills", -1) >= args.kills:
            r = done[stage]
            print(f"{stage}: kept from {done_file}")
        else:
            load0 = os.getloadavg()[0]
            rng = random.Random(f"{args.seed}-{stage}")  # a stage's kills don't depend on order
            r = stress(stage, root / "prep", root, args.kills, rng)
            r["load_1min"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            r["cpus"] = os.cpu_count()
            done[stage] = r
            tmp = done_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(list(done.values()), indent=2))
            tmp.replace(done_file)
        results.append(r)
        print(f"{stage:9s} kills {r['kills']:3d}  during a write {r['during_write']:3d}  "
              f"corrupt {r['corrupt']}  mismatched values {r['mismatches']}  "
              f"fresh starts {r['fresh_starts']}  (reference run {r['reference_s']:.1f} s, "
              f"load {r.get('load_1min')} on {r.get('cpus')} cpus)",
              flush=True)
        for p in r["problems"]:
            print(f"    {p}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    bad = sum(r["corrupt"] + r["mismatches"] + len(r["problems"]) for r in results)
    print("OK: no corrupt checkpoint, no mismatch" if not bad else f"FAILED: {bad} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
