"""Backtest the pass predictions on a registered ladder: predict from the k smallest sizes
of a data group only, then look at what the bigger ones did.

    scalelab track backtest --registry runs/sweep/registry.db --out docs/backtest.md

For each all-or-nothing experiment and each k >= 3 at which it still failed on all k sizes
(the runs of one size with other seeds are one size: their items pooled, their mean judged):
the calibrated prediction (predict.py) and, beside it, from the same k sizes: the same
calibration on each item's greedy margin instead of its log-likelihood, the margin-quantile
fit (predict.quantile_prediction), and the mapping the calibration replaced (exact match X
<-> mean token log-likelihood ln(X)/L, accuracy X <-> the Brier level of X). A row is a
hit when the first passing model lies within 2x of the predicted size (parameters N); a
prediction of "never" is a hit when no bigger model passes. Since the true crossing lies
anywhere between the last failing and the first passing size, each row also says whether
the prediction falls in that bracket.
"""

from __future__ import annotations

import math

from scalelab.track import metrics as M
from scalelab.track.predict import (
    by_scale,
    data_group,
    fmt,
    pooled_calibration,
    predict,
    prediction_for,
    quantile_prediction,
    scale_mean,
    scale_passed,
    series,
)


def naive_prediction(exp, ser: list[tuple[dict, dict]]) -> float | None:
    """The old mapping: the mean continuous metric reaches the level that exact match X
    'should' have if every token were sampled independently (ln(X)/L), or the Brier score
    of a model with accuracy X."""
    if exp["metric"] == "mc_accuracy":
        k = round(ser[-1][1]["metrics"].get("n_choices", 2))
        metric, level = "brier", M.brier_pass_level(exp["threshold"], k)
    else:
        length = M.mean([r["metrics"].get("target_tokens", 1.0) for _, r in ser]) or 1.0
        metric, level = "token_logprob", math.log(max(exp["threshold"], 1e-9)) / length
    pts = [(s, v) for s, rs in by_scale(ser, "non_embedding_params")
           if math.isfinite(v := scale_mean(rs, metric))]  # nan: nothing scored
    p = predict(pts, level, M.HIGHER_IS_BETTER[metric])
    return None if p is None else p["predicted"]


def judge(predicted: float | None, actual: float | None, largest: float) -> str:
    """hit / early / late / miss: within 2x of the first passing size, or 'never' and
    indeed no pass up to the largest model."""
    if actual is None:
        if predicted is None or predicted > largest:
            return "hit (no pass yet)"
        return "miss (predicted a pass that did not come)"
    if predicted is None:
        return "miss (predicted never)"
    ratio = predicted / actual
    return "hit" if 0.5 <= ratio <= 2 else ("late" if ratio > 2 else "early")


