"""`scalelab demo`: the folder it takes, and the numbers of its report (on made-up rows; the
stages and the evaluation themselves run in test_posttrain.py)."""

import errno
import json
from pathlib import Path

import pytest
from new_user_home import cli

from scalelab.config import UserError
from scalelab.train.rundir import resume_or_restart


@pytest.fixture
def no_training(monkeypatch):
    """The demo's pretraining stage refuses to run (exit 2, "no training here")."""
    import scalelab.train.pretrain

    def pretrain(*args, **kwargs):
        raise UserError("no training here")
    monkeypatch.setattr(scalelab.train.pretrain, "pretrain", pretrain)


def test_demo_takes_no_folder_of_the_users_with_a_pretrain_subfolder(tmp_path, no_training):
    """A folder holding a `pretrain/` of the user's passed as the demo's own: its files were
    removed to start the pretraining over (a scalelab run there was resumed or taken)."""
    mine = tmp_path / "project"
    (mine / "pretrain").mkdir(parents=True)
    (mine / "pretrain/notes.txt").write_text("mine")
    rc, _, err = cli("demo", "--quick", "--out", str(mine))
    assert rc == 2 and "not written by `scalelab demo`" in err
    assert [p.name for p in mine.rglob("*")] == ["pretrain", "notes.txt"]


def test_a_demo_json_of_the_users_or_an_old_demo_folder_is_not_taken(tmp_path, no_training):
    """Any file named demo.json made a folder the demo's (and was overwritten); a demo folder
    from before demo.json existed is refused with the way to go on, not told it is no demo."""
    mine = tmp_path / "web"
    mine.mkdir()
    (mine / "demo.json").write_text('{"title": "my demo page"}')
    rc, _, err = cli("demo", "--quick", "--out", str(mine))
    assert rc == 2 and "not written by `scalelab demo`" in err
    assert (mine / "demo.json").read_text() == '{"title": "my demo page"}'
    old = tmp_path / "old-demo"
    (old / "pretrain").mkdir(parents=True)
    (old / "pretrain" / "run.json").write_text('{"stage": "pretrain"}')
    rc, _, err = cli("demo", "--quick", "--out", str(old))
    assert rc == 2 and "a demo from before" in err and '{"schedule": "quick"}' in err
    assert [p.name for p in old.rglob("*")] == ["pretrain", "run.json"]


def test_a_quick_demo_folder_is_not_continued_as_a_full_one(tmp_path, no_training):
    """`demo` on a `demo --quick` folder resumed its 600-step pretraining to 3000 steps under
    a new schedule, and its SFT run from the model before that: refused, nothing written."""
    out = tmp_path / "demo"
    rc, _, err = cli("demo", "--quick", "--out", str(out))
    assert rc == 2 and "no training here" in err  # the folder was taken
    assert json.loads((out / "demo.json").read_text()) == {"schedule": "quick"}
    rc, _, err = cli("demo", "--out", str(out))
    assert rc == 2 and "scalelab demo --quick" in err and "demo.json" in err
    assert [p.name for p in out.iterdir()] == ["demo.json"]
    rc, _, err = cli("demo", "--quick", "--out", str(out))  # the same command: taken again
    assert rc == 2 and "no training here" in err


