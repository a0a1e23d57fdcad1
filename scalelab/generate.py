"""Batched sampling with a KV cache: used by `scalelab generate`, evaluation and PPO rollouts.

Prompts of different lengths are left-padded; position ids come from the padding mask, so a
padded prompt produces exactly the same tokens as the same prompt alone.

The rollout engine (`Rollout`) keeps every decode-step input at a fixed shape and address: the
KV cache is preallocated, the step reads the token ids (B, 1), positions (B,), the write
position as a tensor and a full-length key mask updated in place, writes the cache by index,
and samples inside the step. The host only replays steps and looks at `done` every
`check_every` tokens. On CUDA the step is recorded once as a CUDA graph per batch/length
bucket and replayed; elsewhere (or with `graphs=False`) the same step runs eagerly. With
`compile=True` the whole step goes through torch.compile before it is recorded, so the graph
replays fewer, fused kernels per layer (rms_norm, rotary embedding, cache write, residual
adds and SwiGLU around the matmuls; sampling) instead of ~30 small ones. Each layer's q/k/v
and gate/up matmuls run as one each, from one copy of their weights per model, refreshed at
every call (`FusedProjections`).

Sampling is Gumbel-max (see `sample_next`), with the uniform noise drawn from `generator`
before each step. `vocab_limit` (the tokenizer's real vocabulary size) keeps the ids of a
padded vocabulary from ever being produced: the logits are cut to their first vocab_limit
columns, a fixed slice, so it fits inside a recorded graph.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Sequence

import torch

from scalelab.model import KVCache, Transformer

CHECK_EVERY = 16  # decode steps between host checks of "has every row stopped?"
COMPILE_OPTIONS: dict = {}  # extra torch.compile arguments for the decode step (experiments)
# Experiment, not yet timed on a GPU: compile the prefill with the step (its eager kernels
# are launched one by one from Python, which on a GPU can take longer than they run).
COMPILE_PREFILL = False
FUSE = True  # decode with FusedProjections where they fit (False: an experiment's baseline)
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: Rollout}
_MAX_ENGINES = 4  # per model; each holds a KV cache and a graph
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(device, dtype): copy}
FUSE_MAX_BYTES = 2 << 30  # models whose blocks weigh more decode unfused (see FusedProjections)


def left_pad(prompts: list[list[int]], length: int, pad_id: int, rows: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (rows, length) with each prompt ending at column P (the longest prompt's
    length), and `valid`, True from a prompt's first token to the end (the positions to be
    generated are valid too). Rows past the prompts stay padding. On the CPU."""
    P = max(len(p) for p in prompts)
    tokens = torch.full((rows or len(prompts), length), pad_id, dtype=torch.long)
    valid = torch.zeros((rows or len(prompts), length), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p):] = True
    return tokens, valid


def padded_attention(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (B, T) and a causal attention mask (B, 1, T, T) for rows with padding
    (valid False). Each query sees valid keys up to itself; a padded query sees only itself,
    which keeps softmax finite (its output is never used)."""
    T = valid.size(1)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device)
    return positions, mask.unsqueeze(1)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, vocab) logits with the tokens outside top-k / the top-p nucleus set to -inf.
    top_p <= 0 keeps the single most likely token (as the server reads top_p = 0)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest set reaching top_p; the first token's mass before it is exactly 0
        drop = probs.cumsum(-1) - probs > max(top_p, 0.0)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                uniform: torch.Tensor | None, vocab_limit: int | None = None) -> torch.Tensor:
    """One token id per row from (B, vocab) logits; temperature 0 means greedy.

    uniform: (B, vocab) noise in [0, 1) (unused when greedy). Gumbel-max: the argmax of
    logits / T - log(-log(u)) is a sample from softmax(logits / T), with no host sync and
    no multinomial, so it can live inside a CUDA graph. vocab_limit: only ids below it."""
    if vocab_limit is not None:  # ids from 0 on: the argmax of the slice is the token id
        logits = logits[:, :vocab_limit]
        uniform = None if uniform is None else uniform[:, :vocab_limit]
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
    return (logits + gumbel).argmax(dim=-1)


def _autocast_without_cache(device_type: str):
    """The caller's autocast, but with its weight-cast cache off: a graph must not keep
    pointers to cached bf16 weights that die when the caller's autocast block ends."""
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type),
                          cache_enabled=False)


