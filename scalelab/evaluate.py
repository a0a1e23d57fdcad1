"""Task accuracy of a chat model: greedy answers to task prompts, scored programmatically."""

from __future__ import annotations

from collections import defaultdict

import torch

from scalelab.data.batches import batches_by_length
from scalelab.generate import generate
from scalelab.model import Transformer
from scalelab.tokenizer import Tokenizer


@torch.no_grad()
def respond_ids(model: Transformer, tok: Tokenizer, prompts: list[str], max_new_tokens: int = 24,
                batch_size: int = 64, **sampling) -> list[list[int]]:
    """Answer ids (ending in EOS if the model stopped) to one-turn chat prompts, in order;
    greedy unless sampling says otherwise. Prompts are batched by length: a batch then pads
    little, and its answers (to similar questions) tend to end together."""
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("vocab_limit", tok.vocab_size)  # never a padded vocabulary's ids
    room = model.cfg.seq_len - max_new_tokens  # too-long prompts keep their last tokens
    ids = [tok.chat_prompt(p)[-room:] for p in prompts]
    out: list[list[int]] = [[] for _ in ids]
    for rows in batches_by_length(ids, batch_size):
        answers = generate(model, [ids[j] for j in rows], max_new_tokens, tok.pad_id,
                           tok.eos_id, **sampling)
        for j, answer in zip(rows, answers):
            out[j] = answer
    return out


def task_accuracy(model: Transformer, tok: Tokenizer, examples: list) -> dict[str, float]:
    """Mean score per task family, plus "mean" over families."""
    was_training = model.training
    model.eval()
    answers = [tok.decode(ids) for ids in respond_ids(model, tok, [e.prompt for e in examples])]
    model.train(was_training)
    from scalelab.tasks import TASKS
    scores: dict[str, list[float]] = defaultdict(list)
    for e, a in zip(examples, answers):
        scores[e.family].append(TASKS[e.family].score(e, a))
    acc = {f: sum(v) / len(v) for f, v in sorted(scores.items())}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc
