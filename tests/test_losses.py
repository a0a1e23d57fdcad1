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


def test_ppo_response_logprobs_match_full_logits_and_bf16_step_runs(tokenizer):
    """Through a real model: PPO's chunked log-probs and entropy equal a log_softmax over the
    model's full logits; and a whole PPO step runs under bf16 autocast (the GPU path)."""
    import copy

    from scalelab.config import ModelConfig, PPOConfig, TrainConfig
    from scalelab.model import ScalarModel, Transformer
    from scalelab.train.loop import make_optimizer
    from scalelab.train.ppo import make_rollout, ppo_step, response_logprobs

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=1, n_head=2,
                      d_model=32)
    policy = Transformer(cfg)
    prompts = [tokenizer.encode(f"Mia has {i} apples", bos=True)[: 3 + i % 4] for i in range(6)]
    responses = [[5 + i, 7, 9][: 1 + i % 3] for i in range(6)]
    ro = make_rollout(prompts, responses, tokenizer.pad_id, "cpu", min_response_len=4)
    logp, ent = response_logprobs(policy, ro, 0.7, with_entropy=True)
    full = F.log_softmax(policy(ro.tokens, ro.positions, ro.mask)[:, ro.prompt_len - 1: -1]
                         / 0.7, dim=-1)
    want = full.gather(-1, ro.tokens[:, ro.prompt_len:, None]).squeeze(-1)
    assert torch.allclose(logp, want, atol=1e-5, rtol=0)
    assert torch.allclose(ent, -(full.exp() * full).sum(-1), atol=1e-5, rtol=0)

    ref = copy.deepcopy(policy).requires_grad_(False)
    value = ScalarModel(copy.deepcopy(policy), zero_head=True)
    both = torch.nn.ModuleDict({"policy": policy, "value": value})
    opt = make_optimizer(both, TrainConfig(lr=1e-3), torch.device("cpu"))
    before = [p.detach().clone() for p in both.parameters()]
    pc = PPOConfig(max_new_tokens=6, minibatches=2, samples_per_prompt=1)
    row, ro = ppo_step(policy, ref, value, opt, lambda idx, r: torch.randn(len(r)),
                       list(range(6)), prompts, tokenizer, pc, 0.05,
                       torch.Generator().manual_seed(0),
                       ctx=torch.autocast("cpu", dtype=torch.bfloat16), grad_clip=0.5,
                       compiled=True)
    assert ro.resp_mask.size(1) == 6  # padded to max_new_tokens: one shape per step
    assert all(torch.isfinite(torch.tensor(v)) for v in row.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, both.parameters()))


def test_packed_ppo_minibatch_gives_the_padded_loss_and_gradients(tokenizer):
    """ppo.pack: a minibatch's sequences packed into fewer rows, each seeing only itself,
    give the padded rows' log-probs, entropy, values, loss and gradients."""
    import copy

    from scalelab.config import ModelConfig, PPOConfig
    from scalelab.model import ScalarModel, Transformer
    from scalelab.train.ppo import make_rollout, minibatch_loss, response_values

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=48, n_layer=2, n_head=2,
                      d_model=32)
    policy, value = Transformer(cfg), ScalarModel(Transformer(cfg))
    prompts = [tokenizer.encode("Mia has " * (1 + i % 4), bos=True) for i in range(7)]
    responses = [[5 + i, 7, 9, 11, 13][: 1 + (3 * i) % 5] for i in range(7)]
    padded = make_rollout(prompts, responses, tokenizer.pad_id, "cpu")
    packed = make_rollout(prompts, responses, tokenizer.pad_id, "cpu", pack=True)
    B, R = padded.resp_mask.shape
    adv, ret = torch.randn(B, R), torch.randn(B, R)
    old_logp, old_values = torch.randn(B, R) - 3, torch.randn(B, R)
    pc = PPOConfig()
    grads, outs = [], []
    for ro in (padded, packed):
        p, v = copy.deepcopy(policy), copy.deepcopy(value)
        loss, stats = minibatch_loss(p, v, ro, old_logp, old_values, adv, ret, pc)
        loss.backward()
        grads.append([q.grad for q in (*p.parameters(), *v.parameters())])
        outs.append([loss.detach(), *stats.values()])
    assert packed._packing[0].size(0) < B  # fewer rows than the padded batch
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    sub = torch.tensor([5, 0, 3])  # a minibatch of a packed rollout packs its own rows
    assert torch.allclose(response_values(value, packed.rows(sub)) * padded.resp_mask[sub],
                          response_values(value, padded.rows(sub)) * padded.resp_mask[sub],
                          atol=1e-5)


