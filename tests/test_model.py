import pytest
import torch
import torch.nn.functional as F

from scalelab.config import ModelConfig
from scalelab.generate import generate
from scalelab.model import LOGICAL_AXES, KVCache, Transformer
from scalelab.parallel.rules import param_key


def test_future_tokens_never_change_past_logits(tiny_model):
    x = torch.randint(0, 320, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 320, (2, 8))
    with torch.no_grad():
        a, b = tiny_model(x), tiny_model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_cache_forward_matches_full_forward(tiny_model):
    from scalelab.model import KVCache
    x = torch.randint(0, 320, (3, 24))
    with torch.no_grad():
        full = tiny_model(x)
        cache = KVCache(tiny_model.cfg, 3, 24, "cpu", torch.float32)
        parts = [tiny_model(x[:, :10], cache=cache), tiny_model(x[:, 10:11], cache=cache),
                 tiny_model(x[:, 11:], cache=cache)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_greedy_with_cache_equals_without(mlp):
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=100, seq_len=64, n_layer=2, n_head=4,
                                    n_kv_head=2, d_model=32, mlp=mlp)).eval()
    prompts = [[5, 6, 7, 8, 9], [1, 2], [42] * 9]  # ragged: exercises left padding
    kw = dict(max_new_tokens=30, pad_id=0, eos_id=None, temperature=0.0)
    with_cache = generate(model, prompts, use_cache=True, **kw)
    without = generate(model, prompts, use_cache=False, **kw)
    assert with_cache == without
    assert all(len(o) == 30 for o in with_cache)
    # Left padding with position ids from the mask: a padded prompt = the prompt alone.
    for p, out in zip(prompts, with_cache):
        assert generate(model, [p], **kw)[0] == out


def test_sampling_is_seeded_and_stops_at_eos(tiny_model):
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return generate(tiny_model, [[1, 2, 3]] * 4, 20, pad_id=0, eos_id=7, temperature=1.5,
                        top_k=20, top_p=0.9, generator=g)
    a, b = run(0), run(0)
    assert a == b and a != run(1)
    for out in a:
        assert 7 not in out[:-1]  # nothing after EOS


def test_every_weight_has_logical_axes_matching_its_shape(tiny_model):
    def table_keys(model: Transformer) -> set[str]:
        seen = set()
        for name, p in model.named_parameters():
            assert len(LOGICAL_AXES[param_key(name)]) == p.dim(), name
            seen.add(param_key(name))
        return seen
    # every table row names a parameter and every parameter a row, root level included;
    # a tied lm_head is the embedding (named_parameters lists a shared tensor once)
    biases = {k for k in LOGICAL_AXES if k.endswith(".bias")}
    assert table_keys(tiny_model) == set(LOGICAL_AXES) - {"lm_head.weight"} - biases
    untied = Transformer(ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2,
                                     d_model=8, tie_embeddings=False, qkv_bias=True))
    assert table_keys(untied) == set(LOGICAL_AXES)


def test_param_count_and_flops_by_hand():
    cfg = ModelConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=8, d_mlp=16,
                      tie_embeddings=False)
    m = Transformer(cfg)
    per_layer = 4 * 8 * 8 + 3 * 8 * 16 + 2 * 8  # attention + swiglu + two norms
    n = 2 * per_layer + 8 + 64 * 8  # + final norm + lm_head (input table excluded)
    assert m.num_params() == n
    assert m.num_params(non_embedding=False) == n + 64 * 8
    assert m.flops_per_token() == 6 * n + 12 * 2 * 2 * 4 * 16


def test_tiny_model_overfits_one_batch(tiny_model):
    torch.manual_seed(0)
    x = torch.randint(0, 320, (4, 32))
    opt = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    tiny_model.train()
    for _ in range(150):
        logits = tiny_model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 320), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1  # started at ~ln(320) = 5.8


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        Transformer(ModelConfig(vocab_size=10, d_model=30, n_head=4))
    with pytest.raises(ValueError):
        Transformer(ModelConfig(vocab_size=10, d_model=32, n_head=4, n_kv_head=3))


def test_kv_cache_row_methods_match_plain_tensor_edits():
    """add_rows / write_rows / drop_front (the server's batch edits) against the same edits
    done by hand on plain tensors."""
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=16, vocab_size=32, seq_len=8)
    cache = KVCache(cfg, 2, 8, "cpu", torch.float32)
    for buf in cache.k + cache.v:
        buf.normal_()
    k, v = torch.stack(cache.k), torch.stack(cache.v)  # (layer, batch, kv_head, pos, dim)
    cache.add_rows(3)
    zeros = torch.zeros(2, 3, 2, 8, 4)
    k, v = torch.cat([k, zeros], 1), torch.cat([v, zeros], 1)
    src = KVCache(cfg, 2, 3, "cpu", torch.float32)
    for buf in src.k + src.v:
        buf.normal_()
    rows = torch.tensor([4, 1])
    cache.write_rows(rows, 2, src)
    src_k, src_v = torch.stack(src.k), torch.stack(src.v)
    k[:, 4, :, 2:5], k[:, 1, :, 2:5] = src_k[:, 0], src_k[:, 1]
    v[:, 4, :, 2:5], v[:, 1, :, 2:5] = src_v[:, 0], src_v[:, 1]
    cache.drop_front(3)
    for got, want in ((torch.stack(cache.k), k), (torch.stack(cache.v), v)):
        assert torch.equal(got[:, :, :, :5], want[:, :, :, 3:])
    assert cache.k[1].shape == (5, 2, 8, 4) and cache.shape[0] == 5


@pytest.mark.parametrize("expand", [False, True])
def test_masked_grouped_query_attention_equals_its_multi_head_twin(monkeypatch, expand):
    """Under a mask (padding, packing) grouped-query attention gives what a multi-head model
    with each k/v head copied to its query heads gives, on both paths: SDPA's enable_gqa, and
    the k/v heads expanded by hand (what CUDA takes, whose masked kernels lack GQA; forced here
    on CPU). Copying heads in the wrong order (repeat instead of repeat_interleave) fails."""
    import scalelab.model as M
    from scalelab.generate import padded_attention
    monkeypatch.setattr(M, "EXPAND_KV_UNDER_MASK", ("cpu",) if expand else ())
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, seq_len=16, n_layer=2, n_head=4, d_model=32)
    gqa = Transformer(ModelConfig(**cfg, n_kv_head=2))
    mha = Transformer(ModelConfig(**cfg, n_kv_head=4))
    state = gqa.state_dict()
    for name, w in state.items():
        if name.endswith(("wk.weight", "wv.weight")):  # (kv heads x head_dim, d): copy heads
            state[name] = w.view(2, 8, 32).repeat_interleave(2, 0).reshape(32, 32)
    mha.load_state_dict(state)
    x = torch.randint(0, 64, (3, 12))
    valid = torch.ones(3, 12, dtype=torch.bool)
    valid[1, :5] = valid[2, :2] = False
    positions, mask = padded_attention(valid)
    a, b = gqa(x, positions, mask), mha(x, positions, mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    a[valid].sum().backward()
    assert gqa.blocks[0].attn.wk.weight.grad.abs().sum() > 0
