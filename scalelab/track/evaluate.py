"""Run an experiment's items through a model: greedy answers (the batched KV-cache generator)
and teacher-forced log-likelihoods (one forward pass per batch over prompt + target).

Models are scalelab model folders or, when `transformers` is installed, local Hugging Face
causal-LM folders. Both sit behind the same three calls: encode, loglik, greedy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scalelab.config import UserError, load_config
from scalelab.io import read_rows
from scalelab.tokenizer import ids_before
from scalelab.track import metrics as M
from scalelab.track.specs import Item, load_items

BATCH = 64
N_SAMPLES = 5  # sample outputs kept per result


def picked_and_rival(logits: torch.Tensor, tokens: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """From next-token logits (B, T-1, V): log p of each next token and the largest log p of
    any other token (their difference is > 0 where greedy decoding picks the token)."""
    logp = F.log_softmax(logits.float(), -1)
    nxt = tokens[:, 1:, None]
    return logp.gather(-1, nxt).squeeze(-1), logp.scatter(-1, nxt, -torch.inf).amax(-1)


class ScalelabLM:
    def __init__(self, path: Path, device: torch.device, kind: str = "scalelab"):
        from scalelab.train.checkpoint import load_model
        self.kind = kind  # "hf": a Hugging Face folder imported by scalelab.hf
        self.model, self.tok = load_model(path, device)
        self.device, self.max_len = device, self.model.cfg.seq_len
        self.pad_id = self.tok.pad_id
        self.prefix = self.tok.prompt_prefix  # BOS for scalelab's own models, as in training
        self.empty_context = [self.tok.doc_eos_id]  # see contexts()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def next_logprobs(self, tokens: torch.Tensor, mask: torch.Tensor, rivals: bool = False):
        """log p(tokens[:, t+1] | tokens[:, :t+1]): (B, T-1). Right padding: causal
        attention never sees the pads. rivals: also the best log p of any other token."""
        if rivals:
            return picked_and_rival(self.model(tokens)[:, :-1], tokens)
        from scalelab.train.losses import token_logprobs
        h = self.model.hidden(tokens)[:, :-1]
        return token_logprobs(h, self.model.lm_head.weight, tokens[:, 1:])

    def greedy(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        from scalelab.generate import generate
        return generate(self.model, prompts, max_new, self.pad_id, self.tok.eos_id,
                        temperature=0, vocab_limit=self.tok.vocab_size)


class HFLM:
    kind = "hf"

    def __init__(self, path: Path, device: torch.device):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise UserError(f"{path}: a Hugging Face model folder needs `pip install "
                            "transformers`") from None
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: cannot load as a Hugging Face causal LM ({e})") from None
        self.model.to(device).eval()
        self.device = device
        self.max_len = getattr(self.model.config, "max_position_embeddings", 2048)
        # what the tokenizer adds to a text by default, as in lm-eval's and vLLM's prompts
        self.prefix = ids_before(self.tok("x").input_ids,
                                 self.tok("x", add_special_tokens=False).input_ids)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else \
            (self.tok.eos_token_id or 0)
        self.empty_context = [self.tok.eos_token_id if self.tok.eos_token_id is not None
                              else self.pad_id]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def next_logprobs(self, tokens: torch.Tensor, mask: torch.Tensor, rivals: bool = False):
        logits = self.model(input_ids=tokens, attention_mask=mask.long()).logits[:, :-1]
        if rivals:
            return picked_and_rival(logits, tokens)
        return F.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)

    def greedy(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        P = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), P), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding for generation
            ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
        out = self.model.generate(input_ids=ids.to(self.device),
                                  attention_mask=mask.to(self.device), max_new_tokens=max_new,
                                  do_sample=False, pad_token_id=self.pad_id)
        eos = self.tok.eos_token_id
        return [row[: row.index(eos) + 1] if eos is not None and eos in row else row
                for row in out[:, P:].tolist()]


def load_lm(path: str | Path, device: torch.device | None = None) -> ScalelabLM | HFLM:
    from scalelab import hf
    from scalelab.hardware import pick_device
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: model folder not found")
    device = device or pick_device("auto")
    if not hf.is_hf_folder(path):
        return ScalelabLM(path, device)
    try:  # Llama, Qwen2, Mistral: scalelab runs them itself (no transformers needed)
        hf.hf_model_config(json.loads((path / "config.json").read_text()), str(path))
    except UserError:
        return HFLM(path, device)  # any other causal LM, through transformers
    return ScalelabLM(path, device, kind="hf")


@torch.no_grad()
def loglik(lm, contexts: list[list[int]], targets: list[list[int]], margins: list | None = None
           ) -> list[list[float]]:
    """Log-probability of every target token given its context, one forward per batch. With
    `margins` (a list), also appends each target's per-token margins: log p(target token)
    minus the largest log p of any other token (> 0 where greedy decoding picks it)."""
    out: list[list[float]] = []
    for b in range(0, len(contexts), BATCH):
        seqs, starts = [], []
        for ctx, tgt in zip(contexts[b: b + BATCH], targets[b: b + BATCH]):
            seq = (ctx + tgt)[-lm.max_len:]  # an over-long context loses its start
            seqs.append(seq)
            starts.append(len(seq) - len(tgt))
        T = max(map(len, seqs))
        tokens = torch.full((len(seqs), T), lm.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.bool)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), True
        got = lm.next_logprobs(tokens.to(lm.device), mask.to(lm.device),
                               rivals=margins is not None)
        picked, rivals = got if margins is not None else (got, None)
        picked = picked.float().cpu()
        for i, (s, start) in enumerate(zip(seqs, starts)):
            out.append(picked[i, start - 1: len(s) - 1].tolist())
            if rivals is not None:
                margins.append((picked[i] - rivals[i].float().cpu())[start - 1: len(s) - 1]
                               .tolist())
    return out


def greedy_answers(lm, contexts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Greedy continuations, one token longer than each target (to see where it stops).
    A batch holds targets of one length: a long prompt is cut to leave room for its own
    answer only (not for the longest of its batch), so an item's answer, like its loglik,
    does not depend on which other items share its batch."""
    out: list[list[int]] = [[] for _ in contexts]
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    for n, items in sorted(by_length.items()):
        for b in range(0, len(items), BATCH):
            rows = items[b: b + BATCH]
            got = lm.greedy([contexts[i][-(lm.max_len - n - 1):] for i in rows], n + 1)
            for i, o in zip(rows, got):
                out[i] = o[: n + 1]
    return out