def backtest(reg) -> list[dict]:
    rows = []
    exps = [e for e in reg.experiments() if e["metric"] in M.ALL_OR_NOTHING]
    latest, models = reg.latest(), reg.models()  # once: each load parses every result
    for group in sorted({data_group(m) for m in models if m["lineage"] == "base"}):
        every = {e["id"]: series(reg, e, "params", group, latest, models)
                 for e in reg.experiments()}
        for exp in exps:
            ser = every[exp["id"]]
            scales = by_scale(ser, "non_embedding_params")  # seeds of one size: one scale
            sizes = [s for s, _ in scales]
            first_pass = next((i for i, (_, rs) in enumerate(scales)
                               if scale_passed(exp, rs)), None)
            for k in range(3, len(scales)):
                if first_pass is not None and first_pass < k:
                    break  # already passing within the k sizes: nothing left to predict
                sub = [(m, r) for m, r in ser if m["non_embedding_params"] <= sizes[k - 1]]
                ids = {m["id"] for m, _ in sub}
                pooled = pooled_calibration(
                    [[(m, r) for m, r in s if m["id"] in ids] for s in every.values()])
                out = prediction_for(exp, sub, "non_embedding_params", pooled)
                p = out[1] if out else None
                # the same calibration on the greedy margin (generation only)
                gm = prediction_for(exp, sub, "non_embedding_params", pooled,
                                    "greedy_margin") if out and out[0] == "token_logprob" \
                    else out
                gm = gm[1]["predicted"] if gm and gm[1] else None
                q = quantile_prediction(exp, sub, "non_embedding_params")
                q = q and q["predicted"]
                naive = naive_prediction(exp, sub)
                actual = sizes[first_pass] if first_pass is not None else None
                rows.append({
                    "group": group, "experiment": exp["name"], "k": k, "largest": sizes[k - 1],
                    "predicted": p and p["predicted"], "low": p and p["low"],
                    "high": p and p["high"], "calibrated_on":
                        p and p["detail"].get("calibrated_on"),
                    "naive": naive, "actual": actual,
                    "margin": gm, "margin_verdict": judge(gm, actual, sizes[-1]),
                    "quantile": q, "quantile_verdict": judge(q, actual, sizes[-1]),
                    "top": sizes[-1], "verdict": "no prediction" if p is None else
                    judge(p["predicted"], actual, sizes[-1]),
                    "naive_verdict": judge(naive, actual, sizes[-1]),
                    "in_band": None if p is None or actual is None else
                    bool((p["low"] or math.inf) <= actual <= (p["high"] or math.inf)),
                    "in_bracket": None if p is None or actual is None else
                    bool(sizes[first_pass - 1] < (p["predicted"] or math.inf) <= actual),
                })
    return rows


def markdown(rows: list[dict]) -> str:
    def n(v):
        return "-" if v is None else fmt(v)
    out = [] if rows else [
        "No rows: nothing to backtest. A row needs an all-or-nothing experiment still failing "
        "on the k >= 3 smallest sizes of base models of one tokenizer and corpus, with a "
        "bigger one evaluated after them (so at least 4 such sizes).", ""]
    for group in sorted({r["group"] for r in rows}):
        out += [f"Models: {group}", "",
                "| experiment | from k sizes (up to N) | predicted N | band (10-90%) | "
                "first pass | verdict | between last fail and first pass | "
                "greedy-margin calibration | its verdict | margin quantile | its verdict | "
                "old mapping | its verdict |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in (r for r in rows if r["group"] == group):
            first = n(r["actual"]) if r["actual"] else f"none up to {r['top']:.3g}"
            band = "" if r["in_band"] is None else \
                (", in band" if r["in_band"] else ", outside band")
            out.append(f"| {r['experiment']} | {r['k']} ({r['largest']:.3g}) | "
                       f"{n(r['predicted'])} | {n(r['low'])} .. {n(r['high'])} | {first} | "
                       f"{r['verdict']}{band} | "
                       f"{'-' if r['in_bracket'] is None else 'yes' if r['in_bracket'] else 'no'}"
                       f" | {n(r['margin'])} | {r['margin_verdict']} "
                       f"| {n(r['quantile'])} | {r['quantile_verdict']} "
                       f"| {n(r['naive'])} | {r['naive_verdict']} |")
        out.append("")
    scored = [r for r in rows if r["verdict"] != "no prediction"]
    with_pass = [r for r in scored if r["actual"] is not None]
    for label, key in (("Calibrated (log-likelihood)", "verdict"),
                       ("Greedy-margin calibration", "margin_verdict"),
                       ("Margin quantile", "quantile_verdict"), ("Old mapping", "naive_verdict")):
        out.append(f"{label}: {sum(r[key].startswith('hit') for r in scored)} of {len(scored)} "
                   "predictions hit (within 2x of the first passing size, or 'no pass' where "
                   f"none came); of the {len(with_pass)} rows of experiments that did pass "
                   f"later, {sum(r[key] == 'hit' for r in with_pass)} within 2x.")
        out.append("")
    return "\n".join(out) + "\n"
