"""Tracker metrics and fits on hand-computed examples."""

import math

import numpy as np
import pytest

from scalelab.config import UserError
from scalelab.track import metrics as M
from scalelab.track.predict import (
    fit_logistic,
    fit_power_law,
    level_for,
    predict,
    predict_calibrated,
)
from scalelab.track.specs import builtin_items, jsonl_items, load_items


def test_levenshtein_and_edit_distance():
    assert M.levenshtein(list("kitten"), list("sitting")) == 3
    assert M.levenshtein([], [1, 2]) == 2
    assert M.edit_distance([5, 1, 9, 8, 0], [5, 1, 9, 8]) == 0.0  # extra tokens are ignored
    assert M.edit_distance([5, 2, 9, 8], [5, 1, 9, 8]) == 0.25  # one substitution of four
    assert M.edit_distance([1, 9, 8], [5, 1, 9, 8]) == 0.25  # one deletion
    assert M.edit_distance([], [5, 1]) == 1.0


def test_exact_match_respects_word_boundaries():
    assert M.exact_match(" 5198\n12 + 3", " 5198") == 1.0
    assert M.exact_match(" 5198.", " 5198") == 1.0
    assert M.exact_match(" 51980", " 5198") == 0.0  # a longer number is wrong
    assert M.exact_match(" Oakfords", " Oakford") == 0.0
    assert M.exact_match(" 519", " 5198") == 0.0
    assert M.exact_match(" 5198", " 5198") == 1.0


def test_choice_scores_by_hand():
    # log-likelihoods ln(0.6), ln(0.3), ln(0.1): softmax over choices gives back 0.6/0.3/0.1
    s = M.choice_scores([math.log(0.6), math.log(0.3), math.log(0.1)], answer=0)
    assert s["mc_accuracy"] == 1.0
    assert s["brier"] == pytest.approx(0.4**2 + 0.3**2 + 0.1**2)  # 0.26
    s = M.choice_scores([math.log(0.6), math.log(0.3), math.log(0.1)], answer=2)
    assert s["mc_accuracy"] == 0.0
    assert s["brier"] == pytest.approx(0.6**2 + 0.3**2 + 0.9**2)
    # unnormalised: only the differences matter
    assert M.choice_scores([-10.0, -10.0], 1)["brier"] == pytest.approx(0.5)
    # several right answers (1 and 2) count as one outcome of probability 0.4
    lls = [math.log(0.6), math.log(0.3), math.log(0.1)]
    s = M.choice_scores(lls, answer=[1, 2])
    assert s["mc_accuracy"] == 0.0 and s["brier"] == pytest.approx(0.6**2 + 0.6**2)
    assert s["margin"] == pytest.approx(math.log(0.3) - math.log(0.6))
    s = M.choice_scores(lls, answer=[2, 0])
    assert s["mc_accuracy"] == 1.0 and s["brier"] == pytest.approx(0.3**2 + 0.3**2)
    assert s["margin"] == pytest.approx(math.log(0.6) - math.log(0.3))
    assert M.brier_pass_level(0.9, 2) == pytest.approx(2 * 0.1**2)
    assert M.token_logprob([-1.0, -2.0, -3.0]) == -2.0


def test_pass_direction():
    assert M.passes(0.8, 0.8, "exact_match") and not M.passes(0.79, 0.8, "exact_match")
    assert M.passes(0.1, 0.2, "edit_distance") and not M.passes(0.3, 0.2, "brier")
    assert not M.passes(float("nan"), 0.0, "token_logprob")


def test_power_law_fit_recovers_known_law():
    ns = [1e4, 3e4, 1e5, 3e5, 1e6]
    fit = fit_power_law(ns, [1.5 + 40.0 * n**-0.35 for n in ns])
    assert fit["alpha"] == pytest.approx(0.35, abs=0.002)
    assert fit["E"] == pytest.approx(1.5, abs=0.01)
    assert fit["A"] == pytest.approx(40.0, rel=0.03)
    assert fit_power_law([1e4, 1e5], [2.0, 1.9]) is None  # two points fit anything