def test_packed_reward_and_dpo_batches_give_the_padded_losses_and_gradients(tokenizer):
    """reward.pack and dpo.pack: a batch's answers packed into fewer rows give the reward
    model's pair loss and DPO's sequence log-probs, and their gradients, of the padded batch."""
    import copy

    from scalelab.config import ModelConfig
    from scalelab.data.batches import pack_spans, pad_right
    from scalelab.model import ScalarModel, Transformer
    from scalelab.train.dpo import sequence_logprob
    from scalelab.train.reward import collate_groups, pair_loss_sum

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=48, n_layer=2, n_head=2,
                      d_model=32)
    groups = []
    for i in range(5):
        prompt = tokenizer.encode("Mia has " * (1 + i % 3), bos=True)
        answers = [prompt + [5 + k] * (1 + 5 * ((i + k) % 3)) for k in range(3)]
        groups.append((answers, [(0, 1), (0, 2), (2, 1)][: 1 + i % 3]))
    seqs = [s for g, _ in groups for s in g]
    targets = [s[1:] + [IGNORE] for s in seqs]
    x, y = pad_right(seqs, tokenizer.pad_id), pad_right(targets, IGNORE)
    lengths = torch.tensor([len(s) for s in seqs])
    dpo_packing = pack_spans(torch.arange(x.size(1)) < lengths[:, None])
    assert dpo_packing[0].numel() < 0.75 * x.numel()  # far fewer slots than the padded batch
    assert pack_spans(torch.ones(4, 6, dtype=torch.bool)) == ()  # nothing to save: not packed
    reward = ScalarModel(Transformer(cfg))
    policy = Transformer(cfg)
    results = []
    for pack in (False, True):
        r, p = copy.deepcopy(reward), copy.deepcopy(policy)
        loss = pair_loss_sum(r, collate_groups(groups, tokenizer.pad_id, pack))
        logp = sequence_logprob(p, x, y, dpo_packing if pack else ())
        (loss + logp.sum()).backward()
        results.append(([loss.detach(), logp.detach()],
                        [q.grad for q in (*r.parameters(), *p.parameters())]))
    (out1, g1), (out2, g2) = results
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(out1, out2))
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2))


def test_ppo_logprobs_are_over_the_ids_sampling_draws_from(tokenizer):
    """A model vocabulary padded past the tokenizer's: generate never samples the padded ids,
    so PPO's log-probs (and entropy) are those of the softmax over the real ids only."""
    from scalelab.config import ModelConfig
    from scalelab.model import Transformer
    from scalelab.train.ppo import make_rollout, response_logprobs

    torch.manual_seed(0)
    V = tokenizer.vocab_size
    policy = Transformer(ModelConfig(vocab_size=V + 64, seq_len=32, n_layer=1, n_head=2,
                                     d_model=32))
    with torch.no_grad():
        policy.lm_head.weight[V:] *= 30  # padded ids that would take real probability mass
    prompts = [tokenizer.encode(f"Sam is {i}", bos=True) for i in range(3)]
    responses = [[11, 12, 13][: 1 + i] for i in range(3)]
    ro = make_rollout(prompts, responses, tokenizer.pad_id, "cpu", vocab_limit=V)
    logp, ent = response_logprobs(policy, ro, 1.0, with_entropy=True)
    logits = policy(ro.tokens, ro.positions, ro.mask)[:, ro.prompt_len - 1: -1]
    real = F.log_softmax(logits[..., :V], dim=-1)
    want = real.gather(-1, ro.tokens[:, ro.prompt_len:, None]).squeeze(-1)
    assert torch.allclose(logp, want, atol=1e-5, rtol=0)
    assert torch.allclose(ent, -(real.exp() * real).sum(-1), atol=1e-5, rtol=0)
    padded = F.log_softmax(logits, dim=-1).gather(-1, ro.tokens[:, ro.prompt_len:, None])
    assert not torch.allclose(padded.squeeze(-1), want, atol=1e-3)


