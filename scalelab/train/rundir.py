"""Claiming a run folder safely: a run writes only into a folder that is new, empty, or an
earlier run of the same stage. Anything else is refused before any work, so a user's own
files can never be overwritten or deleted by `--out .` or `--out my_project`.

Each run folder records its stage in DIR/run.json ({"stage": "pretrain"}); folders from
before that file existed are recognised by what they hold (lineage.json, data/meta.json).
Under torchrun it also records the job ({"job": ...}, see torchrun_job): a worker that
`torchrun --max-restarts` starts again before the run's first checkpoint may take its own
job's folder back and start over; any other command still finds the folder taken.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

from scalelab.config import UserError
from scalelab.io import atomic_write_json, read_json_if_any
from scalelab.train.progress import is_rank0

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: no run-folder lock)
    fcntl = None

MARKER = "run.json"


class RunBusy(UserError):
    """Another live command is writing the run folder: refused, and nothing of it removed."""


_held: dict[Path, int] = {}  # run folders this process writes -> the locked folder's fd


def hold(out: Path) -> None:
    """Lock the run folder for as long as this process writes it (rank 0 only), so that a
    second command on the same run (two --resume, say) is refused instead of interleaving
    metrics and checkpoints. An flock on the folder itself: nothing is written, and the OS
    drops it when the process ends, however it ends (kill -9 too). Call on a folder that
    exists; a file system without flock goes unlocked."""
    key = out.resolve()
    if fcntl is None or key in _held or not is_rank0():
        return
    try:
        fd = os.open(key, os.O_RDONLY)
    except OSError:  # a folder we may write but not read: left unlocked
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunBusy(f"--out {out}: another scalelab command is writing this run right now; "
                      "wait for it to end (or stop it), or choose another --out") from None
    except OSError:  # no flock here (some network file systems)
        os.close(fd)
        return
    _held[key] = fd


def release(out: Path | None = None) -> None:
    """Let go of one run folder's lock (or all of them): its stage has finished."""
    for key in [out.resolve()] if out is not None else list(_held):
        fd = _held.pop(key, None)
        if fd is not None:
            os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders start with '.', never match)."""
    found = [p for p in (run_dir / "checkpoints").glob("step_*")
             if re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[5:]))


def last_step(out: Path) -> int | None:
    """Step of the newest finished checkpoint, or None."""
    found = list_checkpoints(out)
    return int(found[-1].name[5:]) if found else None


def run_stage(out: Path) -> str | None:
    """The stage that made the run in `out`, or None if it is not a scalelab run folder."""
    for name in (MARKER, "lineage.json"):
        stage = read_json_if_any(out / name).get("stage")
        if isinstance(stage, str):
            return stage
    if (out / "data" / "meta.json").is_file() and \
            ((out / "config.toml").is_file() or (out / "tokenizer.json").is_file()):
        return "pretrain"  # token files (and tokenizer) in scalelab's layout
    return None


def torchrun_job() -> str | None:
    """Names this torchrun job, the same in every attempt of it: the rendezvous run id, the
    host and the torchrun agent's pid (the workers' parent; the run id alone is "none"
    unless --rdzv-id or --standalone is given). None outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    return f"{run_id}@{socket.gethostname()}:{os.getppid()}"


