"""The run monitor: spikes and NaNs are detected and rewound, stalls end the process with
stacks dumped (and torchrun restarts it), a full disk leaves the previous checkpoint intact."""

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_sets, toy_ppo

from scalelab.config import (
    ModelConfig,
    MonitorConfig,
    PPOConfig,
    RunFailed,
    TrainConfig,
)
from scalelab.model import Transformer
from scalelab.train import checkpoint as ck
from scalelab.train.loop import make_optimizer
from scalelab.train.monitor import Health, Watchdog, read_events


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_val_loss(run_dir):
    return [r["val_loss"] for r in rows(run_dir) if "val_loss" in r][-1]


def pretrain(out, steps, *sets):
    return run_cli("pretrain", "--config", "tiny", "--out", str(out), "--max-steps", str(steps),
                   *tiny_sets(), *[a for s in sets for a in ("--set", s)])


def test_health_flags_spikes_nans_and_explosions_but_not_noise():
    h = Health(MonitorConfig(spike_window=20, min_history=10))
    torch.manual_seed(0)
    # A noisy, falling loss: no verdict on any step.
    for i in range(60):
        assert h.judge(5.0 - 0.02 * i + 0.05 * torch.randn(()).item(), 0.5) is None
    assert h.judge(float("nan"), 0.5)["event"] == "nonfinite"
    assert h.judge(3.9, float("inf"))["event"] == "nonfinite"
    seen = h.judge(6.0, 0.5)  # the median is ~3.9: a jump of 2 nats is a spike
    assert seen["event"] == "spike" and seen["median"] < 4.1 < seen["limit"] < 6.0
    assert h.judge(3.9, 0.5 * 25)["event"] == "grad_explosion"
    assert h.judge(3.9, 0.5 * 5) is None  # 5x is inside the default factor of 20


def test_time_inside_a_clock_is_its_own_even_when_read_inside():
    """A checkpoint's state_dict reads the clock after save_model wrote DIR/model: that
    writing was billed as training (goodput up, tokens/s down), not as checkpointing."""
    from scalelab.train.monitor import Monitor
    mon = Monitor(MonitorConfig(stall_factor=0), Path("unused"))
    mon.start(10)
    t0 = time.monotonic()
    with mon.clock("checkpoint"):
        time.sleep(0.2)  # save_model
        mon.state_dict()
        with mon.clock("data"):  # a clock inside another: each keeps its own
            time.sleep(0.1)
        time.sleep(0.1)  # the checkpoint itself
    took = time.monotonic() - t0
    assert mon.total["data"] == pytest.approx(0.1, abs=0.05)
    assert mon.total["checkpoint"] == pytest.approx(took - mon.total["data"], abs=0.01)
    assert mon.total["train"] < 0.01


def test_watchdog_reports_a_stall_within_3x_the_median_step():
    fired = []
    dog = Watchdog(2.5, 0.0, lambda waited, median: fired.append((waited, median)))
    dog.start()
    for _ in range(8):  # steps of ~40 ms, then nothing
        dog.beat()
        time.sleep(0.04)
    dog.beat()
    stalled_at = time.monotonic()
    dog.join(timeout=5)
    assert fired, "the watchdog did not fire"
    waited, median = fired[0]
    assert 0.03 < median < 0.2
    assert 2.5 * median <= waited <= 3 * median
    assert stalled_at + waited <= time.monotonic()


def test_a_stall_on_a_rank_that_writes_nothing_writes_no_summary(tmp_path, monkeypatch):
    """Every rank's watchdog fires when a mesh stalls: only rank 0 writes summary.json
    (each rank wrote it, through the same temporary name); every rank dumps its stacks."""
    import scalelab.train.monitor as monitor

    def leave(code):
        raise SystemExit(code)
    monkeypatch.setattr(monitor.os, "_exit", leave)
    for main, out in ((False, tmp_path / "rank1"), (True, tmp_path / "rank0")):
        out.mkdir()
        with pytest.raises(SystemExit):
            monitor.Monitor(MonitorConfig(), out, main=main).on_stall(3.0, 1.0)
        assert len(list(out.glob("stacks-step0-pid*.txt"))) == 1
        assert sorted(p.name for p in out.glob("*.json*")) == \
            (["events.jsonl", "summary.json"] if main else [])