class FusedProjections:
    """A decode engine's copy of each layer's wq|wk|wv and w_gate|w_up weights, each set as
    one matrix (in the autocast dtype, if any), so a decode step runs one matmul where the
    model runs three, or two. At a rollout's batch these matmuls are small and each costs
    about its launch: on an H200, 87.5k new tok/s against 66.7k without (GPT-2 124M shape,
    bench/results/gpu_check-h200-2026-11-28b); on CPU, no change. `active` copies the live
    weights in (PPO changes them between rollouts) and has the model use the copy until it
    ends. Made only for models whose blocks weigh at most FUSE_MAX_BYTES: past that the
    matmuls are large and the memory better spent. A model's engines share one (see
    `fused_projections`). (A sharded model never gets here: PPO on a mesh samples from
    a whole copy, since decoding needs whole heads.)"""

    def __init__(self, model: Transformer, dtype: torch.dtype):
        self.targets = []  # (module whose .fused is set, the nn.Linear it stands for)
        for block in model.blocks:
            self.targets.append((block.attn, [block.attn.wq, block.attn.wk, block.attn.wv]))
            if block.mlp.kind == "swiglu":
                self.targets.append((block.mlp, [block.mlp.w_gate, block.mlp.w_up]))
        self.fused = []  # (weight, bias or None, output sizes): filled by `active`
        for _, linears in self.targets:
            sizes = [lin.weight.size(0) for lin in linears]
            w = linears[0].weight
            weight = w.new_empty(sum(sizes), w.size(1), dtype=dtype)
            bias = None if linears[0].bias is None else w.new_empty(sum(sizes), dtype=dtype)
            self.fused.append((weight, bias, sizes))

    @staticmethod
    def fits(model: Transformer) -> bool:
        return sum(p.numel() * p.element_size() for p in model.blocks.parameters()
                   ) <= FUSE_MAX_BYTES

    @contextlib.contextmanager
    def active(self):
        with torch.no_grad():
            for (_, linears), (weight, bias, _) in zip(self.targets, self.fused):
                torch.cat([lin.weight for lin in linears], out=weight)
                if bias is not None:
                    torch.cat([lin.bias for lin in linears], out=bias)
        for (module, _), fused in zip(self.targets, self.fused):
            module.fused = fused
        try:
            yield
        finally:
            for module, _ in self.targets:
                module.fused = None


def fused_projections(model: Transformer) -> FusedProjections | None:
    """The FusedProjections a decode engine runs with, in the dtype its matmuls run in (the
    autocast one if autocast is on), or None (FUSE off, or too large a model). One per model,
    device and dtype, shared by its engines (every call refreshes it in place, so its address
    stays fixed for their graphs): up to _MAX_ENGINES kept engines hold one copy of the
    weights, not one each."""
    if not (FUSE and FusedProjections.fits(model)):
        return None
    p = next(model.parameters())
    dtype = (torch.get_autocast_dtype(p.device.type)
             if torch.is_autocast_enabled(p.device.type) else p.dtype)
    copies = _FUSED.setdefault(model, {})
    if (p.device, dtype) not in copies:
        copies[p.device, dtype] = FusedProjections(model, dtype)
    return copies[p.device, dtype]


