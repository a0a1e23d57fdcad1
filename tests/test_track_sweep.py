"""`scalelab sweep` end to end on a toy ladder (seconds per size), and `pretrain --register`."""

import contextlib
import io
import json
import math
import subprocess
import sys

import pytest
from conftest import run_cli, tiny_sets

from scalelab.cli import main
from scalelab.track.registry import Registry

SWEEP = """
[model]
seq_len = 32
[data]
n_docs = 1500
tokenizer_vocab = 400
[train]
batch_size = 8
lr = 3e-3
warmup_steps = 5
eval_batches = 2
log_every = 5

[sweep]
name = "toy"
tokens_per_param = 0.5
lr_width = 32
min_steps = 10
sizes = [{n_layer = 1, d_model = 16, n_head = 2}, {n_layer = 1, d_model = 24, n_head = 2},
         {n_layer = 1, d_model = 32, n_head = 2}]
experiments = [{name = "add1", task = "builtin:addition?digits=1&n=6", threshold = 0.9},
               {name = "older", task = "builtin:older?n=6", threshold = 0.99}]
[sweep.corpus]
arithmetic = 3.0
qa = 1.0
"""


def test_sweep_trains_registers_fits_and_reports(tmp_path):
    cfg = tmp_path / "toy.toml"
    cfg.write_text(SWEEP)
    reg = tmp_path / "reg.db"
    r = run_cli("sweep", "--config", str(cfg), "--out", str(tmp_path / "sw"),
                "--registry", str(reg))
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    sizes = summary["sizes"]
    assert [s["label"] for s in sizes] == ["L1-d16", "L1-d24", "L1-d32"]
    assert [s["lr"] for s in sizes] == [6e-3, 4e-3, 3e-3]  # lr ~ 1/width
    for s in sizes:  # 0.5 tokens per parameter, at least 10 steps of 8 x 32 tokens
        assert s["steps"] == max(10, math.ceil(0.5 * s["params"] / (8 * 32)))
        assert s["tokens"] == s["steps"] * 8 * 32
    assert sizes[0]["steps"] < sizes[2]["steps"]  # bigger models see more tokens
    fit = summary["scaling_law"]
    assert fit and set(fit) >= {"E", "A", "alpha"}
    db = Registry(reg)
    assert [m["name"] for m in db.models()] == ["toy-L1-d16", "toy-L1-d24", "toy-L1-d32"]
    # one N: the budget's parameter count is the registry's, and FLOPs are 6 N D with it
    assert [m["non_embedding_params"] for m in db.models()] == [s["params"] for s in sizes]
    assert all(m["flops"] == 6 * m["non_embedding_params"] * m["tokens"] for m in db.models())
    assert fit["n"] == [float(s["params"]) for s in sizes]
    assert len(db.results()) == 6  # every experiment on every size
    page = (tmp_path / "sw" / "report" / "report.html").read_text()
    assert "L(N) =" in page and "scaling.png" in page
    assert (tmp_path / "sw" / "report" / "scaling.png").is_file()
    shared = (tmp_path / "sw" / "shared" / "tokenizer.json").read_bytes()
    for s in sizes:  # one tokenizer for every size, so the losses compare
        assert (tmp_path / "sw" / "runs" / s["label"] / "tokenizer.json").read_bytes() == shared
    assert "warning" not in r.stdout
    # the corpus followed the configured mix: only arithmetic and Q/A documents
    docs = [json.loads(x)["text"] for x in
            (tmp_path / "sw" / "shared" / "corpus.jsonl").read_text().splitlines()[:50]]
    assert all(" = " in d or d.startswith("Q:") or " is " in d for d in docs)

    # running it again trains nothing and adds no duplicate models or results
    r = run_cli("sweep", "--config", str(cfg), "--out", str(tmp_path / "sw"),
                "--registry", str(reg))
    assert r.returncode == 0, r.stderr
    assert "--- training" not in r.stdout and len(db.results()) == 6

    # a second seed of every size into the same --out: three new runs (train.seed + 1) and
    # models beside the first ones, which are neither retrained nor re-evaluated
    metrics = {s["label"]: (tmp_path / "sw" / "runs" / s["label"] / "metrics.jsonl").read_bytes()
               for s in sizes}
    r = run_cli("sweep", "--config", str(cfg), "--out", str(tmp_path / "sw"),
                "--registry", str(reg), "--seeds", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("--- training") == 3 and "3 sizes x 2 seeds" in r.stdout
    runs = json.loads((tmp_path / "sw" / "sweep.json").read_text())["sizes"]
    assert [(s["label"], s["seed"]) for s in runs] == [
        ("L1-d16", 1337), ("L1-d16-s2", 1338), ("L1-d24", 1337), ("L1-d24-s2", 1338),
        ("L1-d32", 1337), ("L1-d32-s2", 1338)]
    for s in sizes:
        run = tmp_path / "sw" / "runs" / s["label"]
        assert (run / "metrics.jsonl").read_bytes() == metrics[s["label"]]
        again = tmp_path / "sw" / "runs" / f"{s['label']}-s2"
        assert "seed = 1338" in (again / "config.toml").read_text()
        # another initialisation and data order: another model (the weights differ)
        assert (again / "model" / "model.safetensors").read_bytes() != \
            (run / "model" / "model.safetensors").read_bytes()
    assert len(db.models()) == 6 and len(db.results()) == 12
    assert [m["name"] for m in db.models()][3:] == ["toy-L1-d16-s2", "toy-L1-d24-s2",
                                                    "toy-L1-d32-s2"]

    # another budget, or another shape under a size's name, into the same --out: refused
    # before anything is touched (the runs were trained further in place while the
    # registry kept their old tokens, losses and results, and the L(N) fit the old losses)
    metrics = (tmp_path / "sw" / "runs" / "L1-d16" / "metrics.jsonl").read_bytes()
    args = ["sweep", "--config", str(cfg), "--out", str(tmp_path / "sw"), "--registry", str(reg)]
    for old, new, said in (("tokens_per_param = 0.5", "tokens_per_param = 2.0",
                            "sweep.tokens_per_param 0.5 -> 2.0"),
                           ("lr = 3e-3", "lr = 1e-3", "train.lr 0.003 -> 0.001"),
                           ("d_model = 24, n_head = 2", "d_model = 24, n_head = 4",
                            "size L1-d24")):
        cfg.write_text(SWEEP.replace(old, new))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(args) == 2
        assert "holds a sweep made with another config (changed: " in err.getvalue()
        assert said in err.getvalue(), err.getvalue()
    assert (tmp_path / "sw" / "runs" / "L1-d16" / "metrics.jsonl").read_bytes() == metrics
    assert [m["tokens"] for m in db.models()] == [s["tokens"] for s in sizes] * 2
    # how often it logs is not what it trains: the same sweep, nothing to do
    cfg.write_text(SWEEP.replace("log_every = 5", "log_every = 2"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(args) == 0
    assert "--- training" not in out.getvalue() and len(db.models()) == 6
    # a plan written before a config key existed: the key had its default then
    plan_file = tmp_path / "sw" / "sweep-plan.json"
    plan = json.loads(plan_file.read_text())
    del plan["settings"]["train.activation_checkpointing"]
    plan_file.write_text(json.dumps(plan))
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(args) == 0


def test_bad_sweep_config_exits_2(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    args = ["sweep", "--config", str(cfg), "--out", str(tmp_path / "o"),
            "--registry", str(tmp_path / "r.db")]
    cfg.write_text(SWEEP.replace("min_steps = 10", "min_stepz = 10"))
    assert main(args) == 2 and "unknown key 'sweep.min_stepz'" in capsys.readouterr().err
    cfg.write_text(SWEEP.replace("n_head = 2}]", "n_head = 5}]"))
    err = capsys.readouterr().err if main(args) == 2 else "exit 0"
    assert "sweep.sizes[2]" in err and "n_head = 5" in err, err
    # refused before any work: no shared corpus or tokenizer, no registry, nothing in --out
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.db").exists()
    # two sizes named alike (L1-d32): the second silently reused the first's run and
    # model (n_head only differs), or failed to resume it after the first had trained
    for other in ("n_head = 4", "n_head = 2, d_mlp = 256"):
        cfg.write_text(SWEEP.replace("n_head = 2}]", f"n_head = 2}},\n {{n_layer = 1, "
                                     f"d_model = 32, {other}}}]"))
        err = capsys.readouterr().err if main(args) == 2 else "exit 0"
        assert f"{cfg}: sweep.sizes[3]: gives the same run and model name as " \
            "sweep.sizes[2] (L1-d32" in err, err
        assert not (tmp_path / "o").exists() and not (tmp_path / "r.db").exists()
    # budget keys out of range: a negative lr_width trained with a negative learning rate
    # (a traceback once the corpus was built), nan or inf a traceback, tokens_per_param <= 0
    # or a negative flops silently trained every size for min_steps
    for old, new in (("tokens_per_param = 0.5", "tokens_per_param = -1.0"),
                     ("tokens_per_param = 0.5", "tokens_per_param = 0"),
                     ("tokens_per_param = 0.5", "tokens_per_param = nan"),
                     ("tokens_per_param = 0.5", "flops = -1e9"),
                     ("tokens_per_param = 0.5", "flops = inf"),
                     ("lr_width = 32", "lr_width = -32"),
                     ("min_steps = 10", "min_steps = -1")):
        cfg.write_text(SWEEP.replace(old, new))
        err = capsys.readouterr().err if main(args) == 2 else "exit 0"
        assert f"{cfg}: 'sweep.{new.split()[0]}' = " in err and "must be a finite" in err, err
        assert not (tmp_path / "o").exists() and not (tmp_path / "r.db").exists()
    # no run per size, in the config or on the command line
    cfg.write_text(SWEEP.replace("min_steps = 10", "min_steps = 10\nseeds = 0"))
    err = capsys.readouterr().err if main(args) == 2 else "exit 0"
    assert f"{cfg}: 'sweep.seeds' = 0 must be >= 1" in err, err
    cfg.write_text(SWEEP)
    err = capsys.readouterr().err if main(args + ["--seeds", "-1"]) == 2 else "exit 0"
    assert "--seeds -1: must be >= 1" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "r.db").exists()
    # an experiment name the registry holds with another task: the sweep evaluated every
    # size on the registry's task, not the config's, and said nothing
    other = tmp_path / "other.db"
    assert main(["track", "experiment", "add", "--name", "older", "--task",
                 "builtin:subtraction?n=3", "--threshold", "0.5", "--registry",
                 str(other)]) == 0
    cfg.write_text(SWEEP)
    err = capsys.readouterr().err if main(args[:-1] + [str(other)]) == 2 else "exit 0"
    assert f"{cfg}: sweep.experiments[1] (older): {other} holds an experiment of that name " \
        "with task builtin:subtraction?n=3, pass if exact_match >= 0.5" in err, err
    assert not (tmp_path / "o").exists()
    # corpus weights with a corpus of one's own: the weights were silently ignored
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"text": "Mia has 3 apples."}\n')
    cfg.write_text(SWEEP.replace("n_docs = 1500", f'n_docs = 1500\nsource = "{mine}"'))
    err = capsys.readouterr().err if main(args) == 2 else "exit 0"
    assert f"{cfg}: [sweep.corpus] weighs the built-in world corpus" in err, err
    assert not (tmp_path / "o").exists()
    cfg.write_text(SWEEP.replace("arithmetic = 3.0", "algebra = 3.0"))
    assert main(args) == 2 and "sweep.corpus.algebra" in capsys.readouterr().err
    # a bad experiment entry: named by file and key, refused before any work (they used to
    # be checked one by one while being added: a traceback for a threshold "high" or a
    # name 3, a typo'd key ignored, the entries before the bad one already registered)
    for old, new, said in (
            ("0.99}", '"high"}', "sweep.experiments[1].threshold"),
            ("0.99}", '0.99, metrc = "brier"}', "sweep.experiments[1]: unknown key 'metrc'"),
            ('name = "older"', "name = 3", "sweep.experiments[1].name"),
            ("0.99}", "true}", "sweep.experiments[1].threshold"),
            ("0.99}", "7}", "sweep.experiments[1] (older): threshold 7"),
            ("0.99}", '0.5, metric = "exact_match"}',
             "sweep.experiments[1] (older): metric 'exact_match' does not apply")):
        cfg.write_text(SWEEP.replace(old, new))
        err = capsys.readouterr().err if main(args) == 2 else "exit 0"
        assert f"{cfg}: {said}" in err, (new, err)
        assert not (tmp_path / "o").exists() and not (tmp_path / "r.db").exists()


def test_pretrain_register(tmp_path):
    reg = tmp_path / "reg.db"
    r = run_cli("track", "experiment", "add", "--name", "add1", "--task",
                "builtin:addition?digits=1&n=5", "--threshold", "0.9", "--registry", str(reg))
    assert r.returncode == 0, r.stderr
    r = run_cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "run"), "--max-steps",
                "10", *tiny_sets(), "--register", "--registry", str(reg))
    assert r.returncode == 0, r.stderr
    m = Registry(reg).models()[0]
    vals = [json.loads(x)["val_loss"] for x in (tmp_path / "run" / "metrics.jsonl")
            .read_text().splitlines() if "val_loss" in x]
    assert m["name"] == "run" and m["tokens"] == 10 * 8 * 32 and m["val_loss"] == vals[-1]
    assert "add1" in r.stdout  # the new model was evaluated on the waiting experiment