def test_nan_and_spike_are_rewound_and_the_run_ends_like_a_clean_one(tmp_path):
    clean, hurt = tmp_path / "clean", tmp_path / "hurt"
    assert pretrain(clean, 60, "train.eval_every=20").returncode == 0
    # max_rewinds=1: the two rewinds have a checkpoint (step 40) between them, so the run
    # is not stuck and goes on (it gave up at the second when the count never reset).
    r = pretrain(hurt, 60, "train.eval_every=20", 'monitor.inject="nan@25,spike@45"',
                 "monitor.rewind_lr_factor=0.5", "monitor.rewind_lr_steps=3",
                 "monitor.max_rewinds=1")
    assert r.returncode == 0, r.stderr
    lr = lambda run, step: next(r["lr"] for r in rows(run) if r["step"] == step and "lr" in r)
    for step in (21, 22, 23, 41, 42, 43):  # lr halved for 3 steps after each rewind
        assert lr(hurt, step) == pytest.approx(0.5 * lr(clean, step))
    assert lr(hurt, 24) == lr(clean, 24) and lr(hurt, 44) == lr(clean, 44)
    events = read_events(hurt)
    assert [(e["event"], e["step"], e["action"], e["to_step"]) for e in events] == \
        [("nonfinite", 25, "rewind", 20), ("spike", 45, "rewind", 40)]
    assert events[1]["loss"] > events[1]["limit"]
    marks = [r for r in rows(hurt) if "event" in r]
    assert [(m["step"], m["seen_step"]) for m in marks] == [(20, 25), (40, 45)]
    train_steps = [r["step"] for r in rows(hurt) if "loss" in r]
    assert train_steps == list(range(1, 61))  # each rewound stretch appears once
    # Final loss within noise of the clean run (the two diverge by skipped data only).
    assert abs(final_val_loss(hurt) - final_val_loss(clean)) < 0.05
    summary = json.loads((hurt / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 60
    assert summary["events"] == {"nonfinite": 1, "spike": 1}
    assert summary["time"]["rewind"] > 0 and 0 < summary["goodput"] < 1
    clean_summary = json.loads((clean / "summary.json").read_text())
    assert clean_summary["time"]["rewind"] == 0 and clean_summary["events"] == {}
    # `runs list|show|watch` read it all back.
    r = run_cli("runs", "list", str(tmp_path))
    assert r.returncode == 0 and str(hurt) in r.stdout and str(clean) in r.stdout
    assert "finished  60/60" in r.stdout
    r = run_cli("runs", "show", str(hurt))
    assert r.returncode == 0, r.stderr
    assert "status      finished" in r.stdout and "goodput" in r.stdout
    assert "step 45: loss spike" in r.stdout and "-> rewind" in r.stdout
    r = run_cli("runs", "watch", "--once", str(hurt))
    assert r.returncode == 0 and "loss spike" in r.stdout
    # Killed mid-run: no summary, and the process of progress.json is gone.
    shutil.copytree(hurt, tmp_path / "killed")
    (tmp_path / "killed/summary.json").unlink()
    shutil.rmtree(tmp_path / "killed/model")
    (tmp_path / "killed/metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in rows(hurt) if r["step"] <= 30))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    prog = json.loads((tmp_path / "killed/progress.json").read_text())
    (tmp_path / "killed/progress.json").write_text(json.dumps({**prog, "pid": int(gone)}))
    r = run_cli("runs", "show", str(tmp_path / "killed"))
    assert "status      dead (killed or crashed" in r.stdout
    # Each logged row splits its interval's wall time into shares.
    last = [r for r in rows(hurt) if "loss" in r][-1]
    shares = {k: v for k, v in last.items() if k.startswith("time/")}
    assert abs(sum(shares.values()) - 1) < 1e-6 and shares["time/train"] > 0


def test_policy_stop_and_too_many_rewinds_exit_1_with_a_clear_message(tmp_path):
    few = "data.n_docs=600"  # a smaller corpus: these runs stop early anyway
    r = pretrain(tmp_path / "stop", 20, few, 'monitor.inject="nan@5"', "monitor.policy=stop")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "run stopped: step 5: loss nan" in r.stderr
    assert json.loads((tmp_path / "stop/summary.json").read_text())["status"] == "stopped"
    # Before any checkpoint, "rewind" drops the update instead.
    # ... and monitor.on_event hears about it, and about the end, as JSON on stdin.
    told = tmp_path / "told.txt"
    r = pretrain(tmp_path / "skip", 8, few, 'monitor.inject="nan@5"',
                 f'monitor.on_event="cat >> {told}; echo >> {told}"')
    assert r.returncode == 0, r.stderr
    assert [(e["step"], e["action"]) for e in read_events(tmp_path / "skip")] == [(5, "skip")]
    # strict JSON (no NaN, which jq and JavaScript refuse): the skipped step's loss is null
    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    logged = [json.loads(line, parse_constant=refuse)
              for line in (tmp_path / "skip/metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if r["step"] == 5 and "lr" in r] == [None]
    heard = [json.loads(line) for line in told.read_text().splitlines() if line]
    assert [(h["event"], h["step"]) for h in heard] == [("nonfinite", 5), ("finished", 8)]
    # No monitor: a NaN loss still ends the run with one line (it was a traceback).
    r = pretrain(tmp_path / "off", 8, few, 'monitor.inject="nan@5"', "monitor.enabled=false")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("scalelab: run stopped: loss is nan "
                                                         "at step 5 (monitor.enabled = false")
    # Every gradient is an "explosion": the run keeps rewinding, then gives up.
    r = pretrain(tmp_path / "jumpy", 40, few, "monitor.grad_factor=1e-9",
                 "monitor.max_rewinds=2", "train.checkpoint_every=5")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "again after 2 rewinds" in r.stderr
    actions = [e["action"] for e in read_events(tmp_path / "jumpy")]
    assert actions == ["rewind", "rewind", "give_up"]


def test_stall_dumps_stacks_exits_and_torchrun_restart_resumes(tmp_path):
    out = tmp_path / "stall"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--nproc-per-node", "1", "--max-restarts", "1", "-m", "scalelab",
           "pretrain", "--config", "tiny", "--out", str(out), "--max-steps", "30",
           *tiny_sets(), "--set", "data.n_docs=600", "--set", 'monitor.inject="stall@25"',
           "--set",
           "monitor.stall_min_s=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "restart 1 by torchrun: resuming" in r.stderr
    events = read_events(out)
    assert [e["event"] for e in events] == ["stall", "resumed"]
    stall = events[0]
    assert stall["step"] == 24 and stall["action"] == "exit"
    assert 1.0 <= stall["waited_s"] < 3.0  # the 1 s floor, checked every limit/50
    stacks = open(stall["stacks"]).read()
    assert "in stall" in stacks and "in fit" in stacks  # the main thread, asleep in the loader
    assert events[1]["step"] == 20 and events[1]["restart"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 30
    assert summary["time"]["restart"] > 1.0  # the lost stretch and the second start
    assert [r["step"] for r in rows(out) if "loss" in r] == list(range(1, 31))


@pytest.mark.parametrize("fused", [False, True])  # True: skipped on the device, as on CUDA
def test_ppo_drops_non_finite_minibatch_updates(tokenizer, fused):
    from scalelab.train.ppo import ppo_step
    policy, ref, value, opt, both = toy_ppo(tokenizer, lr=3e-3)
    if fused:
        opt = torch.optim.AdamW(both.parameters(), lr=3e-3, fused=True)
    pc = PPOConfig(max_new_tokens=6, minibatches=2, ppo_epochs=2)
    prompts = [tokenizer.encode(f"Mia has {i}", bos=True) for i in range(8)]
    before = {k: v.clone() for k, v in both.state_dict().items()}
    row, _ = ppo_step(policy, ref, value, opt, lambda i, r: torch.ones(len(r)),
                      list(range(8)), prompts, tokenizer, pc, 0.05,
                      corrupt=lambda loss: loss * float("nan"))
    assert row["skipped_updates"] == 4
    assert all(torch.equal(before[k], v) for k, v in both.state_dict().items())
    row, _ = ppo_step(policy, ref, value, opt, lambda i, r: torch.ones(len(r)),
                      list(range(8)), prompts, tokenizer, pc, 0.05)  # a sound step is applied
    assert row["skipped_updates"] == 0
    assert not all(torch.equal(before[k], v) for k, v in both.state_dict().items())


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16))
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    ckpts = ck.Checkpointer(tmp_path, keep=2)
    ckpts.save(10, model, opt, {"loader": {"epoch": 0, "index": 3}})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real = ck.save_file

    def full_disk(tensors, path):
        real(tensors, path)  # a file is half there, then the disk is full
        with open(path, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(RunFailed, match="No space left on device.*step_10 is intact"):
        ckpts.save(20, model, opt, {"loader": {}})
    monkeypatch.setattr(ck, "save_file", real)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_10"]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no partial folder left
    meta = ckpts.load(model, opt)
    assert meta["step"] == 10 and meta["loader"] == {"epoch": 0, "index": 3}
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_torchrun_restart_of_its_own_job_may_take_back_a_folder_without_checkpoint(
        tmp_path, monkeypatch):
    from scalelab.config import UserError
    from scalelab.train.rundir import check_out, claim
    out = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    claim(out, "pretrain", False)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # died before a checkpoint
    with pytest.raises(UserError, match="already holds a run"):  # a second start of the job
        check_out(out, "pretrain", False)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    claim(out, "pretrain", False)  # the job's restart: starts over
    assert not (out / "metrics.jsonl").exists()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job2")  # another job, even restarted: refused
    with pytest.raises(UserError, match="already holds a run"):
        check_out(out, "pretrain", False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")  # and so is a plain command
    with pytest.raises(UserError, match="already holds a run"):
        check_out(out, "pretrain", False)


def test_a_run_stopped_before_its_first_checkpoint_has_a_way_out(tmp_path):
    """Ctrl-C before the first checkpoint: without --resume the folder was refused with 'pass
    --resume', and with --resume with 'start again without --resume', a loop."""
    from scalelab.config import UserError
    from scalelab.train.rundir import check_out, claim
    out = tmp_path / "run"
    claim(out, "ppo", False)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    for resume in (False, True):
        with pytest.raises(UserError) as e:
            check_out(out, "ppo", resume)
        assert "--resume" not in str(e.value).split(";")[-1]  # the advice: not a loop
        assert "delete" in str(e.value) and "new --out" in str(e.value)
    # Killed while writing its token files, before any training: nothing to delete, the
    # plain command takes the folder back (the advice was to delete it all the same).
    early = tmp_path / "early"
    claim(early, "pretrain", False)
    with pytest.raises(UserError, match="it stopped before training: run the same command "
                                        "without --resume$"):
        check_out(early, "pretrain", True)
    check_out(early, "pretrain", False)  # no loop


def test_torchrun_restart_before_the_first_checkpoint_starts_over(tmp_path):
    out = tmp_path / "early"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    cmd = [torchrun, "--nproc-per-node", "1", "--max-restarts", "1", "-m", "scalelab",
           "pretrain", "--config", "tiny", "--out", str(out), "--max-steps", "8",
           *tiny_sets(), "--set", "data.n_docs=600", "--set", 'monitor.inject="stall@6"',
           "--set", "monitor.stall_min_s=1", "--set", "train.checkpoint_every=100"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "already holds a run" not in r.stderr
    assert [e["event"] for e in read_events(out)] == ["stall"]  # kept; no resume happened
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 8
    assert [r["step"] for r in rows(out) if "loss" in r] == list(range(1, 9))  # one clean run


def test_kill_stress_script_few_kills(tmp_path):
    """bench/kill_stress.py at a small scale (the 20-kill runs are in bench/results)."""
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "kill_stress.py")
    r = subprocess.run([sys.executable, script, "--kills", "2", "--stages", "pretrain",
                        "--out", str(tmp_path), "--seed", "1"], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    got = json.loads((tmp_path / "results.json").read_text())[0]
    assert got["kills"] == 2 and got["corrupt"] == 0 and got["mismatches"] == 0
    assert not got["problems"]


def test_metrics_mirror_to_wandb_when_asked(tmp_path, monkeypatch):
    """wandb is not installed in CI (a heavy package): a stand-in module records the calls."""
    import importlib.machinery
    import types

    from scalelab.cli import main
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", step, dict(data)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    args = ["pretrain", "--config", "tiny", "--out", str(out), "--max-steps", "6", *tiny_sets(),
            "--set", "data.n_docs=600", "--set", "train.eval_every=3"]
    assert main([*args, "--set", "monitor.wandb=true"]) == 0
    assert calls[0][0] == "init" and calls[0][1]["project"] == "scalelab"
    assert calls[0][1]["id"] == (out / "wandb-id.txt").read_text().strip()
    assert calls[-1] == ("finish",)
    want = [(r["step"], {k: v for k, v in r.items() if k != "step" and not isinstance(v, str)})
            for r in rows(out)]  # the numbers of every row, eval rows too (not the samples)
    assert [c[1:] for c in calls if c[0] == "log"] == want
    assert any("val_loss" in c[2] for c in calls if c[0] == "log")
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: one line, exit 2
    assert main([*args[:4], str(tmp_path / "none"), *args[5:], "--set",
                 "monitor.wandb=true"]) == 2
    assert not (tmp_path / "none").exists()


def test_a_run_stopped_after_a_rewind_resumes_as_if_it_never_stopped(tmp_path, monkeypatch):
    """nan@6 rewinds to the checkpoint at 4, past the batches of steps 5 and 6, at half the
    lr from then on. Stopped at 7 (before the next checkpoint), the resumed run trained on
    those batches again; stopped at 10 (after the checkpoint at 8), at the full lr."""
    from scalelab.cli import main
    from scalelab.train import loop
    args = ["pretrain", "--config", "tiny", "--max-steps", "12", *tiny_sets(), "--set",
            "data.n_docs=600", "--set", "train.eval_every=100", "--set", "monitor.stall_factor=0",
            "--set", "train.checkpoint_every=4", "--set", 'monitor.inject="nan@6"', "--set",
            "monitor.rewind_lr_factor=0.5", "--set", "monitor.rewind_lr_steps=30"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*args, "--out", str(whole)]) == 0
    log = loop.Run.log

    def stop_after(step):  # Ctrl-C once the row of `step` is logged
        def log_then_stop(run, row):
            log(run, row)
            if row.get("step") == step and "loss" in row:
                raise KeyboardInterrupt
        monkeypatch.setattr(loop.Run, "log", log_then_stop)

    stop_after(7)
    assert main([*args, "--out", str(cut)]) == 130
    stop_after(10)
    assert main(["pretrain", "--out", str(cut), "--resume"]) == 130
    monkeypatch.setattr(loop.Run, "log", log)
    assert main(["pretrain", "--out", str(cut), "--resume"]) == 0
    train = lambda run: [(r["step"], r["lr"], r["loss"]) for r in rows(run) if "loss" in r]
    assert [s for s, _, _ in train(cut)] == list(range(1, 13))
    assert train(cut) == train(whole)


def test_a_resumed_monitor_judges_the_next_step_as_one_that_never_stopped(tmp_path):
    """The running median of healthy steps is in the checkpoint: without it a resumed run
    judged no spike for its first monitor.min_history steps."""
    from scalelab.train.monitor import Monitor
    mc = MonitorConfig(spike_window=20, min_history=10, stall_factor=0)
    going, resumed = Monitor(mc, tmp_path), Monitor(mc, tmp_path, resume=True)
    norm = torch.tensor(0.5)
    for i in range(15):
        assert going.check(i + 1, torch.tensor(4.0 + 0.01 * (i % 3)), norm) is None
    resumed.load_state_dict(json.loads(json.dumps(going.state_dict())))  # as state.json has it
    spike = torch.tensor(6.0)
    assert going.check(16, spike, norm)["event"] == "spike"
    assert resumed.check(16, spike, norm) == going.check(16, spike, norm)


def test_a_window_shorter_than_min_history_still_judges(tmp_path):
    """monitor.spike_window = 5 (min_history 10): the window never held 10 steps, so no spike
    or explosion was ever judged. Now: judged from the 11th healthy step on, over the last 5;
    a resumed monitor counts the steps before its checkpoint; a window of 1 is exit 2."""
    from scalelab.config import UserError, load_config
    from scalelab.train.monitor import Monitor
    mc = MonitorConfig(spike_window=5, min_history=10, stall_factor=0)
    going, resumed = Monitor(mc, tmp_path), Monitor(mc, tmp_path, resume=True)
    norm = torch.tensor(0.5)
    for i in range(10):
        if i == 9:  # 9 healthy steps so far: a jump is not judged yet (then joins the window)
            resumed.load_state_dict(json.loads(json.dumps(going.state_dict())))
            assert going.check(i + 1, torch.tensor(9.0), norm) is None
        else:
            assert going.check(i + 1, torch.tensor(4.0 + 0.01 * (i % 3)), norm) is None
    assert resumed.check(10, torch.tensor(9.0), norm) is None
    # the window: 4.02, 4.0, 4.01, 4.02, 9.0: median 4.02, limit 4.02 + max(6 * MAD, 0.402)
    seen = going.check(11, torch.tensor(6.0), norm)
    assert seen["event"] == "spike" and seen["median"] == pytest.approx(4.02)
    assert resumed.check(11, torch.tensor(6.0), norm) == seen
    assert going.check(12, torch.tensor(4.0), torch.tensor(0.5 * 21))["event"] == \
        "grad_explosion"
    with pytest.raises(UserError, match="monitor.spike_window = 1 must be >= 2"):
        load_config(None, ["monitor.spike_window=1"])


@pytest.mark.parametrize("row_at_checkpoint", [True, False])
def test_the_row_after_a_rewind_measures_the_steps_that_stand(tmp_path, row_at_checkpoint):
    """The first row after a rewind divided the tokens since the rewind by a time that still
    held the undone steps (tokens/s 20x too low, their time a "train" share); with no row
    at the checkpoint it dropped the tokens before the checkpoint instead."""
    from scalelab.train.monitor import Monitor
    mon = Monitor(MonitorConfig(stall_factor=0), tmp_path)
    mon.start(100)
    t0 = time.monotonic()
    time.sleep(0.1)  # steps up to the checkpoint: they stand
    mon.count_tokens(200)
    kept = time.monotonic() - t0
    state = json.loads(json.dumps(mon.state_dict()))  # the checkpoint
    if row_at_checkpoint:
        mon.interval_row()
        kept, kept_tokens = 0.0, 0
    else:
        kept_tokens = 200
    time.sleep(0.3)  # steps after it, undone by the rewind
    mon.count_tokens(600)
    with mon.clock("rewind"):
        mon.load_state_dict(state, rewinding=True)
        mon.rewound({"event": "nonfinite", "step": 9, "loss": math.nan, "grad_norm": 1.0}, 4)
    t1 = time.monotonic()
    time.sleep(0.05)  # one step again
    mon.count_tokens(100)
    kept += time.monotonic() - t1
    assert mon.tokens == 300 and mon.interval_tokens == kept_tokens + 100
    assert mon.busy_seconds() == pytest.approx(kept, abs=0.02)
    row = mon.interval_row()
    assert row["time/rewind"] > 0.3 / 0.45 - 0.05  # of the interval's wall time


def test_on_event_hears_strict_json_when_a_run_ends_before_any_row(tmp_path):
    """policy "stop" at a step before the first logged row: the "stopped" notice gave the
    hook `"loss": NaN` (the loss not yet known), which jq and JavaScript refuse."""
    from scalelab.train.monitor import Monitor
    told = tmp_path / "told.json"
    mon = Monitor(MonitorConfig(stall_factor=0, on_event=f"cat > {told}"), tmp_path)
    mon.start(10)
    mon.finish("stopped", "step 3: loss nan")

    def refuse(word):
        raise ValueError(f"{word} is not JSON")
    heard = json.loads(told.read_text(), parse_constant=refuse)
    assert heard["event"] == "stopped" and heard["loss"] is None
    assert json.loads((tmp_path / "summary.json").read_text())["loss"] is None  # the same


def test_an_event_after_a_torn_line_is_kept(tmp_path):
    """A run killed (or out of disk) mid-line in events.jsonl, then resumed: the "resumed"
    event was appended onto the torn line, and both were unreadable."""
    from scalelab.train.monitor import Monitor
    (tmp_path / "events.jsonl").write_text('{"event": "spike", "step": 3}\n{"event": "sta')
    Monitor(MonitorConfig(stall_factor=0), tmp_path).event(
        {"event": "resumed", "step": 2, "restart": 0})
    assert [(e["event"], e["step"]) for e in read_events(tmp_path)] == \
        [("spike", 3), ("resumed", 2)]