def stop_ids(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """generate's eos_id as a tuple: none, one id, or several (any of them ends a row)."""
    if eos_id is None:
        return ()
    return (eos_id,) if isinstance(eos_id, int) else tuple(dict.fromkeys(eos_id))


def hits_stop(nxt: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """(B,) True where the token is one of the stop ids (B,) x (S,): no host sync."""
    return (nxt[:, None] == stops).any(1)


class Rollout:
    """Fixed-shape decoding state for `rows` sequences of up to `length` tokens."""

    def __init__(self, model: Transformer, rows: int, length: int, pad_id: int,
                 eos_ids: tuple[int, ...], temperature: float, top_k: int, top_p: float,
                 vocab_limit: int | None = None):
        device = next(model.parameters()).device
        self.pad_id = pad_id
        self.stops = torch.tensor(eos_ids, dtype=torch.long, device=device) if eos_ids else None
        self.sampling = (temperature, top_k, top_p)
        self.vocab_limit = vocab_limit
        self.cache = KVCache(model.cfg, rows, length, device)  # dtype: what attention makes
        self.cur = torch.zeros(rows, 1, dtype=torch.long, device=device)  # token to feed
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)  # its position id
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)  # its cache column
        self.key_ok = torch.zeros(rows, 1, 1, length, dtype=torch.bool, device=device)
        self.out = torch.zeros(rows, length, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)
        self.noise = torch.zeros(rows, model.cfg.vocab_size, device=device)
        self.projections = fused_projections(model)
        self.graph = None  # on CUDA: the recorded step, replayed each token
        self.run_step = None  # elsewhere: the step called each token (maybe compiled)
        self.run_prefill = None  # with compile and COMPILE_PREFILL: _prefill compiled
        self.live_rows = rows

    def draw(self, generator: torch.Generator | None) -> None:
        # Noise for the live rows only: a bucket's filler rows take no random numbers, so
        # the tokens do not depend on the bucket size.
        if self.sampling[0] > 0:
            self.noise[: self.live_rows].uniform_(generator=generator)

    def prefill(self, model: Transformer, tokens: torch.Tensor, valid: torch.Tensor,
                prompt_len: int, live: torch.Tensor, generator: torch.Generator | None,
                draw: bool = True) -> None:
        """Run the (B, prompt_len) prompts, sample the first new token, reset the state.
        tokens/valid: (B, length); live: (B,) False for filler rows of a bucket."""
        self.live_rows = int(live.sum())
        if draw:
            self.draw(generator)
        cols = self.cache.write_at = torch.arange(prompt_len, device=tokens.device)
        if self.run_prefill is None:
            self._prefill(model, tokens, valid, cols, live)
        else:
            torch._dynamo.maybe_mark_dynamic(cols, 0)  # one compiled prefill for any length
            try:
                self.run_prefill(model, tokens, valid, cols, live)
            except Exception as e:  # as for the step: a compiler problem must not stop us
                warnings.warn(f"generate: torch.compile of the prefill failed ({e!r:.200}); "
                              "running it uncompiled", stacklevel=2)
                self.run_prefill = None
                self._prefill(model, tokens, valid, cols, live)  # rewrites it all
        self.cache.write_at = self.write_at  # from here on, writes follow the step's tensor

    def _prefill(self, model: Transformer, tokens: torch.Tensor, valid: torch.Tensor,
                 prompt_cols: torch.Tensor, live: torch.Tensor) -> None:
        """prefill's tensor work, the prompt's columns 0..P-1 given as prompt_cols (where the
        cache writes them): no host sync, so it can be compiled whole."""
        P = prompt_cols.size(0)
        positions, mask = padded_attention(valid)
        h = model.hidden(tokens[:, :P], positions[:, :P], mask[:, :, :P, :], self.cache)
        nxt = sample_next(model.lm_head(h[:, -1]), *self.sampling, self.noise, self.vocab_limit)
        nxt = nxt.masked_fill(~live, self.pad_id)
        at = prompt_cols[-1:] + 1  # column P as a tensor: indexing by P itself would fix P
        self.out.copy_(tokens)
        self.out.index_copy_(1, at, nxt[:, None])
        self.done.copy_(~live)
        if self.stops is not None:
            self.done |= hits_stop(nxt, self.stops)
        self.cur.copy_(nxt[:, None])
        self.pos.copy_(positions.index_select(1, at)[:, 0])
        self.write_at.copy_(at)
        cols = torch.arange(tokens.size(1), device=tokens.device)
        self.key_ok.copy_((valid & (cols < P))[:, None, None, :])

    def step(self, model: Transformer) -> None:
        """One decode step; every input is a fixed buffer, so it can be graph-captured."""
        self.key_ok.index_fill_(3, self.write_at, True)
        h = model.hidden(self.cur, self.pos[:, None], self.key_ok, self.cache)
        nxt = sample_next(model.lm_head(h[:, -1]), *self.sampling, self.noise, self.vocab_limit)
        nxt = nxt.masked_fill(self.done, self.pad_id)
        if self.stops is not None:
            self.done |= hits_stop(nxt, self.stops)
        self.out.index_copy_(1, self.write_at + 1, nxt[:, None])
        self.cur.copy_(nxt[:, None])
        self.pos.add_(1)
        self.write_at.add_(1)

    def compiled_step(self, model: Transformer):
        """`step` under torch.compile (fusing the small kernels around the matmuls), compiled by
        running it once (a step of the warm-up). If compiling fails: warn, return `step`."""
        try:
            step = torch.compile(self.step, fullgraph=True, dynamic=False, **COMPILE_OPTIONS)
            step(model)
            return step
        except Exception as e:  # a compiler problem must not stop the rollouts
            warnings.warn(f"generate: torch.compile of the decode step failed ({e!r:.200}); "
                          "running it uncompiled", stacklevel=3)
            return self.step

    def prepare(self, model: Transformer, use_graph: bool, compile: bool) -> None:
        """Compile (if `compile`) and record (if `use_graph`: CUDA only) the step. The state
        must have been prefilled, and it is left dirty: prefill again before use. With
        COMPILE_PREFILL the prefill is compiled too, on its first call, for any prompt length
        (a first prompt of one token compiles it for that length alone)."""
        if compile and COMPILE_PREFILL:
            self.run_prefill = torch.compile(self._prefill, **COMPILE_OPTIONS)
        if not use_graph:
            self.run_step = self.compiled_step(model) if compile else self.step
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _autocast_without_cache("cuda"):
            step = self.compiled_step(model) if compile else self.step
            for _ in range(2):  # warm-up: cuBLAS workspaces, allocator pools
                step(model)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _autocast_without_cache("cuda"):
            step(model)
        self.graph = graph

    def decode(self, model: Transformer, steps: int, generator: torch.Generator | None,
               check_every: int) -> int:
        """Up to `steps` decode steps; stops early (checked every check_every steps) once
        every row has sampled EOS. Returns the number of steps run."""
        for i in range(steps):
            self.draw(generator)
            if self.graph is not None:
                self.graph.replay()
            else:
                (self.run_step or self.step)(model)
            if self.stops is not None and (i + 1) % check_every == 0 and self.done.all():
                return i + 1
        return steps


