"""`scalelab sweep`: a ladder of model sizes, each trained for a compute-optimal number of
tokens, registered, evaluated on every experiment; then L(N) is fitted and reported.

A sweep TOML is an ordinary run config ([model], [data], [train] shared by every size) plus
a [sweep] table:

    [sweep]
    name = "cpu"                 # model names become cpu-L2-d64, ...
    tokens_per_param = 20.0      # Chinchilla; or flops = 1e13 for a fixed budget per size
    lr_width = 128               # train.lr is the lr at this d_model; lr ~ 1/d_model
    min_steps = 100
    seeds = 1                    # runs per size: train.seed, train.seed + 1, ...
    sizes = [{n_layer = 1, d_model = 32, n_head = 2}, ...]
    experiments = "starter"      # or [{name=, task=, threshold=, metric=, note=}, ...]
    [sweep.corpus]               # optional document-kind weights for builtin:world
    arithmetic = 0.5

With seeds = 3 each size is trained three times (initialisation and data order differ,
the corpus is the same): cpu-L2-d64, cpu-L2-d64-s2, cpu-L2-d64-s3. The fits and predictions
take one point per size, the mean over its seeds (predict.by_scale); the report shows each.

Rerunning with the same --out resumes the ladder (sizes and seeds may be added); another
budget, corpus or shape of an existing size is refused (sweep-plan.json says what it was).

Learning rate scales as 1/width (with one lr for all sizes the biggest model failed in an
earlier run, and the "emergence" curve measured the optimiser).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from pathlib import Path

from scalelab.config import Config, UserError, apply_dict, read_toml
from scalelab.io import atomic_write_json, atomic_write_text
from scalelab.track.ops import (
    add_experiment,
    ensure_model,
    evaluate,
    seed_experiments,
    with_task_files,
)
from scalelab.track.registry import Registry

SWEEP_KEYS = {"name": str, "tokens_per_param": float, "flops": float, "lr_width": int,
              "min_steps": int, "seeds": int, "sizes": list, "experiments": (str, list),
              "corpus": dict}


def load_table(path: Path, table: str, keys: dict, defaults: dict) -> tuple[Config, dict]:
    """A sweep- or study-style TOML: the usual config sections plus one [table] of typed
    keys (an int is taken where a float is wanted), whose `sizes` lists model tables."""
    data = read_toml(path, f"{table} config")
    tab = data.pop(table, None)
    if not isinstance(tab, dict):
        raise UserError(f"{path}: needs a [{table}] table (name, sizes, ...)")
    cfg = apply_dict(Config(), data, str(path))
    opts = {"name": path.stem, **defaults}
    for key, value in tab.items():
        want = keys.get(key)
        if want is None:
            raise UserError(f"{path}: unknown key '{table}.{key}' (known: {', '.join(keys)})")
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool):
            raise UserError(f"{path}: '{table}.{key}' has the wrong type "
                            f"({type(value).__name__})")
        opts[key] = value
    if not opts["sizes"]:
        raise UserError(f"{path}: '{table}.sizes' must list at least one model size")
    labels: dict[str, int] = {}  # each size's run folder and model name: one size each
    for i, size in enumerate(opts["sizes"]):
        if table == "study" and isinstance(size, str) and size.startswith("registry:"):
            if size in labels:
                raise UserError(f"{path}: {table}.sizes[{i}] repeats {table}.sizes"
                                f"[{labels[size]}] ({size})")
            labels[size] = i
            continue  # a study may start from a registered base model
        if not isinstance(size, dict):
            raise UserError(f"{path}: {table}.sizes[{i}] must be a table like "
                            "{n_layer = 2, d_model = 64, n_head = 2}"
                            + (' or "registry:NAME"' if table == "study" else ""))
        from scalelab.model import check_shape
        where = f"{path}: {table}.sizes[{i}]"
        try:  # a size that cannot be built is refused before any corpus or registry work
            shape = apply_dict(copy.deepcopy(cfg), {"model": size}, where).model
            check_shape(shape)
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        label = size_label(shape)
        if label in labels:  # the later one would reuse (or fail to resume) the earlier's run
            raise UserError(f"{where}: gives the same run and model name as {table}.sizes"
                            f"[{labels[label]}] ({label}: sizes are named by n_layer and "
                            "d_model only); give each size its own n_layer or d_model")
        labels[label] = i
    return cfg, opts


def load_sweep(path: Path) -> tuple[Config, dict]:
    cfg, opts = load_table(path, "sweep", SWEEP_KEYS, {
        "tokens_per_param": 20.0, "flops": 0.0, "lr_width": 0, "min_steps": 50, "seeds": 1,
        "sizes": [], "experiments": "starter", "corpus": {}})
    # each budget key a finite number in range, before any corpus or registry work: a
    # negative lr_width made a negative learning rate (a traceback after the corpus was
    # built), nan a traceback, a tokens_per_param <= 0 silently min_steps for every size
    for key, low, strict in (("tokens_per_param", 0.0, True), ("flops", 0.0, False),
                             ("lr_width", 0, False), ("min_steps", 0, False)):
        value = opts[key]
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise UserError(f"{path}: 'sweep.{key}' = {value} must be a finite number "
                            f"{'>' if strict else '>='} {low}"
                            + (" (0: no fixed FLOP budget)" if key == "flops" else "")
                            + (" (0: one lr for every size)" if key == "lr_width" else ""))
    if opts["seeds"] < 1:
        raise UserError(f"{path}: 'sweep.seeds' = {opts['seeds']} must be >= 1 (runs per size)")
    from scalelab.data.world import DOC_KINDS
    if opts["corpus"] and cfg.data.source != "builtin:world":  # it was silently ignored
        raise UserError(f"{path}: [sweep.corpus] weighs the built-in world corpus's document "
                        f"kinds; data.source is {cfg.data.source!r}: drop one of the two")
    for kind, w in opts["corpus"].items():
        if kind not in DOC_KINDS or not isinstance(w, (int, float)) or w < 0:
            raise UserError(f"{path}: sweep.corpus.{kind}: expected a weight >= 0 for one of "
                            f"{', '.join(DOC_KINDS)}")
    check_experiments(opts["experiments"], path)
    return cfg, opts


EXPERIMENT_KEYS = {"name": str, "task": str, "threshold": (int, float), "metric": str,
                   "note": str}


def check_experiments(exps: str | list, path: Path) -> None:
    """sweep.experiments: "starter" or tables of EXPERIMENT_KEYS, each checked as `track
    experiment add` would (task spec, metric, threshold), before any work is done."""
    from scalelab.track.ops import checked_experiment
    if isinstance(exps, str):
        if exps != "starter":
            raise UserError(f"{path}: sweep.experiments must be \"starter\" or a list of "
                            "tables")
        return
    for i, e in enumerate(exps):
        where = f"{path}: sweep.experiments[{i}]"
        if not isinstance(e, dict) or not {"name", "task", "threshold"} <= set(e):
            raise UserError(f"{where} needs name, task and threshold")
        for key, value in e.items():
            if key not in EXPERIMENT_KEYS:
                raise UserError(f"{where}: unknown key {key!r} (known: "
                                f"{', '.join(EXPERIMENT_KEYS)})")
            if not isinstance(value, EXPERIMENT_KEYS[key]) or isinstance(value, bool):
                raise UserError(f"{where}.{key} has the wrong type ({type(value).__name__})")
        try:  # kept as stored: the task's full path, the metric its default when not given
            e["task"], e["metric"] = checked_experiment(e["name"], e["task"],
                                                        float(e["threshold"]), e.get("metric"))
        except UserError as err:
            raise UserError(f"{where} ({e['name']}): {err}") from None


def write_corpus(path: Path, n_docs: int, seed: int, weights: dict[str, float]) -> None:
    """The world corpus with chosen document-kind weights, as {"text": ...} rows."""
    from scalelab.data.world import DOC_KINDS, World
    world, kinds = World.create(seed), list(weights)
    rows = []
    for i in range(n_docs):
        rng = random.Random(seed * 2**32 + i)
        kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
        rows.append(json.dumps({"text": DOC_KINDS[kind](world, rng)}) + "\n")
    atomic_write_text(path, "".join(rows))


def size_label(model) -> str:
    """A size's run folder and model-name suffix: L2-d64."""
    return f"L{model.n_layer}-d{model.d_model}"


