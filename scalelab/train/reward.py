"""Reward model: the Transformer trunk plus a scalar head read at the last token, learned from
which of two completions is preferred (Bradley-Terry: -log sigmoid(r_better - r_worse)).

As in InstructGPT, the K ranked answers to one prompt form one batch element and all their
C(K,2) comparisons are trained together. Preferences come from a JSONL file, or are
generated: sample K completions per task prompt from the SFT model and rank them with a gold
labeler (`scalelab.train.labelers`), a programmatic stand-in for human raters.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from scalelab.config import PRESETS, Config, RewardConfig, UserError, load_config
from scalelab.data.batches import (
    ExampleLoader,
    batches_by_length,
    held_out_words,
    pack_spans,
    pad_right,
    run_packed,
    split_heldout,
)
from scalelab.data.formats import is_builtin_tasks, read_preferences
from scalelab.evaluate import respond_ids
from scalelab.generate import stopped
from scalelab.io import atomic_write_text, read_json
from scalelab.model import ScalarModel, Transformer
from scalelab.parallel.apply import parallelize
from scalelab.tokenizer import Tokenizer
from scalelab.train.checkpoint import load_model, save_full_model
from scalelab.train.labelers import get_labeler, refuse_unused
from scalelab.train.loop import fit, one_step, start_stage
from scalelab.train.progress import say
from scalelab.train.rundir import claim


def bradley_terry_loss(better: torch.Tensor, worse: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(r_better - r_worse) over pairs."""
    return -F.logsigmoid(better - worse).mean()


def score_last(model: ScalarModel, seqs: torch.Tensor, lengths: torch.Tensor,
               packing: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """Scalar at each right-padded sequence's last real token; with `packing` (pack_spans
    of the batch) computed over the sequences packed into fewer rows."""
    out = run_packed(model, seqs, packing) if packing else model(seqs)
    return out.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)


# ---- saving and loading -------------------------------------------------------------------

def load_reward_model(model_dir: Path, device="cpu") -> tuple[ScalarModel, Tokenizer, dict]:
    d = Path(model_dir)
    if not d.exists():
        raise UserError(f"{d}: model folder not found")
    if not (d / "reward.json").is_file():
        hint = f"; did you mean {d / 'model'}?" if (d / "model" / "reward.json").is_file() \
            else " (give the model/ folder of a `scalelab reward` run)"
        raise UserError(f"{d}: not a reward model folder (no reward.json){hint}")
    model, tok = load_model(d, device, wrap=ScalarModel)
    return model, tok, read_json(d / "reward.json")


@torch.no_grad()
def score_sequences(model: ScalarModel, seqs: list[list[int]], pad_id: int,
                    batch_size: int = 64) -> torch.Tensor:
    """Raw score of each token sequence, in order; batched by length, so little padding."""
    device = next(model.parameters()).device
    out = torch.empty(len(seqs), device=device)
    for rows in batches_by_length(seqs, batch_size):
        batch = [seqs[j] for j in rows]
        lengths = torch.tensor([len(s) for s in batch], device=device)
        out[torch.tensor(rows, device=device)] = score_last(
            model, pad_right(batch, pad_id).to(device), lengths).float()
    return out


def reward_scores(model: ScalarModel, tok: Tokenizer, stats: dict, prompts: list[str],
                  responses: list[list[int]]) -> torch.Tensor:
    """Normalised rewards (mean 0, std 1 on reference samples) for prompt/response ids."""
    raw = score_sequences(model, [tok.chat_prompt(p) + r for p, r in zip(prompts, responses)],
                          tok.pad_id)
    return (raw - stats["mean"]) / stats["std"]


# ---- preference data ------------------------------------------------------------------------

def preference_examples(rc: RewardConfig) -> list:
    """The task examples whose prompts generate_preferences samples answers to."""
    from scalelab.tasks import TRAIN_TASKS, make_examples
    return make_examples(TRAIN_TASKS, rc.n_prompts, rc.seed + 7)


