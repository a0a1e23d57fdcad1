"""The registry and the track commands, end to end on randomly initialised tiny models."""

import contextlib
import io
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from scalelab.cli import main
from scalelab.config import ModelConfig, UserError
from scalelab.model import Transformer
from scalelab.track.registry import Registry
from scalelab.train.checkpoint import save_model


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    """Three random tiny models of growing width (no training: the rules are what's tested)."""
    root = tmp_path_factory.mktemp("models")
    out = []
    for i, d in enumerate((16, 24, 32)):
        torch.manual_seed(i)
        # untied: a random tied model just repeats its last input token, whatever its seed
        m = Transformer(ModelConfig(vocab_size=512, seq_len=64, n_layer=1, n_head=2, d_model=d,
                                    tie_embeddings=False))
        save_model(m, tokenizer, root / f"m{d}" / "model")
        out.append(root / f"m{d}" / "model")
    return out


def track(reg: Path, *args: str) -> subprocess.CompletedProcess:
    """In process (importing torch per call would dominate the test time)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["track", *args, "--registry", str(reg)])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def greedy_text(model_dir: Path, prompt: str, n: int = 3) -> str:
    from scalelab.track.evaluate import greedy_answers, load_lm
    lm = load_lm(model_dir, torch.device("cpu"))
    out = greedy_answers(lm, [lm.prefix + lm.encode(prompt)], [n])[0]
    return lm.decode(out[:n])


def test_rerun_on_new_model_runs_exactly_the_unpassed_experiments(tmp_path, models):
    reg = tmp_path / "reg.db"
    # "mine" passes only for the m24 model: its target is m24's own greedy answer, on a
    # prompt where that answer is not the start of a longer word (exact match needs that)
    task = tmp_path / "mine.jsonl"
    for prompt in ("12 + 7 =", "Q: Where does Mia live? A:", "Tom has", "5 - 3 =", "Count"):
        want, longer = greedy_text(models[1], prompt), greedy_text(models[1], prompt, 4)
        if want != greedy_text(models[0], prompt) and not longer[len(want):][:1].isalnum():
            break
    task.write_text(json.dumps({"prompt": prompt, "target": want}) + "\n")
    assert track(reg, "experiment", "add", "--name", "mine", "--task", str(task),
                 "--threshold", "1").returncode == 0
    assert track(reg, "experiment", "add", "--name", "easy", "--task",
                 "builtin:addition?digits=1&n=8", "--metric", "edit_distance",
                 "--threshold", "1").returncode == 0  # edit distance <= 1 always passes
    r = track(reg, "experiment", "add", "--name", "hard", "--task", "builtin:older?n=8",
              "--threshold", "1.0", "--note", "needs a real model")
    assert r.returncode == 0, r.stderr

    r = track(reg, "model", "add", str(models[0]))
    assert r.returncode == 0, r.stderr
    assert "running the 3 experiments" in r.stdout
    r = track(reg, "model", "add", str(models[1]))  # "easy" passed already: 2 run
    assert "running the 2 experiments" in r.stdout, r.stdout
    r = track(reg, "model", "add", str(models[2]), "--name", "big")  # only "hard" is left
    assert "running the 1 experiments" in r.stdout, r.stdout

    db = Registry(reg)
    ran = {(x["model"], x["experiment"]) for x in db.results()}
    assert ran == {("m16", "mine"), ("m16", "easy"), ("m16", "hard"),
                   ("m24", "mine"), ("m24", "hard"), ("big", "hard")}
    r = track(reg, "status", "--json")
    s = json.loads(r.stdout)
    first = {e["name"]: e["first_passing_model"] for e in s["experiments"]}
    assert first == {"mine": "m24", "easy": "m16", "hard": None}
    assert s["not_yet"] == ["hard"]
    rules = {e["name"]: e["pass_rule"] for e in s["experiments"]}  # the serve page shows it
    assert rules == {"mine": ">=1", "easy": "<=1", "hard": ">=1"}
    text = track(reg, "status").stdout
    assert "not yet passed: hard" in text
    rules = {line.split()[0]: line.split()[2] for line in text.splitlines()
             if line.split()[:1] in (["mine"], ["easy"], ["hard"])}
    assert rules == {"mine": ">=1", "easy": "<=1", "hard": ">=1"}  # each pass rule's direction

    # reruns add rows, never replace them
    n = len(db.results())
    r = track(reg, "run", "--failed-only")
    assert r.returncode == 0 and "running 1 experiments on 3 models" in r.stdout
    assert len(db.results()) == n + 3
    r = track(reg, "run", "--model", "m16", "--experiment", "easy")
    rows = [x for x in db.results() if (x["model"], x["experiment"]) == ("m16", "easy")]
    assert len(rows) == 2 and rows[0]["metrics"] == rows[1]["metrics"]  # deterministic
    assert rows[0]["code_version"] and rows[0]["samples"]
    show = track(reg, "experiment", "show", "mine").stdout
    assert "first passed by m24" in show


def test_report_and_predictions(tmp_path, models):
    reg = tmp_path / "reg.db"
    assert track(reg, "experiment", "add", "--name", "add1", "--task",
                 "builtin:addition?digits=1&n=8", "--threshold", "0.9").returncode == 0
    assert track(reg, "experiment", "add", "--name", "add1-ed", "--task",
                 "builtin:addition?digits=1&n=8", "--metric", "edit_distance",
                 "--threshold", "0").returncode == 0
    for m in models:
        r = track(reg, "model", "add", str(m))
        assert r.returncode == 0, r.stderr
    r = track(reg, "report", "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "rep" / "report.html").read_text()
    for src in [s.split("'")[0] for s in page.split("<img src='")[1:]]:
        assert (tmp_path / "rep" / src).is_file() and "/" not in src  # relative, present
    assert "add1" in page and "Prediction" in page
    # random models never answer right: nothing calibrates exact match, so add1 has no
    # prediction (and the page says why); the continuous add1-ed is extrapolated directly
    assert "no model of its group has answered an item right" in page
    preds = Registry(reg).predictions()
    assert {p["experiment_id"] for p in preds} == {Registry(reg).experiment("add1-ed")["id"]}
    assert {p["n_models"] for p in preds} == {3}  # made once 3 models had results
    assert {p["axis"] for p in preds} == {"params"}  # random models: no training FLOPs


def test_concurrent_writers_lose_nothing(tmp_path):
    reg = tmp_path / "reg.db"
    db = Registry(reg)
    eid = db.add_experiment("e", "builtin:qa", "exact_match", 0.5)
    mid = db.add_model({"name": "m", "path": "/x", "kind": "scalelab", "params": 1,
                        "non_embedding_params": 1})
    code = (f"from scalelab.track.registry import Registry\nr = Registry({str(reg)!r})\n"
            f"for i in range(150): r.add_result({eid}, {mid}, {{'exact_match': 0.0, 'i': i}}, "
            "False, [], 1, 0.0, 'test')\n")
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    assert len(db.results()) == 300


def test_adding_one_folder_twice_at_once_gives_one_model(tmp_path):
    """Two `model add` of one folder at once both find the name free before either writes;
    the later insert then finds the earlier's row and uses it instead of refusing its own
    folder. Another folder under that name is still refused."""
    db = Registry(tmp_path / "reg.db")
    info = {"name": "m", "path": "/runs/a/model", "kind": "scalelab", "params": 1,
            "non_embedding_params": 1}
    first = db.add_model(info)
    assert Registry(tmp_path / "reg.db").add_model(dict(info)) == first
    assert [m["name"] for m in db.models()] == ["m"]
    with pytest.raises(UserError, match="already registered"):
        db.add_model({**info, "path": "/runs/b/model"})


def test_corrupt_or_foreign_registry_exits_2(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    r = run_cli("track", "status", "--registry", str(junk))  # the real command line, once
    assert r.returncode == 2 and "junk.db: not a scalelab registry" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.commit()
    con.close()
    r = track(other, "experiment", "list")
    assert r.returncode == 2 and "other.db: an SQLite database but not a scalelab" in r.stderr
    new = tmp_path / "new.db"
    r = track(new, "experiment", "show", "nope")
    assert r.returncode == 2 and "no experiment named 'nope'" in r.stderr
    r = track(new, "experiment", "add", "--name", "x", "--task", "builtin:addition?dig=2",
              "--threshold", "0.5")
    assert r.returncode == 2 and "unknown parameter 'dig'" in r.stderr
    r = track(new, "model", "add", str(tmp_path))
    assert r.returncode == 2 and "config.json" in r.stderr
    assert track(new, "experiment", "add", "--name", "x", "--task", "builtin:qa",
                 "--threshold", "0.5").returncode == 0
    r = track(new, "experiment", "add", "--name", "x", "--task", "builtin:qa", "--threshold", "1")
    assert r.returncode == 2 and "already exists" in r.stderr  # names are never overwritten


def test_a_nan_metric_keeps_the_registry_usable(tmp_path, models):
    """An lm-eval multiple-choice task none of whose documents can be judged scores
    mc_accuracy nan. Python writes that as NaN, which SQLite's json_valid rejects: every
    later command refused the whole registry as damaged."""
    reg = tmp_path / "reg.db"
    assert track(reg, "experiment", "add", "--name", "a", "--task", "builtin:qa?n=2",
                 "--threshold", "0.5").returncode == 0
    assert track(reg, "model", "add", str(models[0]), "--no-run").returncode == 0
    r = Registry(reg)
    r.add_result(1, 1, {"exact_match": math.nan, "token_logprob": -math.inf}, False, [], 0,
                 0.1, "test")
    r.close()
    r = track(reg, "status")
    assert r.returncode == 0 and "nan" in r.stdout, r
    r = track(reg, "status", "--json")  # strict JSON (jq refuses NaN): the value is null
    cell = json.loads(r.stdout, parse_constant=pytest.fail)["experiments"][0]["results"]
    assert cell == {"m16": {"value": None, "passed": False}}
    assert math.isnan(Registry(reg).results()[0]["metrics"]["exact_match"])
    assert track(reg, "experiment", "show", "a").returncode == 0
    # the report's plot of it: no finite point to place on a log axis (it used to crash)
    r = track(reg, "report", "--out", str(tmp_path / "rep"))
    assert r.returncode == 0 and (tmp_path / "rep" / "exp1.png").is_file(), r
    assert "nan" in (tmp_path / "rep" / "report.html").read_text()


def test_hand_edited_registry_is_refused_naming_table_and_row(tmp_path, models):
    """Values of the right SQL type but the wrong shape used to pass the opening check and
    then crash a command halfway (KeyError, AttributeError, LinAlgError in the report)."""
    import shutil
    reg = tmp_path / "reg.db"
    assert track(reg, "experiment", "add", "--name", "a", "--task", "builtin:qa?n=2",
                 "--threshold", "0.5").returncode == 0
    assert track(reg, "model", "add", str(models[0])).returncode == 0
    con = sqlite3.connect(reg)  # everything into the main file, so one copy holds it all
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    edits = {"UPDATE results SET metrics = '{}'": "table results, row 1: column metrics lacks",
             "UPDATE results SET metrics = '[1]'": "row 1: column metrics holds a JSON array",
             "UPDATE results SET samples = '[{\"a\": 1}]'": "row 1: column samples holds a "
             "sample without",
             "UPDATE models SET non_embedding_params = -5": "table models, row 1 (m16): para",
             "UPDATE experiments SET threshold = 1e308 * 10": "row 1 (a): threshold inf"}
    for i, (sql, said) in enumerate(edits.items()):
        copy = tmp_path / f"edited{i}.db"
        shutil.copy(reg, copy)
        con = sqlite3.connect(copy)
        con.execute(sql)
        con.commit()
        con.close()
        r = track(copy, "status")
        assert r.returncode == 2 and said in r.stderr and not r.stdout, (sql, r)


def test_lm_eval_options_without_lm_eval_are_refused(tmp_path):
    """`--limit 0` and `--include-path ''` were taken as not given (falsy) and ignored."""
    reg = tmp_path / "reg.db"
    for extra in (["--limit", "0"], ["--limit", "5"], ["--include-path", ""]):
        r = track(reg, "experiment", "add", "--name", "x", "--task", "builtin:qa",
                  "--threshold", "0.5", *extra)
        assert r.returncode == 2 and "go with --lm-eval" in r.stderr, (extra, r)
    for bad in (["--task", "builtin:nosuch"], ["--task", "builtin:qa", "--metric", "brier"]):
        r = track(reg, "experiment", "add", "--name", "x", "--threshold", "0.5", *bad)
        assert r.returncode == 2 and r.stderr, (bad, r)
    assert not reg.exists()  # a refused experiment made an empty registry file all the same


def test_hf_model_folder(tmp_path, tokenizer):
    """A local Hugging Face causal LM goes through the same registry and scoring."""
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf,
                                                  bos_token="<|bos|>", eos_token="<|eos|>",
                                                  pad_token="<|pad|>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=64, n_embd=16,
                                  n_layer=1, n_head=2, bos_token_id=tokenizer.bos_id,
                                  eos_token_id=tokenizer.eos_id)
    d = tmp_path / "hf-tiny"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    hf_tok.save_pretrained(d)
    reg = tmp_path / "reg.db"
    assert track(reg, "experiment", "add", "--name", "a", "--task",
                 "builtin:addition?digits=2&n=4", "--threshold", "0.5").returncode == 0
    assert track(reg, "experiment", "add", "--name", "o", "--task", "builtin:older?n=4",
                 "--threshold", "0.5").returncode == 0
    r = track(reg, "model", "add", str(d))
    assert r.returncode == 0, r.stderr
    m = Registry(reg).model("hf-tiny")
    # by hand: wte V*16 + wpe 64*16, one block (2 layer norms 2*32, c_attn 16*48+48,
    # c_proj 16*16+16, c_fc 16*64+64, mlp c_proj 64*16+16), ln_f 32. GPT-2 ties its head to
    # wte, so N (the tied table counted, see track/evaluate.py) is every parameter.
    by_hand = tokenizer.vocab_size * 16 + 64 * 16 + 64 + 816 + 272 + 1088 + 1040 + 32
    assert m["kind"] == "hf" and m["params"] == m["non_embedding_params"] == by_hand
    res = Registry(reg).results()
    assert len(res) == 2 and all(math.isfinite(x["metrics"]["token_logprob"]) for x in res)
    assert -20 < res[0]["metrics"]["token_logprob"] < 0


def test_task_suite_spec_for_chat_models(tmp_path, models):
    """tasks:FAMILY asks through the chat template and scores with the family's scorer."""
    from scalelab.track.evaluate import is_right
    from scalelab.track.specs import load_items
    items = load_items("tasks:addition?difficulty=2&n=5")
    assert len(items) == 5 and all(it.example is not None for it in items)
    assert is_right(items[0], " " + items[0].target + ".\n") == 1.0  # lenient, first line
    assert is_right(items[0], "no idea") == 0.0
    reg = tmp_path / "reg.db"
    assert track(reg, "experiment", "add", "--name", "chat-add", "--task",
                 "tasks:addition?difficulty=1&n=4", "--threshold", "0.5").returncode == 0
    r = track(reg, "model", "add", str(models[0]), "--lineage", "sft")
    assert r.returncode == 0, r.stderr
    (res,) = Registry(reg).results()
    # the mean target log-likelihood again, one unpadded chat sequence at a time
    from scalelab.train.checkpoint import load_model
    model, tok = load_model(models[0])
    per_item, margins = [], []
    with torch.no_grad():
        for it in load_items("tasks:addition?difficulty=1&n=4"):
            ctx, tgt = tok.chat_prompt(it.prompt), tok.encode(it.target)
            logp = torch.log_softmax(model(torch.tensor([ctx + tgt]))[0].double(), -1)
            rows = [logp[len(ctx) - 1 + i] for i in range(len(tgt))]
            per_item.append(sum(r[t].item() for r, t in zip(rows, tgt)) / len(tgt))
            # greedy margin: the weakest target token's lead over its best rival
            margins.append(min(r[t].item() - torch.cat([r[:t], r[t + 1:]]).max().item()
                               for r, t in zip(rows, tgt)))
    assert res["metrics"]["token_logprob"] == pytest.approx(sum(per_item) / 4, abs=1e-4)
    pi = res["metrics"]["per_item"]
    assert pi["x_is"] == "greedy_margin" and pi["x"] == pytest.approx(margins, abs=1e-4)
    assert pi["token_logprob"] == pytest.approx(per_item, abs=1e-4)
    assert res["metrics"]["exact_match"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    r = track(reg, "experiment", "add", "--name", "x", "--task", "tasks:algebra",
              "--threshold", "0.5")
    assert r.returncode == 2 and "unknown task family 'algebra'" in r.stderr


def test_lineage_from_post_training_record(tmp_path, models):
    import shutil
    reg = tmp_path / "reg.db"
    assert track(reg, "model", "add", str(models[0]), "--no-run").returncode == 0
    run = tmp_path / "sft-run"
    shutil.copytree(models[1], run / "model")
    (run / "lineage.json").write_text(json.dumps({"stage": "sft", "parent": str(models[0])}))
    assert track(reg, "model", "add", str(run / "model"), "--no-run").returncode == 0
    m = Registry(reg).model("sft-run")
    assert (m["lineage"], m["parent"]) == ("sft", "m16")


def test_model_add_killed_mid_evaluation_is_finished_by_running_it_again(tmp_path, models,
                                                                           monkeypatch):
    from scalelab.track import evaluate as ev
    whole, cut = tmp_path / "whole.db", tmp_path / "cut.db"
    for reg in (whole, cut):
        for name, task in (("a", "builtin:addition?digits=1&n=4"), ("o", "builtin:older?n=4"),
                           ("s", "builtin:story?steps=1&n=4")):
            assert track(reg, "experiment", "add", "--name", name, "--task", task,
                         "--threshold", "1").returncode == 0
    assert track(whole, "model", "add", str(models[0]), "--name", "m").returncode == 0
    real, calls = ev.run_experiment, []

    def dies_on_the_second(lm, e):  # the process is killed while evaluating experiment 2
        calls.append(e["name"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lm, e)

    monkeypatch.setattr(ev, "run_experiment", dies_on_the_second)
    assert track(cut, "model", "add", str(models[0]), "--name", "m").returncode == 130
    assert len(Registry(cut).results()) == 1  # the model and one result were committed
    monkeypatch.setattr(ev, "run_experiment", real)
    r = track(cut, "model", "add", str(models[0]), "--name", "m")  # once refused: exit 2
    assert r.returncode == 0, r.stderr
    assert "already registered from this folder" in r.stdout
    got, want = Registry(cut).results(), Registry(whole).results()
    assert [x["experiment"] for x in got] == ["a", "o", "s"]  # nothing evaluated twice
    assert [(x["experiment"], x["metrics"]) for x in got] == \
        [(x["experiment"], x["metrics"]) for x in want]
    other = tmp_path / "other" / "model"  # the name still refuses another folder
    other.parent.mkdir()
    import shutil
    shutil.copytree(models[1], other)
    r = track(cut, "model", "add", str(other), "--name", "m")
    assert r.returncode == 2 and "already registered" in r.stderr


def test_one_folder_under_a_second_name_is_refused(tmp_path, models):
    """`model add DIR --name other` of a folder registered unchanged: a second record of the
    same weights, evaluated again and counted twice in every fit (two points at one N)."""
    reg = tmp_path / "reg.db"
    assert track(reg, "model", "add", str(models[0]), "--no-run").returncode == 0
    r = track(reg, "model", "add", str(models[0]), "--name", "again", "--no-run")
    assert r.returncode == 2 and "already registered as 'm16'" in r.stderr, r
    assert "track run --model m16" in r.stderr
    assert [m["name"] for m in Registry(reg).models()] == ["m16"]


def test_model_add_on_a_folder_trained_further_since_is_refused(tmp_path, models):
    """`pretrain --resume --max-steps MORE` rewrites RUN/model in place: adding it again must
    not keep the old tokens and FLOPs under the new weights."""
    import shutil
    reg, run = tmp_path / "reg.db", tmp_path / "run"
    shutil.copytree(models[0], run / "model")
    (run / "config.toml").write_text("")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "tokens": 100}\n')
    assert track(reg, "model", "add", str(run / "model"), "--no-run").returncode == 0
    r = track(reg, "model", "add", str(run / "model"), "--no-run")  # unchanged: nothing to do
    assert r.returncode == 0 and "already registered" in r.stdout, r
    assert "running" not in r.stdout, r.stdout  # it used to say "running what it lacks"
    with (run / "metrics.jsonl").open("a") as f:  # trained on: 100 more tokens
        f.write('{"step": 2, "loss": 4.0, "tokens": 200}\n')
    r = track(reg, "model", "add", str(run / "model"), "--no-run")
    assert r.returncode == 2 and "--name" in r.stderr and "200" in r.stderr, r.stderr
    assert Registry(reg).model("run")["tokens"] == 100
    r = track(reg, "model", "add", str(run / "model"), "--no-run", "--name", "run-200")
    assert r.returncode == 0 and Registry(reg).model("run-200")["tokens"] == 200


def test_track_run_on_a_folder_trained_further_since_is_refused(tmp_path, models):
    """`track run` must not file the new weights' results under the old record either."""
    import shutil
    reg, run = tmp_path / "reg.db", tmp_path / "run"
    shutil.copytree(models[0], run / "model")
    (run / "config.toml").write_text("")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "tokens": 100}\n')
    assert track(reg, "experiment", "add", "--name", "a", "--task",
                 "builtin:addition?digits=1&n=2", "--threshold", "1").returncode == 0
    assert track(reg, "model", "add", str(run / "model"), "--no-run").returncode == 0
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 4.0, "tokens": 200}\n')
    for extra in ((), ("--model", "run")):
        r = track(reg, "run", *extra)
        assert r.returncode == 2 and str(run / "model") in r.stderr, r
        assert "--name NEW" in r.stderr and "200" in r.stderr, r.stderr
    assert Registry(reg).results() == []
    assert track(reg, "model", "add", str(run / "model"), "--no-run", "--name",
                 "run-200").returncode == 0
    r = track(reg, "run")  # the old record is now superseded: skipped, said so
    assert r.returncode == 0 and "skipped run:" in r.stdout and "run-200" in r.stdout, r
    assert [x["model"] for x in Registry(reg).results()] == ["run-200"]
    assert track(reg, "run", "--model", "run").returncode == 2  # asked for by name: refused