def test_power_law_fit_keeps_the_irreducible_loss_non_negative():
    """Four short CPU runs (d_model 16..48, 20 steps) whose loss still falls faster at the
    larger sizes: the unbounded fit went to alpha 0.001 and E = -326.7. E >= 0 (a
    cross-entropy), and the fit is the best such one: no (alpha, E >= 0, A >= 0) on a
    dense grid does better."""
    ns, losses = [15440, 24696, 47264, 77040], [5.645, 5.504, 5.340, 5.091]
    fit = fit_power_law(ns, losses)
    assert fit["E"] >= 0 and fit["A"] >= 0 and fit["alpha"] > 0.01
    N, L = np.array(ns, dtype=float), np.array(losses)
    model = fit["E"] + fit["A"] * N ** -fit["alpha"]
    assert fit["rmse"] == pytest.approx(float(np.sqrt(np.mean((model - L) ** 2))))
    best = math.inf
    for alpha in np.linspace(0.001, 2.0, 400):
        x = N ** -alpha
        for e in np.linspace(0.0, min(losses), 200):
            a = max(0.0, float(x @ (L - e) / (x @ x)))  # the best A >= 0 for this E
            best = min(best, float(np.sqrt(np.mean((e + a * x - L) ** 2))))
    assert fit["rmse"] <= best + 1e-6


def test_prediction_extrapolates_the_continuous_metric():
    # y = -3 + 0.5 * log10(N) reaches -0.5 at N = 1e5 exactly
    pts = [(1e2, -2.0), (1e3, -1.5), (1e4, -1.0)]
    p = predict(pts, level=-0.5, higher=True)
    assert p["predicted"] == pytest.approx(1e5, rel=1e-6)
    assert p["low"] == pytest.approx(1e5, rel=1e-3)  # no residuals: no band
    noisy = predict([(1e2, -2.1), (1e3, -1.4), (1e4, -1.05), (1e5, -0.55)], -0.1, True)
    assert noisy["low"] < noisy["predicted"] < noisy["high"]
    assert predict(pts, level=-0.5, higher=False)["predicted"] is None  # wrong direction
    assert predict(pts[:2], -0.5, True) is None


def test_builtin_specs_match_the_corpus_format(tmp_path):
    items = builtin_items("builtin:addition?digits=3&n=20&seed=4")
    assert len(items) == 20 and items == load_items("builtin:addition?digits=3&n=20&seed=4")
    for it in items:
        a, b = it.prompt.removesuffix(" =").split(" + ")
        assert it.target == f" {int(a) + int(b)}" and max(len(a), len(b)) == 3
    story = builtin_items("builtin:story?steps=4&n=5")[0]
    assert story.prompt.endswith("have? A:") and story.target.strip().isdigit()
    older = builtin_items("builtin:older?n=3")[0]
    assert older.is_choice and len(older.choices) == 2
    with pytest.raises(UserError, match="digits must be an integer in 1..5"):
        builtin_items("builtin:addition?digits=9")
    with pytest.raises(UserError, match="unknown built-in family"):
        builtin_items("builtin:algebra")
    for spec in ("builtin:addition?digits=1&digits=2", "tasks:addition?n=2&n=3"):
        with pytest.raises(UserError, match="given twice"):  # the last one used to win
            load_items(spec)
    # n capped like the built-ins' (tasks:addition?n=100000000 ran on for minutes, eating memory)
    with pytest.raises(UserError, match="n must be an integer in 1..100000"):
        load_items("tasks:addition?n=100000000")
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(UserError, match="t.jsonl:2:"):
        jsonl_items(bad)
    bad.write_text('{"prompt": "a", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(UserError, match="t.jsonl:1: \"answer\""):
        jsonl_items(bad)
    # a choice listed twice: the tie goes to the first, so answer 0 was right for any model
    bad.write_text('{"prompt": "a", "choices": [" x", " y"], "answer": 0}\n'
                   '{"prompt": "b", "choices": [" x", " x", " y"], "answer": 0}\n')
    with pytest.raises(UserError, match="t.jsonl:2: \"choices\" lists ' x' twice"):
        jsonl_items(bad)


def test_logistic_calibration_recovers_a_known_curve():
    rng = np.random.default_rng(0)
    x = rng.uniform(-3, 1, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-(4 + 4 * x)))).astype(float)
    a, b = fit_logistic(x, y)
    assert a == pytest.approx(4, rel=0.15) and b == pytest.approx(4, rel=0.15)
    assert fit_logistic(x, np.zeros_like(x)) is None  # one outcome: nothing to calibrate