def test_register_to_a_registry_that_cannot_be_made_is_refused_before_training(tmp_path,
                                                                               capsys):
    bad = tmp_path / "missing" / "reg.db"
    assert main(["pretrain", "--config", "tiny", "--out", str(tmp_path / "run"),
                 "--max-steps", "2", *tiny_sets(), "--register", "--registry", str(bad)]) == 2
    assert f"folder {bad.parent} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no training first


def test_register_under_a_name_another_folder_holds_is_refused_before_training(tmp_path,
                                                                                capsys):
    """Two projects' runs/tiny into one registry: the second trained, then failed with
    "pass --name", which pretrain does not take."""
    reg = tmp_path / "reg.db"
    db = Registry(reg)
    db.add_model({"name": "run", "path": str(tmp_path / "elsewhere" / "run" / "model"),
                  "kind": "scalelab", "params": 10, "non_embedding_params": 10})
    db.close()
    assert main(["pretrain", "--config", "tiny", "--out", str(tmp_path / "run"),
                 "--max-steps", "2", *tiny_sets(), "--register", "--registry", str(reg)]) == 2
    err = capsys.readouterr().err
    assert f"--register: {reg} already holds a model named 'run'" in err, err
    assert "scalelab track model add OUT/model --name NEW" in err
    assert not (tmp_path / "run").exists()  # no training first


