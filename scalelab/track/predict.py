"""Fits: when will a failing experiment pass, and the loss scaling law L(N) = E + A / N^alpha.

Prediction. The all-or-nothing metric jumps, so it is useless to extrapolate; a continuous one
moves smoothly with log(scale). What links them is measured, not assumed: every evaluation
keeps each item's right/wrong next to its continuous score: for generation the answer's mean
token log-likelihood (the greedy margin is stored beside it, see CALIBRATE_ON), for multiple
choice the answer's log-likelihood margin over the best other choice.
From the registered models of the group a logistic fit gives P(item right | score). Then

  1. the mean item score is fitted against log10(scale) on the largest FIT_POINTS models;
  2. at a larger scale every item of the largest model moves up by the fitted change of the
     mean (the spread of easy and hard items is kept), and the calibrated curve turns the
     items into an expected pass rate;
  3. the prediction is the first scale where that rate reaches the threshold, searched up to
     HORIZON decades beyond the largest model; not reached there: "never".

The band (10th..90th percentile) comes from a bootstrap that redraws the items, the
calibration pairs and the trend's residuals together; a draw that never crosses counts as
infinitely late, so a band can end in "never" (and start there: then any pass is a miss).
Experiments on a continuous metric skip the calibration: their own line reaches their own
threshold. Only models that share a tokenizer and a corpus are fitted together (data_group).
"""

from __future__ import annotations

import hashlib
import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from scalelab.config import tomllib
from scalelab.track import metrics as M

FIT_POINTS = 4
BOOTSTRAP = 200
HORIZON = 3.0  # decades of scale searched beyond the largest model
AXES = {"params": "non_embedding_params", "flops": "flops"}
ITEM_SCORES = ("greedy_margin", "token_logprob", "margin")  # what per_item["x"] can be
# Generation items store their greedy margin, which predicts right/wrong almost perfectly
# but extrapolates worse than the answer's mean log-likelihood (backtested on the CPU sweep,
# docs/emergence.md): predictions calibrate on the log-likelihood.
CALIBRATE_ON = {"greedy_margin": "token_logprob"}


# ---- which models may share a fit ---------------------------------------------------------