def contexts(lm, items: list[Item]) -> list[list[int]]:
    if items[0].example is None:
        # An empty prompt, on a tokenizer that starts prompts with nothing (Qwen2.5, GPT-2
        # style), would leave the first target token with no context at all: it gets the
        # end-of-text token instead, as lm-eval gives an empty context.
        return [lm.prefix + lm.encode(it.prompt) or lm.empty_context for it in items]
    if lm.kind != "scalelab":
        raise UserError("tasks: specs use scalelab's chat template; a Hugging Face model "
                        "needs a JSONL task file instead")
    return [lm.tok.chat_prompt(it.prompt) for it in items]


def is_right(it: Item, text: str) -> float:
    if it.example is not None:  # the task family's own (lenient) scorer
        from scalelab.tasks import TASKS
        return TASKS[it.example.family].score(it.example, text)
    return M.exact_match(text, it.target)


def check_fits(lm, items: list[Item], answers: list[list[list[int]]], spare: int) -> None:
    """Each answer (every choice of an item), one prompt token and `spare` more (greedy's
    stop check) must fit the model's context: loglik and greedy_answers cut prompts only."""
    for i, (it, ans) in enumerate(zip(items, answers)):
        n = max(map(len, ans))
        if n + 1 + spare > lm.max_len:
            raise UserError(f"{it.source or f'item {i + 1}'}: an answer of {n} tokens does not "
                            f"fit the model's {lm.max_len}-token context (with a prompt token"
                            f"{' and one to spare' if spare else ''})")


def score(lm, items: list[Item]) -> tuple[dict, list[dict]]:
    """Mean metrics over the items, plus a few sample outputs. agg["per_item"] keeps each
    item's right/wrong and its continuous score (the greedy margin, with the mean target-token
    log-likelihood beside it; for multiple choice the answer's log-likelihood margin over the
    best other choice), from which predictions calibrate pass/fail (track/predict.py)."""
    ctxs = contexts(lm, items)
    if items[0].is_choice:
        flat_ctx = [c for c, it in zip(ctxs, items) for _ in it.choices]
        flat_tgt = [lm.encode(ch) for it in items for ch in it.choices]
        per_item = iter(flat_tgt)
        check_fits(lm, items, [[next(per_item) for _ in it.choices] for it in items], 0)
        lps = iter(loglik(lm, flat_ctx, flat_tgt))
        rows, samples = [], []
        for it in items:
            per = [next(lps) for _ in it.choices]
            totals = [sum(lp) for lp in per]
            s = M.choice_scores(totals, it.answer)
            s["token_logprob"] = M.token_logprob(per[it.answer])
            rows.append(s)
            if len(samples) < N_SAMPLES:
                best = max(range(len(totals)), key=totals.__getitem__)
                samples.append({"prompt": it.prompt, "target": it.choices[it.answer],
                                "output": it.choices[best]})
        agg = {k: M.mean([r[k] for r in rows]) for k in M.CHOICE_METRICS}
        agg["n_choices"] = M.mean([len(it.choices) for it in items])
        agg["per_item"] = {"x": [r["margin"] for r in rows],
                           "ok": [r["mc_accuracy"] for r in rows], "x_is": "margin"}
        return agg, samples
    tgts = [lm.encode(it.target) for it in items]
    check_fits(lm, items, [[t] for t in tgts], 1)
    margins: list[list[float]] = []
    lps = loglik(lm, ctxs, tgts, margins)
    outs = greedy_answers(lm, ctxs, [len(t) for t in tgts])
    rows, samples = [], []
    for it, tgt, lp, out in zip(items, tgts, lps, outs):
        text = lm.decode(out)
        rows.append({"exact_match": is_right(it, text),
                     "token_logprob": M.token_logprob(lp),
                     "edit_distance": M.edit_distance(out, tgt)})
        if len(samples) < N_SAMPLES:
            samples.append({"prompt": it.prompt, "target": it.target, "output": text})
    agg = {k: M.mean([r[k] for r in rows]) for k in M.GENERATION_METRICS}
    agg["target_tokens"] = M.mean([len(t) for t in tgts])
    # the greedy margin of an item is its weakest target token's margin: > 0 exactly when
    # greedy decoding reproduces every target token (exact match, up to where it stops)
    agg["per_item"] = {"x": [min(m) if m else 0.0 for m in margins],
                       "ok": [r["exact_match"] for r in rows], "x_is": "greedy_margin",
                       "token_logprob": [r["token_logprob"] for r in rows]}
    return agg, samples