def test_track_run_skips_a_deleted_model_folder_or_task_file(tmp_path, models):
    """Old run folders get cleaned up: one registered folder (or JSONL task) gone used to
    stop every later `track run` at exit 2, the other models never evaluated."""
    import shutil
    reg, gone = tmp_path / "reg.db", tmp_path / "old" / "model"
    shutil.copytree(models[0], gone)
    task = tmp_path / "mine.jsonl"
    task.write_text('{"prompt": "1 + 1 =", "target": " 2"}\n')
    for name, spec in (("a", "builtin:addition?digits=1&n=2"), ("mine", str(task))):
        assert track(reg, "experiment", "add", "--name", name, "--task", spec,
                     "--threshold", "1").returncode == 0
    for m in (gone, models[1]):
        assert track(reg, "model", "add", str(m), "--no-run").returncode == 0
    shutil.rmtree(gone)
    task.unlink()
    r = track(reg, "run")
    assert r.returncode == 0, r
    assert "skipped old: its folder" in r.stdout and "skipped experiment mine" in r.stdout
    assert [(x["model"], x["experiment"]) for x in Registry(reg).results()] == [("m24", "a")]
    assert track(reg, "run", "--model", "old").returncode == 2  # asked for by name: refused
    assert track(reg, "run", "--experiment", "mine").returncode == 2
    r = track(reg, "model", "add", str(models[2]))  # runs what it can, says what it skips
    assert r.returncode == 0 and "skipped experiment mine" in r.stdout, r