def run_data(model_dir: Path) -> dict | None:
    """The [data] section of the run a model folder sits in (RUN/config.toml), None when
    there is no readable one (an imported folder, say)."""
    cfg = model_dir.parent / "config.toml"
    try:
        return tomllib.loads(cfg.read_text()).get("data", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None


def corpus_source(model_dir: Path) -> str | None:
    """data.source the model was pretrained on, None when unknown."""
    d = run_data(model_dir)
    return None if d is None else d.get("source", "builtin:world")


UNKNOWN_CORPUS = "unknown corpus"  # no RUN/config.toml: an imported folder, say


@lru_cache(maxsize=512)
def _group_of(path: str) -> str:
    model = Path(path)
    tok = next((model / f for f in ("tokenizer.json", "tokenizer_config.json")
                if (model / f).is_file()), None)
    tok_id = hashlib.sha256(tok.read_bytes()).hexdigest()[:10] if tok else "no-tokenizer"
    data = UNKNOWN_CORPUS
    d = run_data(model)
    if d is not None:
        src = d.get("source", "builtin:world")
        data = f"{src} n_docs={d.get('n_docs')} seed={d.get('seed', 0)}" \
            if src.startswith("builtin:") else Path(src).name
        if not src.startswith("builtin:") and Path(src).is_file():
            data += f" ({Path(src).stat().st_size} bytes)"
    return f"tokenizer {tok_id}, corpus {data}"


def data_group(model: dict) -> str:
    """Models whose losses and scores may be fitted together: the same tokenizer (file
    hash) and the same pretraining corpus (from RUN/config.toml)."""
    return _group_of(str(model["path"]))


def series(reg, exp, axis: str, group: str | None = None, latest: dict | None = None,
           models: list | None = None) -> list[tuple[dict, dict]]:
    """(model row, newest result) for base models that have a value on this axis, of one
    data group when given. A caller that asks for many series passes reg.latest() and
    reg.models() once: each load parses every result (record_predictions loaded them once
    per experiment, group and axis: quadratic in the registry's size)."""
    latest = reg.latest() if latest is None else latest
    out = []
    for m in reg.models() if models is None else models:
        r = latest.get((exp["id"], m["id"]))
        if r is not None and m["lineage"] == "base" and m[AXES[axis]] and \
                (group is None or data_group(m) == group):
            out.append((dict(m), r))
    return sorted(out, key=lambda mr: mr[0][AXES[axis]])


def by_scale(ser: list[tuple[dict, dict]], col: str) -> list[tuple[float, list[dict]]]:
    """(scale, its results) per distinct scale, smallest first: the runs of one size with
    other seeds (`sweep.seeds`) share a scale, and every fit takes one point per scale."""
    out: dict[float, list[dict]] = {}
    for m, r in ser:
        out.setdefault(m[col], []).append(r)
    return sorted(out.items())


def scale_mean(results: list[dict], metric: str) -> float:
    """The mean of a metric over the seeds at one scale, its finite values only (nan when
    none: a task nothing could score)."""
    values = [r["metrics"].get(metric) for r in results]
    return M.mean([v for v in values if v is not None and math.isfinite(v)])


def scale_passed(exp, results: list[dict]) -> bool:
    """A scale passes when its seeds do on average: the mean of their metric (their items
    pooled, for all-or-nothing metrics scored on as many items each). One run passes as
    it was judged."""
    if len(results) == 1:
        return bool(results[0]["passed"])
    return M.passes(scale_mean(results, exp["metric"]), exp["threshold"], exp["metric"])


def judged_key(m) -> tuple:
    """Models with one key pass or fail as one (judged_together): the runs of one recipe,
    i.e. base models of one size (N), token budget and known data group, which differ in
    their seed (`sweep.seeds`). Any other model is judged alone: a post-trained one, an
    imported one (nothing says what it was trained on), one trained further."""
    group = data_group(m)
    if m["lineage"] == "base" and m["tokens"] and not group.endswith(UNKNOWN_CORPUS):
        return (m["non_embedding_params"], m["tokens"], group)
    return (m["non_embedding_params"], m["id"])


def judged_together(exp, models: list, latest: dict) -> list[list[tuple[dict, dict]]]:
    """(model, newest result on `exp`) in the sets that pass or fail as one (judged_key),
    smallest N first: the workflow's "passed" (which experiments `model add` still runs,
    the first passing size of `status` and the report) and `status --by-size` judge these.
    The fits and verdicts take one point per value of their axis in a data group
    (by_scale), the same sets for a ladder of seeds."""
    sets: dict[tuple, list] = {}
    for m in models:
        if (r := latest.get((exp["id"], m["id"]))) is not None:
            sets.setdefault(judged_key(m), []).append((dict(m), r))
    return sorted(sets.values(), key=lambda s: (s[0][0]["non_embedding_params"], s[0][0]["id"]))


def runs_label(runs: list[tuple[dict, dict]] | None) -> str | None:
    """A set of (model, result) runs by name: the model's own, or 'mean of a, b'."""
    if runs is None:
        return None
    names = [m["name"] for m, _ in runs]
    return names[0] if len(names) == 1 else f"mean of {', '.join(names)}"


def first_passing(exp, models: list, latest: dict) -> list[tuple[dict, dict]] | None:
    """The smallest set of runs (judged_together) that passes `exp`, None if none does."""
    return next((s for s in judged_together(exp, models, latest)
                 if scale_passed(exp, [r for _, r in s])), None)


def passed_experiments(reg, joining=None) -> set[int]:
    """Experiments that a size (the mean of its runs) or a post-trained model passes, on
    the newest evaluations. With `joining` (a model about to be evaluated), a pass by the
    set it joins does not count: a new seed of a size that passed is evaluated, since its
    result may undo the pass."""
    latest, models = reg.latest(), reg.models()
    if joining is not None:
        models = [m for m in models if judged_key(m) != judged_key(joining)]
    return {e["id"] for e in reg.experiments() if first_passing(e, models, latest)}


def pooled_items(results: list[dict], x_is: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """per_item of the seeds at one scale, concatenated; None if none stores items."""
    data = [d for r in results if (d := per_item(r, x_is)) is not None]
    if not data:
        return None
    return np.concatenate([d[0] for d in data]), np.concatenate([d[1] for d in data])


# ---- calibration: P(right | continuous item score) ----------------------------------------

def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> tuple[float, float] | None:
    """(a, b) of P(y=1) = sigmoid(a + b x) by Newton's method; None unless both outcomes
    occur. A small ridge keeps perfectly separated data finite."""
    if len(x) < 4 or y.min() == y.max():
        return None
    X = np.stack([np.ones_like(x), x], 1)
    w = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-np.clip(X @ w, -30, 30)))
        grad = X.T @ (p - y) + ridge * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return (float(w[0]), float(w[1])) if w[1] > 0 else None


