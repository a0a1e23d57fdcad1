"""What the tracker does, called by the `track` commands, the sweep and the training stages
(`--register`): add experiments, register a model, evaluate models on experiments."""

from __future__ import annotations

import json
import math
from pathlib import Path

from scalelab.config import UserError
from scalelab.track import metrics as M
from scalelab.track.registry import Registry, code_version


def human(x: float | None) -> str:
    if x is None:
        return "-"
    x = float(f"{x:.3g}")  # rounded first: 999,600 is 1M, not 1e+03k
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def add_experiment(reg: Registry, name: str, task: str, threshold: float,
                   metric: str | None = None, note: str = "", exist_ok: bool = False
                   ) -> int | None:
    task, metric = checked_experiment(name, task, threshold, metric)
    return reg.add_experiment(name, task, metric, threshold, note, exist_ok)


# The values a metric can take (an all-or-nothing one: a fraction, 0..1). A threshold out
# of them never passes, or always does: token_logprob >= 0.8 was taken (a log-likelihood is
# at most 0), and the experiment could never pass.
THRESHOLD_RANGE = {
    "token_logprob": (-math.inf, 0.0, "a mean log-likelihood"),
    "brier": (0.0, 2.0, "a Brier score"),
    "perplexity": (1.0, math.inf, "a perplexity"),
    "word_perplexity": (1.0, math.inf, "a perplexity"),
    "byte_perplexity": (1.0, math.inf, "a perplexity"),
    "bits_per_byte": (0.0, math.inf, "bits per byte"),
}


def checked_experiment(name: str, task: str, threshold: float, metric: str | None = None
                       ) -> tuple[str, str]:
    """(task, metric) as an experiment stores them (a file by absolute path, the task's
    default metric), or a UserError saying which of the four is wrong and why."""
    from scalelab.track.lmeval_task import is_lm_eval, metrics_for
    from scalelab.track.specs import is_choice_task
    if not name.strip():
        raise UserError("name must not be empty")
    if not task.strip():  # else read as the file '.': "is a folder; give a .jsonl file"
        raise UserError("task must not be empty (builtin:FAMILY?key=value, tasks:FAMILY or "
                        "a JSONL file)")
    if is_lm_eval(task):  # also finds the task (lm-eval installed, name, include path)
        allowed, default = metrics_for(task)
        kind = "this lm-eval task"
    else:
        choice = is_choice_task(task)  # also validates the spec (file, line, key)
        if not task.startswith(("builtin:", "tasks:")):  # a file: found from any folder later
            task = str(Path(task).resolve())
        allowed = M.CHOICE_METRICS if choice else M.GENERATION_METRICS
        default = "mc_accuracy" if choice else "exact_match"
        kind = "multiple choice" if choice else "generation"
    metric = metric or default
    if metric not in allowed:
        raise UserError(f"metric {metric!r} does not apply to {task!r} "
                        f"({kind}: {', '.join(allowed)})")
    lo, hi, what = THRESHOLD_RANGE.get(metric, (0.0, 1.0, "a fraction"))
    if not math.isfinite(threshold) or not lo <= threshold <= hi:
        raise UserError(f"threshold {threshold:g} is out of range for {metric} ({what}: "
                        f"{lo:g}..{hi:g})")
    return task, metric


def seed_experiments(reg: Registry, log=print) -> list[str]:
    """Add the starter set (graded arithmetic, stories, facts); existing names are kept,
    also one that another process adds meanwhile (two sweeps starting at once). One of
    those names that holds another task or pass rule is said: it, not the built-in, is what
    runs under that name."""
    from scalelab.track.specs import STARTER
    have = {e["name"]: e for e in reg.experiments()}
    for name, task, thr, _ in STARTER:
        e = have.get(name)
        if e is not None and (e["task"], e["metric"], e["threshold"]) != \
                (task, checked_experiment(name, task, thr)[1], thr):  # the default metric
            log(f"kept your experiment {name} ({e['task']}, pass if {e['metric']} "
                f"{M.comparison(e['metric'])} {e['threshold']:g}), not the built-in {name} "
                f"({task}): names are permanent")
    return [name for name, task, thr, note in STARTER
            if name not in have and add_experiment(reg, name, task, thr, None, note,
                                                   exist_ok=True) is not None]