def test_calibrated_prediction_lands_near_the_true_crossing():
    """Items whose mean log-likelihood rises 0.5 per decade, right with a known logistic
    probability: the prediction from three models falls within 2x of where the true curve
    crosses, inside its band; a flat trend predicts never, with a 'never' band."""
    rng = np.random.default_rng(1)
    offsets = rng.normal(0, 0.4, 300)
    truth = (4.0, 4.0)

    def model(n):
        x = -3 + 0.5 * math.log10(n) + offsets
        y = (rng.random(len(x)) < 1 / (1 + np.exp(-(truth[0] + truth[1] * x)))).astype(float)
        return x, y
    data = [(n, *model(n)) for n in (1e3, 1e4, 1e5)]
    assert max(d[2].mean() for d in data) < 0.8  # all three still fail at 0.8
    cx, cy = np.concatenate([d[1] for d in data]), np.concatenate([d[2] for d in data])
    p = predict_calibrated([(n, x) for n, x, _ in data], cx, cy, 0.8)
    want = 10 ** ((level_for(-3 + offsets, 0.8, *truth) + 3) / 0.5)
    assert want / 2 < p["predicted"] < want * 2
    assert p["low"] <= p["predicted"] <= p["high"]
    flat = [(n, -2 + offsets) for n in (1e3, 1e4, 1e5)]
    q = predict_calibrated(flat, cx, cy, 0.8)
    assert q["predicted"] is None and q["low"] is None and q["high"] is None


def test_backtest_verdicts_treat_never_honestly():
    from scalelab.track.backtest import judge
    assert judge(None, 3e4, 1e5) == "miss (predicted never)"  # it passed: never was wrong
    assert judge(None, None, 1e5) == "hit (no pass yet)"
    assert judge(5e4, None, 1e5) == "miss (predicted a pass that did not come)"
    assert judge(5e4, 3e4, 1e5) == "hit" and judge(1e5, 3e4, 1e5) == "late"


def test_data_groups_split_by_tokenizer_and_corpus(tmp_path):
    from scalelab.track.predict import data_group

    def model(name: str, tok: str, n_docs: int) -> dict:
        (tmp_path / name / "model").mkdir(parents=True)
        (tmp_path / name / "model" / "tokenizer.json").write_text(tok)
        (tmp_path / name / "config.toml").write_text(f"[data]\nn_docs = {n_docs}\n")
        return {"path": str(tmp_path / name / "model")}
    a, b = model("a", "tok1", 100), model("b", "tok1", 100)
    assert data_group(a) == data_group(b)
    assert data_group(model("c", "tok2", 100)) != data_group(a)  # another tokenizer
    assert data_group(model("d", "tok1", 200)) != data_group(a)  # another corpus


def synthetic_ladder(path, seeds: int = 1, threshold: float = 0.8,
                     sizes: tuple = (1e3, 3e3, 1e4, 3e4, 1e5)):
    """Five sizes whose 200 items follow a known logistic curve; with seeds > 1 each size's
    items are split in order between that many registered runs of the size."""
    from scalelab.track.registry import Registry
    reg = Registry(path)
    exp = reg.add_experiment("toy", "builtin:addition?digits=1", "exact_match", threshold)
    # the runs' config: one known corpus, so the seeds of a size share a recipe
    (path.parent / "config.toml").write_text('[data]\nsource = "builtin:world"\n')
    rng = np.random.default_rng(2)
    offsets = rng.normal(0, 0.4, 200)
    for i, n in enumerate(sizes):
        x = -3.2 + 0.6 * math.log10(n) + offsets
        ok = (rng.random(200) < 1 / (1 + np.exp(-(4 + 4 * x)))).astype(float)
        for j, (xs, oks) in enumerate(zip(np.split(x, seeds), np.split(ok, seeds))):
            name = f"m{i}-s{j}" if seeds > 1 else f"m{i}"
            mid = reg.add_model({"name": name, "path": str(path.parent / name), "kind": "x",
                                 "params": int(n), "non_embedding_params": int(n),
                                 "tokens": 20 * int(n)})
            metrics = {"exact_match": oks.mean(), "token_logprob": xs.mean(),
                       "edit_distance": 0.5, "target_tokens": 1.0,
                       "per_item": {"x": xs.tolist(), "ok": oks.tolist(),
                                    "x_is": "token_logprob"}}
            reg.add_result(exp, mid, metrics, oks.mean() >= threshold, [], len(xs), 0.0,
                           "test")
    return reg, exp, offsets


