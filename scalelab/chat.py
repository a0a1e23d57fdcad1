"""`scalelab chat`: talk to a chat model in the terminal, turn after turn.

Each turn is the whole conversation so far in the tokenizer's chat template, ending with an
open assistant turn; the answer is printed token by token as it is sampled (one row, a KV
cache) and ends at EOS. Works with stdin piped, one user message per line. Ctrl-C while an
answer streams stops that answer (what was shown of it stays in the conversation); Ctrl-C at
the prompt, or end of input, ends the chat.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterator
from typing import TextIO

import torch

from scalelab.generate import sample_next
from scalelab.model import KVCache
from scalelab.tokenizer import Tokenizer

HELP = "(one message per line; /reset forgets the conversation, /exit or end of input quits)"


@torch.no_grad()
def stream_tokens(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
                  eos_ids: Collection[int], temperature: float, top_k: int, top_p: float,
                  generator: torch.Generator | None, vocab_limit: int | None = None
                  ) -> Iterator[int]:
    """Yield sampled token ids one at a time (a stop id included, then stop); vocab_limit:
    as generate's (the tokenizer's vocabulary size)."""
    param = next(model.parameters())
    total = min(len(prompt) + max_new_tokens, model.cfg.seq_len)
    cache = KVCache(model.cfg, 1, total, param.device, param.dtype)
    x = torch.tensor([prompt], dtype=torch.long, device=param.device)
    noise = torch.zeros(1, model.cfg.vocab_size, device=param.device)  # drawn as generate does
    for _ in range(total - len(prompt)):
        if temperature > 0:
            noise.uniform_(generator=generator)
        nxt = sample_next(model(x, cache=cache)[:, -1], temperature, top_k, top_p, noise,
                          vocab_limit)
        tok = int(nxt.item())
        yield tok
        if tok in eos_ids:
            return
        x = nxt.view(1, 1)


def is_utf8(text: str) -> bool:
    """False for text Python decoded from invalid UTF-8 (argv, stdin): it holds lone
    surrogates, which the tokenizer refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def stream_text(tok: Tokenizer, ids: Iterator[int], out: TextIO,
                got: list[int] | None = None) -> list[int]:
    """Print the decoded text as it grows; hold back a character whose bytes are incomplete.
    The ids go into `got` as they arrive: a caller interrupted midway keeps them."""
    got, shown = [] if got is None else got, ""
    for i in ids:
        got.append(i)
        text = tok.decode(got)
        if text.endswith("\ufffd"):  # part of a multi-byte character: wait for the rest
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    text = tok.decode(got)
    out.write(text[len(shown):])
    return got


def fit_history(tok: Tokenizer, messages: list[dict], budget: int) -> tuple[list[int], int]:
    """Prompt ids for the newest turns that fit `budget` tokens; how many turns were dropped.
    A system message, if any, is kept."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = tok.encode_chat(system + turns, generation_prompt=True)[0]
        if len(ids) <= budget or len(turns) <= 1:
            return ids, dropped
        turns, dropped = turns[2:] if len(turns) > 2 else turns[1:], dropped + 1


def chat_loop(model: torch.nn.Module, tok: Tokenizer, inp: TextIO, out: TextIO,
              max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              generator: torch.Generator | None, system: str | None = None,
              interactive: bool = False) -> int:
    """Read user lines until EOF or /exit; return the number of answers given."""
    messages = [{"role": "system", "content": system}] if system else []
    answers = 0
    budget = model.cfg.seq_len - max_new_tokens
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = inp.readline()
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if not is_utf8(text):
            sys.stderr.write("scalelab: that line is not valid UTF-8 text (your terminal or "
                             "file uses another encoding); it was not sent\n")
            continue
        if text.strip() == "/reset":
            messages = messages[:1] if system else []
            out.write("(conversation forgotten)\n")
            continue
        messages.append({"role": "user", "content": text})
        prompt, dropped = fit_history(tok, messages, budget)
        if len(prompt) > budget:
            messages.pop()
            sys.stderr.write(f"scalelab: that message is too long for the model's context of "
                             f"{model.cfg.seq_len} tokens with --max-new-tokens "
                             f"{max_new_tokens}; say less or lower --max-new-tokens\n")
            continue
        if dropped:
            sys.stderr.write(f"(the oldest {dropped} exchange(s) no longer fit the context of "
                             f"{model.cfg.seq_len} tokens: the model no longer sees them)\n")
        out.write("assistant> ")
        ids: list[int] = []
        try:
            stream_text(tok, stream_tokens(model, prompt, max_new_tokens, tok.stop_ids,
                                           temperature, top_k, top_p, generator,
                                           tok.vocab_size), out, ids)
            answer = tok.decode(ids)
        except KeyboardInterrupt:  # Ctrl-C: stop this answer, keep the chat
            answer = tok.decode(ids).rstrip("\ufffd")  # what was shown (no half character)
            out.write(" [stopped]")
            if not answer:  # stopped before a word: forget the question too
                out.write("\n")
                messages.pop()
                continue
        out.write("\n")
        out.flush()
        messages.append({"role": "assistant", "content": answer})
        answers += 1
    return answers
