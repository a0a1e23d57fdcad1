"""End to end through the real command line: exit codes, stderr, files on disk."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli, tiny_sets

from scalelab.config import load_config


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, \
        {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    r = run_cli("pretrain", "--config", "tiny", "--out", str(out), "--max-steps", "40",
                *tiny_sets())
    assert r.returncode == 0, r.stderr
    return out


def test_pretrain_writes_the_run_directory_contract(trained):
    assert (trained / "config.toml").is_file()
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (trained / "model" / f).is_file()
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step_30", "step_40"]
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r for r in rows)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 41))
    assert all("lr" in r for r in train_rows)
    train, val = losses(trained)
    assert val[40] < val[0] - 1.0  # it learns (nats), even in 40 steps of a 2 x 32 model
    assert not list(trained.rglob(".*tmp"))  # no temporary leftovers


def test_generate_prints_world_text(trained):
    r = run_cli("generate", "--model", str(trained / "model"), "--prompt", "Mia has",
                "--max-new-tokens", "20", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Mia has") and len(r.stdout) > len("Mia has") + 5


def test_killed_run_resumes_with_identical_losses(tmp_path):
    common = ["pretrain", "--config", "tiny", *tiny_sets(), "--max-steps", "150",
              "--set", "train.checkpoint_every=25", "--set", "train.eval_every=50"]
    full = tmp_path / "full"
    assert run_cli(*common, "--out", str(full)).returncode == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "scalelab", *common, "--out", str(cut)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (cut / "checkpoints" / "step_75").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "checkpoints" / "step_150").exists()  # really killed mid-way

    r = run_cli("pretrain", "--out", str(cut), "--resume")  # config comes from the run dir
    assert r.returncode == 0, r.stderr
    (a, va), (b, vb) = losses(full), losses(cut)
    assert a == b and va == vb  # bit-for-bit on CPU, every step


def test_refuses_to_overwrite_a_run(trained):
    before = (trained / "metrics.jsonl").read_text()
    r = run_cli("pretrain", "--config", "tiny", "--out", str(trained), *tiny_sets())
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (trained / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("args, message", [
    (["--config", "nope.toml"], "nope.toml: config file not found"),
    (["--config", "tiny", "--set", "train.learning_rate=1"], "unknown config key"),
    (["--config", "tiny", "--set", "data.source=missing.txt"], "missing.txt: corpus"),
    (["--config", "tiny", "--set", "model.n_head=3"], "[model] config"),
])
def test_bad_input_exits_2_with_one_clear_line(tmp_path, args, message):
    r = run_cli("pretrain", "--out", str(tmp_path / "r"), *args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_malformed_toml_and_empty_corpus(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nlr = = 3\n")
    r = run_cli("pretrain", "--config", str(bad), "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and "bad.toml: malformed TOML" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    r = run_cli("pretrain", "--out", str(tmp_path / "r2"), "--set", f"data.source={empty}")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_checkpoint_and_model_are_reported_and_kept(trained, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    weights = run / "checkpoints" / "step_40" / "model.safetensors"
    weights.write_bytes(b"garbage" * 10)
    r = run_cli("pretrain", "--out", str(run), "--resume", "--max-steps", "50")
    assert r.returncode == 2 and "step_40/model.safetensors" in r.stderr
    assert "Traceback" not in r.stderr
    assert weights.read_bytes() == b"garbage" * 10  # nothing was deleted or rewritten
    (run / "model" / "config.json").write_text("{not json")
    r = run_cli("generate", "--model", str(run / "model"), "--prompt", "x")
    assert r.returncode == 2 and "config.json: corrupt JSON" in r.stderr
    r = run_cli("generate", "--model", str(tmp_path / "none"), "--prompt", "x")
    assert r.returncode == 2 and "model folder not found" in r.stderr


def test_resume_without_checkpoint(tmp_path):
    r = run_cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "r"), "--resume")
    assert r.returncode == 2 and "no checkpoint" in r.stderr


@pytest.mark.parametrize("stage, inputs", [
    ("pretrain", ["--set", "model.n_head=3"]), ("sft", ["--base", "m", "--data", "d.jsonl"]),
    ("ppo", ["--policy", "m", "--reward", "r", "--prompts", "p.jsonl"]),
    ("dpo", ["--policy", "m", "--data", "d.jsonl"])])
def test_registry_without_register_is_refused(tmp_path, capsys, stage, inputs):
    """`--registry PATH` without --register was silently ignored: nothing was registered.
    It is an option of --register (README: `--register [--registry PATH]`), so it is refused
    before any work rather than taken to mean a registration the user did not ask for."""
    from scalelab.cli import main
    reg = tmp_path / "reg.db"
    assert main([stage, "--out", str(tmp_path / "run"), "--registry", str(reg), *inputs]) == 2
    err = capsys.readouterr().err
    assert "--registry needs --register" in err and len(err.splitlines()) == 1, err
    assert sorted(tmp_path.iterdir()) == []


def test_reward_register_is_refused_with_its_reason(tmp_path, capsys):
    """DESIGN.md: every stage takes --register. A reward model is no language model to run
    experiments on, so reward takes the flag only to refuse it, and its help says so."""
    from scalelab.cli import main
    with pytest.raises(SystemExit):
        main(["reward", "--help"])
    assert "register the policy" in " ".join(capsys.readouterr().out.split())
    assert main(["reward", "--base", "m", "--data", "d.jsonl", "--out", str(tmp_path / "r"),
                 "--register"]) == 2
    err = capsys.readouterr().err
    assert "register the policy" in err and len(err.splitlines()) == 1, err
    assert sorted(tmp_path.iterdir()) == []


def test_one_seed_rule_for_the_cli_and_the_config():
    """`generate --seed` took 64 bits while config seeds had to be below 2^32 in size: one
    bound now (the samplers multiply config seeds, so theirs is the one kept)."""
    from argparse import Namespace

    from scalelab.cli import check_sampling
    from scalelab.config import UserError, load_config
    sampling = dict(max_new_tokens=1, temperature=1.0, top_k=0, top_p=1.0)
    for v in (2**32, -2**32, 2**63):
        with pytest.raises(UserError, match=rf"--seed {v} must be between -2\^32 and 2\^32"):
            check_sampling(Namespace(**sampling, seed=v))
        with pytest.raises(UserError, match=rf"sft.seed = {v} must be between -2\^32 and 2\^32"):
            load_config(overrides=[f"sft.seed={v}"])
    for v in (2**32 - 1, -2**32 + 1, 0):
        check_sampling(Namespace(**sampling, seed=v))
        assert load_config(overrides=[f"sft.seed={v}"]).sft.seed == v


def test_a_full_disk_while_logging_is_one_line_and_the_run_resumes(tmp_path, capsys,
                                                                    monkeypatch):
    """A full disk during a metrics append (not a checkpoint) ended in a traceback."""
    import errno
    import io
    import pathlib

    from scalelab.cli import main
    out = tmp_path / "run"
    args = ["pretrain", "--config", "tiny", "--out", str(out), "--max-steps", "8", *tiny_sets(),
            "--set", "data.n_docs=600", "--set", "train.eval_every=100", "--set",
            "train.checkpoint_every=4", "--set", "monitor.stall_factor=0"]
    real_open = pathlib.Path.open

    class FullDisk(io.BytesIO):
        def write(self, text):  # as write() fails: an OSError without a file name
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_(path, mode="r", *a, **kw):
        if path.name == "metrics.jsonl" and mode.startswith("a") and path.exists() and \
                '"step": 5,' in path.read_text():  # step 6's row finds the disk full
            return FullDisk()
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "open", open_)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"scalelab: run stopped: could not write {out / 'metrics.jsonl'} (No space "
                   f"left on device); its checkpoint {out / 'checkpoints' / 'step_4'} is "
                   "intact: free some space, then continue with --resume")
    monkeypatch.setattr(pathlib.Path, "open", real_open)
    assert main(["pretrain", "--out", str(out), "--resume"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))


def resumed(trained, tmp_path, capsys, *args: str) -> tuple[int, str, str]:
    """`pretrain --resume ARGS` in this process, on a copy of the 40-step run."""
    import shutil

    from scalelab.cli import main
    run = tmp_path / "copy"
    if not run.exists():
        shutil.copytree(trained, run)
    rc = main(["pretrain", "--out", str(run), "--resume", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_resume_with_another_seed_is_refused(trained, tmp_path, capsys):
    """train.seed orders the data: another one on --resume would not repeat the run it
    continues (it passed silently)."""
    rc, _, err = resumed(trained, tmp_path, capsys, "--max-steps", "50", "--set",
                         "train.seed=7")
    assert rc == 2 and "train.seed = 7" in err and "train.seed = 1337" in err, err
    assert losses(tmp_path / "copy") == losses(trained)  # nothing trained or rewritten


def test_a_longer_schedule_on_resume_is_said(trained, tmp_path, capsys):
    """--max-steps 50 on a 40-step run stretches the cosine schedule: the lr jumps back up.
    One line says so, with the lr before and after (computed here from the formula)."""
    import math
    tc = load_config(trained / "config.toml").train

    def cosine(step: int, total: int) -> float:
        floor = tc.lr * tc.min_lr_ratio
        t = (step - tc.warmup_steps) / (total - tc.warmup_steps)
        return floor + (tc.lr - floor) * 0.5 * (1 + math.cos(math.pi * t))
    rc, out, err = resumed(trained, tmp_path, capsys, "--max-steps", "50")
    assert rc == 0, err
    was, now = cosine(39, 40), cosine(40, 50)
    assert now > 1.5 * was
    assert (f"train.max_steps is 50, was 40: the learning-rate schedule now ends at step 50, "
            f"so at step 40 the lr goes from {was:.4g} to {now:.4g}") in out, out
    rows = [json.loads(line) for line in (tmp_path / "copy" / "metrics.jsonl").open()]
    assert next(r["lr"] for r in rows if r["step"] == 41 and "lr" in r) == \
        pytest.approx(now, rel=1e-9)
    rc, out, _ = resumed(trained, tmp_path, capsys, "--max-steps", "52")  # said each time
    assert rc == 0 and "train.max_steps is 52, was 50" in out


def test_unfinished_checkpoint_folders_are_removed_on_resume(trained, tmp_path, capsys):
    """A run killed while writing step 35's checkpoint, resumed with checkpoint_every 10:
    its .step_35.tmp was never reused, so it stayed for good. Only that name goes."""
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    ckpts = run / "checkpoints"
    (ckpts / ".step_35.tmp" / "rng").mkdir(parents=True)
    (ckpts / ".step_35.tmp" / "model.safetensors").write_bytes(b"half")
    mine = [ckpts / "notes.txt", ckpts / ".step_35.tmp.bak", ckpts / "step_35.tmp"]
    for p in mine:
        p.write_text("the user's\n")
    rc, _, err = resumed(trained, tmp_path, capsys, "--max-steps", "41")
    assert rc == 0, err
    assert not (ckpts / ".step_35.tmp").exists()
    assert all(p.read_text() == "the user's\n" for p in mine)


def test_a_damaged_last_checkpoint_names_the_one_before(trained, tmp_path, capsys):
    """The newest checkpoint is damaged: the error names the older one and how to resume
    from it; doing what it says repeats the run from step 30 exactly."""
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    (run / "checkpoints" / "step_40" / "model.safetensors").write_bytes(b"garbage")
    rc, _, err = resumed(trained, tmp_path, capsys, "--max-steps", "50")
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    aside = run / "damaged_step_40"
    assert "step_40/model.safetensors: corrupt" in err
    assert (f"the run can go on from the checkpoint before it, {run / 'checkpoints' / 'step_30'}"
            f": move this one out of the way (mv {run / 'checkpoints' / 'step_40'} {aside}) "
            "and --resume again") in err, err
    shutil.move(run / "checkpoints" / "step_40", aside)
    rc, _, err = resumed(trained, tmp_path, capsys, "--max-steps", "40")
    assert rc == 0, err
    assert losses(run) == losses(trained)  # steps 31-40 again, bit for bit
    shutil.rmtree(run / "checkpoints" / "step_30")  # the older one damaged, none before it
    (run / "checkpoints" / "step_40" / "state.json").write_text("{")
    rc, _, err = resumed(trained, tmp_path, capsys, "--max-steps", "50")
    assert rc == 2 and "keeps no older checkpoint to go back to: start it again in a new " \
        "--out" in err, err