def test_a_stage_folder_that_is_no_run_is_not_removed(tmp_path):
    """resume_or_restart (demo, sweep, study) starts a run killed before its first checkpoint
    over by removing its folder; a folder no run made is refused instead."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a scalelab run"):
        resume_or_restart(theirs, 10)
    assert (theirs / "notes.txt").read_text() == "mine"
    killed = tmp_path / "killed"  # claimed (run.json), logged, no checkpoint yet
    killed.mkdir()
    (killed / "run.json").write_text('{"stage": "pretrain"}')
    (killed / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    assert resume_or_restart(killed, 10) is False and not killed.exists()


def test_report_counts_and_averages_ppo_steps_past_the_monitors_rows():
    """A PPO step that dropped a non-finite minibatch update leaves a monitor row ({"event",
    "action": "skip"}) in metrics.jsonl beside the step's own: the report counted it as a step
    and, in the first or last tenth, ended the demo with a KeyError after all its training."""
    from scalelab.demo import write_report
    rows = []
    for step in range(1, 21):
        if step in (2, 20):
            rows.append({"step": step, "event": "nonfinite", "action": "skip"})
        rows.append({"step": step, "loss": 0.1, "lr": 1e-5, "objective/scores": float(step),
                     "gold_reward": step / 10, "objective/kl": 2.0 * step})
    fams = {"addition": 0.5, "mean": 0.5}
    results = {"PPO": {"held_in": fams, "held_out": fams, "gold_reward": 0.5,
                       "gold_reward_se": 0.1, "sampled_correct": 0.5,
                       "sampled_extra_words": 0.0, "sampled_stopped": 1.0,
                       "showcase": [""] * 6}}
    md = write_report(Path("unused"), "scalelab demo", 1.0, results, {"val_accuracy": 0.7},
                      rows, [])
    # 20 steps; the first tenth is steps 1-2, the last 19-20: scores 1.5 -> 19.5
    assert ("PPO (20 steps): proxy reward 1.500 -> 19.500, gold reward 0.150 -> 1.950, "
            "KL to the reference 3.000 -> 39.000") in md


def half_then_full_disk(write, name):
    """A writer that, for a file of this name (or its temporary one), writes half of what it
    is given, then fails as a full disk does."""
    def failing(path, data, *args, **kwargs):
        if name not in path.name:
            return write(path, data, *args, **kwargs)
        write(path, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")
    return failing


def fake_demo(monkeypatch):
    """run_demo with every stage done and the evaluation made up: what it writes itself."""
    import scalelab.demo as demo
    fams = {"addition": 0.5, "mean": 0.5}
    result = {"held_in": fams, "held_out": fams, "gold_reward": 0.5, "gold_reward_se": 0.1,
              "sampled_correct": 0.5, "sampled_extra_words": 0.0, "sampled_stopped": 1.0,
              "showcase": [""] * 6}
    monkeypatch.setattr(demo, "run_stage", lambda run_dir, *args: run_dir / "model")
    monkeypatch.setattr(demo, "evaluate_policies", lambda models: dict.fromkeys(models, result))
    monkeypatch.setattr(demo, "read_metrics", lambda run_dir: [
        {"step": 1, "lr": 1.0, "objective/scores": 0.1, "gold_reward": 0.2, "objective/kl": 0.0}])
    monkeypatch.setattr(demo, "read_json", lambda path: {"val_accuracy": 0.7})
    return demo


def test_a_full_disk_keeps_the_last_report_whole(tmp_path, monkeypatch):
    """report.md, report.html, results.json and the plots were written in place: a full disk
    (or Ctrl-C) mid-write left half a report where the last whole one was."""
    import matplotlib.figure
    demo = fake_demo(monkeypatch)
    out = tmp_path / "demo"
    demo.run_demo(out, quick=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"report.md", "report.html", "results.json"} <= set(before)
    for name in ("results.json", "report.md", "report.html"):
        with monkeypatch.context() as m:
            m.setattr(Path, "write_text", half_then_full_disk(Path.write_text, name))
            with pytest.raises(OSError):
                demo.run_demo(out, quick=True)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before, name
    # The plots: savefig fails the same way.
    rows = [{"step": 1, "loss": 2.0, "val_loss": 2.0, "objective/scores": 0.1,
             "gold_reward": 0.2, "objective/kl": 0.0, "objective/kl_k3": 0.0}]
    assert demo.plot(out, rows, rows, rows, []) == ["losses.png", "ppo.png"]
    pngs = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(pngs) == ["losses.png", "ppo.png"]

    def savefig(fig, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    with pytest.raises(OSError):
        demo.plot(out, rows, rows, rows, [])
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == pngs
    assert not list(out.glob(".*"))  # no temporary file left


def test_run_health_lists_the_stages_in_the_order_they_ran(tmp_path):
    """Sorted by name, ppo came before pretrain."""
    import json

    from scalelab.demo import run_health
    for stage in ("ppo", "pretrain", "reward", "sft"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "summary.json").write_text(json.dumps(
            {"status": "finished", "step": 1, "wall_s": 1.0}))
    rows = [r.split("|")[1].strip() for r in run_health(tmp_path) if r.startswith("| ")]
    assert rows[1:] == ["pretrain", "sft", "reward", "ppo"]  # rows[0]: the header