def run_experiment(lm, exp) -> tuple[dict, bool, list[dict], int, float]:
    from scalelab.track import lmeval_task
    t0 = time.perf_counter()
    if lmeval_task.is_lm_eval(exp["task"]):
        agg, samples, n = lmeval_task.run(lm, exp["task"])
    else:
        items = load_items(exp["task"])
        agg, samples = score(lm, items)
        n = len(items)
    if exp["metric"] not in agg:
        raise UserError(f"experiment {exp['name']!r}: metric {exp['metric']!r} does not apply "
                        f"to task {exp['task']!r} (it has {', '.join(sorted(agg))})")
    passed = M.passes(agg[exp["metric"]], exp["threshold"], exp["metric"])
    return agg, passed, samples, n, time.perf_counter() - t0


# ---- what a model folder says about itself ----------------------------------------------

def model_info(path: str | Path, lm) -> dict:
    """Parameter counts, and from the run folder around it (RUN/model) the training tokens,
    6ND FLOPs and the pretraining validation loss (next-token loss on held-out text; a
    post-training stage's own losses are different quantities and are not stored there).
    A post-trained model's tokens and FLOPs include those of the model it started from
    (lineage.json); PPO's rollouts are not counted.

    N, the one parameter count of every fit, budget and prediction ("non_embedding_params"),
    is Transformer.num_params(): all parameters except an input embedding table, which is
    counted when it is tied to the output layer (there it is a real matmul). The sweep's
    token budgets and the FLOPs (6ND) use the same N."""
    path = Path(path).resolve()
    model = lm.model
    params = sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once
    if hasattr(model, "num_params"):  # scalelab's Transformer (own or imported weights)
        n = model.num_params()
    else:  # a transformers model: the same rule, by asking whether the head is the table
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        n = params if head is not None and head.weight is emb.weight else \
            params - emb.weight.numel()
    info = {"path": str(path), "kind": lm.kind, "params": params,
            "non_embedding_params": n, "tokens": None, "flops": None, "val_loss": None}
    if lm.kind == "scalelab":
        info.update(run_totals(path, n))
    return info


def run_totals(model_dir: Path, n: int, depth: int = 0) -> dict:
    """tokens, flops (6 N D) and val_loss of the run around model_dir, plus its parents'
    tokens and flops (following lineage.json up to a few stages)."""
    run = model_dir.parent
    if not ((run / "config.toml").is_file() and (run / "metrics.jsonl").is_file()):
        return {}
    cfg = load_config(run / "config.toml")
    step, val, tokens = 0, None, None
    for row in read_rows(run / "metrics.jsonl"):
        if "loss" in row:
            step = max(step, row["step"])
            tokens = row.get("tokens", tokens)  # real tokens, logged by the training loop
        if "val_loss" in row:
            val = row["val_loss"]
    try:
        record = json.loads((run / "lineage.json").read_text())
        stage, parent = record["stage"], Path(record["parent"])
    except (OSError, ValueError, KeyError, TypeError):
        stage, parent = "pretrain", None
    if tokens is None and stage != "ppo":  # older runs: full windows of batch x seq_len
        tc = cfg.train
        ranks = cfg.parallel.dp * cfg.parallel.fsdp  # batch_size is per data rank
        if ranks > 0:  # a -1 (inferred from the world size) is not recorded: tokens unknown
            tokens = step * tc.batch_size * tc.grad_accum * cfg.model.seq_len * ranks
    out = {"tokens": tokens or 0, "flops": 6.0 * n * (tokens or 0),
           "val_loss": val if stage == "pretrain" else None}
    if parent is not None and depth < 8:
        up = run_totals(parent.resolve(), n, depth + 1)  # a relative parent: from the cwd
        out["tokens"] += up.get("tokens") or 0
        out["flops"] += up.get("flops") or 0.0
    if tokens is None and stage == "pretrain":
        return {"val_loss": out["val_loss"]}
    return out