def per_item(result: dict, x_is: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(item scores, right/wrong) of a result; x_is picks another stored item score (a
    generation result keeps token_logprob beside its greedy margin)."""
    pi = result["metrics"].get("per_item")
    if not pi:
        return None
    x = pi["x"] if x_is in (None, pi.get("x_is", "token_logprob")) else pi.get(x_is)
    if not x:  # none stored, or no item scored (lm-eval documents none of which could be judged)
        return None
    return np.asarray(x, dtype=float), np.asarray(pi["ok"], dtype=float)


def item_score_kind(result: dict) -> str:
    return result["metrics"]["per_item"].get("x_is", "token_logprob")


def pass_rate(items: np.ndarray, shift: float, a: float, b: float) -> float:
    return float(np.mean(1 / (1 + np.exp(-np.clip(a + b * (items + shift), -30, 30)))))


def level_for(items: np.ndarray, threshold: float, a: float, b: float) -> float:
    """The mean item score at which the calibrated pass rate reaches the threshold (items
    shifted together): bisection on the shift."""
    lo, hi = -100.0, 100.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if pass_rate(items, mid, a, b) >= threshold else (mid, hi)
    return float(items.mean() + hi)


def calibrated_crossing(xs: np.ndarray, means: np.ndarray, items: np.ndarray,
                        calib: tuple[float, float], threshold: float) -> float:
    """log10 scale where the shifted items reach the threshold; inf if not within HORIZON."""
    slope, _ = np.polyfit(xs, means, 1)
    if slope <= 0:
        return math.inf
    need = level_for(items, threshold, *calib) - items.mean()  # shift still needed
    at = xs[-1] + max(0.0, need) / slope
    return float(at) if at <= xs[-1] + HORIZON else math.inf


def predict_calibrated(points: list[tuple[float, np.ndarray]], calib_x: np.ndarray,
                       calib_y: np.ndarray, threshold: float, seed: int = 0) -> dict | None:
    """points: (scale, item scores) per model, smallest first; calibration pairs pooled over
    those models. None if fewer than 3 scales or the calibration has one outcome only."""
    pts = sorted(points, key=lambda p: p[0])[-FIT_POINTS:]
    calib = fit_logistic(calib_x, calib_y)
    if len({p[0] for p in pts}) < 3 or calib is None:
        return None
    xs = np.log10([p[0] for p in pts])
    means = np.array([p[1].mean() for p in pts])
    items = pts[-1][1]
    best = calibrated_crossing(xs, means, items, calib, threshold)
    b, a = np.polyfit(xs, means, 1)
    resid = (means - (a + b * xs)) * math.sqrt(len(xs) / max(1, len(xs) - 2))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(BOOTSTRAP):
        ys = a + b * xs + rng.choice(resid, len(xs))
        it = rng.choice(items, len(items))
        k = rng.integers(0, len(calib_x), len(calib_x))
        c = fit_logistic(calib_x[k], calib_y[k]) or calib
        boots.append(calibrated_crossing(xs, ys, it, c, threshold))
    lo = float(np.percentile(boots, 10, method="lower"))
    hi = float(np.percentile(boots, 90, method="higher"))
    detail = {"method": "calibrated", "slope_per_decade": float(b), "intercept": float(a),
              "calibration": list(calib), "fit_scales": [p[0] for p in pts],
              "fit_values": [float(v) for v in means],
              "never_fraction": float(np.mean(np.isinf(boots)))}
    return {"predicted": exp10(best), "low": exp10(lo), "high": exp10(hi),
            "level": level_for(items, threshold, *calib), "detail": detail}


def exp10(v: float) -> float | None:
    return None if not math.isfinite(v) else 10.0 ** v


# ---- a continuous metric against its own threshold ----------------------------------------

def crossing(xs: np.ndarray, ys: np.ndarray, level: float, higher: bool) -> float:
    """log10 scale where the least-squares line through (log10 x, y) reaches level; inf if
    it does not improve or only beyond HORIZON."""
    b, a = np.polyfit(xs, ys, 1)
    if (b <= 0 if higher else b >= 0):
        return math.inf
    at = max(float(xs[-1]), float((level - a) / b))
    return at if at <= xs[-1] + HORIZON else math.inf


def predict(points: list[tuple[float, float]], level: float, higher: bool,
            seed: int = 0) -> dict | None:
    """points: (scale, continuous metric) of the models so far. None if fewer than 3."""
    pts = sorted(p for p in points if p[0] and p[0] > 0)[-FIT_POINTS:]
    if len({p[0] for p in pts}) < 3:
        return None
    xs = np.log10([p[0] for p in pts])
    ys = np.array([p[1] for p in pts], dtype=float)
    best = crossing(xs, ys, level, higher)
    b, a = np.polyfit(xs, ys, 1)
    resid = (ys - (a + b * xs)) * math.sqrt(len(xs) / max(1, len(xs) - 2))
    rng = np.random.default_rng(seed)
    boots = [crossing(xs, a + b * xs + rng.choice(resid, len(xs)), level, higher)
             for _ in range(BOOTSTRAP)]
    lo = float(np.percentile(boots, 10, method="lower"))
    hi = float(np.percentile(boots, 90, method="higher"))
    detail = {"method": "direct", "slope_per_decade": float(b), "intercept": float(a),
              "fit_scales": [p[0] for p in pts], "fit_values": [p[1] for p in pts]}
    return {"predicted": exp10(best), "low": exp10(lo), "high": exp10(hi), "level": level,
            "detail": detail}


def pooled_calibration(serieses: list[list[tuple[dict, dict]]]
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Calibration pairs of every experiment in these series, per kind of item score."""
    pooled = {}
    for x_is in ITEM_SCORES:
        xs, ys = [np.zeros(0)], [np.zeros(0)]
        for ser in serieses:
            for _, r in ser:
                d = per_item(r, x_is)
                if d is not None:
                    xs.append(d[0])
                    ys.append(d[1])
        pooled[x_is] = np.concatenate(xs), np.concatenate(ys)
    return pooled


def prediction_for(exp, ser: list[tuple[dict, dict]], col: str,
                   pooled: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                   x_is: str | None = None) -> tuple[str, dict] | None:
    """(metric, prediction) from the (model, result) series of one data group. The
    calibration uses this experiment's own items; if they are all wrong (or all right), the
    pooled pairs of every experiment with the same kind of item score (pooled[x_is]). The
    item score: mean token log-likelihood for generation, the log-likelihood margin for
    multiple choice, unless x_is names another one the results store (greedy_margin)."""
    scales = by_scale(ser, col)
    if exp["metric"] in M.CONTINUOUS:
        pts = [(s, v) for s, rs in scales
               if math.isfinite(v := scale_mean(rs, exp["metric"]))]  # nan: nothing scored
        return exp["metric"], predict(pts, exp["threshold"], M.HIGHER_IS_BETTER[exp["metric"]])
    stored = next((item_score_kind(r) for _, r in reversed(ser)
                   if r["metrics"].get("per_item")), None)
    metric = x_is or CALIBRATE_ON.get(stored, stored)
    data = [(s, d) for s, rs in scales if (d := pooled_items(rs, metric)) is not None]
    if not data:
        return None
    x = np.concatenate([d[0] for _, d in data])
    y = np.concatenate([d[1] for _, d in data])
    source = "this experiment"
    if y.min() == y.max() and pooled and metric in pooled:
        (x, y), source = pooled[metric], "pooled over experiments"
    p = predict_calibrated([(s, d[0]) for s, d in data], x, y, exp["threshold"])
    if p is not None:
        p["detail"]["calibrated_on"] = source
    return metric, p


def quantile_prediction(exp, ser: list[tuple[dict, dict]], col: str) -> dict | None:
    """Pass at threshold t means at least a fraction t of the items have a margin above 0,
    i.e. the (1 - t) quantile of the item margins is above 0 (exactly so for greedy and
    multiple-choice margins, which are > 0 where the item is right). So fit that quantile
    itself against log10(scale) and find where it reaches 0: no calibration curve, and no
    assumption that hard items move as fast as the mean."""
    pts = []
    for s, rs in by_scale(ser, col):
        d = pooled_items([r for r in rs if r["metrics"].get("per_item")
                          and item_score_kind(r) in ("greedy_margin", "margin")])
        if d is not None:
            pts.append((s, float(np.quantile(d[0], 1 - exp["threshold"]))))
    p = predict(pts, 0.0, True)
    if p is not None:
        p["detail"]["method"] = "margin quantile"
    return p


def record_predictions(reg) -> list[dict]:
    """A new prediction row for each experiment and data group whose evidence changed and
    none of whose sizes passes yet (judged as the verdicts and backtest judge a size: the
    mean of its runs, so one lucky seed does not end the predictions)."""
    latest, models, made = reg.latest(), reg.models(), []
    groups = sorted({data_group(m) for m in models if m["lineage"] == "base"})
    pooled = {g: pooled_calibration([series(reg, e, "params", g, latest, models)
                                     for e in reg.experiments()]) for g in groups}
    for exp in reg.experiments():
        for group in groups:
            for axis, col in AXES.items():
                ser = series(reg, exp, axis, group, latest, models)
                if len(ser) < 3 or any(scale_passed(exp, rs) for _, rs in by_scale(ser, col)):
                    continue
                out = prediction_for(exp, ser, col, pooled[group])
                if out is None or out[1] is None:
                    continue
                metric, p = out
                last = max(m["id"] for m, _ in ser)
                if any(q["axis"] == axis and q["n_models"] == len(ser)
                       and q["last_model_id"] == last for q in reg.predictions(exp["id"])):
                    continue  # same evidence, same prediction: don't add a duplicate row
                row = {"experiment_id": exp["id"], "axis": axis, "n_models": len(ser),
                       "last_model_id": last, "largest": max(m[col] for m, _ in ser),
                       "metric": metric, "level": p["level"], "predicted": p["predicted"],
                       "low": p["low"], "high": p["high"],
                       "detail": json.dumps({**p["detail"], "group": group})}
                reg.add_prediction(row)
                made.append({**row, "experiment": exp["name"]})
    return made


def verdict(reg, exp, pred, latest: dict | None = None, models: list | None = None) -> str:
    """How a stored prediction fared against the models that came after it (same group).
    None as a bound is "never": a pass with a 'never' low end is a miss, not a hit."""
    col = AXES[pred["axis"]]
    group = json.loads(pred["detail"]).get("group")
    later = [(m, r) for m, r in series(reg, exp, pred["axis"], group, latest, models)
             if m[col] > pred["largest"]]
    if not later:
        return "no bigger model yet"
    won = [s for s, rs in by_scale(later, col) if scale_passed(exp, rs)]
    lo = math.inf if pred["low"] is None else pred["low"]
    hi = math.inf if pred["high"] is None else pred["high"]
    if won:
        x = won[0]
        who = runs_label([(m, r) for m, r in later if m[col] == x])
        if pred["predicted"] is None:
            return f"passed at {x:.3g} ({who}) although predicted never: a miss"
        where = "inside the band" if lo <= x <= hi else \
            ("earlier than predicted" if x < lo else "later than predicted")
        return f"passed at {x:.3g} ({who}): {where}"
    top = max(m[col] for m, _ in later)
    if top > hi:
        return f"still failing at {top:.3g}, beyond the band: too optimistic"
    return f"still failing at {top:.3g}, below the predicted {fmt(pred['predicted'])}: consistent"


def fmt(v: float | None) -> str:
    return f"never (not within 10^{HORIZON:g}x)" if v is None else f"{v:.3g}"


# ---- the loss scaling law ---------------------------------------------------------------

def fit_power_law(n: list[float], loss: list[float]) -> dict | None:
    """Least squares for L(N) = E + A * N^-alpha: a grid over alpha, and for each alpha the
    best (E, A) by linear least squares with E >= 0 and A >= 0, then a finer grid around the
    best alpha. E is the loss no size removes, a cross-entropy: never below 0. Unbounded, a
    few short runs whose loss still falls faster at the larger sizes were fitted with
    alpha -> 0 and a meaningless E (L(N) = -326.7 + 335.6 / N^0.001)."""
    if len(set(n)) < 3:  # a curve in N needs at least three different N
        return None
    N, L = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)

    def squared_error(E: float, A: float, x: np.ndarray) -> float:
        return float(((E + A * x - L) ** 2).sum())

    def solve(alpha: float) -> tuple[float, float, float]:
        x = N ** -alpha
        (E, A), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1), L, rcond=None)
        if E < 0 or A < 0:  # the optimum lies on a bound: the best of the two edges
            edges = [(0.0, max(0.0, float(x @ L / (x @ x)))),  # E = 0
                     (max(0.0, float(L.mean())), 0.0)]  # A = 0: a flat line
            E, A = min(edges, key=lambda ea: squared_error(*ea, x))
        return squared_error(E, A, x), float(E), float(A)

    grid = np.linspace(0.01, 2.0, 200)
    best = min(grid, key=lambda a: solve(a)[0])
    fine = np.linspace(max(0.001, best - 0.01), best + 0.01, 201)
    alpha = float(min(fine, key=lambda a: solve(a)[0]))
    sse, E, A = solve(alpha)
    return {"E": E, "A": A, "alpha": alpha, "rmse": math.sqrt(sse / len(N)),
            "n": [float(x) for x in N], "loss": [float(x) for x in L]}
