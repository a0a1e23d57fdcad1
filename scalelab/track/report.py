"""`scalelab track report`: one HTML page with PNG plots, readable straight from disk.

For each experiment: the all-or-nothing metric and the continuous ones against parameters N
(the tracker's one N: track/evaluate.py model_info) and training FLOPs; the first
(smallest) passing model; for a still-failing one, the newest prediction of where it passes
(line, level and band drawn in); and how every earlier prediction fared once bigger models
arrived. Loss fits and predictions pool only models of one tokenizer and corpus.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from scalelab.config import UserError
from scalelab.io import atomic_write, atomic_write_text
from scalelab.track import metrics as M
from scalelab.track.predict import (
    AXES,
    by_scale,
    corpus_source,
    data_group,
    first_passing,
    fit_power_law,
    fmt,
    record_predictions,
    runs_label,
    scale_mean,
    series,
    verdict,
)

# the report's title, also what marks a folder as one `track report` wrote (check_folder)
REPORT_MARK = b"<title>scalelab emergence report</title>"
AXIS_LABEL = {"params": "parameters N", "flops": "training FLOPs (6ND)"}


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A PNG written whole or not at all (a full disk mid-write keeps the last one)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("the report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def experiment_plot(plt, exp, ser: dict, preds: dict, path: Path) -> None:
    """2 rows (params, FLOPs) x 3 panels (all-or-nothing, log-likelihood, edit/Brier)."""
    choice = exp["metric"] in ("mc_accuracy", "brier")
    cols = ["mc_accuracy" if choice else "exact_match", "token_logprob",
            "brier" if choice else "edit_distance"]
    if exp["metric"] not in cols:  # an lm-eval metric (acc, bits_per_byte, ...): first panel
        cols[0] = exp["metric"]
    present = [a for a in AXES if ser[a]]  # models without a run folder have no FLOPs
    fig, axes = plt.subplots(len(present), 3, figsize=(13, 3.3 * len(present)), squeeze=False)
    for row, axis in enumerate(present):
        pts = ser[axis]
        for col, metric in enumerate(cols):
            ax = axes[row][col]
            xs = [m[AXES[axis]] for m, _ in pts]
            ys = [r["metrics"].get(metric, math.nan) for _, r in pts]
            ax.set_title(metric, fontsize=9)
            if not any(math.isfinite(y) for y in ys):  # e.g. nan: an lm-eval task that
                # scored no item; a log axis with no point on it cannot be drawn
                ax.text(0.5, 0.5, "no finite value", ha="center", transform=ax.transAxes)
                continue
            color = "C0" if col == 0 else "C1"
            means = by_scale(pts, AXES[axis])  # a line through each size's mean over seeds
            ax.plot([x for x, _ in means], [scale_mean(rs, metric) for _, rs in means], "-",
                    color=color)
            ax.plot(xs, ys, "o", color=color)
            for (_, r), x, y in zip(pts, xs, ys):
                if r["passed"] and col == 0:
                    ax.plot([x], [y], "o", color="C2", ms=9)
            if metric == exp["metric"]:
                ax.axhline(exp["threshold"], ls="--", color="C3", lw=1, label="pass level")
            p = preds.get(axis)
            if p is not None and p["metric"] == metric:
                d = json.loads(p["detail"])
                ax.axhline(p["level"], ls=":", color="C3", lw=1, label="pass level (fit)")
                lo_x = min(d["fit_scales"])
                hi_x = max([max(d["fit_scales"])] + [v for v in (p["predicted"], p["high"])
                                                     if v and v < 1e6 * max(d["fit_scales"])])
                line = [lo_x * (hi_x / lo_x) ** (i / 20) for i in range(21)]
                cap = 0.0 if metric == "token_logprob" else math.inf  # log-probs stay <= 0
                ax.plot(line, [min(cap, d["intercept"] + d["slope_per_decade"] * math.log10(x))
                               for x in line], "-", color="C4", lw=1, label="fit")
                if p["predicted"]:
                    ax.axvline(p["predicted"], color="C4", lw=1)
                    ax.axvspan(p["low"] or p["predicted"], min(p["high"] or hi_x, hi_x),
                               color="C4", alpha=0.15, label="predicted pass (band)")
            ax.set_xscale("log")
            if row == len(present) - 1:
                ax.set_xlabel(AXIS_LABEL[axis] if col == 1 else "")
            ax.tick_params(labelsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        axes[row][0].set_ylabel(f"vs {axis}")
    fig.suptitle(f"{exp['name']}: {exp['task']}", fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def overview_plot(plt, exps, sers: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, e in enumerate(exps):
        pts = sers[e["id"]]["params"]
        if not pts:
            continue
        scales = by_scale(pts, "non_embedding_params")  # the mean over seeds per size
        xs = [x for x, _ in scales]
        main = "mc_accuracy" if e["metric"] in ("mc_accuracy", "brier") else "exact_match"
        style = {"color": plt.cm.tab20(i % 20), "ls": "-" if i < 20 else "--",
                 "marker": "o", "label": e["name"]}
        axes[0].plot(xs, [scale_mean(rs, main) for _, rs in scales], **style)
        axes[1].plot(xs, [scale_mean(rs, "token_logprob") for _, rs in scales], **style)
    for ax, t in zip(axes, ["exact match / accuracy", "mean target-token log-likelihood"]):
        ax.set_xscale("log")
        ax.set_xlabel("parameters N")
        ax.set_title(t)
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def scaling_plot(plt, fit: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(fit["n"], fit["loss"], "o", label="final validation loss")
    lo, hi = min(fit["n"]), max(fit["n"]) * 4
    xs = [lo * (hi / lo) ** (i / 40) for i in range(41)]
    ax.plot(xs, [fit["E"] + fit["A"] * x ** -fit["alpha"] for x in xs], "-",
            label=f"L = {fit['E']:.2f} + {fit['A']:.3g} / N^{fit['alpha']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("validation loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


def esc(x) -> str:
    return html.escape(str(x))


def scaling_caveat(base: list[dict], scaling: dict | None) -> str:
    """Why L(N) was not fitted, or why the fits and predictions may not mean much."""
    sizes = {m["non_embedding_params"] for m in base}
    notes = []
    if scaling is None and len(base) >= 2 and len(sizes) < 3:
        notes.append(f"no L(N) fit: the {len(base)} pretrained models have {len(sizes)} "
                     "distinct size(s); a curve in N needs at least three.")
    gone = [m["name"] for m in base if not Path(m["path"]).is_dir()]
    if gone:  # not "different corpora (None, ...)": nothing says which corpus they had
        notes.append(f"the folders of {', '.join(gone)} are gone, so their tokenizer and "
                     "corpus are unknown: no fit or prediction pools them with the others.")
    corpora = {corpus_source(Path(m["path"])) for m in base if m["name"] not in gone}
    if len(corpora) > 1:
        names = ", ".join(sorted(c or "unknown" for c in corpora))
        notes.append(f"these models were pretrained on different corpora ({names}): their "
                     "validation losses are on different text, so each corpus gets its own "
                     "L(N) fit and its own predictions below.")
    return " ".join(notes)


def write_report(reg, out: Path, models: list[str] | None = None,
                 scaling: dict | None = None) -> Path:
    """out/report.html plus PNGs beside it. `models` limits the page to those names."""
    plt = pyplot()
    record_predictions(reg)  # make sure the newest evidence has a prediction on file
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "report.html").exists():  # the page first, as the folder's mark: a run
        # stopped while drawing the plots leaves a folder the next run takes as its own
        atomic_write_text(out / "report.html", "<!doctype html><html><head>"
                          + REPORT_MARK.decode() + "</head><body>being written</body></html>")
    keep = set(models) if models else None
    mods = [dict(m) for m in reg.models() if keep is None or m["name"] in keep]
    mods.sort(key=lambda m: (m["non_embedding_params"], m["id"]))
    # Losses in nats/token compare only under one tokenizer and corpus: one fit per group.
    base = [m for m in mods if m["lineage"] == "base" and m["val_loss"] is not None]
    if scaling is None:
        fits = []
        for group in sorted({data_group(m) for m in base}):
            ms = [m for m in base if data_group(m) == group]
            fit = fit_power_law([m["non_embedding_params"] for m in ms],
                                [m["val_loss"] for m in ms])
            if fit:
                fits.append((group, fit))
    else:
        fits = [("the sweep's models (one tokenizer and corpus)", scaling)]
    caveat = scaling_caveat(base, fits[0][1] if fits else None)
    exps = reg.experiments()
    latest = reg.latest()
    all_models = reg.models()
    sers = {e["id"]: {a: [(m, r) for m, r in series(reg, e, a, None, latest, all_models)
                          if keep is None or m["name"] in keep] for a in AXES} for e in exps}

    parts = ["<!doctype html><html><head><meta charset='utf-8'>" + REPORT_MARK.decode()
             + "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:2px 6px;text-align:right}td.l,th.l{text-align:left}.p{background:#cfc}"
             "img{max-width:100%}</style></head><body><h1>Emergence report</h1>",
             f"<p>Registry <code>{esc(reg.path)}</code>: {len(exps)} experiments, "
             f"{len(mods)} models.</p>"]
    for i, (group, scaling) in enumerate(fits):
        png = "scaling.png" if i == 0 else f"scaling{i}.png"
        scaling_plot(plt, scaling, out / png)
        parts.append(f"<h2>Scaling law</h2><p>Models of {esc(group)}. Least-squares fit of "
                     f"final validation loss on N (parameters, a tied embedding counted "
                     f"once) over {len(scaling['n'])} models: "
                     f"<b>L(N) = {scaling['E']:.3f} + {scaling['A']:.4g} / "
                     f"N^{scaling['alpha']:.3f}</b> (rmse {scaling['rmse']:.4f}).</p>"
                     f"<img src='{png}'>")
    if caveat:
        parts.append(f"<p><b>Caveat:</b> {esc(caveat)}</p>")
    parts.append("<h2>Status</h2><table><tr><th class=l>experiment</th><th>pass if</th>" +
                 "".join(f"<th>{esc(m['name'])}<br>{m['non_embedding_params']:.3g}</th>"
                         for m in mods) + "<th class=l>first passing</th></tr>")
    first = {}  # experiment id -> the smallest passing size (its runs' mean) or model
    for e in exps:
        if (won := first_passing(e, mods, latest)) is not None:
            first[e["id"]] = runs_label(won)
        cells = ""
        for m in mods:
            r = latest.get((e["id"], m["id"]))
            if r is None:
                cells += "<td></td>"
                continue
            cells += (f"<td class='{'p' if r['passed'] else ''}'>"
                      f"{r['metrics'][e['metric']]:.2f}</td>")
        parts.append(f"<tr><td class=l><a href='#e{e['id']}'>{esc(e['name'])}</a></td>"
                     f"<td>{esc(e['metric'])} {M.comparison(e['metric'])} "
                     f"{e['threshold']:g}</td>{cells}"
                     f"<td class=l>{esc(first.get(e['id'], 'not yet'))}</td></tr>")
    parts.append("</table><p>Green: the run passes (newest evaluation); first passing: the "
                 "smallest model, or size of several runs by their mean. Columns: models, with "
                 "parameter counts N, smallest first.</p>")
    untrained = [m["name"] for m in mods if m["flops"] is None]
    if untrained:  # e.g. imported Hugging Face folders: nothing says what they were trained on
        parts.append(f"<p>No training tokens or FLOPs known for {esc(', '.join(untrained))}: "
                     "these models are placed on the parameter axis only.</p>")
    if any(sers[e["id"]]["params"] for e in exps):
        overview_plot(plt, exps, sers, out / "overview.png")
        parts.append("<h2>All experiments against size</h2><img src='overview.png'>")

    for e in exps:
        preds = reg.predictions(e["id"])
        newest = {p["axis"]: p for p in preds}
        parts.append(f"<h2 id='e{e['id']}'>{esc(e['name'])}</h2><p><code>{esc(e['task'])}"
                     f"</code>: pass if {esc(e['metric'])} "
                     f"{M.comparison(e['metric'])} {e['threshold']:g}. "
                     f"{esc(e['note'])}</p>")
        if sers[e["id"]]["params"]:
            img = f"exp{e['id']}.png"
            experiment_plot(plt, e, sers[e["id"]], newest, out / img)  # for a passed one: the
            # last prediction before it passed, drawn beside what happened
            parts.append(f"<img src='{img}'>")
        parts.append(f"<p><b>First passing model:</b> {esc(first.get(e['id'], 'none yet'))}</p>")
        if e["id"] not in first:
            for axis, p in newest.items():
                group = json.loads(p["detail"]).get("group", "")
                parts.append(f"<p><b>Prediction ({AXIS_LABEL[axis]}; {esc(group)}):</b> "
                             "passes at "
                             f"{fmt(p['predicted'])} (band {fmt(p['low'])} .. {fmt(p['high'])}),"
                             f" from {p['n_models']} models up to {p['largest']:.3g}; "
                             f"{esc(p['metric'])} must reach {p['level']:.3f}.</p>")
            if not newest and e["metric"] in M.ALL_OR_NOTHING and \
                    len(sers[e["id"]]["params"]) >= 3:
                parts.append("<p><b>Prediction:</b> none: no model of its group has answered "
                             "an item right yet, so nothing links the continuous scores to "
                             "passing (predict.py calibrates on such items).</p>")
        if preds:
            parts.append("<table><tr><th class=l>made</th><th>axis</th><th>models</th>"
                         "<th>largest then</th><th>predicted pass</th><th>band</th>"
                         "<th class=l>what happened</th></tr>")
            for p in preds:
                parts.append(f"<tr><td class=l>{esc(p['time'])}</td><td>{p['axis']}</td>"
                             f"<td>{p['n_models']}</td><td>{p['largest']:.3g}</td>"
                             f"<td>{fmt(p['predicted'])}</td><td>{fmt(p['low'])} .. "
                             f"{fmt(p['high'])}</td><td class=l>"
                             f"{esc(verdict(reg, e, p, latest, all_models))}</td></tr>")
            parts.append("</table>")
        big = sers[e["id"]]["params"][-1] if sers[e["id"]]["params"] else None
        if big and big[1]["samples"]:
            parts.append(f"<p>Sample outputs of {esc(big[0]['name'])}:</p><ul>" + "".join(
                f"<li><code>{esc(s['prompt'][-70:])}</code> &rarr; <code>{esc(s['output'])}"
                f"</code> (want <code>{esc(s['target'])}</code>)</li>"
                for s in big[1]["samples"][:3]) + "</ul>")
    parts.append("</body></html>")
    atomic_write_text(out / "report.html", "\n".join(parts))
    return out / "report.html"