def test_sweep_stopped_while_adding_its_experiments_runs_again(tmp_path, monkeypatch):
    """Ctrl-C while the experiments were being added left --out holding sweep-plan.json
    only, which the rerun refused as a folder the sweep had not written."""
    import scalelab.track.sweep as sweep
    cfg = tmp_path / "toy.toml"
    cfg.write_text(SWEEP)
    args = ["sweep", "--config", str(cfg), "--out", str(tmp_path / "sw"), "--registry",
            str(tmp_path / "reg.db")]

    def stop(*_):
        raise KeyboardInterrupt
    monkeypatch.setattr(sweep, "ensure_experiments", stop)
    assert main(args) == 130
    monkeypatch.undo()
    monkeypatch.setattr(sweep, "shared_vocab", stop)  # got past the folder check: enough
    assert main(args) == 130


def test_a_run_another_process_is_training_is_not_removed(tmp_path):
    """Two sweeps on one --out: the second removed the run the first was training (no
    checkpoint yet: "killed before its first one, start over"), under the first's feet."""
    from scalelab.train.rundir import RunBusy, resume_or_restart
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"stage": "pretrain"}')  # a stage claims its folder first
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    holder = subprocess.Popen(  # what a training stage holds while it writes the run
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
         "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
         "time.sleep(60)", str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunBusy, match="another scalelab command is writing this run"):
            resume_or_restart(run, 10)
        assert (run / "metrics.jsonl").is_file()
    finally:
        holder.kill()
        holder.wait()
    assert resume_or_restart(run, 10) is False and not run.exists()  # stopped: start over