def _use_graph(device: torch.device, graphs: bool) -> bool:
    return graphs and device.type == "cuda"


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _engine(model: Transformer, rows: int, length: int, keep: bool, compile: bool,
            *args) -> Rollout:
    """A Rollout for this shape: new each call, or (keep: with graphs or compiled) cached
    per model, so the recording and the compiled step are made once."""
    if not keep:
        return Rollout(model, rows, length, *args)
    device_type = next(model.parameters()).device.type
    autocast = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type)
    p = next(model.parameters())
    key = (rows, length, args, autocast, p.dtype, p.data_ptr(), compile)
    engines = _ENGINES.setdefault(model, {})
    if key not in engines:
        while len(engines) >= _MAX_ENGINES:
            engines.pop(next(iter(engines)))
        engines[key] = Rollout(model, rows, length, *args)
    return engines[key]


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
             pad_id: int, eos_id: int | Sequence[int] | None = None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None,
             use_cache: bool = True, graphs: bool = True, compile: bool = False,
             check_every: int = CHECK_EVERY, vocab_limit: int | None = None
             ) -> list[list[int]]:
    """New tokens for each prompt (ending at and including EOS if one was sampled).

    eos_id: the id that ends a row, or several (a row ends at the first of them it samples).

    vocab_limit: the tokenizer's vocabulary size, when the model's is padded past it; ids
    from it on are never produced (they decode to nothing).
    use_cache=False recomputes the whole sequence every token: slow, the reference.
    graphs: on CUDA, replay the decode step as a CUDA graph (no effect elsewhere).
    compile: torch.compile the whole decode step (before recording it, with graphs). The
    first call per batch/length bucket then takes tens of seconds: worth it for PPO and
    benchmarks, not for one short generation."""
    device = next(model.parameters()).device
    if not prompts or not all(prompts):
        raise ValueError("generate: every prompt needs at least one token (e.g. BOS)")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:  # nothing asked for (lm-eval may ask that): nothing to run
        return [[] for _ in prompts]
    B, P = len(prompts), max(len(p) for p in prompts)
    total = min(P + max_new_tokens, model.cfg.seq_len)
    if P >= total:
        raise ValueError(f"prompt of {P} tokens leaves no room in seq_len {model.cfg.seq_len}")
    eos_ids = stop_ids(eos_id)
    if not use_cache:
        return _generate_no_cache(model, prompts, total, pad_id, eos_ids, temperature, top_k,
                                  top_p, generator, vocab_limit)
    use_graph = _use_graph(device, graphs)
    keep = use_graph or compile
    # A kept engine has its batch and length rounded up, so later calls can reuse it.
    rows, length = (_round_up(B, 8), _round_up(total, 64)) if keep else (B, total)
    tokens, valid = left_pad(prompts, length, pad_id, rows)
    valid[B:, P - 1:] = True  # filler rows: one pad token as the prompt, marked done
    tokens, valid = tokens.to(device), valid.to(device)
    live = torch.arange(rows, device=device) < B

    engine = _engine(model, rows, length, keep, compile, pad_id, eos_ids, temperature, top_k,
                     top_p, vocab_limit)
    with engine.projections.active() if engine.projections else contextlib.nullcontext():
        if keep and engine.graph is None and engine.run_step is None:
            # A one-token dummy prompt makes the cache; compiling, warm-up and capture then
            # write only columns 0..4, in range for any length (rounded up to 64).
            engine.prefill(model, torch.full_like(tokens, pad_id), torch.ones_like(valid), 1,
                           live, generator, draw=False)
            engine.prepare(model, use_graph, compile)
        engine.prefill(model, tokens, valid, P, live, generator)
        steps = engine.decode(model, total - P - 1, generator, max(1, check_every))
    rows_out = engine.out[:B, P: P + 1 + steps].tolist()
    return [_cut_at_eos(r, eos_ids) for r in rows_out]


