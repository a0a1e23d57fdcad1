"""DPO: learn from preference pairs directly, no reward model and no sampling.

loss = -log sigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))), with log-probs summed
over the response tokens and a frozen copy of the starting policy as reference. At step 1
policy == reference, so the loss is exactly ln 2.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from scalelab.config import Config, UserError
from scalelab.data.batches import (
    ExampleLoader,
    held_out_words,
    pack_spans,
    pad_right,
    run_packed,
    split_heldout,
)
from scalelab.data.formats import is_builtin_tasks, read_jsonl, read_preferences
from scalelab.parallel.apply import parallelize
from scalelab.train.checkpoint import save_full_model
from scalelab.train.loop import fit, one_step, start_stage
from scalelab.train.losses import token_logprobs
from scalelab.train.progress import say
from scalelab.train.sft import IGNORE, encode_conversations


def sequence_logprob(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     packing: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Sum of log p(target) over the positions where the target is not IGNORE: (B,). With
    `packing` (pack_spans of the batch) the model reads the sequences packed."""
    h = run_packed(model.hidden, x, packing) if packing else model.hidden(x)
    return token_logprobs(h, model.lm_head.weight, y).sum(-1)  # IGNORE -> 0


def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor,
             ref_r: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * ((logp_c - ref_c) - (logp_r - ref_r))).mean()


Pair = tuple[str, str, str, bool, bool]  # prompt, chosen, rejected, and whether each stopped


def check_ranked_row(row: dict, where: str) -> tuple[list, list, list]:
    """(responses, scores, stopped) of a reward run's ranked row, or UserError naming where."""
    answers = row.get("responses")
    if not isinstance(row.get("prompt"), str):
        raise UserError(f'{where}: "prompt" must be a string')
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f'{where}: "responses" must be a list of strings, best first')
    n = len(answers)
    scores, stopped = row.get("scores"), row.get("stopped", [True] * n)
    if not isinstance(scores, list) or len(scores) != n or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise UserError(f'{where}: "scores" must be a list of {n} numbers, one per response')
    if not isinstance(stopped, list) or len(stopped) != n or not all(
            isinstance(x, bool) for x in stopped):
        raise UserError(f'{where}: "stopped" must be a list of {n} true/false, one per response')
    return answers, scores, stopped


def load_pairs(spec: str, min_margin: float) -> list[Pair]:
    """prompt/chosen/rejected rows from a JSONL file; a reward run's generated
    `preferences.jsonl` (ranked answers per prompt) also works: the best answer vs each one
    scored more than min_margin lower, each ending with EOS only if the model stopped."""
    if is_builtin_tasks(spec, "--data"):
        raise UserError(f"--data: {spec!r}: DPO reads a preference JSONL file, e.g. the "
                        "preferences.jsonl that `scalelab reward --data builtin:tasks` writes")
    rows = read_jsonl(spec)
    if "responses" not in rows[0][1]:
        return [(p, c, r, True, True) for p, c, r in read_preferences(spec)]
    pairs = []
    for n, row in rows:
        answers, scores, stopped = check_ranked_row(row, f"{spec}:{n}")
        pairs += [(row["prompt"], answers[0], a, stopped[0], st)
                  for a, s, st in zip(answers[1:], scores[1:], stopped[1:])
                  if scores[0] - s > min_margin]
    return pairs


