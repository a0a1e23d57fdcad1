"""Instruction fine-tuning: every task framed as instruction -> response, loss on the response.

A batch's conversations are packed into as few rows as fit, none wider than its longest
conversation (sft.pack), each seeing only itself (a block-diagonal causal mask, positions
from 0 in each): the same loss and gradients as one right-padded row per conversation, for
about half the tokens on the built-in tasks.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from scalelab.config import Config, UserError
from scalelab.data.batches import (
    ExampleLoader,
    held_out_words,
    pack,
    packed_attention,
    pad_right,
    split_heldout,
)
from scalelab.data.formats import is_builtin_tasks, read_conversations
from scalelab.parallel.apply import parallelize
from scalelab.tokenizer import Tokenizer
from scalelab.train.checkpoint import save_full_model
from scalelab.train.loop import fit, mean_loss, one_step, start_stage
from scalelab.train.losses import IGNORE, cross_entropy
from scalelab.train.progress import say


def task_conversations(n: int, seed: int, chatty_fraction: float = 0.0
                       ) -> tuple[list[list[dict]], list]:
    """n conversations over the training task families, and the examples behind them. A
    chatty_fraction of the responses end with a pleasantry line (tasks.demonstration)."""
    from scalelab.tasks import TRAIN_TASKS, make_examples
    from scalelab.tasks.core import demonstration
    examples = make_examples(TRAIN_TASKS, n, seed)
    rng = random.Random(f"{seed}:demonstrations")
    return [[{"role": "user", "content": e.prompt},
             {"role": "assistant", "content": demonstration(e, rng, chatty_fraction)}]
            for e in examples], examples


def encode_conversations(convs: list[list[dict]], tok: Tokenizer, max_len: int
                         ) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) per conversation; targets are IGNORE except on assistant tokens."""
    out, dropped = [], 0
    for conv in convs:
        ids, mask = tok.encode_chat(conv)
        if len(ids) > max_len + 1:
            dropped += 1
            continue
        targets = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
        out.append((ids[:-1], targets))
    if dropped:
        say(f"skipped {dropped} of {len(convs)} conversations longer than {max_len} tokens")
    if not out:
        raise UserError(f"no conversation fits the model's context of {max_len} tokens")
    return out


def sft_batch(items: list[tuple[list[int], list[int]]], width: int, pad_id: int,
              packing: bool) -> tuple[torch.Tensor, ...]:
    """A batch of (inputs, targets) items: packed (`pack`) where packing saves a row, else
    right-padded. A packed batch of one item per row would differ from the padded one only
    by its mask, which on CUDA rules out the flash kernel (batch size 1, say)."""
    if packing:
        packed = pack(items, width, pad_id, IGNORE)
        if len(packed[0]) < len(items):
            return packed
    return pad_right([x for x, _ in items], pad_id), pad_right([y for _, y in items], IGNORE)


def masked_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean loss over the assistant tokens of a batch: (inputs, targets) right-padded, or
    packed (inputs, targets, positions, segments)."""
    x, y, *packed = batch
    positions, mask = (packed[0], packed_attention(packed[1])) if packed else (None, None)
    h = model.hidden(x, positions, mask)
    return cross_entropy(h, model.lm_head.weight, y)  # skips IGNORE targets


def masked_loss_sum(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Summed over the assistant tokens: fit() divides by their count over the whole step
    (every micro-batch, every data rank), so each token weighs the same."""
    return masked_loss(model, batch) * (batch[1] != IGNORE).sum()


def assistant_tokens(batch: tuple[torch.Tensor, ...]) -> int:
    return int((batch[1] != IGNORE).sum())


def sft(cfg: Config, base: Path, data_spec: str, out: Path, resume: bool = False) -> Path:
    run, par, model, tok = start_stage(cfg, out, resume, "sft", base, data=data_spec)
    device = par.device
    parallelize(model, par, cfg.train.dtype, entry="hidden")  # the loss reads hidden(), lm_head

    sc = cfg.sft
    if is_builtin_tasks(data_spec, "--data"):
        convs = task_conversations(sc.n_examples, sc.seed, sc.chatty_fraction)[0]
    else:
        convs = read_conversations(data_spec)
    encoded = encode_conversations(convs, tok, model.cfg.seq_len)
    train_items, val_items = split_heldout(encoded)

    def collate(items):
        return sft_batch(items, model.cfg.seq_len, tok.pad_id, sc.pack)
    tc = cfg.train
    step_rows, why = one_step(tc, par.data_world)
    if len(train_items) < step_rows:
        raise UserError(f"{data_spec}: {len(encoded)} usable examples "
                        f"({held_out_words(len(encoded), len(train_items), len(val_items))}), "
                        f"fewer than one batch of {step_rows} ({why}) to train on")
    loader = ExampleLoader(train_items, tc.batch_size, collate, seed=tc.seed,
                           rank=par.data_rank, world=par.data_world,
                           accum=cfg.train.grad_accum)
    val_batches = [collate(val_items[i: i + tc.batch_size])
                   for i in range(0, len(val_items), tc.batch_size)]
    eval_examples = None
    if data_spec == "builtin:tasks" and par.single:  # task accuracy on fresh examples (it
        # samples with a KV cache, which needs whole heads: one process only)
        eval_examples = task_conversations(200, cfg.sft.seed + 1)[1]

    @torch.no_grad()
    def evaluate(step: int) -> dict:
        # the mean over every held-out assistant token: the same for any batch_size/mapping
        row = {"val_loss": mean_loss(model, masked_loss_sum, val_batches, device, tc.dtype,
                                     units=assistant_tokens)}
        if eval_examples is not None:
            from scalelab.evaluate import task_accuracy
            row["task_accuracy"] = task_accuracy(model, tok, eval_examples)["mean"]
        return row

    mean_len = sum(len(i) for i, _ in train_items) / len(train_items)
    fit(run, cfg, model, loader, device, masked_loss_sum, evaluate,
        save_model=lambda: save_full_model(model, tok, out / "model", par),
        count_tokens=lambda batch: int((batch[0] != tok.pad_id).sum()),
        flops_per_token=model.flops_per_token(int(mean_len)),
        parallel=None if par.single else par, loss_units=assistant_tokens)
    return out / "model"