def test_compiled_pretraining_loss_and_grads_match_eager():
    # Under torch.compile next_token_loss takes the plain F.cross_entropy path (inductor fuses
    # it); eagerly it is the chunked one. Both must give the same loss and gradients.
    from scalelab.config import ModelConfig
    from scalelab.model import Transformer
    from scalelab.train.pretrain import next_token_loss
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16))
    data = torch.randint(64, (3, 17))
    batch = (data[:, :-1], data[:, 1:])
    results = []
    for fn in (next_token_loss, torch.compile(next_token_loss)):
        model.zero_grad()
        loss = fn(model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_sft_loss_is_one_graph_and_matches_eager(tokenizer):
    """The SFT loss compiles into one graph, as `scalelab sft` compiles it on CUDA, with the
    eager loss and gradients: packed rows (block-diagonal mask), and right-padded batches
    whose lengths vary (after the second length torch.compile makes T symbolic; causal
    attention decided by `T > 1` then broke the graph at every layer), compiled at most
    twice for any number of lengths."""
    from scalelab.config import ModelConfig
    from scalelab.data.batches import pack, pad_right
    from scalelab.model import Transformer
    from scalelab.train.sft import encode_conversations, masked_loss, task_conversations
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1,
                                    n_head=2, d_model=32))
    items = encode_conversations(task_conversations(24, seed=3)[0], tokenizer, 64)
    batches = [pack(items[:12], 64, tokenizer.pad_id, IGNORE)]
    batches += [(pad_right([x for x, _ in b], tokenizer.pad_id),
                 pad_right([y for _, y in b], IGNORE))
                for b in (items[12:16], items[16:20], items[20:24])]
    assert len({b[0].size(1) for b in batches[1:]}) == 3  # three lengths
    compiled = torch.compile(masked_loss, fullgraph=True)
    for batch in batches:
        results = []
        for fn in (masked_loss, compiled):
            model.zero_grad()
            loss = fn(model, batch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (l1, g1), (l2, g2) = results
        assert torch.allclose(l1, l2, atol=1e-5, rtol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2))


    # Batches of new lengths reuse the graph compiled for a symbolic length (the chunked
    # loss's Python loop over tokens fixed the length: a recompile per batch).
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    counted = torch.compile(masked_loss, backend=counter, fullgraph=True)
    for k in range(4):
        b = items[4 * k: 4 * k + 4]
        counted(model, (pad_right([x for x, _ in b], tokenizer.pad_id),
                        pad_right([y for _, y in b], IGNORE))).backward()
    assert counter.frame_count <= 2


def test_compiled_token_logprobs_match_eager_without_a_recompile_per_length(tokenizer):
    """DPO's sequence log-probs and PPO's log-probs and entropy, compiled (as on CUDA), equal
    the eager chunked ones; DPO batches of four lengths compile at most twice (the chunk
    loop, a Python loop over the tokens, made every new length a recompile)."""
    from torch._dynamo.testing import CompileCounter

    from scalelab.config import ModelConfig
    from scalelab.data.batches import pad_right
    from scalelab.model import Transformer
    from scalelab.train.dpo import sequence_logprob
    from scalelab.train.ppo import make_rollout, response_logprobs
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1,
                                    n_head=2, d_model=32))
    seqs = [tokenizer.encode("Mia has " * n + "apples", bos=True) for n in range(1, 9)]
    batches = [(pad_right(b, tokenizer.pad_id), pad_right([s[1:] + [IGNORE] for s in b], IGNORE))
               for b in (seqs[0:2], seqs[2:4], seqs[4:6], seqs[6:8])]
    assert len({x.size(1) for x, _ in batches}) == 4
    counter = CompileCounter()
    counted = torch.compile(sequence_logprob, backend=counter, fullgraph=True)
    compiled = torch.compile(sequence_logprob, fullgraph=True)
    for x, y in batches:
        results = []
        for fn in (sequence_logprob, compiled):
            model.zero_grad()
            logp = fn(model, x, y)
            logp.sum().backward()
            results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
        (l1, g1), (l2, g2) = results
        assert torch.allclose(l1, l2, atol=1e-4, rtol=1e-5)
        assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(g1, g2))
        counted(model, x, y)
    assert counter.frame_count <= 2

    ro = make_rollout(seqs[:3], [[5, 6, 7], [8], [9, 10]], tokenizer.pad_id, "cpu")
    eager = response_logprobs(model, ro, 0.7, with_entropy=True)
    both = torch.compile(response_logprobs, fullgraph=True)(model, ro, 0.7, with_entropy=True)
    for a, b in zip(eager, both):
        assert torch.allclose(a * ro.resp_mask, b * ro.resp_mask, atol=1e-5)


def test_compiled_losses_hold_no_fp32_tensor_of_all_logits():
    """Under torch.compile the losses take the plain form and rely on inductor to fuse the
    softmax: no (tokens, vocab) fp32 tensor may be allocated, forward or backward (the issue's
    bar for PPO). token_logprobs picked the target with gather, whose backward scattered into
    a zeroed fp32 (tokens, vocab) buffer. Read from the code inductor generates."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code
    tokens, vocab = 3 * 40, 997
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 40, 24, generator=g, requires_grad=True)
    w = torch.randn(vocab, 24, generator=g, requires_grad=True)
    y = torch.randint(vocab, (3, 40), generator=g)

    def logprobs(h, w, y):
        logp, entropy = token_logprobs(h, w, y, temperature=0.7, with_entropy=True)
        return (logp.sum() + entropy.sum()).backward()

    def ce(h, w, y):
        return cross_entropy(h, w, y).backward()

    for fn in (logprobs, ce):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, code = run_and_get_code(torch.compile(fn), h, w, y)
        buffers = re.findall(r"empty_strided_cpu\(\(([\d, ]*)\), \([\d, ]*\), torch\.(\w+)\)",
                             "\n".join(code))
        assert len(buffers) > 5  # forward and backward were both read
        whole = [(shape, dtype) for shape, dtype in buffers if dtype == "float32"
                 and math.prod(int(n) for n in shape.split(",") if n.strip()) >= tokens * vocab]
        assert not whole, (fn.__name__, whole)