def generate_preferences(policy: Transformer, tok: Tokenizer, cfg: Config) -> list[dict]:
    """Sample K answers per task prompt, rank them with the labeler: one row per prompt with
    its distinct answers best first and their gold scores."""
    rc = cfg.reward
    label = get_labeler(rc.labeler)
    if rc.max_new_tokens >= policy.cfg.seq_len:
        raise UserError(f"reward.max_new_tokens = {rc.max_new_tokens} leaves no room for a "
                        f"prompt in the model's context of {policy.cfg.seq_len} tokens")
    examples = preference_examples(rc)
    g = torch.Generator(device=next(policy.parameters()).device).manual_seed(rc.seed)
    prompts = [e.prompt for e in examples for _ in range(rc.samples_per_prompt)]
    answers = respond_ids(policy, tok, prompts, rc.max_new_tokens, temperature=rc.temperature,
                          generator=g)
    rows = []
    for k, e in enumerate(examples):
        group = answers[k * rc.samples_per_prompt:(k + 1) * rc.samples_per_prompt]
        scored = {}  # (text, stopped) -> gold score; duplicates collapse
        for ids in group:
            ended = stopped(ids, tok.eos_id)
            text = tok.decode(ids)
            scored.setdefault((text, ended), label(e, text, ended))
        ranked = sorted(scored.items(), key=lambda kv: -kv[1])
        if len({s for _, s in ranked}) > 1:  # all tied: nothing to learn from
            rows.append({"prompt": e.prompt, "responses": [t for (t, _), _ in ranked],
                         "stopped": [st for (_, st), _ in ranked],
                         "scores": [s for _, s in ranked]})
    return rows


def rows_from_pairs(pairs: list[tuple[str, str, str]]) -> list[dict]:
    return [{"prompt": p, "responses": [c, r], "scores": [1.0, 0.0]} for p, c, r in pairs]


def encode_rows(rows: list[dict], tok: Tokenizer, max_len: int, min_margin: float = 0.0
                ) -> list[tuple]:
    """(sequences, pairs) per prompt; pairs index (better, worse) whose scores differ by more
    than min_margin (near-ties are no preference). A response ends with EOS unless the row
    says it never stopped, exactly as PPO will present it. An answer longer than max_len is
    left out (cut short, it is not what PPO presents; a long prompt cut both to one prefix)."""
    items, skipped, total = [], 0, 0
    for row in rows:
        prompt = tok.chat_prompt(row["prompt"])
        ended = row.get("stopped", [True] * len(row["responses"]))
        fits = [(prompt + tok.encode(r) + [tok.eos_id] * st, score)
                for r, st, score in zip(row["responses"], ended, row["scores"])]
        total += len(fits)
        fits = [(seq, score) for seq, score in fits if len(seq) <= max_len]
        skipped += len(row["responses"]) - len(fits)
        seqs, s = [seq for seq, _ in fits], [score for _, score in fits]
        pairs = [(i, j) if s[i] > s[j] else (j, i)
                 for i, j in combinations(range(len(seqs)), 2) if abs(s[i] - s[j]) > min_margin]
        if pairs:
            items.append((seqs, pairs))
    if skipped:
        say(f"skipped {skipped} of {total} answers longer than the context "
            f"({max_len} tokens)")
    return items


def group_length(item: tuple) -> int:
    """A prompt group's padded width: its longest answer."""
    return max(len(seq) for seq in item[0])


def collate_groups(items: list[tuple], pad_id: int, pack: bool = False):
    """(sequences right-padded, their lengths, better, worse), and with `pack` how to pack
    the sequences (pack_spans)."""
    seqs, better, worse = [], [], []
    for group, pairs in items:
        base = len(seqs)
        seqs += group
        better += [base + i for i, _ in pairs]
        worse += [base + j for _, j in pairs]
    lengths = torch.tensor([len(s) for s in seqs])
    seqs = pad_right(seqs, pad_id)
    packing = pack_spans(torch.arange(seqs.size(1)) < lengths[:, None]) if pack else ()
    return seqs, lengths, torch.tensor(better), torch.tensor(worse), *packing


def pair_loss_sum(model: ScalarModel, batch) -> torch.Tensor:
    """Bradley-Terry loss summed over the batch's pairs: fit() divides by the step's global
    count of pairs (prompts differ in how many pairs they give)."""
    seqs, lengths, better, worse, *packing = batch
    r = score_last(model, seqs, lengths, packing)
    return bradley_terry_loss(r[better], r[worse]) * len(better)


@torch.no_grad()
def pair_accuracy(model: ScalarModel, batches: list) -> float:
    right = total = 0
    for seqs, lengths, better, worse, *packing in batches:
        r = score_last(model, seqs, lengths, packing)
        right += int((r[better] > r[worse]).sum())
        total += len(better)
    return right / max(total, 1)


# reward.* settings read only where answers are sampled and ranked (--data builtin:tasks)
SAMPLING_KEYS = ("n_prompts", "samples_per_prompt", "temperature", "max_new_tokens")


