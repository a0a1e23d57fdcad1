"""`scalelab study instruct` on a toy grid: 2 sizes x 2 nested task subsets, seconds each."""

import json

from scalelab.cli import main
from scalelab.tasks import HELDOUT_TASKS, TRAIN_TASKS, make_examples
from scalelab.track.registry import Registry
from scalelab.track.specs import load_items

STUDY = """
[model]
seq_len = 128
[data]
n_docs = 1200
tokenizer_vocab = 400
[train]
batch_size = 8
lr = 3e-3
warmup_steps = 2
eval_batches = 1
log_every = 5

[study]
name = "toy"
sizes = [{n_layer = 1, d_model = 16, n_head = 2}, {n_layer = 1, d_model = 32, n_head = 2}]
pretrain_steps = 6
lr_width = 32
n_tasks = [1, 3]
sft_steps = 4
sft_examples = 120
sft_lr = 2e-3
eval_n = 2
"""


def test_study_trains_each_size_and_subset_registers_and_reports(tmp_path, capsys):
    cfg, reg_path, out = tmp_path / "study.toml", tmp_path / "reg.db", tmp_path / "st"
    cfg.write_text(STUDY)
    args = ["study", "instruct", "--config", str(cfg), "--out", str(out),
            "--registry", str(reg_path)]
    assert main(args) == 0
    summary = json.loads((out / "study.json").read_text())
    assert summary["status"] == "done"
    order = summary["task_order"]
    assert sorted(order) == sorted(TRAIN_TASKS)  # a permutation of the training families
    one, three = summary["subsets"]["1"], summary["subsets"]["3"]
    assert three[:1] == one and len(set(three)) == 3 and not set(three) & set(HELDOUT_TASKS)
    # each SFT run trained on exactly its subset's families (read back from its data file),
    # on no prompt of the study's test items
    reg = Registry(reg_path)
    tests = {it.prompt for e in reg.experiments() for it in load_items(e["task"])}
    for k, fams in (("1", one), ("3", three)):
        rows = [json.loads(x) for x in (out / "sft-data" / f"tasks-{k}.jsonl").read_text()
                .splitlines()]
        assert len(rows) == 120
        prompts = [r["messages"][0]["content"] for r in rows]
        assert prompts == [e.prompt for e in make_examples(fams, 240, 0)
                           if e.prompt not in tests][:120]
    grid = [(r["size"], r["n_tasks"]) for r in summary["rows"]]
    assert grid == [("L1-d16", 0), ("L1-d16", 1), ("L1-d16", 3),
                    ("L1-d32", 0), ("L1-d32", 1), ("L1-d32", 3)]
    for label in ("L1-d16", "L1-d32"):
        assert (out / "base" / label / "checkpoints" / "step_6").is_dir()
        for k in (1, 3):
            assert (out / "sft" / f"{label}-t{k}" / "checkpoints" / "step_4").is_dir()
            lineage = json.loads((out / "sft" / f"{label}-t{k}" / "lineage.json").read_text())
            assert lineage["parent"] == str(out / "base" / label / "model")
    # the registry: 2 bases + 4 SFT models (with their parents), one experiment per family,
    # one result per (model, family)
    models = {m["name"]: m for m in reg.models()}
    assert set(models) == {"toy-L1-d16", "toy-L1-d32", "toy-L1-d16-t1", "toy-L1-d16-t3",
                           "toy-L1-d32-t1", "toy-L1-d32-t3"}
    assert models["toy-L1-d32-t3"]["lineage"] == "sft"
    assert models["toy-L1-d32-t3"]["parent"] == "toy-L1-d32"
    n_fam = len(TRAIN_TASKS) + len(HELDOUT_TASKS)
    assert len(reg.experiments()) == n_fam and len(reg.results()) == 6 * n_fam
    # the table's held-out score is the mean of the registry's held-out results
    res = {(r["model"], r["experiment"]): r["metrics"]["exact_match"] for r in reg.results()}
    for row in summary["rows"]:
        want = sum(res[(row["model"], f"toy:{f}")] for f in HELDOUT_TASKS) / len(HELDOUT_TASKS)
        assert abs(row["held_out"] - want) < 1e-12
    md = (out / "report.md").read_text()
    assert "study.png" in md and md.count("| L1-d") == 6
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun reuses everything: no training, no new registry rows
    capsys.readouterr()
    assert main(args) == 0
    assert "--- " not in capsys.readouterr().out  # nothing trained
    assert len(reg.results()) == 6 * n_fam and len(reg.models()) == 6
    # ... and another config into the same folder is refused (exit 2) before any work
    cfg.write_text(STUDY.replace("sft_steps = 4", "sft_steps = 5"))
    assert main(args) == 2 and "another config" in capsys.readouterr().err

    # a base model from the registry is tuned as it is (no pretraining)
    cfg.write_text(STUDY.replace('name = "toy"', 'name = "toy2"').replace(
        "sizes = [", 'sizes = ["registry:toy-L1-d32"]\nold_sizes = [').replace(
        "n_tasks = [1, 3]", "n_tasks = [1]"))
    text = cfg.read_text()
    cfg.write_text(text[:text.index("old_sizes")] + text[text.index("pretrain_steps"):])
    out2 = tmp_path / "st2"
    assert main(["study", "instruct", "--config", str(cfg), "--out", str(out2),
                 "--registry", str(reg_path)]) == 0
    assert not (out2 / "base").exists() and not (out2 / "shared").exists()
    lineage = json.loads((out2 / "sft" / "toy-L1-d32-t1" / "lineage.json").read_text())
    assert lineage["parent"] == models["toy-L1-d32"]["path"]
    assert reg.model("toy2-toy-L1-d32-t1")["parent"] == "toy-L1-d32"


