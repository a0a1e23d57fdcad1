"""The chunked token losses equal the plain full-vocabulary computation (values and gradients)."""

import pytest
import torch
import torch.nn.functional as F

from scalelab.train.losses import IGNORE, cross_entropy, token_logprobs


def _inputs(seed=0, n=37, d=16, vocab=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).float().requires_grad_(True)
    w = (0.5 * torch.randn(vocab, d, generator=g)).requires_grad_(True)
    y = torch.randint(vocab, (n,), generator=g)
    return h, w, y


def _grads(out, *xs):
    return torch.autograd.grad(out, xs)


@pytest.mark.parametrize("chunk", [5, 16, None])
def test_cross_entropy_matches_plain(chunk):
    h, w, y = _inputs()
    y[::4] = IGNORE
    ours = cross_entropy(h, w, y, chunk=chunk)
    plain = F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE)
    assert torch.allclose(ours, plain, atol=1e-5, rtol=0)
    # a non-unit incoming gradient (grad_accum scaling, say) is applied to both
    for a, b in zip(_grads(3.0 * ours, h, w), _grads(3.0 * plain, h, w)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_cross_entropy_all_ignored_is_zero_and_no_grad_mode_works():
    h, w, y = _inputs()
    assert cross_entropy(h, w, torch.full_like(y, IGNORE)).item() == 0.0
    with torch.no_grad():
        val = cross_entropy(h, w, y, chunk=7)
    assert torch.allclose(val, F.cross_entropy(h @ w.t(), y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [6, None])
def test_token_logprobs_and_entropy_match_plain(temperature, chunk):
    h, w, y = _inputs(seed=1)
    h3, y3 = h.view(1, 37, -1), y.view(1, 37)  # any leading shape
    mask = (torch.arange(37) % 3 != 0).float().view(1, 37)
    logp, ent = token_logprobs(h3, w, y3, temperature, with_entropy=True, chunk=chunk)
    logp_all = F.log_softmax((h3 @ w.t()) / temperature, dim=-1)
    plain = logp_all.gather(-1, y3[..., None]).squeeze(-1)
    plain_ent = -(logp_all.exp() * logp_all).sum(-1)
    assert logp.shape == (1, 37)
    assert torch.allclose(logp, plain, atol=1e-5, rtol=0)
    assert torch.allclose(ent, plain_ent.detach(), atol=1e-5, rtol=0)
    # a masked, weighted objective as PPO builds it
    weights = torch.linspace(-1, 2, 37).view(1, 37)
    for a, b in zip(_grads((logp * weights * mask).sum(), h, w),
                    _grads((plain * weights * mask).sum(), h, w)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_token_logprobs_under_bf16_autocast_is_close():
    h, w, y = _inputs(seed=2)
    plain = F.log_softmax(h @ w.t(), -1).gather(-1, y[:, None]).squeeze(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = token_logprobs(h, w, y, chunk=8)
        loss = cross_entropy(h, w, y, chunk=8)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp, plain, atol=0.1)
    assert abs(loss.item() + plain.mean().item()) < 0.1
    (-logp.sum() + loss).backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
