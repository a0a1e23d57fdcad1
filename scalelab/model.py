"""A decoder-only Transformer in the modern style (RMSNorm, RoPE, SwiGLU, GQA, no biases).

The model knows nothing about devices or parallelism. Instead every weight has logical axis
names (`LOGICAL_AXES`); `scalelab.parallel` maps those names onto a device mesh.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from scalelab.config import ModelConfig

# Logical names of each weight's dimensions, in the tensor's own order (nn.Linear stores
# (out_features, in_features)). Keyed by the parameter name with the block index removed.
LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed.weight": ("vocab", "embed"),
    "blocks.attn_norm.weight": ("embed",),
    "blocks.attn.wq.weight": ("heads", "embed"),
    "blocks.attn.wk.weight": ("kv", "embed"),
    "blocks.attn.wv.weight": ("kv", "embed"),
    "blocks.attn.wo.weight": ("embed", "heads"),
    "blocks.attn.wq.bias": ("heads",),
    "blocks.attn.wk.bias": ("kv",),
    "blocks.attn.wv.bias": ("kv",),
    "blocks.mlp_norm.weight": ("embed",),
    "blocks.mlp.w_gate.weight": ("mlp", "embed"),
    "blocks.mlp.w_up.weight": ("mlp", "embed"),
    "blocks.mlp.w_down.weight": ("embed", "mlp"),
    "final_norm.weight": ("embed",),
    "lm_head.weight": ("vocab", "embed"),
}


# Devices whose fused attention kernels take a mask but not grouped-query heads (see
# Attention.forward); on CPU the flash kernel takes both. On an H200 (torch 2.11) SDPA's
# efficient kernel refused masked GQA, cuDNN's took it.
EXPAND_KV_UNDER_MASK = ("cuda",)
# How a compiled decode step (one query per row, a mask over the cache) attends: "sdpa", or
# "flex", FlexAttention's decoding kernel (split over the keys), an experiment not yet timed
# on a GPU: SDPA's pick there, cuDNN's kernel, is built for blocks of queries.
DECODE_ATTENTION = "sdpa"


def resolve(cfg: ModelConfig) -> ModelConfig:
    """Fill the derived defaults (0 = auto) so the saved config is explicit."""
    c = ModelConfig(**asdict(cfg))
    c.n_kv_head = c.n_kv_head or c.n_head
    if not c.d_mlp:
        # SwiGLU has 3 matrices, so 8/3*d keeps the parameter count of a 4*d two-matrix MLP.
        c.d_mlp = 64 * math.ceil(8 * c.d_model / 3 / 64) if c.mlp == "swiglu" else 4 * c.d_model
    return c


class KVCache:
    """Preallocated keys and values, one (batch, kv_heads, max_len, head_dim) buffer per layer
    (separate buffers, not views of one: a compiled decode step then writes straight into
    its inputs instead of copying a whole layer's cache).

    Two ways to write: by default `pos` counts the filled positions and each call appends
    (attention then sees positions [0, pos + T)). With `write_at` set to a (T,) long tensor,
    keys/values go to those positions by index and attention sees the whole buffer, so every
    shape stays fixed (what a CUDA graph needs); the caller's mask hides unwritten positions.
    With dtype None the buffers are made on the first write, in the dtype attention produced
    (bf16 under autocast), with as many heads as this rank computes.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype=None):
        self.n_layer = cfg.n_layer
        self.shape = [batch, cfg.n_kv_head, max_len, cfg.d_model // cfg.n_head]
        self.k: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        if dtype is not None:
            self._allocate(device, dtype)
        self.pos = 0
        self.write_at: torch.Tensor | None = None

    def _allocate(self, device, dtype) -> None:
        # zeros, not empty: masked-out garbage must still be finite
        self.k = [torch.zeros(self.shape, device=device, dtype=dtype) for _ in range(self.n_layer)]
        self.v = [torch.zeros(self.shape, device=device, dtype=dtype) for _ in range(self.n_layer)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.shape[1] = k.size(1)
            self._allocate(k.device, k.dtype)
        ck, cv = self.k[layer], self.v[layer]
        k, v = k.to(ck.dtype), v.to(cv.dtype)
        if self.write_at is not None:
            ck.index_copy_(2, self.write_at, k)
            cv.index_copy_(2, self.write_at, v)
            return ck, cv
        end = self.pos + k.size(2)
        if end > ck.size(2):
            raise ValueError(f"KV cache full: {end} > {ck.size(2)} positions")
        ck[:, :, self.pos:end] = k
        cv[:, :, self.pos:end] = v
        return ck[:, :, :end], cv[:, :, :end]

    # For a server whose batch changes while it runs (scalelab.serve.engine); buffers exist.

    def add_rows(self, n: int) -> None:
        """Append n zeroed rows to the batch."""
        self.shape[0] += n
        for bufs in (self.k, self.v):
            bufs[:] = [torch.cat([b, b.new_zeros((n,) + b.shape[1:])]) for b in bufs]

    def write_rows(self, rows: torch.Tensor, start: int, src: KVCache) -> None:
        """Copy all of src's positions into `rows` of this cache, from position `start` on."""
        for mine, theirs in zip(self.k + self.v, src.k + src.v):
            mine[rows, :, start:start + theirs.size(2)] = theirs

    def drop_front(self, n: int) -> None:
        """Move every position left by n, forgetting the first n; the last n keep stale
        (finite) values that the caller's mask must hide."""
        if n <= 0:
            return
        for buf in self.k + self.v:
            buf[:, :, :-n] = buf[:, :, n:].clone()


def rope_frequencies(head_dim: int, theta: float, scaling: dict[str, float] | None = None
                     ) -> torch.Tensor:
    """Rotation speed of each pair of dimensions. With Llama-3 scaling, slow (long-wavelength)
    pairs are slowed further by `factor`, fast ones kept, and those in between blended."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if not scaling:
        return inv_freq
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    blend = (old_len / wavelen - low) / (high - low)
    between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(between, (1 - blend) * scaled / factor + blend * scaled, scaled)


def rope_tables(head_dim: int, max_len: int, theta: float,
                scaling: dict[str, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_len, head_dim) tables [cos, cos] and [-sin, sin], the form `apply_rope` uses."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half): (x1 cos - x2 sin, x2 cos + x1 sin).
    x: (B, T, H, D); cos, sin: (B, T, 1, D) rows of `rope_tables`. Written as
    x * [cos, cos] + [x2, x1] * [-sin, sin] so every product runs on whole contiguous rows
    (few, fast kernels when decoding), with the same float results as the half-by-half form."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([x2, x1], dim=-1) * sin).type_as(x)


def flex_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
    """One query per row through FlexAttention (compiled use only). q: (B, H, 1, D); k, v:
    (B, KV, S, D); mask: bool, True where the query may attend, broadcastable to (B, 1, 1, S)."""
    from torch.nn.attention.flex_attention import flex_attention

    ok = mask.expand(q.size(0), 1, 1, k.size(2))

    def hide(score, b, h, q_idx, kv_idx):
        return torch.where(ok[b, 0, 0, kv_idx], score, float("-inf"))
    return flex_attention(q, k, v, score_mod=hide, enable_gqa=q.size(1) != k.size(1))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        bias = cfg.qkv_bias
        self.wq = nn.Linear(cfg.d_model, cfg.n_head * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_head * self.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_head * self.head_dim, cfg.d_model, bias=False)
        self.fused: tuple | None = None  # (weight, bias, sizes) of wq|wk|wv, while decoding

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        if self.fused is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:  # a decode engine's copy of the three weights as one: one matmul, not three
            weight, bias, sizes = self.fused
            q, k, v = F.linear(x, weight, bias).split(sizes, dim=-1)
        # -1 instead of n_head: under tensor parallelism this rank holds only some heads.
        q = apply_rope(q.view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        gqa = q.size(1) != k.size(1)
        if mask is None:  # plain causal attention over this chunk, or one new token that
            # sees the whole cache. (Not `T > 1` alone: under torch.compile with varying
            # lengths T is symbolic, and SDPA refuses a symbolic bool: a graph break per layer.)
            causal = cache is None or T > 1
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        elif T == 1 and DECODE_ATTENTION == "flex" and torch.compiler.is_compiling():
            y = flex_decode(q, k, v, mask)
        else:
            if gqa and T > 1 and q.device.type in EXPAND_KV_UNDER_MASK:
                # A mask (padding, packing) rules out flash, and torch's docs say the other
                # CUDA kernels do not take GQA: math would hold (B, heads, T, T) scores. Give
                # each query head its own copy of k/v instead (what enable_gqa means).
                k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
                gqa = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        if cfg.mlp == "swiglu":
            self.w_gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        elif cfg.mlp != "relu2":
            raise ValueError(f"model.mlp must be 'swiglu' or 'relu2', got {cfg.mlp!r}")
        self.w_up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.w_down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.fused: tuple | None = None  # (weight, None, sizes) of w_gate|w_up, while decoding

    def forward(self, x):
        if self.kind == "swiglu":
            if self.fused is None:
                gate, up = self.w_gate(x), self.w_up(x)
            else:  # see Attention.fused
                gate, up = F.linear(x, self.fused[0]).split(self.fused[2], dim=-1)
            return self.w_down(F.silu(gate) * up)
        return self.w_down(F.relu(self.w_up(x)).square())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def check_shape(cfg: ModelConfig) -> ModelConfig:
    """The resolved config, or a ValueError naming the sizes that cannot make a model (so
    commands can refuse them before any work)."""
    c = resolve(cfg)
    if c.d_model % c.n_head or c.n_head % c.n_kv_head:
        raise ValueError(f"d_model = {c.d_model} must divide by n_head = {c.n_head}, and "
                         f"n_head by n_kv_head = {c.n_kv_head}")
    if (c.d_model // c.n_head) % 2:
        raise ValueError(f"d_model / n_head = {c.d_model // c.n_head} must be even "
                         "(rotary embeddings rotate pairs of channels)")
    return c


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = check_shape(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.seq_len, cfg.rope_theta,
                               cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # GPT-2 style: N(0, 0.02), residual output projections scaled down by depth.
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith(("wo.weight", "w_down.weight")):
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.cfg.n_layer))
            else:
                p.normal_(0.0, 0.02)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T).

        positions: (B, T) position ids (default: consecutive, continuing after the cache).
        mask: boolean (B, 1, T, S) attention mask, True = may attend (S = keys incl. cache);
              None means causal.
        """
        return self.lm_head(self.hidden(tokens, positions, mask, cache))

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, T, d_model): what heads read from."""
        B, T = tokens.shape
        start = cache.pos if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        if mask is None and start > 0 and T > 1:  # causal, offset by what is cached
            mask = causal_mask(T, start + T, tokens.device)
        cos = self.rope_cos[positions].unsqueeze(2)  # (B, T, 1, head_dim)
        sin = self.rope_sin[positions].unsqueeze(2)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, mask, cache)
        if cache is not None and cache.write_at is None:  # writes by index leave pos alone
            cache.pos += T
        return self.final_norm(x)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; non_embedding drops the input table unless it is tied to the lm_head
        (a tied table is still a real matmul at the output)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.cfg.tie_embeddings:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B)."""
        c, t = self.cfg, seq_len or self.cfg.seq_len
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.d_model // c.n_head) * t


def causal_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    """(q_len, k_len) boolean mask for the last q_len of k_len positions."""
    q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    return q >= torch.arange(k_len, device=device)[None, :]


class ScalarModel(nn.Module):
    """Trunk + linear head giving one scalar per position (reward or value)."""

    def __init__(self, trunk: Transformer, zero_head: bool = False):
        super().__init__()
        self.trunk, self.cfg = trunk, trunk.cfg
        self.head = nn.Linear(trunk.cfg.d_model, 1)
        with torch.no_grad():
            self.head.bias.zero_()
            if zero_head:  # a value head starts at 0 so early PPO steps aren't noise
                self.head.weight.zero_()
            else:
                self.head.weight.normal_(0.0, 1 / math.sqrt(trunk.cfg.d_model + 1))

    def forward(self, tokens, positions=None, mask=None) -> torch.Tensor:
        # sum over the one output: a fresh fp32 tensor, not a view (FSDP warns about views)
        return self.head(self.trunk.hidden(tokens, positions, mask)).sum(-1, dtype=torch.float32)