def with_task_files(exps: list, log=print) -> list:
    """The experiments whose JSONL task file (stored by absolute path) still exists; each
    one whose file was deleted is skipped, saying so."""
    from scalelab.track.lmeval_task import PREFIX
    keep = []
    for e in exps:
        if e["task"].startswith(("builtin:", "tasks:", PREFIX)) or Path(e["task"]).is_file():
            keep.append(e)
        else:
            log(f"  skipped experiment {e['name']}: its task file {e['task']} is gone")
    return keep


def evaluate(reg: Registry, models: list, exps: list, log=print,
             skip_stale: bool = False) -> None:
    """Every experiment on every model; each evaluation adds a result row. A model whose
    folder changed since it was registered is refused; with `skip_stale` (`track run` over
    all models) it is skipped where another record now holds that folder's contents (it was
    re-registered), as is a model whose folder is gone."""
    from scalelab.track.evaluate import load_lm, model_info, run_experiment
    from scalelab.track.predict import (
        first_passing,
        fmt,
        judged_together,
        record_predictions,
        runs_label,
        scale_mean,
    )
    version = code_version()
    for m in models:
        if not exps:
            break
        if skip_stale and not Path(m["path"]).is_dir():
            log(f"  skipped {m['name']}: its folder {m['path']} is gone")
            continue
        lm = load_lm(m["path"])
        info = model_info(m["path"], lm)
        newer = next((o["name"] for o in reg.models() if o["path"] == m["path"]
                      and unchanged(o, info)), None) \
            if skip_stale and not unchanged(m, info) else None
        if newer is not None:
            log(f"  skipped {m['name']}: its folder has since been trained further and "
                f"registered as {newer}")
            continue
        check_unchanged(m, info, m["path"])
        # loaded once per model, kept current below (re-reading every result per
        # experiment was quadratic in the registry)
        latest, everyone = reg.latest(), reg.models()
        for e in exps:
            before = first_passing(e, everyone, latest)
            agg, ok, samples, n, secs = run_experiment(lm, e)
            reg.add_result(e["id"], m["id"], agg, ok, samples, n, secs, version)
            latest[(e["id"], m["id"])] = {"metrics": agg, "passed": ok}
            extra = "  ".join(f"{k} {agg[k]:.3f}" for k in agg if k != e["metric"]
                              and k in M.HIGHER_IS_BETTER)
            log(f"  {m['name']:<16} {e['name']:<16} {e['metric']} {agg[e['metric']]:.3f} "
                f"{'PASS' if ok else 'fail'}  ({extra})")
            after = first_passing(e, everyone, latest)
            if runs_label(before) != runs_label(after):  # a pass, or a new seed (or a rerun)
                # pulled a size's mean under the bar: say where the first pass is now
                now = after or next(s for s in judged_together(e, everyone, latest)
                                    if any(w["id"] == m["id"] for w, _ in s))
                said = "first passed by" if after else "no longer passed:"
                value = scale_mean([r for _, r in now], e["metric"])
                reg.add_history(e["id"], f"{said} {runs_label(now)} ({e['metric']} {value:.3f})")
    for p in record_predictions(reg):
        log(f"  prediction: {p['experiment']} passes at {p['axis']} ~ {fmt(p['predicted'])} "
            f"[{fmt(p['low'])} .. {fmt(p['high'])}] (from {p['n_models']} models)")


def unchanged(m, info: dict) -> bool:
    """The folder still holds the model registered as `m` (same parameters and tokens)."""
    return (m["params"], m["tokens"]) == (info["params"], info["tokens"])


def check_unchanged(m, info: dict, path: str | Path) -> None:
    """Refuse a registered model whose folder was trained further since (a resumed run
    rewrites RUN/model in place): its results would be filed under the old record."""
    if not unchanged(m, info):
        was, now = ((human(x["params"]), human(x["tokens"])) for x in (m, info))
        raise UserError(f"{path}: registered as {m['name']!r} with {was[0]} params and {was[1]} "
                        f"tokens, but the folder now holds {now[0]} params and {now[1]} "
                        "tokens (trained further since); register it under a new name: "
                        f"scalelab track model add {path} --name NEW")