def test_seeds_of_one_size_are_fitted_as_one_point(tmp_path):
    """The same ladder with each size's items split between two seeds: every backtest row
    and verdict equals the one-run ladder's, which holds the pooled items. At 3e4 one seed
    passes 0.76 alone (0.77) and the size does not (0.755). Fitting each seed as its own
    point took 4 runs = 2 sizes as 'the largest 4 models', and the lucky seed's pass as
    the size's."""
    from scalelab.track.backtest import backtest
    from scalelab.track.predict import verdict
    one, _, _ = synthetic_ladder(tmp_path / "one.db", threshold=0.76)
    two, exp, _ = synthetic_ladder(tmp_path / "two.db", seeds=2, threshold=0.76)
    by_name = {m["name"]: two.latest()[(exp, m["id"])] for m in two.models()}
    assert by_name["m3-s0"]["passed"] and not by_name["m3-s1"]["passed"]
    a, b = backtest(one), backtest(two)
    assert [r["k"] for r in a] == [r["k"] for r in b] == [3, 4]
    for ra, rb in zip(a, b):
        for key in ("largest", "predicted", "low", "high", "naive", "quantile", "actual",
                    "verdict", "in_band"):
            same = rb[key] == ra[key] if ra[key] is None or isinstance(ra[key], (str, bool)) \
                else rb[key] == pytest.approx(ra[key], rel=1e-9)
            assert same, (key, ra[key], rb[key])
    # a stored prediction made from the three smallest sizes, judged by the bigger ones
    pred = {"experiment_id": exp, "axis": "params", "n_models": 6, "largest": 1e4,
            "last_model_id": 6, "metric": "token_logprob", "level": -0.1, "predicted": 9e4,
            "low": 5e4, "high": 2e5, "detail": '{"group": null}'}
    two.add_prediction(pred)
    said = verdict(two, two.experiment("toy"), two.predictions(exp)[-1])
    assert said == "passed at 1e+05 (mean of m4-s0, m4-s1): inside the band", said
    # `track status --by-size`: each size's mean is the one-run ladder's pooled value
    from scalelab.track.commands import status
    cells = status(two)["experiments"][0]["by_size"]
    pooled = status(one)["experiments"][0]["results"]
    assert [c["runs"] for c in cells] == [2] * 5
    assert [c["mean"] for c in cells] == pytest.approx([pooled[f"m{i}"]["value"]
                                                        for i in range(5)])
    assert [c["passed"] for c in cells] == [pooled[f"m{i}"]["passed"] for i in range(5)] \
        == [False] * 4 + [True]
    assert cells[3]["max"] == pytest.approx(0.77) and cells[3]["min"] == pytest.approx(0.74)


def test_one_lucky_seed_does_not_end_the_predictions(tmp_path):
    """Up to 3e4 one seed passes 0.76 alone (0.77) while its size does not (0.755): the
    predictions go on, equal to those of the one-run ladder holding the pooled items (any
    passing model used to end an experiment's predictions)."""
    from scalelab.track.predict import record_predictions
    sizes = (1e3, 3e3, 1e4, 3e4)
    one, _, _ = synthetic_ladder(tmp_path / "one.db", threshold=0.76, sizes=sizes)
    two, _, _ = synthetic_ladder(tmp_path / "two.db", seeds=2, threshold=0.76, sizes=sizes)
    assert any(two.latest()[k]["passed"] for k in two.latest())
    a, b = record_predictions(one), record_predictions(two)
    assert [p["axis"] for p in b] == [p["axis"] for p in a] == ["params"]
    for key in ("predicted", "low", "high", "level"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-9), key


def test_backtest_on_a_synthetic_ladder(tmp_path):
    """Five registered 'models' whose items follow a known logistic curve: the backtest
    predicts sizes 4 and 5 from the smaller ones, finds the pass at the fifth, and tables
    both the calibrated and the old ln(X)/L predictions."""
    from scalelab.track.backtest import backtest, markdown
    reg, exp, offsets = synthetic_ladder(tmp_path / "reg.db")
    passing = [m["name"] for m in reg.models()
               if reg.latest()[(exp, m["id"])]["passed"]]
    assert passing == ["m4"]  # the synthetic ladder turns at the largest size
    rows = backtest(reg)
    assert [r["k"] for r in rows] == [3, 4] and all(r["actual"] == 1e5 for r in rows)
    assert all(r["verdict"] in ("hit", "early", "late") for r in rows)
    # the true crossing of 0.8 lies between the ladder's last two sizes; from 4 models the
    # prediction lands within 2x of it (the ladder's own 3.3x step is coarser than that)
    true = 10 ** ((level_for(-3.2 + offsets, 0.8, 4.0, 4.0) + 3.2) / 0.6)
    assert 3e4 < true < 1e5 and true / 2 < rows[1]["predicted"] < true * 2
    table = markdown(rows)
    assert "| toy | 4 (3e+04) |" in table and "old mapping" in table


