"""`scalelab study instruct`: the instruction-tuning scaling study (FLAN, Chung et al. 2022).

Base models of several sizes are pretrained on one corpus (one tokenizer), then each is
instruction-tuned on nested subsets of the training task families (the first k of one
seeded order, so the 3-task set contains the 1-task set), with the same number of SFT steps
and examples whatever k is: only the variety of instructions changes. Every model (the base
as "0 tasks" too) is scored on the held-out families (never trained: scalelab/tasks) and on
every training family, through the tracker: each family is a registry experiment, each model
a registry row (SFT models with their base as parent), each score a result row. The report
(DIR/report.md, DIR/study.png) shows held-out score against the number of tasks, one line
per size.

    [model] [data] [train]     the pretraining config shared by every size
    [study]
    name = "instruct-cpu"      # models: instruct-cpu-L2-d64, instruct-cpu-L2-d64-t3 (tuned on 3)
    sizes = [{n_layer = 2, d_model = 64, n_head = 2}, ...]   # or "registry:NAME" (reuse)
    pretrain_steps = 600       # the same token budget for every size
    lr_width = 128             # train.lr is the lr at this d_model; lr ~ 1/d_model
    n_tasks = [1, 3, 8, 26]    # nested subsets; at most len(TRAIN_TASKS)
    order_seed = 0             # the seeded order the subsets are prefixes of
    sft_steps = 300
    sft_lr = 1e-3
    sft_examples = 8000
    eval_n = 32                # items per family
    eval_difficulty = 1        # clipped to each family's maximum

Rerunning with the same --out reuses every finished model and result; a different config
is refused (its models would not be the ones the folder holds).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import time
from pathlib import Path

from scalelab.config import (
    Config,
    UserError,
    load_config,
    resolve_config_path,
)
from scalelab.io import atomic_write_json, atomic_write_text, read_json_if_any
from scalelab.track.metrics import mean
from scalelab.track.ops import add_experiment, ensure_model
from scalelab.track.registry import Registry, code_version, registry_path
from scalelab.track.specs import load_items
from scalelab.track.sweep import load_table, shared_vocab, size_config
from scalelab.train.rundir import check_folder, resume_or_restart

STUDY_KEYS = {"name": str, "sizes": list, "pretrain_steps": int, "lr_width": int,
              "n_tasks": list, "order_seed": int, "sft_steps": int, "sft_lr": float,
              "sft_examples": int, "eval_n": int, "eval_difficulty": int}
MARKER = "study.json"


def load_study(path: Path) -> tuple[Config, dict]:
    from scalelab.tasks import TRAIN_TASKS
    cfg, opts = load_table(path, "study", STUDY_KEYS, {
        "sizes": [], "pretrain_steps": 600, "lr_width": 0,
        "n_tasks": [1, 3, 8, len(TRAIN_TASKS)], "order_seed": 0, "sft_steps": 300,
        "sft_lr": 1e-3, "sft_examples": 8000, "eval_n": 32, "eval_difficulty": 1})
    for key, want in STUDY_KEYS.items():
        low = 0 if key in ("order_seed", "lr_width") else 1
        if (want is int and opts[key] < low) or \
                (want is float and not 0 < opts[key] < math.inf):  # inf: a diverged run
            raise UserError(f"{path}: 'study.{key}' must be {'>= 0' if low == 0 else 'positive'}"
                            + (" and finite" if want is float else ""))
    from scalelab.track.specs import LIMITS
    lo, hi = LIMITS["n"]  # the task specs' own cap on items, checked before anything runs
    if not lo <= opts["eval_n"] <= hi:
        raise UserError(f"{path}: 'study.eval_n' = {opts['eval_n']} must be in {lo}..{hi}")
    ks = opts["n_tasks"]
    if not ks or not all(isinstance(k, int) and 1 <= k <= len(TRAIN_TASKS) for k in ks) \
            or ks != sorted(set(ks)):
        raise UserError(f"{path}: 'study.n_tasks' must be increasing integers in "
                        f"1..{len(TRAIN_TASKS)} (the training families)")
    # checked here, not after the first size is pretrained and registered (then the
    # corrected config was refused for that --out, and its model names were taken)
    need = min_sft_examples(sft_preset())
    if opts["sft_examples"] < need:
        raise UserError(f"{path}: 'study.sft_examples' = {opts['sft_examples']} is too few: "
                        f"the SFT preset trains on batches of {need - held_out(need)} "
                        f"conversations and holds out {held_out(need)}; give at least {need} "
                        "(more where conversations longer than model.seq_len are skipped)")
    return cfg, opts


def sft_preset() -> Config:
    """The SFT settings every tuning run of a study starts from (batch size, warmup)."""
    return load_config(resolve_config_path("sft"))


def held_out(n: int) -> int:
    from scalelab.data.batches import split_heldout
    return len(split_heldout(list(range(n)))[1])


def min_sft_examples(sft_cfg: Config) -> int:
    """The fewest conversations that leave one batch to train on after the held-out ones."""
    batch = sft_cfg.train.batch_size * sft_cfg.train.grad_accum
    return next(n for n in range(batch, 2 * batch + 300) if n - held_out(n) >= batch)


def task_order(seed: int) -> list[str]:
    """The training families in a seeded order; the k-task subset is its first k."""
    from scalelab.tasks import TRAIN_TASKS
    order = list(TRAIN_TASKS)
    random.Random(f"study-order:{seed}").shuffle(order)
    return order


def sft_data(path: Path, families: list[str], n: int, seed: int, exclude: set[str]) -> None:
    """n conversations over `families`, as {"messages": ...} rows: the first n of 2n drawn
    round-robin that ask no test prompt (`exclude`: the items of the study's experiments).
    The families' item spaces are small: drawn without this, 155 of the 416 held-in test
    items of configs/study-cpu.toml's 26-task set (eval_n 16) were training prompts."""
    from scalelab.tasks import make_examples
    if path.exists():
        return
    examples = [e for e in make_examples(families, 2 * n, seed) if e.prompt not in exclude]
    if len(examples) < n:
        raise UserError(f"{path}: only {len(examples)} of {2 * n} drawn examples of "
                        f"{', '.join(families)} are not test items; lower study.eval_n or "
                        "study.sft_examples")
    atomic_write_text(path, "".join(
        json.dumps({"messages": [{"role": "user", "content": e.prompt},
                                 {"role": "assistant", "content": e.answer}]}) + "\n"
        for e in examples[:n]))


def ensure_experiments(reg: Registry, opts: dict) -> dict[str, dict]:
    """One registry experiment per task family, named STUDY:FAMILY."""
    from scalelab.tasks import HELDOUT_TASKS, TASKS, TRAIN_TASKS
    names = {fam: f"{opts['name']}:{fam}" for fam in HELDOUT_TASKS + TRAIN_TASKS}
    d = {fam: min(opts["eval_difficulty"], TASKS[fam].max_difficulty) for fam in names}
    tasks = {fam: f"tasks:{fam}?difficulty={d[fam]}&n={opts['eval_n']}" for fam in names}

    def check(fam: str, held: dict | None) -> None:
        # the study reads exact match: an experiment of its name on another metric would
        # be listed (and judged) by that metric while the study reported another
        if held is not None and (held["task"], held["metric"]) != (tasks[fam], "exact_match"):
            raise UserError(f"{reg.path}: experiment {names[fam]!r} exists with task "
                            f"{held['task']!r}, metric {held['metric']}; change study.name")

    have = {e["name"]: e for e in reg.experiments()}
    for fam in names:  # every name checked before any is added (none left under a refused one)
        check(fam, have.get(names[fam]))
    out = {}
    for fam, name in names.items():
        if name not in have:  # exist_ok: another study may add it now
            add_experiment(reg, name, tasks[fam], 0.8, "exact_match",
                           f"instruction study {opts['name']}: family {fam}", exist_ok=True)
        out[fam] = dict(reg.experiment(name))
        check(fam, out[fam])
    return out


def evaluate_model(reg: Registry, model: dict, exps: dict[str, dict]) -> dict[str, dict]:
    """Each family's exact match and answer log-likelihood (per token) for one model; results
    already in the registry are reused, missing ones are run and added."""
    from scalelab.track.evaluate import load_lm, run_experiment
    latest = reg.latest()
    lm, out = None, {}
    for fam, e in exps.items():
        row = latest.get((e["id"], model["id"]))
        if row is None:
            lm = lm or load_lm(model["path"])
            agg, ok, samples, n, secs = run_experiment(lm, e)
            reg.add_result(e["id"], model["id"], agg, ok, samples, n, secs, code_version())
            metrics = agg
        else:
            metrics = row["metrics"]
        out[fam] = {"exact_match": metrics["exact_match"],
                    "token_logprob": metrics["token_logprob"]}
    return out


def summarise(scores: dict[str, dict], tuned: list[str]) -> dict:
    from scalelab.tasks import HELDOUT_TASKS, TRAIN_TASKS
    row = {"held_out": mean([scores[f]["exact_match"] for f in HELDOUT_TASKS]),
           "held_out_logprob": mean([scores[f]["token_logprob"] for f in HELDOUT_TASKS]),
           "held_in_all": mean([scores[f]["exact_match"] for f in TRAIN_TASKS]),
           "held_in_tuned": mean([scores[f]["exact_match"] for f in tuned]) if tuned else None}
    row["held_out_families"] = {f: scores[f]["exact_match"] for f in HELDOUT_TASKS}
    return row


def plan_hash(cfg: Config, opts: dict) -> str:
    return hashlib.sha256(json.dumps([cfg.to_dict(), opts], sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


def run_study(config: Path, out: Path, reg: Registry) -> dict:
    from scalelab.train.pretrain import pretrain
    from scalelab.train.sft import sft
    base_cfg, opts = load_study(config)
    t_start = time.perf_counter()
    order = task_order(opts["order_seed"])
    subsets = {k: order[:k] for k in opts["n_tasks"]}
    digest = plan_hash(base_cfg, opts)
    for i, size in enumerate(opts["sizes"]):  # before --out is started: its study.json
        if isinstance(size, str):  # would refuse the corrected config
            try:
                reg.model(size.removeprefix("registry:"))
            except UserError as e:
                raise UserError(f"{config}: study.sizes[{i}]: {e}") from None
    marker = out / MARKER
    if marker.exists() and read_json_if_any(marker).get("plan") != digest:
        raise UserError(f"--out {out}: holds a study made with another config; choose a new "
                        "--out (its models would not be the ones this config asks for)")
    # the registry's experiments first: one of this study's names holding another task is
    # refused before --out is started (its study.json then refused the corrected config)
    exps = ensure_experiments(reg, opts)
    out.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        atomic_write_json(marker, {"plan": digest, "config": str(config),
                                   "task_order": order, "status": "started"})

    # one tokenizer for every size trained here (BPE training is deterministic)
    vocab = 0
    if any(isinstance(size, dict) for size in opts["sizes"]):
        vocab = shared_vocab(base_cfg, out / "shared")
    sft_cfg = sft_preset()
    sft_cfg.train.max_steps, sft_cfg.train.lr = opts["sft_steps"], opts["sft_lr"]
    sft_cfg.train.checkpoint_every = sft_cfg.train.eval_every = opts["sft_steps"]
    sft_cfg.train.warmup_steps = min(sft_cfg.train.warmup_steps, opts["sft_steps"] // 5)
    data_dir = out / "sft-data"
    data_dir.mkdir(exist_ok=True)
    tests = {it.prompt for e in exps.values() for it in load_items(e["task"])}

    rows = []
    for size in opts["sizes"]:
        t0 = time.perf_counter()
        if isinstance(size, str):  # a base model already in the registry
            base = dict(reg.model(size.removeprefix("registry:")))
            label, base_path = base["name"], Path(base["path"])
        else:
            cfg, info = size_config(base_cfg, size, {"flops": 0.0, "tokens_per_param": 0.0,
                                                     "min_steps": opts["pretrain_steps"],
                                                     "lr_width": opts["lr_width"]}, vocab)
            label = info["label"]
            run = out / "base" / label
            resume = resume_or_restart(run, info["steps"])
            if resume is not None:
                print(f"--- {label}: {info['params'] / 1e3:.0f}k params, pretraining "
                      f"{info['steps']} steps", flush=True)
                pretrain(cfg, run, resume=resume)
            base = ensure_model(reg, run / "model", f"{opts['name']}-{label}", "study.name")
            base_path = run / "model"
        scores = evaluate_model(reg, base, exps)
        rows.append({"size": label, "params": base["non_embedding_params"], "n_tasks": 0,
                     "model": base["name"], "tasks": [], **summarise(scores, [])})
        for k, fams in subsets.items():
            data = data_dir / f"tasks-{k}.jsonl"
            sft_data(data, fams, opts["sft_examples"], opts["order_seed"], tests)
            run = out / "sft" / f"{label}-t{k}"
            resume = resume_or_restart(run, opts["sft_steps"])
            if resume is not None:
                print(f"--- {label}: instruction tuning on {k} task families", flush=True)
                sft(copy.deepcopy(sft_cfg), base_path, str(data), run, resume=resume)
            m = ensure_model(reg, run / "model", f"{opts['name']}-{label}-t{k}", "study.name",
                             lineage="sft", parent=base["name"])
            scores = evaluate_model(reg, m, exps)
            rows.append({"size": label, "params": base["non_embedding_params"], "n_tasks": k,
                         "model": m["name"], "tasks": fams, **summarise(scores, fams)})
            r = rows[-1]
            print(f"    held-out {r['held_out']:.3f}  held-in (tuned) {r['held_in_tuned']:.3f}"
                  f"  held-in (all) {r['held_in_all']:.3f}", flush=True)
        print(f"    {label} done in {time.perf_counter() - t0:.0f} s", flush=True)

    summary = {"plan": digest, "config": str(config), "task_order": order,
               "subsets": {str(k): v for k, v in subsets.items()}, "rows": rows,
               "wall_seconds": time.perf_counter() - t_start, "status": "done"}
    atomic_write_json(marker, summary)
    plot(rows, out / "study.png")
    command = f"scalelab study instruct --config {config} --out {out}"
    atomic_write_text(out / "report.md", report(summary, command, "study.png"))
    print(f"study done in {summary['wall_seconds'] / 60:.1f} min (this invocation); report: "
          f"{out / 'report.md'}")
    return summary


def plot(rows: list[dict], path: Path) -> None:
    from scalelab.track.report import pyplot, save_figure
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("held_out", "held-out families: exact match"),
              ("held_out_logprob", "held-out: answer log-likelihood / token"),
              ("held_in_all", "all training families: exact match"))
    for ax, (key, title) in zip(axes, panels):
        for size in dict.fromkeys(r["size"] for r in rows):
            pts = [(r["n_tasks"], r[key]) for r in rows if r["size"] == size]
            params = next(r["params"] for r in rows if r["size"] == size)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                    label=f"{size} ({params / 1e3:.0f}k)")
        ks = sorted({r["n_tasks"] for r in rows})
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set(title=title, xlabel="training task families (0 = base model)")
        ax.grid(alpha=0.3)
    axes[0].legend(title="model size (N)")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def report(summary: dict, command: str, image: str) -> str:
    from scalelab.tasks import HELDOUT_TASKS
    rows = summary["rows"]
    md = ["# Instruction tuning: number of tasks x model size", "",
          f"Produced by `{command}` ({summary['wall_seconds'] / 60:.1f} min for this "
          "invocation; finished models from an earlier one are reused).", "",
          "Exact match with each family's lenient scorer, greedy answers, "
          "difficulty as configured. Held out: " + ", ".join(HELDOUT_TASKS) + " (never "
          "trained). Held-in (tuned): the families that model was tuned on; (all): every "
          "training family. Log-likelihood: mean per answer token on the held-out items "
          "(teacher forced), the continuous view of the same answers.", "",
          f"![held-out score vs number of tasks]({image})", "",
          "| size | N | tasks | held-out | held-out logprob/token | held-in (tuned) "
          "| held-in (all) | " + " | ".join(HELDOUT_TASKS) + " |",
          "|---|---|---|---|---|---|---|" + "---|" * len(HELDOUT_TASKS)]
    for r in rows:
        tuned = "-" if r["held_in_tuned"] is None else f"{r['held_in_tuned']:.3f}"
        md.append(f"| {r['size']} | {r['params'] / 1e3:.0f}k | {r['n_tasks']} | "
                  f"{r['held_out']:.3f} | {r['held_out_logprob']:.2f} | {tuned} | "
                  f"{r['held_in_all']:.3f} | " + " | ".join(
                      f"{r['held_out_families'][f]:.2f}" for f in HELDOUT_TASKS) + " |")
    md += ["", "Nested subsets (the first k of one seeded order of the training families):", ""]
    md += [f"- {k}: {', '.join(v)}" for k, v in summary["subsets"].items()]
    return "\n".join(md) + "\n"


def cmd_instruct(args: argparse.Namespace) -> None:
    out = Path(args.out)
    check_folder(out, MARKER, "study instruct")
    config = resolve_config_path(args.config)  # a file, or a preset name: study-cpu
    load_study(config)  # bad config: refused before anything is written
    run_study(config, out, Registry(registry_path(args.registry)))


def register(sub) -> None:
    s = sub.add_parser("study", help="scaling studies (instruct: tasks x size, FLAN-style)")
    ss = s.add_subparsers(dest="study", required=True)
    i = ss.add_parser("instruct", help="base models x nested task subsets: held-out score")
    i.add_argument("--config", required=True, help="study TOML or preset name (study-cpu)")
    i.add_argument("--out", required=True, help="new or empty folder, or an earlier study's")
    i.add_argument("--registry", help="SQLite registry file (default: $SCALELAB_REGISTRY or "
                   "./scalelab-registry.db)")
    i.set_defaults(func=cmd_instruct)
