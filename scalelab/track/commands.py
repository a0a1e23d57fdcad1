"""`scalelab track ...` and `scalelab sweep`: registered on the main parser by `register`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from scalelab.config import UserError
from scalelab.track import metrics as M
from scalelab.track.ops import (
    checked_experiment,
    evaluate,
    human,
    register_model,
    seed_experiments,
    with_task_files,
)
from scalelab.track.registry import Registry, registry_path


def open_registry(args: argparse.Namespace, create: bool = True) -> Registry:
    """The registry; for a command that only reads it (create=False), one that does not
    exist yet is shown empty, said on stderr, and not made: `track status` in the wrong
    folder used to leave an empty scalelab-registry.db there, which a later `model add`
    from that folder then filled instead of the real one."""
    path = registry_path(getattr(args, "registry", None))
    if create or path.exists():
        return Registry(path)
    print(f"scalelab: no registry at {path} yet (nothing registered here; another folder's? "
          "pass --registry FILE or set SCALELAB_REGISTRY)", file=sys.stderr)
    reg = Registry(":memory:")  # the empty view, with the path it was asked for in messages
    reg.path = path
    return reg


# ---- experiments ---------------------------------------------------------------------------

def cmd_experiment_add(args: argparse.Namespace) -> None:
    from scalelab.track.lmeval_task import make_spec
    if args.lm_eval is None and (args.include_path is not None or args.limit is not None):
        raise UserError("--include-path and --limit go with --lm-eval")
    task = args.task if args.lm_eval is None else \
        make_spec(args.lm_eval, args.include_path, args.limit)
    # checked before the registry is opened: a refused experiment creates no registry file
    task, metric = checked_experiment(args.name, task, args.threshold, args.metric)
    reg = open_registry(args)
    reg.add_experiment(args.name, task, metric, args.threshold, args.note)
    e = reg.experiment(args.name)
    print(f"added experiment {e['name']}: {e['task']}, pass if {e['metric']} "
          f"{M.comparison(e['metric'])} {e['threshold']}")


def cmd_experiment_seed(args: argparse.Namespace) -> None:
    added = seed_experiments(open_registry(args))
    print(f"added {len(added)} built-in experiments" + (": " + ", ".join(added) if added else ""))


def cmd_experiment_list(args: argparse.Namespace) -> None:
    from scalelab.track.predict import passed_experiments
    reg = open_registry(args, create=False)
    passed = passed_experiments(reg)
    for e in reg.experiments():
        print(f"{e['name']:<18} {'passed' if e['id'] in passed else 'not yet':<8} "
              f"{e['metric']} {M.comparison(e['metric'])} {e['threshold']:<5} {e['task']}")


def cmd_experiment_show(args: argparse.Namespace) -> None:
    from scalelab.track.predict import fmt, verdict
    reg = open_registry(args, create=False)
    e = reg.experiment(args.name)
    print(f"{e['name']}: {e['task']}\n  pass if {e['metric']} "
          f"{M.comparison(e['metric'])} {e['threshold']}"
          f"\n  note: {e['note'] or '-'}\n  created {e['created']}\nhistory:")
    for h in reg.history(e["id"]):
        print(f"  {h['time']}  {h['event']}")
    print("results (every evaluation, oldest first):")
    for r in reg.results(e["id"]):
        vals = "  ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items() if k != "per_item")
        print(f"  {r['time']}  {r['model']:<16} {'PASS' if r['passed'] else 'fail'}  {vals}  "
              f"[{r['code_version']}]")
        if r["samples"]:
            s = r["samples"][0]
            print(f"      e.g. {s['prompt']!r} -> {s['output']!r} (want {s['target']!r})")
    for p in reg.predictions(e["id"]):
        print(f"prediction {p['time']} from {p['n_models']} models ({p['axis']}): passes at "
              f"{fmt(p['predicted'])} [{fmt(p['low'])} .. {fmt(p['high'])}] -> "
              f"{verdict(reg, e, p)}")


# ---- models and runs ----------------------------------------------------------------------

def check_register_name(args: argparse.Namespace) -> None:
    """A training stage's `--register`, before it trains: the registry path can hold one,
    and the name the model will get (its --out folder's) is not another folder's. That was
    refused only after training, with advice (--name) the stage does not take."""
    from scalelab.track.registry import check_path
    path = registry_path(getattr(args, "registry", None))
    check_path(path)
    if not path.is_file():
        return
    out = Path(args.out).resolve()
    reg = Registry(path)
    try:
        row = next((m for m in reg.models() if m["name"] == out.name), None)
    finally:
        reg.close()
    if row is not None and row["path"] != str(out / "model"):
        raise UserError(f"--register: {path} already holds a model named {out.name!r} (from "
                        f"{row['path']}), the name this run would get from its --out folder; "
                        "choose another --out, or train without --register and add it with "
                        "`scalelab track model add OUT/model --name NEW`")


def register_output(args: argparse.Namespace, out: Path, lineage: str,
                    parent: str | None = None) -> None:
    """A training stage's `--register`: its parent is whichever registered model lives at
    the stage's --base/--policy folder (if any)."""
    reg = open_registry(args)
    register_model(reg, out, lineage=lineage, parent=reg.name_of(parent) if parent else None)


def cmd_model_add(args: argparse.Namespace) -> None:
    register_model(open_registry(args), args.dir, args.name, args.lineage, args.parent,
                   run=not args.no_run)


def cmd_model_list(args: argparse.Namespace) -> None:
    for m in open_registry(args, create=False).models():
        print(f"{m['name']:<18} {m['kind']:<8} {m['lineage']:<5} params {human(m['params']):>6}"
              f"  N {human(m['non_embedding_params']):>6}  tokens {human(m['tokens']):>6}"
              f"  FLOPs {human(m['flops']):>6}  pretrain val_loss "
              f"{'-' if m['val_loss'] is None else format(m['val_loss'], '.3f')}  {m['path']}")


def cmd_model_remove(args: argparse.Namespace) -> None:
    reg = open_registry(args, create=False)
    path = reg.model(args.name)["path"]
    n = reg.remove_model(args.name)
    print(f"removed model {args.name} and its {n} results from {reg.path} (its folder {path} "
          "is untouched)")


def cmd_run(args: argparse.Namespace) -> None:
    reg = open_registry(args, create=False)
    # `--model ""` (an unset shell variable) is a name that is not there, not "every model"
    models = [reg.model(args.model)] if args.model is not None else reg.models()
    exps = [reg.experiment(args.experiment)] if args.experiment is not None \
        else reg.experiments()
    if args.failed_only:
        from scalelab.track.predict import passed_experiments
        passed = passed_experiments(reg)
        exps = [e for e in exps if e["id"] not in passed]
    if args.experiment is None:  # named with --experiment, a deleted task file is refused
        exps = with_task_files(exps)
    print(f"running {len(exps)} experiments on {len(models)} models")
    evaluate(reg, models, exps, skip_stale=args.model is None)


def status(reg: Registry) -> dict:
    from scalelab.track.predict import first_passing, judged_together, runs_label
    latest = reg.latest()
    models = sorted(reg.models(), key=lambda m: (m["non_embedding_params"], m["id"]))
    out = {"models": [{k: m[k] for k in ("name", "params", "non_embedding_params", "tokens",
                                         "flops", "lineage")} for m in models],
           "experiments": [], "not_yet": []}
    for e in reg.experiments():
        cells = {}
        for m in models:
            r = latest.get((e["id"], m["id"]))
            if r is not None:
                value = r["metrics"][e["metric"]]  # nan (a task nothing could score): null,
                # since strict JSON (jq, browsers, the serve API) has no NaN
                cells[m["name"]] = {"value": value if math.isfinite(value) else None,
                                    "passed": bool(r["passed"])}
        # a size with several runs passes by their mean, not by its luckiest seed
        first = runs_label(first_passing(e, models, latest))
        out["experiments"].append({"name": e["name"], "task": e["task"], "metric": e["metric"],
                                   "threshold": e["threshold"], "results": cells,
                                   # '<=0.2' for distances: the threshold alone hid which side
                                   "pass_rule": M.comparison(e["metric"])
                                   + format(e["threshold"], "g"),
                                   "first_passing_model": first,
                                   "by_size": size_cells(e, judged_together(e, models, latest))})
        if first is None:
            out["not_yet"].append(e["name"])
    return out


def size_cells(e, sets: list[list[tuple[dict, dict]]]) -> list[dict]:
    """One cell per size of base models (predict.judged_together: one N, token budget and
    data group): its runs, the mean, lowest and highest value over them, and whether the
    size passes."""
    from scalelab.track.predict import data_group, judged_key, scale_passed
    cells = []
    for mrs in sets:
        m0, rs = mrs[0][0], [r for _, r in mrs]
        if m0["lineage"] != "base":
            continue
        values = [v for r in rs if math.isfinite(v := r["metrics"][e["metric"]])]
        cells.append({"n": m0["non_embedding_params"], "group": data_group(m0),
                      "key": list(judged_key(m0)),
                      "models": [m["name"] for m, _ in mrs],
                      "runs": len(rs), "mean": None if not values else M.mean(values),
                      "min": min(values, default=None), "max": max(values, default=None),
                      "passed": scale_passed(e, rs)})
    return cells


def cmd_status(args: argparse.Namespace) -> None:
    s = status(open_registry(args, create=False))
    if args.json:
        print(json.dumps(s, indent=2))
        return
    if args.by_size:
        print_by_size(s)
        return
    names = [m["name"] for m in s["models"]]
    for i, m in enumerate(s["models"], 1):
        print(f"M{i} = {m['name']} (N = {human(m['non_embedding_params'])} params, "
              f"{human(m['flops'])} FLOPs, {m['lineage']})")
    rules = [e["pass_rule"] for e in s["experiments"]]
    # columns as wide as their longest entry plus a space: a study's experiment names
    # (instruct-cpu:compare_numbers) ran into the metric at a fixed width
    wn = max([17] + [len(e["name"]) for e in s["experiments"]]) + 1
    wm = max([12] + [len(e["metric"]) for e in s["experiments"]]) + 1
    wr = max([8] + [len(r) for r in rules])
    print(f"{'experiment':<{wn}}{'metric':<{wm}}{'pass at':>{wr}} "
          + "".join(f"{'M' + str(i):>8}" for i in range(1, len(names) + 1)) + "  first passing")
    for e, rule in zip(s["experiments"], rules):
        cells = ""
        for n in names:
            c = e["results"].get(n)
            cells += f"{'':>8}" if c is None else f"{'nan ':>8}" if c["value"] is None else \
                f"{format(c['value'], '.2f') + ('*' if c['passed'] else ' '):>8}"
        print(f"{e['name']:<{wn}}{e['metric']:<{wm}}{rule:>{wr}} {cells}  "
              f"{e['first_passing_model'] or 'not yet'}")
    print("(* = this run passes; first passing: the smallest model, or size by its runs' "
          "mean)  not yet passed: " + (", ".join(s["not_yet"]) or "none"))


def print_by_size(s: dict) -> None:
    """`track status --by-size`: base models, one column per size (and data group); a size
    of several runs (sweep seeds) shows their mean and range."""
    names: dict[tuple, dict] = {}  # a size's key (predict.judged_key) -> its runs' names
    where: dict[tuple, tuple] = {}  # -> (N, data group)
    for e in s["experiments"]:
        for c in e["by_size"]:
            names.setdefault(tuple(c["key"]), {}).update(dict.fromkeys(c["models"]))
            where[tuple(c["key"])] = (c["n"], c["group"])
    cols = sorted(names, key=lambda k: (where[k][0], str(k)))
    several = len({where[k][1] for k in cols}) > 1
    for i, k in enumerate(cols, 1):
        n, g = where[k]
        print(f"S{i} = N {human(n)}{f' ({g})' if several else ''}: {', '.join(names[k])}")

    def text(c: dict | None) -> str:
        if c is None:
            return ""
        if c["mean"] is None:
            return "nan "
        spread = f"({c['min']:.2f}..{c['max']:.2f})" if c["min"] != c["max"] else ""
        return f"{c['mean']:.2f}{'*' if c['passed'] else ' '}{spread}"

    rows = [[text(next((c for c in e["by_size"] if tuple(c["key"]) == k), None))
             for k in cols] for e in s["experiments"]]
    wn = max([17] + [len(e["name"]) for e in s["experiments"]]) + 1
    wr = max([8] + [len(e["pass_rule"]) for e in s["experiments"]])
    width = max([7] + [len(t) for row in rows for t in row]) + 1
    print(f"{'experiment':<{wn}}{'pass at':>{wr}} "
          + "".join(f"{'S' + str(i):>{width}}" for i in range(1, len(cols) + 1)))
    for e, row in zip(s["experiments"], rows):
        print(f"{e['name']:<{wn}}{e['pass_rule']:>{wr}} " + "".join(f"{t:>{width}}" for t in row))
    print("(* = the size passes: the mean over its runs; (low..high) = the range over runs)")


def cmd_report(args: argparse.Namespace) -> None:
    from scalelab.track.report import REPORT_MARK, write_report
    from scalelab.train.rundir import check_folder
    check_folder(Path(args.out), "report.html", "track report", REPORT_MARK)
    path = write_report(open_registry(args, create=False), Path(args.out))
    print(f"report written to {path}")


BACKTEST_MARK = "<!-- written by `scalelab track backtest`; a rerun replaces this file -->\n"


def cmd_backtest(args: argparse.Namespace) -> None:
    from scalelab.io import atomic_write_text
    from scalelab.track.backtest import backtest, markdown
    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UserError(f"--out {out}: " + ("is a folder; name a file" if out.is_dir() else
                                            f"folder {out.parent} does not exist"))
    if out is not None and out.exists() and not out.read_bytes().startswith(
            BACKTEST_MARK.encode()):  # replace only a file this command wrote
        raise UserError(f"--out {out}: exists and is not a backtest this command wrote; name "
                        "a new file (no file of yours is replaced)")
    text = markdown(backtest(open_registry(args, create=False)))
    print(text)
    if out is not None:
        atomic_write_text(out, BACKTEST_MARK + text)


def cmd_sweep(args: argparse.Namespace) -> None:
    from scalelab.config import resolve_config_path
    from scalelab.track.sweep import PLAN, check_plan, load_sweep, run_sweep
    from scalelab.train.rundir import check_folder
    check_folder(Path(args.out), PLAN, "sweep")
    config = resolve_config_path(args.config)  # a file, or a preset name: sweep-cpu
    base, opts = load_sweep(config)
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds {args.seeds}: must be >= 1 (runs per size)")
        opts["seeds"] = args.seeds
    # bad config, or another one than --out was made with: refused before the registry
    # is opened
    check_plan(Path(args.out), base, opts)
    run_sweep(config, base, opts, Path(args.out), open_registry(args))


# ---- the parser --------------------------------------------------------------------------

def register(sub) -> None:
    """Add `track` and `sweep` to the main `scalelab` sub-parsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=argparse.SUPPRESS,
                        help="SQLite registry file (default: $SCALELAB_REGISTRY or "
                        "./scalelab-registry.db)")
    t = sub.add_parser("track", help="experiment registry: rerun failed experiments on new "
                       "models, report emergence", parents=[common])
    ts = t.add_subparsers(dest="track_command", required=True)

    # --registry is taken at every level: `track --registry X experiment list` and
    # `track experiment --registry X list` as well as after the last word
    ex = ts.add_parser("experiment", help="add, list or show experiments", parents=[common])
    exs = ex.add_subparsers(dest="experiment_command", required=True)
    a = exs.add_parser("add", help="register an experiment", parents=[common])
    a.add_argument("--name", required=True)
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", help="builtin:FAMILY?key=value, tasks:FAMILY or a JSONL file")
    what.add_argument("--lm-eval", metavar="TASK", help="an lm-eval task, run through the "
                      "bridge (pip install 'scalelab[eval]')")
    a.add_argument("--include-path", help="with --lm-eval: folder of the task's YAML (the "
                   "task is then looked up there only)")
    a.add_argument("--limit", type=int, help="with --lm-eval: first N documents only")
    a.add_argument("--threshold", type=float, required=True, help="pass level of --metric")
    a.add_argument("--metric", choices=sorted(M.HIGHER_IS_BETTER),
                   help="default: exact_match (generation) or mc_accuracy (multiple "
                   "choice); lm-eval tasks: also acc, acc_norm, perplexities, bits_per_byte")
    a.add_argument("--note", default="", help="hypothesis or free text")
    a.set_defaults(func=cmd_experiment_add)
    exs.add_parser("list", help="every experiment: passed or not yet, its pass rule",
                   parents=[common]).set_defaults(func=cmd_experiment_list)
    s = exs.add_parser("show", help="one experiment: its rule, history and results",
                       parents=[common])
    s.add_argument("name")
    s.set_defaults(func=cmd_experiment_show)
    exs.add_parser("seed", help="add the built-in starter experiments",
                   parents=[common]).set_defaults(func=cmd_experiment_seed)

    mo = ts.add_parser("model", help="add or list models", parents=[common])
    mos = mo.add_subparsers(dest="model_command", required=True)
    a = mos.add_parser("add", help="register a model and run the experiments not yet passed",
                       parents=[common])
    a.add_argument("dir", help="scalelab model folder (RUN/model) or a local HF model folder")
    a.add_argument("--name")
    a.add_argument("--lineage", default="base", help="base, sft, rlhf, ...")
    a.add_argument("--parent", help="name of the registered model this one came from")
    a.add_argument("--no-run", action="store_true", help="register only")
    a.set_defaults(func=cmd_model_add)
    mos.add_parser("list", help="every registered model: params, N, tokens, FLOPs",
                   parents=[common]).set_defaults(func=cmd_model_list)
    rm = mos.add_parser("remove", help="unregister a model and its results (a mistaken "
                        "registration; its folder is kept)", parents=[common])
    rm.add_argument("name")
    rm.set_defaults(func=cmd_model_remove)

    r = ts.add_parser("run", help="evaluate experiments on models (adds result rows)",
                      parents=[common])
    r.add_argument("--failed-only", action="store_true",
                   help="only experiments no model has passed yet")
    r.add_argument("--model")
    r.add_argument("--experiment")
    r.set_defaults(func=cmd_run)
    st = ts.add_parser("status", help="experiments x models, pass/fail", parents=[common])
    st.add_argument("--json", action="store_true")
    st.add_argument("--by-size", action="store_true",
                    help="one column per size of base models (of one tokenizer and corpus): "
                         "the mean and range over its runs (sweep --seeds)")
    st.set_defaults(func=cmd_status)
    rp = ts.add_parser("report", help="HTML report with plots and predictions",
                       parents=[common])
    rp.add_argument("--out", required=True)
    rp.set_defaults(func=cmd_report)
    bt = ts.add_parser("backtest", help="predict each size from the smaller ones, compare",
                       parents=[common])
    bt.add_argument("--out", help="also write the markdown table to this file (a new one, "
                    "or one an earlier backtest wrote)")
    bt.set_defaults(func=cmd_backtest)

    sw = sub.add_parser("sweep", help="train a ladder of sizes, register, evaluate, fit, report",
                        parents=[common])
    sw.add_argument("--config", required=True,
                    help="sweep TOML or preset name (sweep-cpu, sweep-gpu)")
    sw.add_argument("--out", required=True)
    sw.add_argument("--seeds", type=int, metavar="N",
                    help="runs per size (train.seed, +1, ...; overrides sweep.seeds): more "
                         "seeds can be added to a finished sweep's --out later")
    sw.set_defaults(func=cmd_sweep)
