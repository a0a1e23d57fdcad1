"""The workflow with several runs of one size (`sweep.seeds`): a size passes by its runs' mean,
in `model add`, `run --failed-only`, `status` and the experiments' history, as in the fits."""

import json

import torch
from test_track_registry import greedy_text, track

from scalelab.config import ModelConfig
from scalelab.model import Transformer
from scalelab.track.registry import Registry
from scalelab.train.checkpoint import save_model


def test_one_lucky_seed_does_not_retire_an_experiment(tmp_path, tokenizer):
    """Two runs of one width (seeds 0 and 1: the same N, tokens and data group) and a wider
    model. The task's target is run a's greedy answer and no one else's: a scores 1, a-s2 and big
    0, so the size's mean is 0.5. 'all' (>= 1) is passed by a alone, not by its size;
    'half' (>= 0.5) is passed by the size. The old rule (some model passed) skipped both on
    a-s2 and big, and named a the first passing model of both."""
    paths = {}
    for name, d, seed in (("a", 24, 0), ("a-s2", 24, 1), ("big", 32, 2)):
        torch.manual_seed(seed)
        m = Transformer(ModelConfig(vocab_size=512, seq_len=64, n_layer=1, n_head=2, d_model=d,
                                    tie_embeddings=False))
        save_model(m, tokenizer, tmp_path / name / "model")
        paths[name] = tmp_path / name / "model"
        # the run around it: one corpus, one budget (the two runs of width 24 share a recipe)
        (tmp_path / name / "config.toml").write_text('[data]\nsource = "builtin:world"\n')
        (tmp_path / name / "metrics.jsonl").write_text(
            json.dumps({"step": 10, "loss": 3.0, "tokens": 10 * d}) + "\n")
    for prompt in ("12 + 7 =", "Q: Where does Mia live? A:", "Tom has", "5 - 3 =", "Count"):
        want, longer = greedy_text(paths["a"], prompt), greedy_text(paths["a"], prompt, 4)
        if all(want != greedy_text(paths[o], prompt) for o in ("a-s2", "big")) \
                and not longer[len(want):][:1].isalnum():
            break
    else:
        raise AssertionError("no prompt on which only run a gives its answer")
    task = tmp_path / "mine.jsonl"
    task.write_text(json.dumps({"prompt": prompt, "target": want}) + "\n")
    reg = tmp_path / "reg.db"
    for name, threshold in (("all", "1"), ("half", "0.5")):
        r = track(reg, "experiment", "add", "--name", name, "--task", str(task),
                  "--threshold", threshold)
        assert r.returncode == 0, r.stderr

    assert "running the 2 experiments" in track(reg, "model", "add", str(paths["a"])).stdout
    # a's pass is its size's until the size's second run is in: a-s2 runs both
    r = track(reg, "model", "add", str(paths["a-s2"]))
    assert r.returncode == 0 and "running the 2 experiments" in r.stdout, r.stdout + r.stderr
    r = track(reg, "model", "add", str(paths["big"]))  # only 'all' is still open
    assert "running the 1 experiments" in r.stdout, r.stdout

    db = Registry(reg)
    scores = {(x["model"], x["experiment"]): x["metrics"]["exact_match"] for x in db.results()}
    assert scores == {("a", "all"): 1.0, ("a", "half"): 1.0, ("a-s2", "all"): 0.0,
                      ("a-s2", "half"): 0.0, ("big", "all"): 0.0}
    s = json.loads(track(reg, "status", "--json").stdout)
    first = {e["name"]: e["first_passing_model"] for e in s["experiments"]}
    assert first == {"all": None, "half": "mean of a, a-s2"} and s["not_yet"] == ["all"]
    listed = {ln.split()[0]: ln.split()[1] for ln in
              track(reg, "experiment", "list").stdout.splitlines()}
    assert listed == {"all": "not", "half": "passed"}  # "not yet"
    r = track(reg, "run", "--failed-only")
    assert r.returncode == 0 and "running 1 experiments on 3 models" in r.stdout, r.stdout

    def history(name):
        return [h["event"] for h in db.history(db.experiment(name)["id"])]
    assert history("all")[-2:] == ["first passed by a (exact_match 1.000)",
                                     "no longer passed: mean of a, a-s2 (exact_match 0.500)"]
    assert history("half")[-2:] == ["first passed by a (exact_match 1.000)",  # a alone
                                    "first passed by mean of a, a-s2 (exact_match 0.500)"]
    r = track(reg, "report", "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "<td class=l>mean of a, a-s2</td>" in html and "<td class=l>not yet</td>" in html


def test_only_runs_of_one_recipe_are_judged_as_one_size(tmp_path):
    """Seeds share N, a token budget and a known corpus. Two imported folders of one N (no
    run says what they saw: pythia and pythia-deduped, say), or a run and the same folder
    trained further, are not one size: one passing alone passes."""
    from scalelab.track.predict import first_passing, judged_key
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text('[data]\nsource = "builtin:world"\n')
    exp = {"id": 1, "metric": "exact_match", "threshold": 0.8}
    models = [{"id": i, "name": name, "lineage": "base", "non_embedding_params": 1000,
               "tokens": tokens, "path": str(folder / "model")}
              for i, (name, tokens, folder) in enumerate(
                  [("seed0", 5000, run), ("seed1", 5000, run), ("longer", 9000, run),
                   ("hf-a", None, tmp_path / "a"), ("hf-b", None, tmp_path / "b")], 1)]
    keys = [judged_key(m) for m in models]
    assert keys[0] == keys[1] and len(set(keys)) == 4
    scores = {"seed0": 1.0, "seed1": 0.0, "longer": 0.0, "hf-a": 0.0, "hf-b": 1.0}
    latest = {(1, m["id"]): {"metrics": {"exact_match": scores[m["name"]]},
                             "passed": scores[m["name"]] >= 0.8} for m in models}
    won = first_passing(exp, models, latest)
    assert [m["name"] for m, _ in won] == ["hf-b"]  # seed0 passes alone, its size does not