def size_config(base: Config, size: dict, opts: dict, vocab: int) -> tuple[Config, dict]:
    """This size's config: its shape, lr ~ 1/width, steps for its token or FLOP budget."""
    from scalelab.model import Transformer
    cfg = apply_dict(copy.deepcopy(base), {"model": size}, "sweep size")
    cfg.model.vocab_size = vocab
    try:
        model = Transformer(cfg.model)
    except ValueError as e:
        raise UserError(f"sweep size {size}: {e}") from None
    n = model.num_params()  # the project's one N (track/evaluate.py model_info says which)
    tc = cfg.train
    per_step = tc.batch_size * tc.grad_accum * cfg.model.seq_len
    tokens = opts["flops"] / (6 * n) if opts["flops"] else opts["tokens_per_param"] * n
    tc.max_steps = max(opts["min_steps"], math.ceil(tokens / per_step))
    tc.warmup_steps = min(tc.warmup_steps, tc.max_steps // 5)
    if opts["lr_width"]:
        tc.lr = tc.lr * opts["lr_width"] / cfg.model.d_model
    tc.eval_every = tc.checkpoint_every = tc.max_steps  # eval and checkpoint at the end
    label = size_label(cfg.model)
    return cfg, {"label": label, "params": n, "steps": tc.max_steps, "lr": tc.lr,
                 "tokens": tc.max_steps * per_step}


def seeded(cfg: Config, info: dict, i: int) -> tuple[Config, dict]:
    """The i-th run of a size: train.seed + i, and from the second on its own run folder
    and model name (L2-d64-s2); the first keeps the size's."""
    if i == 0:
        return cfg, {**info, "seed": cfg.train.seed}
    cfg = copy.deepcopy(cfg)
    cfg.train.seed += i
    return cfg, {**info, "label": f"{info['label']}-s{i + 1}", "seed": cfg.train.seed}


def shared_vocab(cfg: Config, shared: Path) -> int:
    """Train (or reuse) in `shared` the one tokenizer of every size, so that their losses
    compare (BPE training is deterministic); its vocab size rounded up to a multiple of 64."""
    from scalelab.train.pretrain import prepare_data
    shared.mkdir(exist_ok=True)
    tok, _ = prepare_data(cfg, shared, reuse=True, run=False)
    return 64 * math.ceil(tok.vocab_size / 64)


def check_registered(reg: Registry, opts: dict, path: Path) -> None:
    """A sweep experiment whose name the registry already holds must be the same one: its
    task, metric and threshold there are what every size would be evaluated on."""
    from scalelab.track.metrics import comparison
    if opts["experiments"] == "starter":
        return
    have = {e["name"]: e for e in reg.experiments()}
    for i, e in enumerate(opts["experiments"]):  # task and metric as load_sweep stored them
        old = have.get(e["name"])
        if old is not None and (old["task"], old["metric"], old["threshold"]) != \
                (e["task"], e["metric"], float(e["threshold"])):
            raise UserError(f"{path}: sweep.experiments[{i}] ({e['name']}): {reg.path} holds "
                            f"an experiment of that name with task {old['task']}, pass if "
                            f"{old['metric']} {comparison(old['metric'])} "
                            f"{old['threshold']:g}; names are permanent: "
                            "give this one another name")


def ensure_experiments(reg: Registry, opts: dict) -> None:
    if opts["experiments"] == "starter":
        seed_experiments(reg)
        return
    have = {e["name"] for e in reg.experiments()}
    for e in opts["experiments"]:  # checked by load_sweep
        if e["name"] not in have:
            add_experiment(reg, e["name"], e["task"], float(e["threshold"]), e.get("metric"),
                           e.get("note", ""), exist_ok=True)  # another sweep may add it now


PLAN = "sweep-plan.json"


# keys that say how a run reports, notifies and keeps checkpoints, not what it trains:
# changing them does not make --out another sweep
BOOKKEEPING = ("train.log_every", "train.sample_every", "train.sample_prompt",
               "train.checkpoint_every", "train.keep_checkpoints", "monitor.on_event")


def check_plan(out: Path, base: Config, opts: dict) -> dict:
    """What --out was made with: the settings every size shares (corpus, tokenizer, budget
    and lr rules, names) and each size's model. A rerun may resume, add or drop sizes;
    another budget or corpus silently trained the registered models further under their
    old records (tokens, loss, results) or reused the old corpus, so it is refused, naming
    the keys that changed (a plan written before they were stored: only that some did)."""
    from scalelab.io import read_json_if_any
    shared = {k: v for k, v in opts.items() if k not in ("sizes", "seeds", "experiments")}
    def flat(cfg: Config, sweep: dict) -> dict:  # as they read back from the plan file
        return json.loads(json.dumps({f"{sec}.{k}": v for sec, d in cfg.to_dict().items()
                                      for k, v in d.items() if f"{sec}.{k}" not in BOOKKEEPING}
                                     | {f"sweep.{k}": v for k, v in sweep.items()}, default=str))
    settings = flat(base, shared)
    plan = {"shared": hashlib.sha256(json.dumps([base.to_dict(), shared], sort_keys=True,
                                                default=str).encode()).hexdigest()[:16],
            "settings": settings, "sizes": {}}
    for size in opts["sizes"]:
        model = apply_dict(copy.deepcopy(base), {"model": size}, "sweep size").model
        plan["sizes"][size_label(model)] = dataclasses.asdict(model)
    old = read_json_if_any(out / PLAN) if (out / PLAN).is_file() else {}
    if "settings" in old:  # a key newer than the plan had its default then
        was = flat(Config(), {}) | old["settings"]
        changed = [f"{k} {was.get(k, '(unset)')!r} -> {settings.get(k, '(unset)')!r}"
                   for k in sorted(was.keys() | settings.keys()) if was.get(k) != settings.get(k)]
    else:
        changed = [] if old.get("shared", plan["shared"]) == plan["shared"] else \
            ["the settings all sizes share ([model], [data], [train], sweep budget, lr and name)"]
    changed += [f"size {label}" for label, model in plan["sizes"].items()
                if old.get("sizes", {}).get(label, model) != model]
    if changed:
        raise UserError(f"--out {out}: holds a sweep made with another config (changed: "
                        f"{'; '.join(changed)}); choose a new --out: its runs would be trained "
                        "further or reused under the models registered from them")
    return {**plan, "sizes": {**old.get("sizes", {}), **plan["sizes"]}}


def run_sweep(config: Path, base: Config, opts: dict, out: Path, reg: Registry) -> dict:
    """Train, register and evaluate every size and seed of `opts` (load_sweep of `config`)
    not yet done in `out`; then fit L(N) and write the report."""
    from scalelab.track.predict import fit_power_law
    from scalelab.track.report import write_report
    from scalelab.train.pretrain import pretrain
    from scalelab.train.rundir import resume_or_restart
    t_start = time.perf_counter()
    made_with = check_plan(out, base, opts)
    check_registered(reg, opts, config)
    # the plan first: it is what marks --out as a sweep's (a folder holding only the
    # user's own shared/ is not one; an --out stopped before its plan was refused)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / PLAN, made_with)
    # one corpus and tokenizer for every size, so the losses are comparable
    shared = out / "shared"
    shared.mkdir(exist_ok=True)
    ensure_experiments(reg, opts)
    if opts["corpus"]:  # load_sweep: only with data.source builtin:world
        corpus = shared / "corpus.jsonl"
        if not corpus.exists():
            write_corpus(corpus, base.data.n_docs, base.data.seed, opts["corpus"])
        base.data.source = str(corpus)
    vocab = shared_vocab(base, shared)

    plan = [size_config(base, s, opts, vocab) for s in opts["sizes"]]
    plan.sort(key=lambda p: p[1]["params"])  # small to large: predictions come before answers
    print(f"sweep {opts['name']}: {len(plan)} sizes"
          + (f" x {opts['seeds']} seeds" if opts["seeds"] > 1 else "") + ", " + ", ".join(
              f"{p['label']} ({p['params'] / 1e3:.0f}k params, {p['steps']} steps)"
              for _, p in plan))
    sizes = []
    for cfg, info in (seeded(cfg, info, i) for cfg, info in plan for i in range(opts["seeds"])):
        run = out / "runs" / info["label"]
        name = f"{opts['name']}-{info['label']}"
        t0 = time.perf_counter()
        resume = resume_or_restart(run, info["steps"])
        if resume is not None:
            print(f"--- training {name}: lr {info['lr']:.2e}, {info['tokens']:,} tokens",
                  flush=True)
            pretrain(cfg, run, resume=resume)
            # pretrain trains its own tokenizer on the same corpus; BPE training is
            # deterministic, so it must equal the shared one or the losses don't compare
            if (run / "tokenizer.json").read_bytes() != (shared / "tokenizer.json").read_bytes():
                print(f"warning: {run / 'tokenizer.json'} differs from the sweep's shared "
                      "tokenizer; validation losses are not comparable across sizes")
        info["train_seconds"] = time.perf_counter() - t0
        m = ensure_model(reg, run / "model", name, "sweep.name")
        done = {r["experiment_id"] for r in reg.results() if r["model_id"] == m["id"]}
        evaluate(reg, [m], with_task_files([e for e in reg.experiments()
                                            if e["id"] not in done]))
        info.update(name=name, non_embedding_params=m["non_embedding_params"],
                    flops=m["flops"], val_loss=m["val_loss"],
                    seconds=time.perf_counter() - t0)
        sizes.append(info)
        sys.stdout.flush()

    fit = fit_power_law([s["non_embedding_params"] for s in sizes],
                        [s["val_loss"] for s in sizes])
    summary = {"config": str(config), "sizes": sizes, "scaling_law": fit,
               "wall_seconds": time.perf_counter() - t_start}
    atomic_write_json(out / "sweep.json", summary)
    if fit:
        print(f"L(N) = {fit['E']:.3f} + {fit['A']:.3g} / N^{fit['alpha']:.3f} "
              f"(N = params, a tied embedding counted once; rmse {fit['rmse']:.3f})")
    report = write_report(reg, out / "report", models=[s["name"] for s in sizes], scaling=fit)
    print(f"sweep done in {summary['wall_seconds'] / 60:.1f} min; report: {report}")
    return summary
