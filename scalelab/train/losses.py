"""Token losses read straight from the final hidden states, in chunks over tokens.

The lm_head maps d_model to the whole vocabulary, so the plain way (logits = lm_head(h), then
log_softmax in fp32) holds a (tokens, vocab) fp32 tensor, and its gradient, at once: 2.5 GB
for a batch of 12 x 1024 at vocab 50k. Here the logits live one chunk of tokens at a time,
in the forward pass and again in the backward pass, and never all together.

- `cross_entropy(h, w, targets)`: mean next-token loss. The forward pass also computes the
  gradients (the loss is a scalar, so its gradient is known up to the incoming scale), so
  training pays no extra matmul for the chunking. Under torch.compile, up to
  PLAIN_MAX_LOGITS logits (4 GB in bf16), it is plain F.cross_entropy instead: inductor
  fuses the softmax onto the logits (no fp32 copy either; on an H200 at the GPT-2 shape
  that pretraining step is 6% faster than the compiled chunked one, bench/results/
  gpu_check-h200-2026-11-28), and the chunk loop, a Python loop over the number of
  tokens, would make every new batch length a recompile (SFT batches vary in length).
- `token_logprobs(h, w, targets, temperature)`: log p(target) per token, and optionally the
  entropy, as PPO and DPO need them. Its backward recomputes each chunk's logits (one extra
  lm_head matmul) because the incoming gradient differs per token, unless the whole input
  fits in one chunk: then that chunk's probabilities are kept (memory stays bounded by the
  chunk size either way). Under torch.compile it is the plain form, as above (no fp32
  (tokens, vocab) tensor either, forward or backward: tests/test_losses.py reads inductor's code).

Matmuls run in the autocast dtype when autocast is on (bf16 on GPUs); softmax, log-probs and
gradient sums are fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MB in fp32)
PLAIN_MAX_LOGITS = 1 << 31  # under torch.compile: the plain loss up to this many logits


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


def _chunks(n: int, vocab: int, chunk: int | None) -> list[tuple[int, int]]:
    size = chunk or max(64, CHUNK_ELEMENTS // vocab)
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def _logits(h: torch.Tensor, w: torch.Tensor, dtype: torch.dtype, inv_temp: float):
    z = (h.to(dtype) @ w.to(dtype).t()).float()
    return z * inv_temp if inv_temp != 1.0 else z


def _add_grads(probs, targets, row_scale, h, w, dtype, grad_w, want_h: bool):
    """Gradients of sum_i row_scale_i * (logsumexp(z_i) - z_i[target_i]) through z = h @ w.T,
    given probs = softmax(z) (overwritten). The per-row scale is applied on the d_model side
    (h and the (n, d) result), which is far cheaper than another pass over (n, vocab).
    Adds into grad_w; returns this chunk's gradient for h (or None)."""
    g = probs.scatter_add_(1, targets[:, None], probs.new_full((len(targets), 1), -1.0))
    g = g.to(dtype)
    scale = row_scale[:, None]
    grad_w += (g.t() @ (h.float() * scale).to(dtype)).float()
    return ((g @ w.to(dtype)).float() * scale).to(h.dtype) if want_h else None


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, chunk, need_grad):
        dtype = _compute_dtype(h)
        valid = targets != IGNORE
        count = valid.sum().clamp(min=1).float()
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = []  # chunks, concatenated once (slice writes would copy under compile)
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) \
            if need_grad else None
        for a, b in _chunks(h.size(0), w.size(0), chunk):
            z = _logits(h[a:b], w, dtype, 1.0)
            lse = torch.logsumexp(z, dim=-1)
            y, keep = targets[a:b].clamp(min=0), valid[a:b]
            picked = z.gather(1, y[:, None]).squeeze(1)
            total = total + ((lse - picked) * keep).sum()
            if need_grad:  # d loss / d z = (softmax - onehot) * keep / count
                grad_h.append(_add_grads(z.sub_(lse[:, None]).exp_(), y, keep.float() / count,
                                         h[a:b], w, dtype, grad_w, True))
        if need_grad:
            ctx.save_for_backward(torch.cat(grad_h), grad_w.to(w.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), grad_w * grad_out.to(grad_w.dtype),
                None, None, None)


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, targets, inv_temp, chunk, with_entropy, need_grad):
        dtype = _compute_dtype(h)
        logp, entropy = [], []
        chunks = _chunks(h.size(0), w.size(0), chunk)
        probs = None
        for a, b in chunks:
            z = _logits(h[a:b], w, dtype, inv_temp)
            lse = torch.logsumexp(z, dim=-1)
            logp.append(z.gather(1, targets[a:b, None]).squeeze(1) - lse)
            if with_entropy:  # H = lse - sum(p * z)
                entropy.append(lse - (torch.exp(z - lse[:, None]) * z).sum(-1))
            if need_grad and len(chunks) == 1:  # all in one chunk: keep it, skip the recompute
                probs = z.sub_(lse[:, None]).exp_()
        ctx.save_for_backward(h, w, targets, *([] if probs is None else [probs]))
        ctx.inv_temp, ctx.chunk, ctx.dtype = inv_temp, chunk, dtype
        logp = torch.cat(logp)
        entropy = torch.cat(entropy) if with_entropy else logp.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        h, w, targets, *kept = ctx.saved_tensors
        dtype, inv_temp = ctx.dtype, ctx.inv_temp
        grad_h = []
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32)
        for a, b in _chunks(h.size(0), w.size(0), ctx.chunk):
            probs = kept[0] if kept else torch.softmax(_logits(h[a:b], w, dtype, inv_temp), -1)
            # d logp / d z = onehot - softmax, times 1/temperature through the scaling
            grad_h.append(_add_grads(probs, targets[a:b], -grad_logp[a:b].float() * inv_temp,
                                     h[a:b], w, dtype, grad_w, ctx.needs_input_grad[0]))
        grad_h = torch.cat(grad_h) if ctx.needs_input_grad[0] else None
        return grad_h, grad_w.to(w.dtype), None, None, None, None, None


def cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight.T against targets, skipping IGNORE (-100).
    h: (..., d); targets: (...) token ids; weight: (vocab, d)."""
    if torch.compiler.is_compiling() and targets.numel() * weight.size(0) <= PLAIN_MAX_LOGITS:
        logits = F.linear(h, weight).float()
        total = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                ignore_index=IGNORE, reduction="sum")
        return total / (targets != IGNORE).sum().clamp(min=1)
    need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _CrossEntropy.apply(h.reshape(-1, h.size(-1)), weight, targets.reshape(-1), chunk,
                               need_grad)


def token_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 1.0, with_entropy: bool = False,
                   chunk: int | None = None):
    """log softmax(h @ weight.T / temperature)[target] per token, shaped like targets: the
    one token log-prob function (PPO, DPO, the tracker's log-likelihoods). Targets equal to
    IGNORE are masked: their log-prob is 0 (sum over a row for a sequence's). With
    with_entropy, also the entropy of each token's distribution (no gradient)."""
    inv_temp = 1.0 / max(temperature, 1e-6)
    if torch.compiler.is_compiling() and targets.numel() * weight.size(0) <= PLAIN_MAX_LOGITS:
        # as in cross_entropy: inductor fuses the plain form, and the chunk loop would make
        # every new number of tokens a recompile (DPO batches vary in length). The target's
        # logit is picked by a mask, not by gather: gather's backward scatters into a zeroed
        # (tokens, vocab) fp32 tensor, which inductor keeps whole; the mask fuses away.
        z = F.linear(h, weight).float() * inv_temp
        lse = torch.logsumexp(z, dim=-1)
        hit = torch.arange(z.size(-1), device=z.device) == targets.clamp(min=0)[..., None]
        logp = torch.where(hit, z, 0.0).sum(-1) - lse
        entropy = (lse - (torch.softmax(z, -1) * z).sum(-1)).detach() if with_entropy else None
    else:
        need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        logp, entropy = _TokenLogprobs.apply(h.reshape(-1, h.size(-1)), weight,
                                             targets.reshape(-1).clamp(min=0), inv_temp,
                                             chunk, with_entropy, need_grad)
        logp = logp.view(targets.shape)
    logp = logp * (targets != IGNORE)
    return (logp, entropy.view(targets.shape)) if with_entropy else logp
