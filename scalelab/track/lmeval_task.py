"""lm-eval tasks as tracker experiments (`pip install scalelab[eval]`).

    lm_eval:TASK                          one of lm-eval's own tasks
    lm_eval:TASK?include_path=DIR         a task YAML in DIR (looked up there only: indexing
                                          lm-eval's ~15k built-in task files takes seconds)
    ...&limit=N                           the first N documents only

The task runs in-process through lm-eval's simple_evaluate on the bridge
(scalelab.lmeval.ScalelabEvalLM) around the model the tracker already loaded; a folder that
only transformers can run goes through lm-eval's own `hf` model instead. A result keeps
lm-eval's aggregate metrics under lm-eval's names (acc, acc_norm, exact_match, perplexity,
bits_per_byte, ...; the task's first filter) and adds the tracker's own, computed from
lm-eval's per-document log-likelihoods and outputs, so that lm-eval tasks get the same
continuous companions and calibrated predictions as the built-in ones:

    multiple_choice   mc_accuracy, brier, token_logprob; items scored by their margin
    generate_until    token_logprob and edit_distance of the gold target; items scored by
                      token_logprob, right/wrong by the task's exact_match (if it has one)
    loglikelihood     token_logprob; right/wrong = the continuation is the greedy one (acc)
    loglikelihood_rolling   lm-eval's perplexities and bits_per_byte only
"""

from __future__ import annotations

import contextlib
import logging
import random
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from scalelab.config import UserError
from scalelab.track import metrics as M

PREFIX = "lm_eval:"
DERIVED = {"multiple_choice": ("mc_accuracy", "brier", "token_logprob"),
           "generate_until": ("token_logprob", "edit_distance"),
           "loglikelihood": ("token_logprob",), "loglikelihood_rolling": ()}
DEFAULT = {"multiple_choice": "mc_accuracy", "generate_until": "exact_match",
           "loglikelihood": "acc", "loglikelihood_rolling": "bits_per_byte"}


def is_lm_eval(spec: str) -> bool:
    return spec.startswith(PREFIX)


def make_spec(task: str, include_path: str | None = None, limit: int | None = None) -> str:
    query = {}
    if include_path is not None:
        path = Path(include_path).resolve()
        if not path.is_dir():
            raise UserError(f"--include-path {include_path}: no such folder")
        query["include_path"] = str(path)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit {limit}: must be at least 1")
        query["limit"] = str(limit)
    return PREFIX + task + ("?" + urlencode(query, safe="/") if query else "")


def parse(spec: str) -> tuple[str, str | None, int | None]:
    task, _, query = spec.removeprefix(PREFIX).partition("?")
    q = dict(parse_qsl(query))
    return task, q.get("include_path"), int(q["limit"]) if "limit" in q else None


def task_manager(include_path: str | None):
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("lm_eval: experiments need lm-eval: pip install 'scalelab[eval]'") from None
    with quiet():
        return TaskManager(include_path=include_path, include_defaults=include_path is None)


def task_config(spec: str) -> dict:
    """The task's YAML config (includes resolved), or a clear error naming the task."""
    task, include_path, _ = parse(spec)
    entry = task_manager(include_path).task_index.get(task)
    where = f"in {include_path}" if include_path else "among lm-eval's built-in tasks"
    if entry is None:
        raise UserError(f"lm-eval task {task!r} not found {where}")
    if entry.kind.name != "TASK" or entry.cfg is None:  # a group, a tag, a Python class
        raise UserError(f"lm-eval {task!r} is a {entry.kind.name.lower()}, not a YAML task: "
                        "register its tasks one by one")
    return entry.cfg


def no_data(spec: str, err: OSError) -> UserError:
    task, include_path, _ = parse(spec)
    return UserError(f"lm-eval task {task!r}: its data set could not be loaded "
                     f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); on a "
                     "machine without a hub it must be in the local Hugging Face cache, or "
                     "in the files its YAML names" + (f" (in {include_path})" if include_path
                                                      else "") +
                     "; HF_HUB_OFFLINE=1 skips the waits for a hub that cannot be reached")