def test_fixed_flop_budget_gives_fewer_tokens_to_bigger_models(tmp_path):
    from scalelab.track.sweep import load_sweep, size_config
    cfg = tmp_path / "iso.toml"
    cfg.write_text(SWEEP.replace("tokens_per_param = 0.5", "flops = 1e10"))
    base, opts = load_sweep(cfg)
    plans = [size_config(base, s, opts, vocab=448) for s in opts["sizes"]]
    per_step = 8 * 32
    for c, info in plans:
        assert info["steps"] == max(10, -(-1e10 // (6 * info["params"] * per_step)))
        assert c.train.eval_every == c.train.max_steps == info["steps"]
    assert plans[0][1]["tokens"] > plans[2][1]["tokens"]  # iso-FLOP: small models read more


def test_sweep_and_study_take_a_preset_name(tmp_path, monkeypatch):
    """`--config sweep-cpu` / `study-cpu` (the presets `--config tny` lists) work from any
    folder, not only from a checkout's root where configs/ is."""
    from scalelab import study
    from scalelab.config import PRESETS
    from scalelab.track import sweep
    got = []
    monkeypatch.setattr(sweep, "run_sweep", lambda config, base, opts, out, reg:
                        got.append(config))
    monkeypatch.setattr(study, "run_study", lambda config, out, reg: got.append(config))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--config", "sweep-cpu", "--out", "s", "--registry", "r.db"]) == 0
    assert main(["study", "instruct", "--config", "study-cpu", "--out", "t",
                 "--registry", "r.db"]) == 0
    assert got == [PRESETS / "sweep-cpu.toml", PRESETS / "study-cpu.toml"]