def restart_count() -> int:
    """How many times torchrun --max-restarts has started this worker again (0 outside)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def restarted_own_job(out: Path) -> bool:
    """This process is a torchrun restart of the job that claimed `out`."""
    if not restart_count():
        return False
    job = read_json_if_any(out / MARKER).get("job")
    return job is not None and job == torchrun_job()


def _started(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() or last_step(out) is not None


def same_input(was: str, now: str) -> bool:
    """Does --resume name what the run started from? Equal text; or two paths (not a spec
    such as builtin:world) that resolve to one file or folder. A path that cannot be found
    from here (gone since, or relative to another working folder) cannot be compared, and
    counts as the same."""
    if was == now:
        return True
    if not (was and now) or ":" in was + now:
        return False
    a, b = Path(was), Path(now)
    return not (a.exists() and b.exists()) or a.resolve() == b.resolve()


def check_writable(out: Path) -> None:
    """--out, or the nearest folder above it that exists, must be a folder we can write in
    (else the command would fail with a traceback after its work)."""
    where = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not where.is_dir():
        raise UserError(f"--out {out}: {where} is a file, so no folder can be made there; "
                        "give a folder (new or empty)")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: {where} is not writable; choose another --out")


def check_out(out: Path, stage: str, resume: bool) -> None:
    """Raise UserError unless `stage` may write its run into `out` (nothing is written)."""
    check_writable(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    owner = run_stage(out) if entries else None
    if owner == stage:
        hold(out)  # before anything of it is read, a second command on it is refused
    if owner is not None and owner != stage:
        fix = f"resume it with `scalelab {owner} ... --resume`" if resume \
            else "choose a new --out"
        raise UserError(f"--out {out}: holds a {owner} run, not a {stage} run; {fix}")
    if resume:
        if owner is None:
            where = "this folder is not a scalelab run" if entries else "nothing is here"
            raise UserError(f"--out {out}: --resume given but {where} (no checkpoint to "
                            f"resume); start a {stage} run in a new or empty folder without "
                            "--resume")
        if last_step(out) is None:
            again = f"to start again, delete {out} or choose a new --out" if _started(out) \
                else "it stopped before training: run the same command without --resume"
            raise UserError(f"--out {out}: --resume given but no checkpoint in "
                            f"{out / 'checkpoints'} (the run stopped before its first one); "
                            f"{again}")
        return
    if owner is not None and _started(out) and not restarted_own_job(out):
        if last_step(out) is None:  # nothing to resume from: say so, not "pass --resume"
            raise UserError(f"--out {out}: already holds a run, stopped before its first "
                            f"checkpoint; to start again, delete {out} or choose a new --out")
        raise UserError(f"--out {out}: already holds a run; pass --resume to continue it "
                        "or choose a new --out")
    if entries and owner is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise UserError(f"--out {out}: folder is not empty ({shown}) and is not a scalelab "
                        "run; a run is written only into a new or empty folder, so that no "
                        "file of yours is touched: choose a new --out")
    # else: new, empty, or our own run that stopped before training (bad data, say): reuse


def resume_or_restart(run: Path, steps: int) -> bool | None:
    """For the commands that run stages themselves (demo, sweep, study): None when the run
    has its checkpoint at `steps` (done); else whether to resume it. A run killed before its
    first checkpoint is removed, to start over; a folder that is no scalelab run is not."""
    if (run / "checkpoints" / f"step_{steps}").is_dir():  # not the hidden .step_N.tmp
        return None
    if last_step(run) is not None:
        return True
    if run.is_dir() and any(run.iterdir()) and run_stage(run) is None:
        raise UserError(f"{run}: is not a scalelab run (no {MARKER}), so it is not removed to "
                        "start this run over; move it away, or choose another --out")
    # Another live command training this run (a second sweep on the same --out): RunBusy,
    # nothing removed. A lock of this process's own is left as it is.
    if run.is_dir() and run.resolve() not in _held:
        hold(run)
        release(run)  # the folder made again below is locked by its stage
    shutil.rmtree(run, ignore_errors=True)
    return False


def finished_step(out: Path, max_steps: int) -> int | None:
    """On --resume: the checkpoint step if the run already reached max_steps (nothing to do)."""
    step = last_step(out)
    return step if step is not None and step >= max_steps else None


def claim(out: Path, stage: str, resume: bool) -> None:
    """check_out, then create the folder and record the stage (and torchrun job); idempotent."""
    check_out(out, stage, resume)
    out.mkdir(parents=True, exist_ok=True)
    hold(out)
    if not resume and _started(out) and restarted_own_job(out):
        # our own job's attempt that died before its first checkpoint: start over (its
        # events.jsonl, with the stall or crash, is kept)
        for name in ("metrics.jsonl", "progress.json", "summary.json"):
            (out / name).unlink(missing_ok=True)
    if not (out / MARKER).exists():
        job = torchrun_job()
        atomic_write_json(out / MARKER, {"stage": stage, **({"job": job} if job else {})},
                          indent=None)


def check_folder(out: Path, own: str, command: str, mark: bytes | None = None) -> None:
    """For commands that write several things into --out (demo, sweep, track report): the
    folder must be new, empty, or one this command wrote before: it holds `own`, a file
    with `mark` in its first 4 KB where given (a name alone, report.html, is a user's too)."""
    check_writable(out)
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    ours = (out / own).exists() if mark is None else _holds_mark(out / own, mark)
    if entries and not ours:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise UserError(f"--out {out}: folder is not empty ({shown}) and was not written by "
                        f"`scalelab {command}`; choose a new or empty --out so that no file "
                        "of yours is touched")


def _holds_mark(path: Path, mark: bytes) -> bool:
    try:
        with path.open("rb") as f:
            return mark in f.read(4096)
    except OSError:
        return False


def is_fresh(out: Path) -> bool:
    """New or empty: everything that later appears inside was written by this run."""
    return not out.exists() or (out.is_dir() and not any(out.iterdir()))


def forget_unstarted(out: Path, existed: bool) -> None:
    """A run that failed on bad input before training leaves nothing behind: remove what it
    wrote into its (new or empty) folder. Call only when is_fresh(out) held at the start."""
    if not out.is_dir() or _started(out):
        return
    try:
        hold(out)  # another live command started in it meanwhile: its files, not ours
    except RunBusy:
        return
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in out.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
