"""The batching engine: one worker thread per loaded model.

Concurrent requests are decoded together, continuously: a request joins the running batch
between two decode steps and leaves it when it ends, and every sampled token is streamed out
as an event the moment it exists. Sampling settings are per row (temperature, top_p, seed:
the noise for Gumbel-max sampling comes from each request's own generator), so any mix of
requests can share a batch, and a seeded request gives the same tokens alone or in company.
How rows share one KV cache: see Engine.

The engine knows nothing about HTTP: a Job carries a callback that receives plain dicts
  {"type": "delta", "index": i, "text": str, "logprobs": [...]}       new text of row i (and,
                                       with logprobs asked for, the entries of its tokens)
  {"type": "done", "index": i, "finish_reason": "stop"|"length", "text": str,
   "tokens": int, "logprobs": [...] | None, "prompt_logprobs": [...] | None}
  {"type": "error", "message": str}                                  the whole job failed
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import takewhile

import torch

from scalelab.generate import left_pad, padded_attention
from scalelab.model import KVCache, Transformer
from scalelab.tokenizer import Tokenizer


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: the sampled token's and k alternatives
    echo: bool = False  # also score the prompt (completions API)


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[dict], None]
    n: int = 1
    cancelled: bool = False  # set by the caller when its client went away
    prompt_logprobs: list | None = None  # filled for echo


@dataclass
class Row:
    job: Job
    index: int
    generator: torch.Generator
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted
    chars: int = 0  # characters of text decoded so far
    entries: list[dict] = field(default_factory=list)  # per-token logprob entries
    sent_entries: int = 0  # how many of them were emitted
    done: bool = False
    eos: bool = False


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to hold back while streaming: a suffix that may be the
    start of a stop string, or a half-decoded UTF-8 character."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    if text[len(text) - hold - 1: len(text) - hold] == "\ufffd":
        hold += 1
    return hold


def padded_batch(prompts: list[list[int]], total: int, pad_id: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded tokens (B, total), position ids counting valid tokens only, and the
    causal mask (B, 1, total, total) that hides padding (a pad query sees itself)."""
    tokens, valid = left_pad(prompts, total, pad_id)
    positions, mask = padded_attention(valid)
    return tokens.to(device), positions.to(device), mask.to(device)


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
    """One token per row with per-row temperature (0 = greedy) and top_p, by Gumbel-max on
    uniform noise (B, V): argmax(logits / T + Gumbel) is a sample from softmax(logits / T)."""
    greedy = logits.argmax(-1)
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    if bool((top_p < 1).any()):  # the sort is a quarter of a tiny model's step: only if asked
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        limit = torch.where(top_p < 1, top_p, torch.full_like(top_p, math.inf))
        drop = (probs.cumsum(-1) - probs) > limit[:, None]  # the smallest set reaching top_p
        scaled = scaled.masked_fill(drop.scatter(1, order, drop), -math.inf)
    gumbel = -torch.log(-torch.log(noise.clamp(1e-12, 1 - 1e-7)))
    return torch.where(temperature <= 0, greedy, (scaled + gumbel).argmax(-1))