def test_verdict_never_is_a_miss_when_a_bigger_model_passes(tmp_path):
    import json

    from scalelab.track.predict import verdict
    from scalelab.track.registry import Registry
    reg = Registry(tmp_path / "reg.db")
    exp = reg.add_experiment("toy", "builtin:addition?digits=1", "exact_match", 0.8)
    ids = [reg.add_model({"name": f"m{i}", "path": str(tmp_path / f"m{i}"), "kind": "x",
                          "params": n, "non_embedding_params": n}) for i, n in
           enumerate([100, 1000])]
    for mid, ok in zip(ids, (False, True)):
        reg.add_result(exp, mid, {"exact_match": float(ok)}, ok, [], 1, 0.0, "test")
    group = json.dumps({"group": None})
    base = {"experiment_id": exp, "axis": "params", "n_models": 3, "last_model_id": ids[0],
            "largest": 100.0, "metric": "token_logprob", "level": -0.1, "detail": group}
    for pred, want in [({"predicted": None, "low": None, "high": None}, "a miss"),
                       ({"predicted": 900.0, "low": 500.0, "high": None}, "inside the band"),
                       ({"predicted": 5e3, "low": 3e3, "high": 9e3}, "earlier than predicted")]:
        reg.add_prediction({**base, **pred})
        assert want in verdict(reg, reg.experiment("toy"), reg.predictions(exp)[-1])


def test_margin_quantile_prediction_on_a_linear_ladder():
    """Item margins spread over [-2 + w, 2 + w] with w = 0.5 log10(N): at threshold 0.8 the
    20th-percentile margin is -1.2 + w, which reaches 0 at log10(N) = 2.4; the items are
    right exactly where their margin is > 0. Stored x_is picks which per-item score is read."""
    from scalelab.track.predict import per_item, quantile_prediction
    spread = np.linspace(-2, 2, 101)
    ser = []
    for n in (10.0, 20.0, 40.0, 80.0):
        x = spread + 0.5 * math.log10(n)
        ser.append(({"non_embedding_params": n}, {"metrics": {"per_item": {
            "x": x.tolist(), "ok": (x > 0).astype(float).tolist(), "x_is": "greedy_margin",
            "token_logprob": (x - 5).tolist()}}}))
    p = quantile_prediction({"threshold": 0.8}, ser, "non_embedding_params")
    assert p["predicted"] == pytest.approx(10 ** 2.4, rel=1e-6)
    assert p["low"] == pytest.approx(p["predicted"]) and p["high"] == pytest.approx(p["predicted"])
    x, ok = per_item(ser[0][1])
    assert x[0] == pytest.approx(-2 + 0.5) and per_item(ser[0][1], "token_logprob")[0][0] == \
        pytest.approx(-6.5)
    assert per_item(ser[0][1], "margin") is None  # not stored for this result


def test_predictions_over_results_that_scored_no_item(tmp_path):
    """An lm-eval multiple-choice task none of whose documents can be judged: every
    result has nan metrics and empty per-item lists. Recording predictions (after every
    evaluation, in the report and backtest) crashed: min() of an empty array, SVD of nan."""
    from scalelab.track.backtest import backtest
    from scalelab.track.predict import record_predictions
    from scalelab.track.registry import Registry
    reg = Registry(tmp_path / "reg.db")
    mc = reg.add_experiment("mc", "builtin:older", "mc_accuracy", 0.8)
    brier = reg.add_experiment("mc-brier", "builtin:older", "brier", 0.2)
    nan = float("nan")
    metrics = {"mc_accuracy": nan, "brier": nan, "token_logprob": nan, "acc": 1.0,
               "per_item": {"x": [], "ok": [], "x_is": "margin"}}
    for i, n in enumerate([1e3, 3e3, 1e4, 3e4]):
        mid = reg.add_model({"name": f"m{i}", "path": str(tmp_path / f"m{i}"), "kind": "x",
                             "params": int(n), "non_embedding_params": int(n)})
        for exp in (mc, brier):
            reg.add_result(exp, mid, metrics, False, [], 0, 0.0, "test")
    assert record_predictions(reg) == []  # nothing to fit: no prediction, no error
    rows = backtest(reg)
    assert rows and {r["verdict"] for r in rows} == {"no prediction"}
    assert {r["naive"] for r in rows} == {None}  # the old mapping fitted nan brier: a "pass"


