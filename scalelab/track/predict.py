"""Fits: when will a failing experiment pass, and the loss scaling law L(N) = E + A / N^alpha.

Prediction. The all-or-nothing metric jumps, so it is useless to extrapolate; the continuous
one moves smoothly (if Schaeffer et al. are right), so fit it against log10(scale) and ask
where the fitted line reaches the continuous level that goes with the threshold:
  exact match >= X     <->  mean token log-likelihood >= ln(X) / L   (exact ~ p_token^L)
  mc accuracy >= X     <->  Brier <= brier_pass_level(X, choices)
  a continuous metric  ->   its own threshold
The line is fitted on the largest FIT_POINTS base models (the recent trend matters most) and
the band comes from a residual bootstrap (10th..90th percentile of the crossing).
"""

from __future__ import annotations

import json
import math

import numpy as np

from scalelab.track import metrics as M

FIT_POINTS = 4
BOOTSTRAP = 400
AXES = {"params": "non_embedding_params", "flops": "flops"}


def continuous_target(exp, results: list[dict]) -> tuple[str, float]:
    """(continuous metric, level at which the experiment should pass)."""
    metric, x = exp["metric"], exp["threshold"]
    if metric in M.CONTINUOUS:
        return metric, x
    if metric == "mc_accuracy":
        k = results[-1]["metrics"].get("n_choices", 2) if results else 2
        return "brier", M.brier_pass_level(x, round(k))
    length = M.mean([r["metrics"].get("target_tokens", 1.0) for r in results]) or 1.0
    return "token_logprob", math.log(max(x, 1e-9)) / length


def crossing(xs: np.ndarray, ys: np.ndarray, level: float, higher: bool) -> float | None:
    """log10 scale where the least-squares line through (log10 x, y) reaches level."""
    b, a = np.polyfit(xs, ys, 1)
    if (b <= 0 if higher else b >= 0):
        return None  # not improving with scale: no crossing ahead
    return float((level - a) / b)


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
    resid = ys - (a + b * xs)
    resid *= math.sqrt(len(xs) / max(1, len(xs) - 2))  # undo the fit's shrinkage
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(BOOTSTRAP):
        c = crossing(xs, a + b * xs + rng.choice(resid, len(xs)), level, higher)
        boots.append(1e3 if c is None else c)  # "never": beyond any scale (see exp10)
    lo, hi = np.percentile(boots, [10, 90])
    detail = {"slope_per_decade": float(b), "intercept": float(a),
              "fit_scales": [p[0] for p in pts], "fit_values": [p[1] for p in pts]}
    exp10 = lambda v: None if v is None or not math.isfinite(v) or v > 300 else 10.0 ** v
    return {"predicted": exp10(best), "low": exp10(lo), "high": exp10(hi), "detail": detail}


def series(reg, exp, axis: str) -> list[tuple[dict, dict]]:
    """(model row, newest result) for base models that have a value on this axis."""
    latest = reg.latest()
    out = []
    for m in reg.models():
        r = latest.get((exp["id"], m["id"]))
        if r is not None and m["lineage"] == "base" and m[AXES[axis]]:
            out.append((dict(m), r))
    return sorted(out, key=lambda mr: mr[0][AXES[axis]])


def record_predictions(reg) -> list[dict]:
    """A new prediction row for each still-failing experiment whose evidence changed."""
    passed, made = reg.passed_experiment_ids(), []
    for exp in reg.experiments():
        if exp["id"] in passed:
            continue
        for axis, col in AXES.items():
            ser = series(reg, exp, axis)
            if len(ser) < 3:
                continue
            metric, level = continuous_target(exp, [r for _, r in ser])
            pts = [(m[col], r["metrics"].get(metric)) for m, r in ser
                   if r["metrics"].get(metric) is not None]
            p = predict(pts, level, M.HIGHER_IS_BETTER[metric])
            if p is None:
                continue
            last = max(m["id"] for m, _ in ser)
            if any(q["axis"] == axis and q["n_models"] == len(ser) and q["last_model_id"] == last
                   for q in reg.predictions(exp["id"])):
                continue  # same evidence, same prediction: don't add a duplicate row
            row = {"experiment_id": exp["id"], "axis": axis, "n_models": len(ser),
                   "last_model_id": last, "largest": max(m[col] for m, _ in ser),
                   "metric": metric, "level": level, "predicted": p["predicted"],
                   "low": p["low"], "high": p["high"], "detail": json.dumps(p["detail"])}
            reg.add_prediction(row)
            made.append({**row, "experiment": exp["name"]})
    return made


def verdict(reg, exp, pred) -> str:
    """How a stored prediction fared against the models that came after it."""
    col = AXES[pred["axis"]]
    later = [(m, r) for m, r in series(reg, exp, pred["axis"]) if m[col] > pred["largest"]]
    if not later:
        return "no bigger model yet"
    won = [m for m, r in later if r["passed"]]
    lo, hi = pred["low"] or 0.0, pred["high"] or math.inf
    if won:
        x = won[0][col]
        where = "inside the band" if lo <= x <= hi else \
            ("earlier than predicted" if x < lo else "later than predicted")
        return f"passed at {x:.3g} ({won[0]['name']}): {where}"
    top = max(m[col] for m, _ in later)
    if top > hi:
        return f"still failing at {top:.3g}, beyond the band: too optimistic"
    return f"still failing at {top:.3g}, below the predicted {fmt(pred['predicted'])}: consistent"


def fmt(v: float | None) -> str:
    return "never (no upward trend)" if v is None else f"{v:.3g}"


# ---- the loss scaling law ---------------------------------------------------------------

def fit_power_law(n: list[float], loss: list[float]) -> dict | None:
    """Least squares for L(N) = E + A * N^-alpha: a grid over alpha, and for each alpha the
    best (E, A) by linear least squares (A >= 0), then a finer grid around the best alpha."""
    if len(set(n)) < 3:  # a curve in N needs at least three different N
        return None
    N, L = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)

    def solve(alpha: float) -> tuple[float, float, float]:
        X = np.stack([np.ones_like(N), N ** -alpha], 1)
        (E, A), *_ = np.linalg.lstsq(X, L, rcond=None)
        if A < 0:  # loss rising with N: clamp to a flat line
            E, A = L.mean(), 0.0
        return float(((E + A * N ** -alpha - L) ** 2).sum()), float(E), float(A)

    grid = np.linspace(0.01, 2.0, 200)
    best = min(grid, key=lambda a: solve(a)[0])
    fine = np.linspace(max(0.001, best - 0.01), best + 0.01, 201)
    alpha = float(min(fine, key=lambda a: solve(a)[0]))
    sse, E, A = solve(alpha)
    return {"E": E, "A": A, "alpha": alpha, "rmse": math.sqrt(sse / len(N)),
            "n": [float(x) for x in N], "loss": [float(x) for x in L]}