class Engine:
    """Owns one model; `submit` a Job from any thread, events come back through job.emit.

    Continuous batching over one KV cache of seq_len columns: every decode step feeds each
    row's newest token at the same column t (positions are per row, so columns are storage
    only). A new job joins between steps: its prompt is prefilled on its own into columns
    [t - len, t) of a free row, its first token sampled, and from then on it steps with the
    others. When t runs out of room, every column before the oldest live row's first one is
    dropped (the cache shifts left). Admission is first come, first served: a job that cannot
    join yet (its prompt is longer than t, or it would not fit before the cache's end, or
    no row is free) holds the ones behind it, so the batch drains for it and nothing starves.
    """

    def __init__(self, model: Transformer, tok: Tokenizer, max_batch: int = 32,
                 window_s: float = 0.005, max_queue: int = 256, context: int | None = None):
        self.model, self.tok = model, tok
        # a row ends at the end of a turn or of a document (they differ for an imported base
        # model with a chat template: <|im_end|> and <|endoftext|>), or at any other id its
        # generation_config.json names
        self.stop_ids = set(tok.stop_ids)
        self.vocab_limit = tok.vocab_size  # ids past it (a padded vocabulary's) are never sent
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # the served context: the KV cache holds this many columns for every row, and each
        # decode step attends over all of them (default: the model's whole context)
        self.seq_len = context or model.cfg.seq_len
        if not 0 < self.seq_len <= model.cfg.seq_len:
            raise ValueError(f"context {self.seq_len} must be in 1..{model.cfg.seq_len}")
        self.max_batch, self.window_s = max_batch, window_s
        self.queue: queue.Queue[Job] = queue.Queue(max_queue)
        self.waiting: deque[Job] = deque()  # taken from the queue, not yet admitted
        self.shared_gen = torch.Generator(device=self.device)  # unseeded requests' noise:
        self.shared_gen.seed()  # from the OS, so a restarted server does not replay its samples
        # counters for /health: admissions (prefill batches), decode steps, rows x steps
        self.batches = self.rows_served = self.steps = self.row_steps = self.shifts = 0
        self._reset()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="scalelab-engine")
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Raises queue.Full when the server is overloaded (the caller answers 503)."""
        self.queue.put_nowait(job)

    # ---- the worker -------------------------------------------------------------------

    def _reset(self) -> None:
        self.rows: list[Row] = []  # one per cache row; done rows are free slots
        self.cache: KVCache | None = None
        self.valid = torch.zeros((0, self.seq_len), dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # next token to feed
        self.start: list[int] = []  # each row's first column
        self.admitting: list[Job] = []
        self.t = 0

    def _live(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if not (r.done or r.job.cancelled)]

    def _loop(self) -> None:
        while True:
            window = 0.0
            if not self._live():
                self._reset()
                if not self.waiting:
                    self.waiting.append(self.queue.get())
                window = self.window_s  # a burst of requests is prefilled together
            deadline = time.monotonic() + window
            while True:  # take what has arrived (timeout 0 does not block)
                try:
                    self.waiting.append(self.queue.get(
                        timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            try:
                with torch.no_grad():
                    self._admit()
                    if self._live():
                        self._step_all()
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                jobs = [r.job for r in self.rows if r is not None and not r.done]
                for job in {id(j): j for j in jobs + self.admitting}.values():
                    job.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
                self._reset()

    def _admit(self) -> None:
        """Move waiting jobs into the batch, in order, while they fit."""
        S, fresh = self.seq_len, not self.rows
        free = [i for i, r in enumerate(self.rows) if r.done or r.job.cancelled]
        room = len(free) + self.max_batch - len(self.rows)
        t, most, joining = self.t, 0, []
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                continue
            if job.n > room and joining:
                break
            if fresh:  # the batch starts at the longest prompt's end
                if joining and max(t, len(job.prompt)) + max(most, job.sampling.max_tokens) > S:
                    break
                t = max(t, len(job.prompt))
            else:
                if job.n > room or len(job.prompt) > t:
                    break
                if t + job.sampling.max_tokens > S:
                    if joining or not self._shift(t + job.sampling.max_tokens - S):
                        break
                    t = self.t
                    if len(job.prompt) > t:
                        break
            most = max(most, job.sampling.max_tokens)
            joining.append(self.waiting.popleft())
            room -= job.n
        if joining:
            self.t = t
            self.admitting = joining
            self._prefill(joining, free)
            self.admitting = []

    def _shift(self, need: int) -> bool:
        """Drop the first columns (at least `need`) that no live row uses."""
        live = self._live()
        drop = min(self.start[i] for i in live) if live else self.t
        if drop < need:
            return False
        S = self.seq_len
        self.cache.drop_front(drop)
        self.valid[:, :S - drop] = self.valid[:, drop:].clone()
        self.valid[:, S - drop:] = False
        self.start = [c - drop for c in self.start]
        self.t -= drop
        self.shifts += 1
        return True

    def _prefill(self, jobs: list[Job], free: list[int]) -> None:
        new_rows: list[Row] = []
        for job in jobs:
            gen = self.shared_gen if job.sampling.seed is None else \
                torch.Generator(device=self.device).manual_seed(job.sampling.seed)
            new_rows += [Row(job, i, gen) for i in range(job.n)]
        self.batches += 1
        self.rows_served += len(new_rows)
        prompts = [r.job.prompt for r in new_rows]
        P, t = max(len(p) for p in prompts), self.t
        tokens, positions, mask = padded_batch(prompts, P, self.tok.pad_id, self.device)
        scratch = KVCache(self.model.cfg, len(new_rows), P, self.device, self.dtype)
        logits = self.model(tokens, positions, mask, scratch).float()

        grow = max(0, len(new_rows) - len(free))
        if grow:  # more rows: grow the cache and the per-row tensors
            if self.cache is None:
                self.cache = KVCache(self.model.cfg, 0, self.seq_len, self.device, self.dtype)
            self.cache.add_rows(grow)
            pad = lambda x, fill: torch.cat([x, torch.full((grow,) + x.shape[1:], fill,  # noqa: E731
                                                           dtype=x.dtype, device=x.device)])
            self.valid, self.positions, self.last = \
                pad(self.valid, False), pad(self.positions, 0), pad(self.last, self.tok.pad_id)
            free = free + list(range(len(self.rows), len(self.rows) + grow))
            self.rows += [None] * grow  # type: ignore[list-item]
            self.start += [0] * grow
        slots = free[:len(new_rows)]
        idx = torch.tensor(slots, device=self.device)
        self.cache.write_rows(idx, t - P, scratch)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        self.valid[idx] = False
        self.valid[idx, t - P:t] = torch.arange(P, device=self.device) >= (P - lengths)[:, None]
        self.positions[idx] = lengths
        for slot, r, p in zip(slots, new_rows, prompts):
            self.rows[slot] = r
            self.start[slot] = t - len(p)
        for i, r in enumerate(new_rows):
            if r.index == 0 and r.job.sampling.echo:
                r.job.prompt_logprobs = self._prompt_logprobs(logits[i], tokens[i], P,
                                                              len(prompts[i]), r.job)
            if r.job.sampling.max_tokens == 0:
                self._finish(r, "length")
        self._sample(logits[:, -1], new_rows, slots)

    def _sample(self, logits: torch.Tensor, rows: list[Row], slots: list[int]) -> None:
        """Sample each row's next token from its logits (B, V), report it, and keep it as
        the token the row feeds at column t."""
        real = logits[:, :self.vocab_limit]
        noise = torch.empty_like(real)
        for i, r in enumerate(rows):
            noise[i] = torch.rand(real.size(-1), generator=r.generator, device=self.device)
        temps = torch.tensor([r.job.sampling.temperature for r in rows], device=self.device)
        top_ps = torch.tensor([r.job.sampling.top_p for r in rows], device=self.device)
        nxt = sample_rows(real, temps, top_ps, noise)
        logp = logits.log_softmax(-1) if any(r.job.sampling.logprobs is not None
                                             for r in rows) else None
        self.last[torch.tensor(slots, device=self.device)] = nxt
        for i, (r, token) in enumerate(zip(rows, nxt.tolist())):
            if not (r.done or r.job.cancelled):
                self._step(r, token, None if logp is None else logp[i], self.t >= self.seq_len)

    def _step_all(self) -> None:
        """One decode step: every row feeds its newest token at column t."""
        t = self.t
        self.valid[:, t] = True
        self.cache.pos = t
        # free rows step along unused; their positions must stay inside the RoPE table
        positions = self.positions.clamp(max=self.seq_len - 1)
        logits = self.model(self.last[:, None], positions[:, None],
                            self.valid[:, None, None, :t + 1], self.cache)[:, -1].float()
        self.positions += 1
        self.t = t + 1
        live = self._live()
        self.steps += 1
        self.row_steps += len(live)
        self._sample(logits[live], [self.rows[i] for i in live], live)

    def _entry(self, token: int, logp: torch.Tensor, k: int) -> dict:
        """The token's text, logprob and bytes, and its k most likely alternatives as a list
        of (text, logprob, bytes), best first (several may have the text "\ufffd"). The
        logprobs are the model's own; a padded vocabulary's ids are not alternatives."""
        top = logp[:self.vocab_limit].topk(k) if k > 0 else None
        text = lambda i: self.tok.decode([i], skip_special=False)  # noqa: E731
        return {"token": text(token), "logprob": float(logp[token]),
                "bytes": self.tok.token_bytes(token),
                "top": [] if top is None else
                [(text(i), v, self.tok.token_bytes(i))
                 for v, i in zip(top.values.tolist(), top.indices.tolist())]}

    def _prompt_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, P: int, n: int,
                         job: Job) -> list[dict | None]:
        """Logprob of each prompt token given the ones before it (None for the first)."""
        k = job.sampling.logprobs or 0
        logp = logits.log_softmax(-1)
        return [None] + [self._entry(int(tokens[pos]), logp[pos - 1], k)
                         for pos in range(P - n + 1, P)]

    def _step(self, r: Row, token: int, logp: torch.Tensor | None, last: bool) -> None:
        s = r.job.sampling
        if token in self.stop_ids:
            r.eos = True
            self._finish(r, "stop")
            return
        r.ids.append(token)
        if logp is not None:  # offset: where the token's text starts
            r.entries.append({**self._entry(token, logp, s.logprobs or 0), "offset": r.chars})
        text = self.tok.decode(r.ids)
        r.chars = len(text)
        hits = [text.find(stop) for stop in s.stop if stop in text]
        if hits:
            self._finish(r, "stop", text[:min(hits)])
        elif len(r.ids) >= s.max_tokens or last:
            self._finish(r, "length", text)
        else:
            self._emit(r, text, len(text) - held_back(text, s.stop))

    def _emit(self, r: Row, text: str, upto: int) -> None:
        """Send text[r.sent:upto] and, with logprobs on, the entries of the tokens whose text
        starts before upto (so the entries streamed are those the final answer keeps)."""
        new = []
        if r.job.sampling.logprobs is not None:
            new = list(takewhile(lambda e: e["offset"] < upto, r.entries[r.sent_entries:]))
        if upto <= r.sent and not new:
            return
        ev = {"type": "delta", "index": r.index, "text": text[r.sent:upto]}
        if r.job.sampling.logprobs is not None:
            ev["logprobs"] = new
            r.sent_entries += len(new)
        r.job.emit(ev)
        r.sent = max(r.sent, upto)

    def _finish(self, r: Row, reason: str, text: str | None = None) -> None:
        text = self.tok.decode(r.ids) if text is None else text
        self._emit(r, text, len(text))
        entries = None
        if r.job.sampling.logprobs is not None:  # keep the tokens that made the final text
            entries = list(takewhile(lambda e: e["offset"] < len(text), r.entries))
        r.done = True
        r.job.emit({"type": "done", "index": r.index, "finish_reason": reason, "text": text,
                    "tokens": len(r.ids) + r.eos, "logprobs": entries,
                    "prompt_logprobs": r.job.prompt_logprobs})