def test_an_answer_longer_than_the_model_context_is_refused(tmp_path, models):
    """The models' context is 64 tokens: a longer answer used to crash generate (traceback:
    an empty prompt) or, for a choice, score the wrong tokens silently."""
    reg = tmp_path / "reg.db"
    long = " and".join(f" {w}" for w in ["Mia", "Tom", "Ava", "Ben"] * 20)  # > 64 tokens
    for name, row in (("gen", {"prompt": "Who?", "target": long}),
                      ("mc", {"prompt": "Who?", "choices": [" Mia", long], "answer": 0})):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
        assert track(reg, "experiment", "add", "--name", name, "--task",
                     str(tmp_path / f"{name}.jsonl"), "--threshold", "0.5").returncode == 0
    assert track(reg, "model", "add", str(models[0]), "--no-run").returncode == 0
    for name in ("gen", "mc"):
        r = track(reg, "run", "--experiment", name)
        assert r.returncode == 2 and f"{name}.jsonl:1: " in r.stderr, r
        assert "64-token context" in r.stderr, r.stderr
    assert Registry(reg).results() == []


def test_backtest_out_that_cannot_be_written(tmp_path):
    reg = tmp_path / "reg.db"
    for out in (tmp_path, tmp_path / "missing" / "b.md"):  # a folder; a file in no folder
        r = track(reg, "backtest", "--out", str(out))
        assert r.returncode == 2 and f"--out {out}" in r.stderr and not r.stdout, r
    r = track(reg, "backtest", "--out", str(tmp_path / "b.md"))
    written = (tmp_path / "b.md").read_text()
    assert r.returncode == 0 and written.endswith(r.stdout[:-1]), (written, r.stdout)
    assert "nothing to backtest" in r.stdout  # an empty registry: said, not "0 of 0" alone
    assert track(reg, "backtest", "--out", str(tmp_path / "b.md")).returncode == 0  # its own
    mine = tmp_path / "notes.md"  # a file of the user's: was overwritten
    mine.write_text("my notes\n")
    r = track(reg, "backtest", "--out", str(mine))
    assert r.returncode == 2 and f"--out {mine}: exists" in r.stderr and not r.stdout, r
    assert mine.read_text() == "my notes\n"