STAGE_LINEAGE = {"sft": "sft", "ppo": "rlhf", "dpo": "rlhf"}


def register_model(reg: Registry, path: str | Path, name: str | None = None,
                   lineage: str = "base", parent: str | None = None, run: bool = True,
                   log=print) -> dict:
    """Register a model folder, then run on it every experiment that no model (a size with
    several runs: their mean, predict.first_passing) has passed yet."""
    from scalelab.track.evaluate import load_lm, model_info
    path = Path(path)
    lm = load_lm(path)
    info = model_info(path, lm)
    if name is None:
        name = path.resolve().parent.name if path.name == "model" else path.name
    if not name.strip():  # a column without a heading in status, unnamable in --model
        raise UserError("--name must not be empty")
    record = path.resolve().parent / "lineage.json"  # written by post-training stages
    if lineage == "base" and record.is_file():
        try:
            rec = json.loads(record.read_text())
            lineage = STAGE_LINEAGE.get(rec["stage"], rec["stage"])
            parent = parent or reg.name_of(rec["parent"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{record}: corrupt lineage record") from None
    if parent is not None:
        reg.model(parent)  # must exist
    info.update(name=name, lineage=lineage, parent=parent)
    same = next((m for m in reg.models() if m["name"] == name), None)
    if same is not None and same["path"] == info["path"]:
        # the same folder under the same name: an earlier `model add` (perhaps killed before
        # its evaluations finished); go on with what it lacks instead of refusing, unless
        # the folder was trained further since (a resumed run rewrites RUN/model in place)
        check_unchanged(same, info, path)
        log(f"model {name} is already registered from this folder" +
            (": running what it lacks" if run else " (--no-run: nothing to do)"))
        m = same
    else:
        twin = next((o["name"] for o in reg.models() if o["path"] == info["path"]
                     and unchanged(o, info)), None)
        if twin is not None:  # the same weights twice: every fit would count them twice
            raise UserError(f"{path}: already registered as {twin!r}, with these weights; "
                            f"`scalelab track run --model {twin}` evaluates it again")
        reg.add_model(info)  # refuses a name another folder holds (this one: a racing add)
        m = reg.model(name)
    log(f"registered model {name}: {human(m['params'])} params "
        f"(N = {human(m['non_embedding_params'])}), "
        f"{human(m['tokens'])} tokens, {human(m['flops'])} FLOPs")
    if m["flops"] is None:
        log("  no training tokens or FLOPs known for this folder: reports place it on the "
            "parameter axis only")
    if run and not reg.experiments():
        log("no experiments registered yet, so there was nothing to run: add the "
            "built-in starter set with `scalelab track experiment seed` (or your own with "
            "`scalelab track experiment add`), then `scalelab track run`")
    elif run:
        from scalelab.track.predict import passed_experiments
        passed = passed_experiments(reg, joining=m)
        mine = {r["experiment_id"] for r in reg.results() if r["model_id"] == m["id"]}
        todo = with_task_files([e for e in reg.experiments() if e["id"] not in passed | mine],
                               log)
        log(f"running the {len(todo)} experiments no model (a size: its runs' mean) has "
            f"passed yet ({len(passed)} already passed, skipped)")
        evaluate(reg, [m], todo, log)
    return dict(m)


def ensure_model(reg: Registry, path: Path, name: str, owner: str, **kw) -> dict:
    """The model registered as `name` from this folder, registered now (without evaluations)
    if new. A name that another folder holds is refused: `owner` is the config key that
    chose the name (sweep.name, study.name)."""
    known = {m["name"]: m for m in reg.models()}
    if name not in known:
        return register_model(reg, path, name, run=False, **kw)
    if Path(known[name]["path"]) != path.resolve():
        raise UserError(f"{reg.path}: a different model is already registered as {name!r}; "
                        f"change {owner}")
    return dict(known[name])