def dpo(cfg: Config, policy_dir: Path, data_spec: str, out: Path, resume: bool = False) -> Path:
    run, par, model, tok = start_stage(cfg, out, resume, "dpo", policy_dir, data=data_spec)
    device = par.device
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    parallelize(model, par, cfg.train.dtype, entry="hidden")  # both by the same rules; the
    parallelize(ref, par, cfg.train.dtype, entry="hidden")  # loss reads hidden(), lm_head
    pairs = load_pairs(data_spec, cfg.dpo.min_margin)

    def conv(prompt: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    def fits(prompt: str, answer: str) -> bool:
        return len(tok.encode_chat(conv(prompt, answer))[0]) <= model.cfg.seq_len + 1

    def encode(prompt: str, answer: str, stopped: bool) -> tuple[list[int], list[int]]:
        x, y = encode_conversations([conv(prompt, answer)], tok, model.cfg.seq_len)[0]
        if not stopped:  # the model never said EOS here: don't credit or blame one
            y[max(i for i, t in enumerate(y) if t != IGNORE)] = IGNORE
        return x, y

    usable = [pair for pair in pairs if fits(*pair[:2]) and fits(pair[0], pair[2])]
    if len(usable) < len(pairs):
        say(f"skipped {len(pairs) - len(usable)} of {len(pairs)} pairs longer than the "
            f"context ({model.cfg.seq_len} tokens)")
    items = [(encode(p, c, c_stop), encode(p, r, r_stop)) for p, c, r, c_stop, r_stop in usable]
    train_items, val_items = split_heldout(items)
    need, why = one_step(cfg.train, par.data_world)
    if len(train_items) < need:
        fix = "add pairs or lower train.batch_size"
        if len(usable) < len(pairs):
            fix = (f"the other {len(pairs) - len(usable)} are longer than the model's context "
                   f"of {model.cfg.seq_len} tokens: shorten them, or {fix}")
        held = held_out_words(len(items), len(train_items), len(val_items))
        raise UserError(f"{data_spec}: only {len(items)} usable pairs ({held}); one step "
                        f"trains on {need} ({why}); {fix}")

    def collate(batch):
        seqs = [c for c, _ in batch] + [r for _, r in batch]  # chosen first, then rejected
        x, y = pad_right([x for x, _ in seqs], tok.pad_id), pad_right([y for _, y in seqs], IGNORE)
        lengths = torch.tensor([len(s) for s, _ in seqs])
        packing = pack_spans(torch.arange(x.size(1)) < lengths[:, None]) if cfg.dpo.pack else ()
        return x, y, *packing

    def loss_fn(m, batch):
        x, y, *packing = batch
        half = x.size(0) // 2
        logp = sequence_logprob(m, x, y, packing)
        with torch.no_grad():
            ref_logp = sequence_logprob(ref, x, y, packing)
        return dpo_loss(logp[:half], logp[half:], ref_logp[:half], ref_logp[half:],
                        cfg.dpo.beta)

    val_batches = [collate(val_items[i:i + 32]) for i in range(0, len(val_items), 32)]

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        right = total = loss = 0.0
        for batch in val_batches:
            x, y, *packing = (t.to(device) for t in batch)
            half = x.size(0) // 2
            logp = sequence_logprob(model, x, y, packing)
            ref_logp = sequence_logprob(ref, x, y, packing)
            margin = logp - ref_logp
            right += float((margin[:half] > margin[half:]).sum())
            total += half
            loss += dpo_loss(logp[:half], logp[half:], ref_logp[:half], ref_logp[half:],
                             cfg.dpo.beta).item()
        return {"val_loss": loss / len(val_batches), "val_pair_accuracy": right / total}

    def loss_sum(m, batch):  # summed over pairs: fit() divides by the step's global count
        return loss_fn(m, batch) * pairs_in(batch)

    def pairs_in(batch) -> int:
        return batch[0].size(0) // 2

    loader = ExampleLoader(train_items, cfg.train.batch_size, collate, seed=cfg.train.seed,
                           rank=par.data_rank, world=par.data_world,
                           accum=cfg.train.grad_accum)
    fit(run, cfg, model, loader, device, loss_sum, evaluate,
        save_model=lambda: save_full_model(model, tok, out / "model", par),
        count_tokens=lambda batch: int((batch[0] != tok.pad_id).sum()),
        parallel=None if par.single else par, loss_units=pairs_in)
    return out / "model"