def refuse_unused_sampling(rc: RewardConfig, data_spec: str) -> None:
    """Sampling settings changed from the reward preset's where nothing is sampled (--data
    FILE): exit 2 naming them, as reward.labeler is (labelers.refuse_unused). Compared with
    the preset, not the dataclass defaults: a config file copied from the preset passes."""
    preset = load_config(PRESETS / "reward.toml").reward
    changed = [f"reward.{k} = {getattr(rc, k)!r}" for k in SAMPLING_KEYS
               if getattr(rc, k) != getattr(preset, k)]
    if changed:
        raise UserError(f"{', '.join(changed)}: no effect with --data {data_spec}: the file's "
                        "pairs are the preferences (answers are sampled and ranked only for "
                        f"--data builtin:tasks); drop {'it' if len(changed) == 1 else 'them'}")


def train_reward(cfg: Config, base: Path, data_spec: str, out: Path,
                 resume: bool = False) -> Path:
    if not is_builtin_tasks(data_spec, "--data"):  # before start_stage makes anything
        refuse_unused(cfg.reward.labeler, f"--data {data_spec}", "the file's pairs are the "
                      "preferences (a labeler ranks answers sampled for --data builtin:tasks)")
        refuse_unused_sampling(cfg.reward, data_spec)
    run, par, policy, tok = start_stage(cfg, out, resume, "reward", base, data=data_spec)
    device = par.device

    pref_file = out / "preferences.jsonl"
    rows_are_generated = is_builtin_tasks(data_spec, "--data")
    if rows_are_generated:
        # Generated once (a resumed run reuses the same data), by rank 0 with the whole model
        # (sampling with a KV cache needs whole heads), exactly as in one process; its own
        # RNG, so every rank's global RNG stays in step for the head below. The other ranks
        # wait on the CPU (no GPU collective to time out), and an error is every rank's.
        with par.together():
            if par.is_main and not pref_file.exists():
                claim(out, "reward", resume)  # run.json first: a rerun may reuse this folder
                tqdm.write("sampling completions from the base model and ranking them")
                with torch.random.fork_rng(devices=[]):
                    rows = generate_preferences(policy, tok, cfg)
                atomic_write_text(pref_file, "".join(json.dumps(r) + "\n" for r in rows))
        rows = [json.loads(line) for line in pref_file.read_text().splitlines()]
    else:
        rows = rows_from_pairs(read_preferences(data_spec))

    items = encode_rows(rows, tok, policy.cfg.seq_len, cfg.reward.min_margin)
    train_items, held = split_heldout(items)
    step_rows, why = one_step(cfg.train, par.data_world)
    if len(train_items) < step_rows:
        hint = ("raise reward.n_prompts" if rows_are_generated else
                f"add pairs to {data_spec} or lower train.batch_size")
        if len(encode_rows(rows, tok, 1 << 30, cfg.reward.min_margin)) > len(items):
            hint = (f"the others have answers longer than the model's context of "
                    f"{policy.cfg.seq_len} tokens: shorten them, or {hint}")
        raise UserError(f"only {len(items)} prompts with a preference "
                        f"({held_out_words(len(items), len(train_items), len(held))}); "
                        f"one step trains on {step_rows} ({why}); {hint}")
    say(f"reward data: {len(train_items)} prompts "
        f"({sum(len(p) for _, p in train_items)} pairs) to train, {len(held)} held out")

    model = parallelize(ScalarModel(policy).to(device), par, cfg.train.dtype)  # head whole over tp
    collate = lambda b: collate_groups(b, tok.pad_id, cfg.reward.pack)  # noqa: E731
    loader = ExampleLoader(train_items, cfg.train.batch_size, collate, seed=cfg.train.seed,
                           rank=par.data_rank, world=par.data_world,
                           accum=cfg.train.grad_accum)
    held = sorted(held, key=group_length)  # evaluation batches of similar widths
    held_batches = [tuple(t.to(device) for t in collate(held[i:i + 32]))
                    for i in range(0, len(held), 32)]
    train_probe = [tuple(t.to(device) for t in collate(train_items[:64]))]

    def evaluate(step: int) -> dict:
        return {"val_accuracy": pair_accuracy(model, held_batches),
                "train_accuracy": pair_accuracy(model, train_probe)}

    @torch.no_grad()
    def save():
        # Normalise on reference samples: every response in the training data.
        raw = score_sequences(model, [s for group, _ in train_items for s in group],
                              tok.pad_id, batch_size=128)
        stats = {"mean": raw.mean().item(), "std": raw.std().clamp(min=1e-6).item(),
                 "val_accuracy": pair_accuracy(model, held_batches)}
        save_full_model(model, tok, out / "model", par, extra_json={"reward.json": stats})

    fit(run, cfg, model, loader, device, pair_loss_sum, evaluate, save_model=save,
        parallel=None if par.single else par,
        count_tokens=lambda batch: int(batch[1].sum()),  # batch[1]: sequence lengths
        loss_units=lambda batch: len(batch[2]))  # batch[2]: the better of each pair
    return out / "model"