def test_human_counts_round_before_picking_the_unit():
    """999,600 parameters printed as '1e+03k' (the unit was chosen before rounding)."""
    from scalelab.track.ops import human
    got = [human(x) for x in (999, 999.6, 999_600, 1e6, 9.996e11, 123_456, 77_040, 0.5, None)]
    assert got == ["999", "1k", "1M", "1M", "1T", "123k", "77k", "0.5", "-"]


def test_report_caveat_names_a_deleted_model_folder_not_a_corpus_none(tmp_path):
    """A registered model whose folder was deleted made the report claim the models 'were
    pretrained on different corpora (None, builtin:world)'."""
    from scalelab.track.report import scaling_caveat
    base = []
    for i, name in enumerate(("a", "b", "c")):
        run = tmp_path / name
        (run / "model").mkdir(parents=True)
        (run / "config.toml").write_text('[data]\nsource = "builtin:world"\n')
        base.append({"name": name, "path": str(run / "model"), "non_embedding_params": 10 ** i})
    assert scaling_caveat(base, {"E": 1.0}) == ""
    base.append({"name": "old", "path": str(tmp_path / "old" / "model"),
                 "non_embedding_params": 5})
    note = scaling_caveat(base, {"E": 1.0})
    assert "None" not in note and "different corpora" not in note, note
    assert note.startswith("the folders of old are gone"), note
    (tmp_path / "c" / "config.toml").write_text('[data]\nsource = "/data/mine.jsonl"\n')
    assert "different corpora (/data/mine.jsonl, builtin:world)" in scaling_caveat(base, None)


def test_predictions_load_the_results_once(tmp_path, monkeypatch):
    """record_predictions (after every evaluation) loaded and parsed every result once per
    experiment, data group and axis: quadratic in the registry, seconds per `track run` on
    a study's registry. Now once; the predictions are those of per-series loads."""
    from scalelab.track.predict import record_predictions
    from scalelab.track.registry import Registry
    reg = Registry(tmp_path / "reg.db")
    rng = np.random.default_rng(0)
    for e in range(4):
        reg.add_experiment(f"e{e}", "builtin:qa", "token_logprob", -0.1)
    for i, n in enumerate((1e4, 3e4, 1e5, 3e5)):
        mid = reg.add_model({"name": f"m{i}", "path": str(tmp_path / f"m{i}"), "kind": "x",
                             "params": n, "non_embedding_params": n, "tokens": 10 * n,
                             "flops": 60 * n * n})
        for e in range(4):
            reg.add_result(e + 1, mid, {"token_logprob": -3 + 0.3 * i + rng.normal(0, 0.05)},
                           False, [], 1, 0.1, "test")
    calls = []
    real = Registry.latest
    monkeypatch.setattr(Registry, "latest", lambda self: calls.append(1) or real(self))
    made = record_predictions(reg)
    assert len(calls) == 1 and len(made) == 8  # 4 experiments x 2 axes
    monkeypatch.undo()
    from scalelab.track import predict
    for p in made:  # the same numbers as a prediction from the experiment's own series
        exp = reg.experiment(p["experiment"])
        ser = predict.series(reg, exp, p["axis"])
        want = predict.prediction_for(exp, ser, predict.AXES[p["axis"]])[1]
        assert (p["predicted"], p["low"], p["high"]) == (want["predicted"], want["low"],
                                                         want["high"])


def test_an_items_greedy_answer_does_not_depend_on_its_batch():
    """Prompts were cut to leave room for the longest target of their batch of 64: a long
    prompt lost its start when a long-target item shared its batch, and kept it alone. A
    stand-in model answers with the number of prompt tokens it saw."""
    from scalelab.track.evaluate import greedy_answers

    class SeesLength:
        max_len = 32

        def greedy(self, prompts, max_new):
            return [[len(p)] * max_new for p in prompts]

    lm, long_prompt, short_prompt = SeesLength(), list(range(28)), list(range(5))
    alone = greedy_answers(lm, [long_prompt], [2])
    mixed = greedy_answers(lm, [short_prompt, long_prompt, short_prompt], [10, 2, 3])
    assert alone == [[28, 28, 28]]  # 28 prompt + 3 new tokens fit 32: nothing cut
    assert mixed == [[5] * 11, [28, 28, 28], [5] * 4]


