"""Batched sampling with a KV cache: used by `scalelab generate`, evaluation and PPO rollouts.

Prompts of different lengths are left-padded; position ids come from the padding mask, so a
padded prompt produces exactly the same tokens as the same prompt alone.
"""

from __future__ import annotations

import torch

from scalelab.model import KVCache, Transformer


def padded_attention(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids (B, T) and a causal attention mask (B, 1, T, T) for rows with padding
    (valid False). Each query sees valid keys up to itself; a padded query sees only itself,
    which keeps softmax finite (its output is never used)."""
    T = valid.size(1)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    mask = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device)
    return positions, mask.unsqueeze(1)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row from (B, vocab) logits; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int,
             pad_id: int, eos_id: int | None = None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, generator: torch.Generator | None = None,
             use_cache: bool = True) -> list[list[int]]:
    """New tokens for each prompt (ending at and including EOS if one was sampled)."""
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = min(P + max_new_tokens, model.cfg.seq_len)
    if P >= total:
        raise ValueError(f"prompt of {P} tokens leaves no room in seq_len {model.cfg.seq_len}")
    tokens = torch.full((B, total), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((B, total), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        valid[i, P - len(p):] = True  # generated positions are always valid
    positions, mask = padded_attention(valid)

    cache = KVCache(model.cfg, B, total, device, next(model.parameters()).dtype) \
        if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    start = 0
    for t in range(P, total):
        if use_cache:  # first step feeds the whole prompt, later ones one token
            logits = model(tokens[:, start:t], positions[:, start:t], mask[:, :, start:t, :t],
                           cache)
            start = t
        else:
            logits = model(tokens[:, :t], positions[:, :t], mask[:, :, :t, :t])
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        tokens[:, t] = torch.where(done, pad_id, nxt)
        if eos_id is not None:
            done |= nxt == eos_id
            if done.all():
                total = t + 1
                break
    out = []
    for i in range(B):
        new = tokens[i, P:total].tolist()
        if eos_id is not None and eos_id in new:  # rows that stopped early hold pads after EOS
            new = new[: new.index(eos_id) + 1]
        out.append(new)
    return out