def check_data(spec: str) -> None:
    """Load the task as a run would (its data set included), so that a task whose data is
    not there is refused when it is added, not by a traceback in every later run."""
    from lm_eval.tasks import get_task_dict
    task, include_path, _ = parse(spec)
    try:
        with quiet():
            get_task_dict([task], task_manager(include_path))
    except OSError as e:  # datasets: ConnectionError off the hub, FileNotFoundError
        raise no_data(spec, e) from None


def metrics_for(spec: str) -> tuple[tuple[str, ...], str]:
    """(metrics an experiment on this task may pass on, the default one); the task's data
    must load."""
    cfg = task_config(spec)
    check_data(spec)
    kind = cfg.get("output_type", "generate_until")
    if kind not in DERIVED:
        raise UserError(f"lm-eval task {parse(spec)[0]!r}: output_type {kind!r} is not "
                        f"supported (known: {', '.join(DERIVED)})")
    own = [m.get("metric") for m in cfg.get("metric_list") or []
           if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    if not own:  # lm-eval's defaults per output type
        own = {"multiple_choice": ["acc", "acc_norm"], "generate_until": ["exact_match"],
               "loglikelihood": ["perplexity", "acc"],
               "loglikelihood_rolling": list(M.LM_EVAL_CONTINUOUS[1:])}[kind]
    allowed = DERIVED[kind] + tuple(m for m in own if m in M.HIGHER_IS_BETTER
                                    and m not in DERIVED[kind])
    if not allowed:
        raise UserError(f"lm-eval task {parse(spec)[0]!r}: none of its metrics ({own}) can "
                        f"be a pass metric (known: {', '.join(M.HIGHER_IS_BETTER)})")
    default = DEFAULT[kind] if DEFAULT[kind] in allowed else allowed[0]
    return allowed, default


@contextlib.contextmanager
def quiet():
    """lm-eval logs on every call (INFO, and warnings about its own defaults); the tracker
    prints its own lines."""
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def bridge(lm):
    """An lm-eval model over the tracker's loaded model."""
    if hasattr(lm.model, "num_params"):  # scalelab's Transformer (own or imported weights)
        from scalelab.lmeval import ScalelabEvalLM
        return ScalelabEvalLM.around(lm.model, lm.tok)
    from lm_eval.models.huggingface import HFLM as LMEvalHF
    return LMEvalHF(pretrained=lm.model, tokenizer=lm.tok, batch_size=16)


def run(lm, spec: str) -> tuple[dict, list[dict], int]:
    """(aggregate metrics with per_item, a few sample outputs, documents) of one task."""
    import numpy as np
    import torch
    from lm_eval import simple_evaluate
    task, include_path, limit = parse(spec)
    ev = bridge(lm)
    states = random.getstate(), np.random.get_state()
    try:
        with quiet(), torch.random.fork_rng(devices=[]):  # lm-eval seeds the global RNGs
            out = simple_evaluate(model=ev, tasks=[task], task_manager=task_manager(include_path),
                                  limit=limit, log_samples=True, bootstrap_iters=0)
    except OSError as e:  # its data set gone since the experiment was added (cache cleared)
        raise no_data(spec, e) from None
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    kind = out["configs"][task].get("output_type", "generate_until")
    samples = out["samples"][task]
    chosen = samples[0]["filter"] if samples else "none"
    samples = [s for s in samples if s["filter"] == chosen]
    agg = {}
    for key, value in out["results"][task].items():
        name, _, filt = key.partition(",")
        if filt == chosen and not name.endswith("_stderr") and isinstance(value, (int, float)):
            agg[name] = float(value)
    delim = out["configs"][task].get("target_delimiter", " ")
    derived, shown = derive(ev, kind, samples, delim)
    agg.update(derived)
    return agg, shown, len(samples)


def _args(sample: dict) -> list[tuple]:
    """The requests' arguments: tuples in-process, {"arg_0": ...} dicts once dumped."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [tuple(a.values()) for a in args.values()]
    return [tuple(a) for a in args]


def _golds(sample: dict, choices: list[str], delim: str) -> list[int]:
    """The document's right choices: lm-eval's target is an index, a choice's text, or a list
    of those (a task with several gold answers). Empty where it cannot be read."""
    t = sample["target"]
    if isinstance(t, list):
        found = [_golds({"target": x}, choices, delim) for x in t]
        return sorted({i for f in found for i in f}) if all(found) else []
    if isinstance(t, int) or isinstance(t, str) and t.isdigit():
        return [int(t)]
    if isinstance(t, str):
        return [i for i, c in enumerate(choices) if c in (t, delim + t)][:1]
    return []


def derive(ev, kind: str, samples: list[dict], delim: str) -> tuple[dict, list[dict]]:
    """The tracker's metrics from lm-eval's per-document records."""
    rows, shown = [], []
    if kind == "multiple_choice":
        for s in samples:
            pairs = _args(s)
            lls = [float(r[0]) for r in s["filtered_resps"]]
            golds = _golds(s, [c for _, c in pairs], delim)
            if not golds or not 0 <= golds[0] <= golds[-1] < len(lls) or len(golds) == len(lls):
                continue  # unreadable, out of range, or every choice right: nothing to judge
            row = M.choice_scores(lls, golds)
            gold = max(golds, key=lls.__getitem__)  # the likeliest right answer
            n = len(ev._encode_pair(*pairs[gold])[1])
            row["token_logprob"] = lls[gold] / max(1, n)
            rows.append(row)
            best = max(range(len(lls)), key=lls.__getitem__)
            shown.append({"prompt": pairs[0][0], "target": pairs[gold][1],
                          "output": pairs[best][1]})
        agg = {k: M.mean([r[k] for r in rows]) for k in DERIVED[kind]}
        agg["n_choices"] = M.mean([len(s["filtered_resps"]) for s in samples])
        agg["per_item"] = {"x": [r["margin"] for r in rows],
                           "ok": [r["mc_accuracy"] for r in rows], "x_is": "margin"}
    elif kind == "generate_until":
        from lm_eval.api.instance import Instance
        golds = [str(s["target"]) for s in samples]  # what the generation is compared with
        reqs = [Instance("loglikelihood", s["doc"], (_args(s)[0][0], g), i)
                for i, (s, g) in enumerate(zip(samples, golds))]
        lls = ev.loglikelihood(reqs) if reqs else []
        for s, g, (ll, _), req in zip(samples, golds, lls, reqs):
            out = s["filtered_resps"]
            out = out[0] if isinstance(out, (list, tuple)) else out
            target_ids = ev._encode_pair(*req.args)[1]
            out_ids = ev.tok_encode(str(out), add_special_tokens=False)
            rows.append({"token_logprob": ll / max(1, len(target_ids)),
                         "edit_distance": M.edit_distance(out_ids, target_ids),
                         "ok": s.get("exact_match")})
            shown.append({"prompt": req.args[0], "target": g, "output": str(out)})
        agg = {k: M.mean([r[k] for r in rows]) for k in DERIVED[kind]}
        if rows and all(r["ok"] is not None for r in rows):
            agg["per_item"] = {"x": [r["token_logprob"] for r in rows],
                               "ok": [float(r["ok"]) for r in rows], "x_is": "token_logprob"}
    elif kind == "loglikelihood":
        for s in samples:
            ll, greedy = s["filtered_resps"][0]
            ctx, cont = _args(s)[0]
            n = len(ev._encode_pair(ctx, cont)[1])
            rows.append({"token_logprob": float(ll) / max(1, n), "ok": float(greedy)})
            shown.append({"prompt": ctx, "target": cont, "output": "(greedy)" if greedy
                          else "(not greedy)"})
        agg = {"token_logprob": M.mean([r["token_logprob"] for r in rows])}
        agg["per_item"] = {"x": [r["token_logprob"] for r in rows],
                           "ok": [r["ok"] for r in rows], "x_is": "token_logprob"}
    else:
        agg = {}
        shown = [{"prompt": "", "target": str(s["target"])[:200], "output": ""}
                 for s in samples]
    return agg, shown[:5]