def stopped(ids: list[int], eos_id: int) -> bool:
    """Did this generated answer end by itself (with EOS), rather than run out of tokens?"""
    return bool(ids) and ids[-1] == eos_id


def _cut_at_eos(new: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    """Up to and including the first stop id (rows that stopped early hold pads after it)."""
    end = next((i for i, t in enumerate(new) if t in eos_ids), None)
    return new if end is None else new[: end + 1]


def _generate_no_cache(model: Transformer, prompts: list[list[int]], total: int, pad_id: int,
                       eos_ids: tuple[int, ...], temperature: float, top_k: int, top_p: float,
                       generator: torch.Generator | None, vocab_limit: int | None = None
                       ) -> list[list[int]]:
    """The reference: a full forward pass over the sequence so far for every new token,
    with the same noise draws as the engine (so equal logits give equal tokens)."""
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    stops = torch.tensor(eos_ids, dtype=torch.long, device=device)
    tokens, valid = (t.to(device) for t in left_pad(prompts, total, pad_id))
    positions, mask = padded_attention(valid)
    noise = torch.zeros(B, model.cfg.vocab_size, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for t in range(P, total):
        logits = model(tokens[:, :t], positions[:, :t], mask[:, :, :t, :t])
        if temperature > 0:
            noise.uniform_(generator=generator)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, noise, vocab_limit)
        tokens[:, t] = torch.where(done, pad_id, nxt)
        if eos_ids:
            done |= hits_stop(nxt, stops)
            if done.all():
                total = t + 1
                break
    return [_cut_at_eos(r, eos_ids) for r in tokens[:, P:total].tolist()]