def test_a_prompt_ending_in_a_space_is_scored_on_the_texts_own_tokens(tmp_path, tokenizer):
    """'A: ' + 'Oakford' was encoded as ' ', 'O', ...: tokens the model never sees for
    'A: Oakford' (' O' is one BPE piece), so a right answer scored as unlikely. The space
    now starts the target, and the item's tokens are those of the whole text."""
    import json
    f = tmp_path / "t.jsonl"
    rows = [{"prompt": "Q: Where does Mia live? A: ", "target": "Oakford"},
            {"prompt": "Q: Who is older, Mia or Tom?\tA:  ", "choices": ["Mia", "Tom"],
             "answer": 0}]
    f.write_text(json.dumps(rows[0]) + "\n")
    it = jsonl_items(f)[0]
    whole = tokenizer.encode(rows[0]["prompt"] + rows[0]["target"])
    assert tokenizer.encode(it.prompt) + tokenizer.encode(it.target) == whole
    assert (it.prompt, it.target) == ("Q: Where does Mia live? A:", " Oakford")
    f.write_text(json.dumps(rows[1]) + "\n")
    it = jsonl_items(f)[0]
    for raw, choice in zip(rows[1]["choices"], it.choices):
        assert tokenizer.encode(it.prompt) + tokenizer.encode(choice) == \
            tokenizer.encode(rows[1]["prompt"] + raw)


def test_model_remove_takes_a_mistaken_registration_out_of_every_count(tmp_path, capsys):
    """A second registration of one run (a slip: the same seed again) counted twice in
    each size's mean; `track model remove` takes it and its results out, keeps its folder,
    notes it in the experiment's history, and refuses a model that is another's parent."""
    from scalelab.cli import main
    from scalelab.track.commands import status
    reg, exp, _ = synthetic_ladder(tmp_path / "reg.db", seeds=2)
    before = status(reg)["experiments"][0]["by_size"]
    src = reg.model("m4-s1")
    (tmp_path / "dup").mkdir()
    dup = reg.add_model({**dict(src), "name": "dup", "path": str(tmp_path / "dup")})
    r = reg.latest()[(exp, src["id"])]
    reg.add_result(exp, dup, r["metrics"], r["passed"], [], 100, 0.0, "test")
    assert status(reg)["experiments"][0]["by_size"][-1]["runs"] == 3
    args = ["--registry", str(tmp_path / "reg.db")]
    assert main(["track", "model", "remove", "dup", *args]) == 0
    assert "removed model dup and its 1 results" in capsys.readouterr().out
    assert status(reg)["experiments"][0]["by_size"] == before
    assert [m["name"] for m in reg.models()] == [f"m{i}-s{j}" for i in range(5) for j in (0, 1)]
    assert (tmp_path / "dup").is_dir()
    assert reg.history(exp)[-1]["event"] == "model dup removed with its results"
    reg.add_model({**dict(src), "name": "tuned", "path": str(tmp_path / "t"),
                   "lineage": "sft", "parent": "m0-s0"})
    assert main(["track", "model", "remove", "m0-s0", *args]) == 2
    assert "model 'm0-s0' is the parent of 'tuned'" in capsys.readouterr().err
    assert main(["track", "model", "remove", "nope", *args]) == 2
    assert "no model named 'nope'" in capsys.readouterr().err


def test_a_model_registered_after_a_removal_gets_a_new_id(tmp_path):
    """SQLite hands out max(id) + 1: removing the newest model freed its id, the next model
    registered took it, and record_predictions took the new evidence for the old ('same
    n_models, same last_model_id': no new prediction, the removed model's stood)."""
    from scalelab.track import predict
    reg, exp, _ = synthetic_ladder(tmp_path / "reg.db", threshold=0.99)
    first = predict.record_predictions(reg)
    old = dict(reg.model("m4"))
    assert [p["last_model_id"] for p in first] == [old["id"]]
    r = reg.latest()[(exp, old["id"])]
    reg.remove_model("m4")
    new = reg.add_model({**old, "name": "m4", "path": str(tmp_path / "m4b"),
                         "params": 300_000, "non_embedding_params": 300_000})
    assert new != old["id"]
    per_item = {**r["metrics"]["per_item"], "x": [v + 0.5 for v in r["metrics"]["per_item"]["x"]]}
    reg.add_result(exp, new, {**r["metrics"], "per_item": per_item}, False, [], 200, 0.0, "t")
    made = predict.record_predictions(reg)
    e = reg.experiment("toy")
    want = predict.prediction_for(e, predict.series(reg, e, "params"), "non_embedding_params")[1]
    assert [(p["last_model_id"], p["largest"], p["predicted"]) for p in made] == \
        [(new, 300_000, want["predicted"])]


