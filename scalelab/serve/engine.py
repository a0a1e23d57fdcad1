"""The batching engine: one worker thread per loaded model.

Requests that arrive within a few milliseconds of each other are decoded together in one
batch (left-padded prompts, one KV cache), and every sampled token is streamed out as an
event the moment it exists. Sampling settings are per row (temperature, top_p, seed: the
noise for Gumbel-max sampling comes from each request's own generator), so any mix of
requests can share a batch; a request waits for the next batch only when it would not fit
in the model's context beside the others, or the batch is full.

Static batching: a batch runs until its last row finishes, and requests that arrive in the
meantime form the next one. Rows that finish early report at once; their slots idle.

The engine knows nothing about HTTP: a Job carries a callback that receives plain dicts
  {"type": "delta", "index": i, "text": str}                         new text of row i
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

import torch

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
    entries: list[dict] = field(default_factory=list)  # per-token logprob entries
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
    B, P = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((B, total), pad_id, dtype=torch.long)
    valid = torch.zeros((B, total), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p):] = True
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = (causal & valid[:, None, :]) | torch.eye(total, dtype=torch.bool)
    return tokens.to(device), positions.to(device), mask.unsqueeze(1).to(device)


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
    """Owns one model; `submit` a Job from any thread, events come back through job.emit."""

    def __init__(self, model: Transformer, tok: Tokenizer, max_batch: int = 32,
                 window_s: float = 0.005, max_queue: int = 256):
        self.model, self.tok = model, tok
        self.device = next(model.parameters()).device
        self.seq_len = model.cfg.seq_len
        self.max_batch, self.window_s = max_batch, window_s
        self.queue: queue.Queue[Job] = queue.Queue(max_queue)
        self.waiting: deque[Job] = deque()  # taken from the queue but did not fit a batch
        self.shared_gen = torch.Generator(device=self.device).manual_seed(0)
        self.batches = self.rows_served = 0  # counters for /health
        self.thread = threading.Thread(target=self._loop, daemon=True, name="scalelab-engine")
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Raises queue.Full when the server is overloaded (the caller answers 503)."""
        self.queue.put_nowait(job)

    # ---- the worker -------------------------------------------------------------------

    def _next_batch(self) -> list[Job]:
        first = self.waiting.popleft() if self.waiting else self.queue.get()
        batch, skipped = [first], []
        deadline = time.monotonic() + self.window_s
        while sum(j.n for j in batch) < self.max_batch:
            if self.waiting:
                job = self.waiting.popleft()
            else:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if self._fits(batch + [job]):
                batch.append(job)
            else:
                skipped.append(job)
        self.waiting.extendleft(reversed(skipped))
        return batch

    def _fits(self, jobs: list[Job]) -> bool:
        longest = max(len(j.prompt) for j in jobs)
        return (sum(j.n for j in jobs) <= self.max_batch and
                longest + max(j.sampling.max_tokens for j in jobs) <= self.seq_len)

    def _loop(self) -> None:
        while True:
            batch = [j for j in self._next_batch() if not j.cancelled]
            if not batch:
                continue
            self.batches += 1
            try:
                self.run_batch(batch)
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                for j in batch:
                    j.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})

    @torch.no_grad()
    def run_batch(self, jobs: list[Job]) -> None:
        rows: list[Row] = []
        for job in jobs:
            gen = self.shared_gen if job.sampling.seed is None else \
                torch.Generator(device=self.device).manual_seed(job.sampling.seed)
            rows += [Row(job, i, gen) for i in range(job.n)]
        self.rows_served += len(rows)
        prompts = [r.job.prompt for r in rows]
        P = max(len(p) for p in prompts)
        total = min(P + max(j.sampling.max_tokens for j in jobs), self.seq_len)
        tokens, positions, mask = padded_batch(prompts, total, self.tok.pad_id, self.device)
        temps = torch.tensor([r.job.sampling.temperature for r in rows], device=self.device)
        top_ps = torch.tensor([r.job.sampling.top_p for r in rows], device=self.device)
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.cfg, len(rows), total, self.device, dtype)

        logits = self.model(tokens[:, :P], positions[:, :P], mask[:, :, :P, :P], cache).float()
        for i, r in enumerate(rows):
            if r.index == 0 and r.job.sampling.echo:
                r.job.prompt_logprobs = self._prompt_logprobs(logits[i], tokens[i], P,
                                                              len(r.job.prompt), r.job)
            if r.job.sampling.max_tokens == 0:
                self._finish(r, "length")
        t = P
        while t < total and not all(r.done or r.job.cancelled for r in rows):
            last = logits[:, -1]
            noise = torch.empty_like(last)
            for i, r in enumerate(rows):
                noise[i] = torch.rand(last.size(-1), generator=r.generator, device=self.device)
            nxt = sample_rows(last, temps, top_ps, noise)
            logp = last.log_softmax(-1) if any(r.job.sampling.logprobs is not None
                                               for r in rows) else None
            tokens[:, t] = nxt
            ids = nxt.tolist()
            for i, r in enumerate(rows):
                if not (r.done or r.job.cancelled):
                    self._step(r, ids[i], None if logp is None else logp[i], t + 1 == total)
            t += 1
            if t < total:
                logits = self.model(tokens[:, t - 1:t], positions[:, t - 1:t],
                                    mask[:, :, t - 1:t, :t], cache).float()

    def _entry(self, token: int, logp: torch.Tensor, k: int) -> dict:
        top = logp.topk(k) if k > 0 else None
        return {"token": self.tok.decode([token], skip_special=False),
                "logprob": float(logp[token]),
                "top": {} if top is None else
                {self.tok.decode([int(i)], skip_special=False): float(v)
                 for v, i in zip(top.values.tolist(), top.indices.tolist())}}

    def _prompt_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor, P: int, n: int,
                         job: Job) -> list[dict | None]:
        """Logprob of each prompt token given the ones before it (None for the first)."""
        k = job.sampling.logprobs or 0
        logp = logits.log_softmax(-1)
        out: list[dict | None] = [None]
        for pos in range(P - n + 1, P):
            out.append(self._entry(int(tokens[pos]), logp[pos - 1], k))
        return out

    def _step(self, r: Row, token: int, logp: torch.Tensor | None, last: bool) -> None:
        s = r.job.sampling
        if token == self.tok.eos_id:
            r.eos = True
            self._finish(r, "stop")
            return
        r.ids.append(token)
        if logp is not None:
            r.entries.append(self._entry(token, logp, s.logprobs or 0))
        text = self.tok.decode(r.ids)
        hits = [text.find(stop) for stop in s.stop if stop in text]
        if hits:
            self._finish(r, "stop", text[:min(hits)])
        elif len(r.ids) >= s.max_tokens or last:
            self._finish(r, "length", text)
        else:
            safe = len(text) - held_back(text, s.stop)
            if safe > r.sent:
                r.job.emit({"type": "delta", "index": r.index, "text": text[r.sent:safe]})
                r.sent = safe

    def _finish(self, r: Row, reason: str, text: str | None = None) -> None:
        text = self.tok.decode(r.ids) if text is None else text
        if len(text) > r.sent:
            r.job.emit({"type": "delta", "index": r.index, "text": text[r.sent:]})
        entries = None
        if r.job.sampling.logprobs is not None:  # keep the tokens that made the final text
            entries, offset = [], 0
            for k, e in enumerate(r.entries):
                if offset >= len(text):
                    break
                e["offset"] = offset
                entries.append(e)
                offset = len(self.tok.decode(r.ids[:k + 1]))
        r.done = True
        r.job.emit({"type": "done", "index": r.index, "finish_reason": reason, "text": text,
                    "tokens": len(r.ids) + r.eos, "logprobs": entries,
                    "prompt_logprobs": r.job.prompt_logprobs})
