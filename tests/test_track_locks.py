"""The registry cut short beside its -wal, or locked by another live process: the command
line exits 2 at once (well under the 60 s busy timeout) naming the file and leaves every file
as it was, or waits for the lock saying so on stderr."""

import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scalelab.track.registry import QUIET_WAIT_S, Registry

HOLD = """
import os, signal, sys, time
from scalelab.track.registry import Registry
r = Registry(sys.argv[1])
if sys.argv[2] in ("write", "die"):
    r.add_experiment("held", "builtin:qa", "exact_match", 0.5)  # frames in the -wal
if sys.argv[2] == "die":  # killed with the registry open: -wal and -shm stay behind
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[2] == "lock":  # a writer stopped mid-transaction (Ctrl-Z, a debugger)
    r.db.execute("BEGIN IMMEDIATE")
print("ready", flush=True)
time.sleep(120)
"""


def other_process(reg: Path, how: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(reg), how], stdout=subprocess.PIPE,
                         text=True)
    if how == "die":
        assert p.wait(timeout=60) == -signal.SIGKILL
    else:
        assert p.stdout.readline().strip() == "ready"
    return p


def contents(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but for the -shm index, which SQLite rebuilds from the -wal."""
    return {p.name: b"" if p.name.endswith("-shm") else p.read_bytes() for p in folder.iterdir()}


def scalelab(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scalelab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("how, keep, says", [
    ("die", 0, "the registry file is empty but reg.db-wal"),  # SQLite would delete the -wal
    ("write", 0, "the registry file is empty but reg.db-wal"),  # ... after 60 s of waiting
    ("open", 0, "another process held a lock on it"),  # -wal of 0 bytes: 60 s, then 'locked'
    # cut in half: SQLite would say 'malformed', then checkpoint the -wal into it and delete it
    ("die", 0.5, "not a scalelab registry (database disk image is malformed)"),
])
def test_registry_cut_short_while_in_use_exits_2_at_once_and_keeps_files(tmp_path, how, keep,
                                                                         says):
    reg = tmp_path / "reg.db"
    made = Registry(reg)
    with made.write() as db:  # some pages beyond the first few
        db.executemany("INSERT INTO history (experiment_id, time, event) VALUES (1, '', ?)",
                       [("x" * 1000,)] * 50)
    made.close()
    holder = other_process(reg, how)
    reg.write_bytes(reg.read_bytes()[:int(keep * reg.stat().st_size)])  # `: > reg.db`, a cp cut
    files = contents(tmp_path)
    assert "reg.db-wal" in files and (len(files["reg.db-wal"]) > 0) == (how != "open")
    cmd = scalelab("track", "model", "list", "--registry", str(reg))
    try:  # the old code waited the whole 60 s busy timeout here (or deleted the -wal)
        out, err = cmd.communicate(timeout=QUIET_WAIT_S + 25)
    finally:
        for p in (holder, cmd):
            p.kill()
            p.wait()
    assert err.startswith(f"scalelab: error: {reg}: {says}"), err
    assert len(err.strip().splitlines()) == 1 and not out
    assert contents(tmp_path) == files  # nothing touched


def test_a_writer_stuck_holding_the_lock_is_said_and_waited_for(tmp_path):
    reg = tmp_path / "reg.db"
    Registry(reg).close()
    holder = other_process(reg, "lock")
    cmd = scalelab("track", "experiment", "add", "--name", "x", "--task", "builtin:qa",
                   "--threshold", "1", "--registry", str(reg))
    try:
        ready, _, _ = select.select([cmd.stderr], [], [], QUIET_WAIT_S + 20)
        note = cmd.stderr.readline() if ready else ""  # the old code said nothing for 60 s
        assert note == f"scalelab: {reg} is locked by another process; waiting up to 60 s\n"
        assert cmd.poll() is None  # still waiting
        holder.kill()  # the lock goes with it
        out, err = cmd.communicate(timeout=60)
    finally:
        for p in (holder, cmd):
            p.kill()
            p.wait()
    assert cmd.returncode == 0, err
    assert [e["name"] for e in Registry(reg).experiments()] == ["x"]


def test_two_seeds_at_once_both_succeed(tmp_path, monkeypatch):
    """`experiment seed` (also run by every sweep) in two processes at once: the second read
    the experiment list before the first wrote; it used to exit 2 ("already exists")."""
    from scalelab.track.ops import seed_experiments
    first, second = Registry(tmp_path / "reg.db"), Registry(tmp_path / "reg.db")
    monkeypatch.setattr(second, "experiments", lambda: [])  # its stale read, before the write
    added = seed_experiments(first)
    assert seed_experiments(second) == []  # nothing added twice, no error
    assert [e["name"] for e in first.experiments()] == added and len(added) == 13