def test_status_by_size_keeps_data_groups_apart(tmp_path, capsys):
    """Two corpora's models at the same N were one 'size' of two runs in `status --by-size`
    (the mean of both judged), while the fits and verdicts keep each data group apart: the
    arithmetic corpus passed at 1e5 and the size showed as failing. The cells of a
    token_logprob range also ran into each other ('-2.50 (-3.00--2.00)' in 17 columns)."""
    from scalelab.track.commands import print_by_size, status
    from scalelab.track.registry import Registry
    reg = Registry(tmp_path / "reg.db")
    exp = reg.add_experiment("t", "builtin:qa", "token_logprob", -0.1)
    value = {}
    for corpus, src, off in (("world", "builtin:world", 0.0), ("arith", "/d/arith.jsonl", 1.0)):
        for i, n in enumerate((1e3, 1e4, 1e5)):
            for seed in (0, 1):
                run = tmp_path / f"{corpus}-{i}-{seed}"
                (run / "model").mkdir(parents=True)
                (run / "config.toml").write_text(f'[data]\nsource = "{src}"\n')
                mid = reg.add_model({"name": run.name, "path": str(run / "model"), "kind": "x",
                                     "params": int(n), "non_embedding_params": int(n),
                                     "tokens": 20 * int(n)})
                value[run.name] = v = -3.0 + i + off + 0.5 * seed
                reg.add_result(exp, mid, {"token_logprob": v}, v >= -0.1, [], 1, 0.0, "t")
    cells = status(reg)["experiments"][0]["by_size"]
    assert [(c["n"], c["runs"]) for c in cells] == [(n, 2) for n in (1e3, 1e3, 1e4, 1e4, 1e5, 1e5)]
    got = {(c["n"], c["models"][0].split("-")[0]): c for c in cells}
    for (n, corpus), c in got.items():
        i = {1000: 0, 10000: 1, 100000: 2}[n]
        pair = [value[f"{corpus}-{i}-{s}"] for s in (0, 1)]
        assert (c["mean"], c["min"], c["max"]) == (sum(pair) / 2, min(pair), max(pair))
        assert c["passed"] == (sum(pair) / 2 >= -0.1)
    assert [n for n, corpus in got if got[n, corpus]["passed"]] == [100000]
    print_by_size(status(reg))
    out = capsys.readouterr().out.splitlines()
    assert out[5] == "S6 = N 100k (tokenizer no-tokenizer, corpus builtin:world n_docs=None " \
                     "seed=0): world-2-0, world-2-1"
    row = out[-2].split()
    assert row[:2] == ["t", ">=-0.1"]
    assert row[2:] == ["-1.75", "(-2.00..-1.50)", "-2.75", "(-3.00..-2.50)", "-0.75",
                       "(-1.00..-0.50)", "-1.75", "(-2.00..-1.50)", "0.25*(0.00..0.50)",
                       "-0.75", "(-1.00..-0.50)"]


def test_a_report_stopped_while_drawing_is_taken_again(tmp_path, monkeypatch):
    """The plots came before report.html, the folder's mark: a Ctrl-C between them left a
    folder of plots that the next `track report --out` into it refused as not its own."""
    from scalelab.cli import main
    from scalelab.track import report
    synthetic_ladder(tmp_path / "reg.db")
    draw = report.save_figure

    def draw_then_stop(fig, path, dpi=110):
        draw(fig, path, dpi)
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "save_figure", draw_then_stop)
    args = ["track", "report", "--out", str(tmp_path / "rep"), "--registry",
            str(tmp_path / "reg.db")]
    assert main(args) == 130
    assert any(p.suffix == ".png" for p in (tmp_path / "rep").iterdir())
    monkeypatch.undo()
    assert main(args) == 0
    assert "<h1>Emergence report</h1>" in (tmp_path / "rep" / "report.html").read_text()
