"""`scalelab runs list|show|watch`: what a run folder says about its run (status, progress,
time, events), also when its records are old, torn or hand-edited."""

import json
import os
import time

import pytest


def test_progress_without_a_pid_is_not_a_running_run(tmp_path):
    """A progress.json that names no process (pid missing or 0) says nothing about a live run:
    os.kill(0, 0) would signal our own process group and call it alive."""
    from scalelab.runs import state
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    for progress in ({"step": 1, "time_unix": 1.0}, {"step": 1, "time_unix": 1.0, "pid": 0}):
        (tmp_path / "progress.json").write_text(json.dumps(progress))
        assert state(tmp_path)["status"].startswith("dead"), progress


def test_a_run_going_again_shows_its_own_time_not_the_last_attempts(tmp_path):
    """A run restarted after a stall (or resumed after a stop) runs on beside the old attempt's
    summary.json: `runs show` said "running" but took goodput, MFU and the wall-time split
    from that summary, frozen at the stall, instead of from the newer progress.json."""
    from scalelab.runs import show_text, state
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 30, "loss": 2.0}) + "\n")
    (tmp_path / "summary.json").write_text(json.dumps({
        "status": "stalled", "step": 24, "time_unix": 1000.0, "wall_s": 10.0, "goodput": 0.1,
        "mfu": 0.01, "tokens_per_s": 5.0, "time": {"train": 1.0, "startup": 9.0}}))
    (tmp_path / "progress.json").write_text(json.dumps({
        "step": 30, "time_unix": 2000.0, "pid": os.getpid(), "mfu": 0.3,
        "time": {"train": 45.0, "restart": 15.0}}))
    s = state(tmp_path)
    assert s["status"] == "running" and s["step"] == 30
    assert s["goodput"] == pytest.approx(45 / 60) and s["mfu"] == 0.3
    assert s["time"] == {"train": 45.0, "restart": 15.0}
    assert "(of 60.0 s)" in show_text(s)


def test_runs_watch_refuses_an_interval_it_cannot_sleep(tmp_path, capsys):
    from scalelab.cli import main
    run = tmp_path / "run"  # a run that is running: this process wrote its progress
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "progress.json").write_text(json.dumps({"pid": os.getpid(),
                                                   "time_unix": time.time()}))
    assert main(["runs", "watch", str(run), "--interval", "-1"]) == 2
    assert "--interval -1" in capsys.readouterr().err


def test_runs_show_events_count(tmp_path, capsys):
    from scalelab.cli import main
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "events.jsonl").write_text("".join(
        json.dumps({"event": "resumed", "step": s, "restart": 0, "time": 1.0}) + "\n"
        for s in (10, 20, 30)))
    shown = {}
    for n in (0, 2, 5):
        assert main(["runs", "show", str(run), "--events", str(n)]) == 0
        out = capsys.readouterr().out
        shown[n] = [s for s in (10, 20, 30) if f"at step {s}" in out]
    assert shown == {0: [], 2: [20, 30], 5: [10, 20, 30]}  # the latest N; 0 = none
    assert main(["runs", "show", str(run), "--events", "-1"]) == 2


def test_runs_watch_refuses_a_folder_that_is_no_run(tmp_path, capsys, monkeypatch):
    """`runs watch` on a folder no run made printed "not started" forever; a run folder whose
    run has not logged a step yet is still watched (it waits for the first one)."""
    from scalelab import runs
    from scalelab.cli import main

    class Slept(Exception):
        pass

    def sleep(_seconds):
        raise Slept
    monkeypatch.setattr(runs.time, "sleep", sleep)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("[train]\nlr = 1e-3\n")  # a user's own config folder
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", mine):
        assert main(["runs", "watch", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"{folder}: not a run folder" in err and len(err.strip().splitlines()) == 1
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"stage": "pretrain"}')  # claimed, no step logged yet
    with pytest.raises(Slept):
        main(["runs", "watch", str(run)])


SUMMARY = {"status": "finished", "step": 10, "max_steps": 10, "loss": 5.6, "tokens": 2560,
           "tokens_per_s": 16088.8, "goodput": 0.1, "wall_s": 1.6, "time_unix": 1.0,
           "time": {"train": 0.16, "data": 0.002, "startup": 1.4}, "events": {}}


@pytest.mark.parametrize("key, value", [("step", "ten"), ("time_unix", "x"), ("status", 3),
                                        ("time", 5), ("time", {"train": "a"}),
                                        ("goodput", "x"), ("events", [1]), ("wall_s", None)])
def test_a_hand_edited_summary_with_a_wrong_type_is_named(tmp_path, capsys, key, value):
    """A summary.json with a string where a number belongs was a traceback in `runs list`,
    `runs show` and the demo report; now one line naming the file and the key, exit 2."""
    from scalelab.cli import main
    from scalelab.config import UserError
    from scalelab.demo import run_health
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    (run / "summary.json").write_text(json.dumps(SUMMARY))
    assert main(["runs", "show", str(run)]) == 0  # intact: read as before
    assert run_health(tmp_path)[-1].startswith("| run | finished | 10 | 2 s | 10% |")
    capsys.readouterr()
    (run / "summary.json").write_text(json.dumps({**SUMMARY, key: value}))
    for command in (["runs", "show", str(run)], ["runs", "list", str(tmp_path)]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert f"{run / 'summary.json'}: '{key}'" in err and len(err.splitlines()) == 1, err
    with pytest.raises(UserError, match=f"summary.json: '{key}'"):
        run_health(tmp_path)
