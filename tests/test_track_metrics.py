"""Tracker metrics and fits on hand-computed examples."""

import math

import pytest

from scalelab.config import UserError
from scalelab.track import metrics as M
from scalelab.track.predict import fit_power_law, predict
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
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(UserError, match="t.jsonl:2:"):
        jsonl_items(bad)
    bad.write_text('{"prompt": "a", "choices": ["x", "y"], "answer": 2}\n')
    with pytest.raises(UserError, match="t.jsonl:1: \"answer\""):
        jsonl_items(bad)