def test_registry_option_is_taken_between_the_subcommands_too(tmp_path, monkeypatch):
    """`--registry X` after any word of the command names the same registry file."""
    from scalelab.cli import main
    monkeypatch.chdir(tmp_path)  # where the default registry would go
    monkeypatch.delenv("SCALELAB_REGISTRY", raising=False)
    reg = tmp_path / "r.db"
    assert main(["track", "experiment", "--registry", str(reg), "seed"]) == 0
    for argv in (["track", "--registry", str(reg), "experiment", "list"],
                 ["track", "experiment", "--registry", str(reg), "list"],
                 ["track", "model", "--registry", str(reg), "list"],
                 ["track", "experiment", "list", "--registry", str(reg)]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(argv) == 0, argv
        if "experiment" in argv:
            assert "addition" in out.getvalue(), argv  # the seeded experiments, from reg
    assert not (tmp_path / "scalelab-registry.db").exists() and reg.is_file()


def test_status_columns_stay_apart_for_long_names_and_thresholds(tmp_path):
    """A study's experiment names (instruct-cpu:compare_numbers) and a threshold like
    -0.123456 are longer than the fixed widths status used: the name ran into the metric
    ('instruct-cpu:compare_numbersexact_match'), the metric into the rule."""
    reg = tmp_path / "reg.db"
    exps = [("instruct-cpu:compare_numbers", "builtin:addition?n=2", "exact_match", "0.8"),
            ("ll", "builtin:addition?n=2", "token_logprob", "-0.123456")]
    for name, task, metric, thr in exps:
        assert track(reg, "experiment", "add", "--name", name, "--task", task, "--metric",
                     metric, "--threshold", thr).returncode == 0
    lines = track(reg, "status").stdout.splitlines()
    assert lines[0].split()[:4] == ["experiment", "metric", "pass", "at"]
    rows = [line.split() for line in lines[1:3]]
    assert rows == [["instruct-cpu:compare_numbers", "exact_match", ">=0.8", "not", "yet"],
                    ["ll", "token_logprob", ">=-0.123456", "not", "yet"]]


def test_an_empty_task_is_named_as_such(tmp_path):
    """`--task ""` (an unset shell variable) was read as the file '.': ".: is a folder"."""
    reg = tmp_path / "reg.db"
    for task in ("", " "):
        r = track(reg, "experiment", "add", "--name", "x", "--task", task, "--threshold", "1")
        assert r.returncode == 2 and "task must not be empty" in r.stderr, r
    assert not reg.exists()


def test_an_empty_model_name_is_refused(tmp_path, models):
    """`model add --name ""` registered a model without a name (a status column without a
    heading), and `track run --model ""` ran every model instead of refusing the name."""
    reg = tmp_path / "reg.db"
    r = track(reg, "model", "add", str(models[0]), "--name", " ", "--no-run")
    assert r.returncode == 2 and "--name must not be empty" in r.stderr, r
    assert track(reg, "model", "add", str(models[0]), "--no-run").returncode == 0
    assert track(reg, "experiment", "add", "--name", "a", "--task",
                 "builtin:addition?digits=1&n=2", "--threshold", "1").returncode == 0
    for flag in ("--model", "--experiment"):
        r = track(reg, "run", flag, "")
        assert r.returncode == 2 and "named ''" in r.stderr, r
    assert Registry(reg).results() == [] and len(Registry(reg).models()) == 1


def test_reading_commands_do_not_make_a_registry_where_there_is_none(tmp_path, monkeypatch):
    """`track status` (list, show, run, backtest, report) in a folder without a registry
    made an empty scalelab-registry.db there and said nothing: a user in the wrong folder
    saw "nothing registered", and a later `model add` from there filled the stray file."""
    from scalelab.cli import main
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SCALELAB_REGISTRY", raising=False)
    for argv in (["status"], ["status", "--json"], ["experiment", "list"], ["model", "list"],
                 ["run"], ["backtest"], ["report", "--out", "rep"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            assert main(["track", *argv]) == 0, argv
        assert "no registry at scalelab-registry.db yet" in err.getvalue(), argv
    assert not (tmp_path / "scalelab-registry.db").exists()
    assert main(["track", "experiment", "seed"]) == 0  # a command that writes makes it
    assert (tmp_path / "scalelab-registry.db").is_file()


def test_seed_says_which_starter_names_hold_another_experiment(tmp_path):
    """A user's own 'addition-1d' was kept by `experiment seed` (names are permanent) without
    a word, so the starter set and a sweep's "starter" ran it under the built-in's name."""
    reg = tmp_path / "reg.db"
    assert track(reg, "experiment", "add", "--name", "addition-1d", "--task",
                 "builtin:subtraction?digits=2", "--threshold", "0.5").returncode == 0
    r = track(reg, "experiment", "seed")
    assert r.returncode == 0, r
    assert "kept your experiment addition-1d (builtin:subtraction?digits=2, pass if " \
        "exact_match >= 0.5), not the built-in addition-1d (builtin:addition?digits=1)" \
        in r.stdout, r.stdout
    assert "added 12 built-in experiments" in r.stdout
    assert track(reg, "experiment", "seed").stdout.count("kept your") == 1  # not the 12


def test_a_threshold_the_metric_cannot_reach_is_refused(tmp_path):
    """token_logprob >= 0.8 (a probability typed for a log-likelihood, which is at most 0)
    was added, and the experiment could never pass; a Brier score is at most 2."""
    reg = tmp_path / "reg.db"
    for task, metric, thr, said in (
            ("builtin:addition?n=2", "token_logprob", "0.8", "a mean log-likelihood: -inf..0"),
            ("builtin:older?n=2", "brier", "2.5", "a Brier score: 0..2"),
            ("builtin:addition?n=2", "edit_distance", "-0.1", "a fraction: 0..1")):
        r = track(reg, "experiment", "add", "--name", "x", "--task", task, "--metric", metric,
                  "--threshold", thr)
        assert r.returncode == 2 and f"threshold {thr} is out of range for {metric} ({said})" \
            in r.stderr, r
    assert not reg.exists()
    assert track(reg, "experiment", "add", "--name", "x", "--task", "builtin:addition?n=2",
                 "--metric", "token_logprob", "--threshold", "-0.5").returncode == 0


def test_an_evaluation_reads_the_results_once_per_model(tmp_path, models, monkeypatch):
    """`model add` asked the registry which experiments had passed before each one, parsing
    every result each time: quadratic in the registry (a study's has thousands of rows)."""
    reg = tmp_path / "reg.db"
    for d in (1, 2, 3, 4):
        assert track(reg, "experiment", "add", "--name", f"a{d}", "--task",
                     f"builtin:addition?digits={d}&n=2", "--threshold", "1").returncode == 0
    calls = []
    real = Registry.latest
    monkeypatch.setattr(Registry, "latest", lambda self: calls.append(1) or real(self))
    assert track(reg, "model", "add", str(models[0])).returncode == 0
    # register_model's passed set, one for the model's evaluations, one for the predictions
    assert len(calls) == 3, len(calls)
    assert len(Registry(reg).results()) == 4