def test_bad_study_config_exits_2(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    out = tmp_path / "o"
    args = ["study", "instruct", "--config", str(cfg), "--out", str(out)]
    cfg.write_text(STUDY.replace("eval_n = 2", "eval_nn = 2"))
    assert main(args) == 2 and "unknown key 'study.eval_nn'" in capsys.readouterr().err
    cfg.write_text(STUDY.replace("n_tasks = [1, 3]", "n_tasks = [3, 1]"))
    assert main(args) == 2 and "study.n_tasks" in capsys.readouterr().err
    cfg.write_text(STUDY.replace("sft_lr = 2e-3", "sft_lr = 0.0"))
    assert main(args) == 2 and "'study.sft_lr' must be positive" in capsys.readouterr().err
    # more items than a task spec takes: refused after study.json was written, and the
    # corrected config then refused for that --out ("another config")
    cfg.write_text(STUDY.replace("eval_n = 2", "eval_n = 200000"))
    assert main(args + ["--registry", str(tmp_path / "r.db")]) == 2
    assert "'study.eval_n' = 200000 must be in 1..100000" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r.db").exists()
    # a family's experiment name held with another task (another eval_n): refused before
    # --out is started, so the corrected config still runs there
    reg = tmp_path / "held.db"
    cfg.write_text(STUDY.replace("eval_n = 2", "eval_n = 3"))
    from scalelab.study import ensure_experiments, load_study
    ensure_experiments(Registry(reg), load_study(cfg)[1])
    cfg.write_text(STUDY)
    assert main(args + ["--registry", str(reg)]) == 2
    assert "exists with task" in capsys.readouterr().err and not out.exists()
    # only the last family's name held: refused before any of the others is added (they
    # stayed in the registry under the refused study name, run on every later model)
    reg = tmp_path / "last.db"
    last = f"toy:{TRAIN_TASKS[-1]}"
    Registry(reg).add_experiment(last, f"tasks:{TRAIN_TASKS[-1]}?n=5", "exact_match", 0.8)
    assert main(args + ["--registry", str(reg)]) == 2
    assert f"experiment '{last}' exists with task" in capsys.readouterr().err
    assert [e["name"] for e in Registry(reg).experiments()] == [last]
    # the study's own task under its name, on another metric: refused too
    reg = tmp_path / "metric.db"
    held = ensure_experiments(Registry(tmp_path / "scratch.db"), load_study(cfg)[1])
    Registry(reg).add_experiment(last, held[TRAIN_TASKS[-1]]["task"], "token_logprob", -1.0)
    assert main(args + ["--registry", str(reg)]) == 2
    assert f"experiment '{last}' exists with task" in capsys.readouterr().err
    cfg.write_text(STUDY.replace("sft_lr = 2e-3", "sft_lr = inf"))  # refused after pretraining
    assert main(args + ["--registry", str(tmp_path / "r.db")]) == 2
    assert "'study.sft_lr' must be positive and finite" in capsys.readouterr().err
    # fewer conversations than one SFT batch (32) plus the held-out ones: refused before
    # anything is trained, not after the first size is pretrained and registered
    cfg.write_text(STUDY.replace("sft_examples = 120", "sft_examples = 34"))
    assert main(args + ["--registry", str(tmp_path / "r.db")]) == 2
    assert "'study.sft_examples' = 34 is too few" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "r.db").exists()
    # an unknown registered base: refused before --out is started (its study.json then
    # refused the corrected config: "holds a study made with another config")
    cfg.write_text(STUDY.replace("{n_layer = 1, d_model = 32, n_head = 2}", '"registry:nope"'))
    err = capsys.readouterr().err if main(args + ["--registry", str(tmp_path / "r.db")]) == 2 \
        else "exit 0"
    assert f"{cfg}: study.sizes[1]: no model named 'nope'" in err, err
    assert not out.exists()
    # one base twice (from the registry, or two sizes named alike): one run folder for both
    cfg.write_text(STUDY.replace("sizes = [", 'sizes = ["registry:a", "registry:a", '))
    assert main(args) == 2 and f"{cfg}: study.sizes[1] repeats study.sizes[0] (registry:a)" \
        in capsys.readouterr().err
    cfg.write_text(STUDY.replace("d_model = 16, n_head = 2", "d_model = 32, n_head = 4"))
    assert main(args) == 2 and f"{cfg}: study.sizes[1]: gives the same run and model name " \
        "as study.sizes[0] (L1-d32" in capsys.readouterr().err
    assert not out.exists()
    mine = tmp_path / "project"  # a folder the study did not write: refused, left alone
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    cfg.write_text(STUDY)
    args[args.index(str(out))] = str(mine)
    assert main(args) == 2 and "was not written by `scalelab study instruct`" in \
        capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_study_sft_data_leaves_out_the_test_items(tmp_path):
    """The families' item spaces are small: 500 next_number examples drawn as the study drew
    them hold most of its 32 test items word for word; its SFT data holds none."""
    from scalelab.study import sft_data
    tests = {it.prompt for it in load_items("tasks:next_number?difficulty=1&n=32")}
    drawn = {e.prompt for e in make_examples(["next_number"], 500, 0)}
    assert len(tests & drawn) > 10
    sft_data(tmp_path / "d.jsonl", ["next_number"], 500, 0, tests)
    rows = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert len(rows) == 500 and not {r["messages"][0]["content"] for r in rows} & tests
