"""The rollout engine against the full-recompute reference, and its sampler's statistics."""

import warnings

import pytest
import torch

import scalelab.generate as gen
from scalelab.config import ModelConfig
from scalelab.generate import Rollout, filter_logits, generate, sample_next
from scalelab.model import Transformer


def small_model(vocab: int = 100, n_kv_head: int = 2, seed: int = 1) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, seq_len=96, n_layer=2, n_head=4,
                                   n_kv_head=n_kv_head, d_model=32)).eval()


PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [42] * 9, [3]]  # ragged: exercises left padding


def run(model, prompts=PROMPTS, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return generate(model, prompts, kw.pop("max_new_tokens", 40), 0, generator=g, **kw)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_sampled_engine_matches_full_recompute_for_the_same_seed(n_kv_head):
    model = small_model(n_kv_head=n_kv_head)
    kw = dict(temperature=1.3, top_k=30, top_p=0.9)
    fast = run(model, **kw)
    assert fast == run(model, use_cache=False, **kw)
    assert fast == run(model, **kw) and fast != run(model, seed=1, **kw)
    assert all(len(o) == 40 for o in fast)


def test_stop_checks_every_k_tokens_still_cut_at_the_first_eos():
    model = small_model(vocab=12)  # a small vocabulary: EOS (id 7) comes up soon
    prompts = [[1, 2, 3]] * 6 + [[4]] * 2
    ref = run(model, prompts, eos_id=7, use_cache=False, max_new_tokens=60)
    assert any(len(o) < 60 for o in ref) and all(o[-1] == 7 for o in ref if len(o) < 60)
    for k in (1, 3, 16, 1000):
        out = run(model, prompts, eos_id=7, check_every=k, max_new_tokens=60)
        assert out == ref, k
    assert all(7 not in o[:-1] for o in ref)


def test_several_stop_ids_end_each_row_at_the_first_of_them(monkeypatch):
    # An imported model may stop at several ids (generation_config.json's eos_token_id
    # list). A row's draws do not depend on its stopping, so the answers are the unstopped
    # ones cut after their first stop id: through the reference, the engine, and a kept one.
    model = small_model(vocab=12)
    prompts = [[1, 2, 3]] * 6 + [[4]] * 2
    free = run(model, prompts, max_new_tokens=60)
    ends = [next((i for i, t in enumerate(o) if t in (7, 9)), None) for o in free]
    want = [o if e is None else o[:e + 1] for o, e in zip(free, ends)]
    assert {o[-1] for o in want} == {7, 9} and all(len(o) < 60 for o in want)
    for kw in (dict(use_cache=False), dict(check_every=1), dict(check_every=16)):
        assert run(model, prompts, eos_id=[7, 9], max_new_tokens=60, **kw) == want, kw
    kept_engines_on_cpu(monkeypatch)
    assert run(model, prompts, eos_id=(9, 7), max_new_tokens=60) == want


def test_no_new_tokens_asked_gives_empty_answers():
    # max_new_tokens 0 (lm-eval may ask it) is nothing to do, even for a prompt that fills the
    # context; it used to be refused as "no room in seq_len"
    model = small_model()
    assert run(model, [[1, 2], [3] * 96], max_new_tokens=0) == [[], []]
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(model, max_new_tokens=-1)


def test_greedy_equals_full_recompute_and_prompt_alone():
    model = small_model()
    kw = dict(temperature=0.0, max_new_tokens=50)
    fast = run(model, **kw)
    assert fast == run(model, use_cache=False, **kw)
    for p, out in zip(PROMPTS, fast):
        assert run(model, [p], **kw)[0] == out


class EagerGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: replay runs the step eagerly."""

    def __init__(self, engine, model):
        self.engine, self.model = engine, model

    def replay(self):
        self.engine.step(self.model)


def test_graph_path_on_cpu_buckets_reuses_and_resets_state(monkeypatch):
    # Everything the CUDA path does except the recording: rows/length rounded up to a bucket,
    # a dummy prefill + warm-up steps that dirty the state, then the real prefill; the engine is
    # cached and reused by later calls with other prompt lengths.
    calls = []

    def fake_prepare(self, model, use_graph, compile):
        assert use_graph and not compile
        for _ in range(2):
            self.step(model)
        calls.append(self)
        self.graph = EagerGraph(self, model)

    model = small_model()
    kw = dict(temperature=1.1, top_p=0.95, eos_id=7, max_new_tokens=30)
    want = [run(model, PROMPTS, **kw), run(model, PROMPTS[1:2], **kw),
            run(model, PROMPTS[:3], temperature=0.0, max_new_tokens=20)]
    monkeypatch.setattr(gen, "_use_graph", lambda device, graphs: graphs)
    monkeypatch.setattr(Rollout, "prepare", fake_prepare)
    got = [run(model, PROMPTS, **kw), run(model, PROMPTS[1:2], **kw),
           run(model, PROMPTS[:3], temperature=0.0, max_new_tokens=20)]
    assert got == want
    assert len(calls) == 2  # one recording per sampling setting; the second call reused it
    assert calls[0].out.shape == (8, 64)  # 4 rows -> 8, 9 + 30 tokens -> 64
    assert run(model, PROMPTS, graphs=False, **kw) == want[0]


def kept_engines_on_cpu(monkeypatch):
    """generate() keeps its engines as on CUDA, each replaying its step through EagerGraph."""
    monkeypatch.setattr(gen, "_use_graph", lambda device, graphs: graphs)
    monkeypatch.setattr(Rollout, "prepare",
                        lambda self, model, use_graph, compile: setattr(
                            self, "graph", EagerGraph(self, model)))


@pytest.mark.parametrize("shape", [{}, {"qkv_bias": True, "mlp": "relu2"}])
def test_fused_projections_follow_the_weights_between_calls(monkeypatch, shape):
    # A kept engine decodes with its own copy of each layer's q|k|v and gate|up weights (one
    # matmul instead of three, or two). PPO changes the weights in place between rollouts:
    # every call must copy them in again, and the model must train on its own weights after.
    # Also with q/k/v biases (Qwen's) and a ReLU^2 MLP (no gate: its matmul stays alone).
    torch.manual_seed(1)
    model = Transformer(ModelConfig(vocab_size=100, seq_len=96, n_layer=2, n_head=4,
                                    n_kv_head=2, d_model=32, **shape)).eval()
    kw = dict(temperature=1.1, top_p=0.95, max_new_tokens=20)
    kept_engines_on_cpu(monkeypatch)
    first = run(model, **kw)
    engine, = gen._ENGINES[model].values()
    assert engine.projections is not None and first == run(model, use_cache=False, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    second = run(model, **kw)
    assert list(gen._ENGINES[model].values()) == [engine]  # the same engine, reused
    assert second == run(model, use_cache=False, **kw) and second != first
    assert all(b.attn.fused is None and b.mlp.fused is None for b in model.blocks)
    model(torch.tensor([PROMPTS[0]])).sum().backward()
    assert model.blocks[0].attn.wk.weight.grad.abs().sum() > 0


def test_kept_engines_of_a_model_share_one_fused_copy(monkeypatch):
    # A model keeps up to 4 engines (one per batch/length bucket) for its whole life: with a
    # fused copy each they would hold up to 4 copies of most of its block weights. They share
    # one per dtype, refreshed by every call, and each engine still follows the weights.
    model = small_model()
    kw = dict(temperature=1.1, top_p=0.95, max_new_tokens=20)
    kept_engines_on_cpu(monkeypatch)
    prompt_sets = [PROMPTS, PROMPTS * 3]  # 4 rows -> a bucket of 8, 12 -> 16: two engines
    for prompts in prompt_sets:
        run(model, prompts, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run(model, **kw)  # a third engine: its matmuls run in bf16, so its copy is bf16
    fp32, fp32_too, bf16 = (e.projections for e in gen._ENGINES[model].values())
    assert fp32 is fp32_too and bf16 is not fp32
    assert fp32.fused[0][0].dtype == torch.float32 and bf16.fused[0][0].dtype == torch.bfloat16
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for prompts in prompt_sets:
        assert run(model, prompts, **kw) == run(model, prompts, use_cache=False, **kw)
    assert len(gen._ENGINES[model]) == 3  # the same engines


@pytest.mark.parametrize("attention,prefill", [("sdpa", False), ("flex", False),
                                               ("sdpa", True)])
def test_compiled_step_gives_the_same_tokens(attention, prefill, monkeypatch):
    # compile=True compiles the whole decode step for real (inductor's CPU backend; on CUDA
    # the same graph becomes Triton kernels and is then recorded), once per bucket: the
    # second call (other prompts, same bucket) reuses it. The eager engine it is compared
    # with equals the full-recompute reference (tests above). "flex": the decode step's
    # attention through FlexAttention (model.DECODE_ATTENTION), grouped heads included.
    # prefill: the prefill compiled too (generate.COMPILE_PREFILL); its second prompt length
    # recompiles it for any length, and the third call reuses that.
    monkeypatch.setattr("scalelab.model.DECODE_ATTENTION", attention)
    monkeypatch.setattr(gen, "COMPILE_PREFILL", prefill)
    model = small_model()
    limit = model.cfg.vocab_size - 3  # as for a padded vocabulary: a slice inside the graph
    kw = dict(temperature=1.1, top_p=0.95, eos_id=7, max_new_tokens=30, vocab_limit=limit)
    with warnings.catch_warnings():
        # a failed compile warns and falls back to the eager step: make that a failure here
        warnings.filterwarnings("error", message="generate: torch.compile")
        assert run(model, compile=True, **kw) == run(model, **kw)
        assert run(model, PROMPTS[1:2], compile=True, **kw) == run(model, PROMPTS[1:2], **kw)
        with torch.no_grad():  # as PPO trains the policy between compiled rollouts
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        assert run(model, compile=True, **kw) == run(model, use_cache=False, **kw)
    engines = list(gen._ENGINES[model].values())
    assert len(engines) == 1 and engines[0].run_step is not engines[0].step  # reused
    assert (engines[0].run_prefill is not None) == prefill
    if prefill:  # compiled once, for both prompt lengths
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        assert len(_debug_get_cache_entry_list(Rollout._prefill.__code__)) == 1
    assert max(max(r) for r in run(model, compile=True, **kw)) < limit


def test_cache_follows_the_dtype_attention_produces():
    model = small_model()
    engine = Rollout(model, 2, 16, 0, None, 0.0, 0, 1.0)
    tokens = torch.randint(1, 100, (2, 16))
    valid = torch.ones(2, 16, dtype=torch.bool)
    live = torch.ones(2, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        engine.prefill(model, tokens, valid, 4, live, None)
        engine.step(model)
    assert engine.cache.k[0].dtype == torch.bfloat16 and engine.cache.k[1].shape[1] == 2
    assert engine.write_at.item() == 5
    assert engine.key_ok[0, 0, 0].tolist() == [True] * 5 + [False] * 11
    bf16 = small_model().to(torch.bfloat16)
    out = run(bf16, temperature=0.0, max_new_tokens=10)
    assert all(len(o) == 10 for o in out)


# ---- the sampler ---------------------------------------------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def frequencies(temperature=1.0, top_k=0, top_p=1.0, n=40_000):
    g = torch.Generator().manual_seed(0)
    logits = PROBS.log().expand(n, 4)
    ids = sample_next(logits, temperature, top_k, top_p, torch.rand(n, 4, generator=g))
    return torch.bincount(ids, minlength=4).float() / n


def test_gumbel_max_samples_the_softmax():
    # 40k draws: the standard error of each frequency is below 0.0025; allow 4 of them.
    torch.testing.assert_close(frequencies(), PROBS, atol=0.01, rtol=0)
    hot = PROBS.sqrt() / PROBS.sqrt().sum()  # temperature 2: p^(1/2), renormalised
    torch.testing.assert_close(frequencies(temperature=2.0), hot, atol=0.01, rtol=0)
    kept = torch.tensor([0.5, 0.3, 0, 0]) / 0.8
    torch.testing.assert_close(frequencies(top_k=2), kept, atol=0.01, rtol=0)
    torch.testing.assert_close(frequencies(top_p=0.7), kept, atol=0.01, rtol=0)


def test_top_k_and_top_p_masks_are_exact():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [0.0, 0.0, 5.0, 1.0, -2.0]])
    inf = float("-inf")
    assert filter_logits(logits, 2, 1.0).tolist() == [[2.0, inf, inf, 3.0, inf],
                                                      [inf, inf, 5.0, 1.0, inf]]
    p = PROBS.log()[None]
    # nucleus: the smallest set whose mass reaches top_p (0.5 < 0.6 -> two tokens)
    assert filter_logits(p, 0, 0.6).isinf().tolist() == [[False, False, True, True]]
    assert filter_logits(p, 0, 0.4).isinf().tolist() == [[False, True, True, True]]
    assert filter_logits(p, 0, 0.9).isinf().tolist() == [[False, False, False, True]]
    assert (sample_next(logits, 0.0, 0, 1.0, None) == torch.tensor([3, 2])).all()


def test_rope_is_a_rotation_of_each_half_pair():
    # Computed another way: pair i is the complex number x[i] + j*x[i + D/2], turned by the
    # angle position * theta^(-2i/D).
    from scalelab.model import apply_rope, rope_tables
    B, T, H, D = 2, 5, 3, 8
    x = torch.randn(B, T, H, D)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 7, 8, 9, 10]])
    cos, sin = rope_tables(D, 16, 10000.0)
    got = apply_rope(x, cos[positions].unsqueeze(2), sin[positions].unsqueeze(2))
    freq = 10000.0 ** (-torch.arange(0, D, 2) / D)
    turn = torch.polar(torch.ones(B, T, 1, D // 2), positions[..., None, None] * freq)
    want = torch.complex(x[..., : D // 2], x[..., D // 2:]) * turn
    torch.testing.assert_close(got, torch.cat([want.real, want.imag], -1), atol=1e-5, rtol=1e-5)


def test_chat_samples_what_generate_samples_for_the_same_seed():
    """`scalelab chat` at a temperature above 0 (its default is 0.8) draws the same tokens as
    generate for the same seed; it used to pass the generator where the noise belongs."""
    from scalelab.chat import stream_tokens
    model = small_model()
    for temperature, top_k in ((0.8, 50), (0.0, 0)):
        want = run(model, [[5, 6, 7]], temperature=temperature, top_k=top_k, max_new_tokens=20)
        got = stream_tokens(model, [5, 6, 7], 20, (), temperature, top_k, 1.0,
                            torch.Generator().manual_seed(0))
        assert list(got) == want[0] and len(want[0]) == 20


def test_an_empty_prompt_is_refused_by_name():
    """A prompt with no token (no BOS to start from) is a ValueError, not a reshape error."""
    model = Transformer(ModelConfig(n_layer=1, d_model=32, n_head=2, vocab_size=64, seq_len=16))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[5, 6], []], 4, pad_id=0)


def test_top_p_zero_keeps_the_most_likely_token_as_the_server_does():
    """top_p = 0: the nucleus is the single most likely token, so sampling at any temperature
    and seed gives the greedy answer (the server already read it so; the library used to
    sample from the unfiltered distribution)."""
    from scalelab.serve.engine import sample_rows
    model = small_model()
    greedy = run(model, temperature=0.0, max_new_tokens=20)
    for seed in range(3):
        assert run(model, seed=seed, temperature=1.5, top_p=0.0, max_new_tokens=20) == greedy
        assert run(model, seed=seed, temperature=1.5, top_p=0.0, use_cache=False,
                   max_new_tokens=20) == greedy
    # the library's sampler and the server's agree draw for draw, top_p = 0 included
    logits, noise = torch.randn(64, 100), torch.rand(64, 100)
    for top_p in (0.0, 0.3, 0.9, 1.0):
        lib = sample_next(logits, 1.2, 0, top_p, noise)
        srv = sample_rows(logits, torch.full((64,), 1.2), torch.full((64,), top_p), noise)
        assert lib.tolist() == srv.tolist(), top_p
    assert filter_logits(PROBS.log()[None], 0, 0.0).isinf().tolist() == [[False, True, True,
                                                                           True]]


class HotPadding(torch.nn.Module):
    """An lm_head whose ids from `limit` on (a padded vocabulary's) get +30 on their logits:
    unmasked, every sample and every greedy pick lands there."""

    def __init__(self, head: torch.nn.Module, limit: int):
        super().__init__()
        self.head, self.limit = head, limit

    def forward(self, h):
        out = self.head(h)
        return torch.cat([out[..., :self.limit], out[..., self.limit:] + 30.0], -1)


def test_padded_vocabulary_ids_are_never_produced():
    from scalelab.chat import stream_tokens
    model = small_model()
    model.lm_head = HotPadding(model.lm_head, 90)
    assert all(t >= 90 for o in run(model, temperature=1.0, max_new_tokens=10) for t in o)
    for kw in (dict(temperature=1.0), dict(temperature=2.0, top_k=5, top_p=0.9),
               dict(temperature=0.0), dict(temperature=1.0, use_cache=False)):
        for seed in range(2):
            out = run(model, seed=seed, vocab_limit=90, max_new_tokens=30, **kw)
            assert all(len(o) == 30 and max(o) < 90 for o in out), kw
    # the limit changes nothing for a model whose vocabulary is all real
    plain = small_model()
    assert run(plain, vocab_limit=100) == run(plain) and run(plain, vocab_limit=150) == run(plain)
    got = stream_tokens(model, [5, 6, 7], 30, (), 1.0, 0, 1.0, torch.Generator().manual_seed(0),
                        vocab_limit=90)
    assert max(got) < 90


def test_evaluation_and_reward_sampling_pass_the_tokenizers_vocabulary(tokenizer):
    """respond_ids (task accuracy, reward-data sampling, the demo) limits sampling to the
    tokenizer's vocabulary by itself."""
    from scalelab.evaluate import respond_ids
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size + 64, seq_len=64,
                                    n_layer=1, n_head=2, d_model=32)).eval()
    model.lm_head = HotPadding(model.lm_head, tokenizer.vocab_size)
    out = respond_ids(model, tokenizer, ["Hi", "Sort 3, 1, 2."], 10, temperature=1.0,
                      generator=torch.Generator().manual_seed(0))
    assert all(o and max(o) < tokenizer.vocab_size for o in out)


def test_answers_batched_by_length_come_back_in_the_prompts_order(tokenizer):
    """respond_ids sorts prompts by length into batches: each answer must still be the one
    its own prompt gets alone, in the order the prompts were given; and a reward model's
    scores, batched by length too, those of each sequence scored alone."""
    from scalelab.evaluate import respond_ids
    from scalelab.model import ScalarModel
    from scalelab.train.reward import score_sequences
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=2,
                                    n_head=2, d_model=32, tie_embeddings=False)).eval()
    prompts = ["Which is the largest number: 12, 45, 7, 3, 99, 18?", "Hi", "Sort 3, 1, 2.",
               "What is 23 plus 41?", "Mia", "Repeat after me: red apple, green pear"]
    together = respond_ids(model, tokenizer, prompts, 8, batch_size=4)
    alone = [respond_ids(model, tokenizer, [p], 8)[0] for p in prompts]
    assert together == alone and len({tuple(a) for a in alone}) > 1
    seqs = [tokenizer.chat_prompt(p) + a for p, a in zip(prompts, alone)]
    scorer = ScalarModel(model).eval()
    with torch.no_grad():
        one_by_one = torch.cat([scorer(torch.tensor([s]))[:, -1] for s in seqs])
    assert torch.allclose(score_sequences(scorer, seqs, tokenizer.pad_id, batch_size=4),
                          one_by_one, atol=1e-5, rtol=0)


class Lines:
    """stdin for chat_loop: one line per readline, then Ctrl-C (KeyboardInterrupt) at the
    prompt, as a terminal gives it."""

    def __init__(self, *lines: str):
        self.lines = list(lines)

    def readline(self) -> str:
        if not self.lines:
            raise KeyboardInterrupt
        return self.lines.pop(0)


def test_ctrl_c_while_answering_stops_that_answer_only(tokenizer, monkeypatch):
    """Ctrl-C while an answer streams ends that answer (what was shown stays in the
    conversation) and the chat goes on; Ctrl-C at the prompt still ends the session."""
    import io

    import scalelab.chat as chat
    words = [tokenizer.encode(w) for w in (" one", " two", " three")]
    prompts, stop_at = [], [2]

    def fake_stream(model, prompt, *args):  # the first answer is interrupted at a word
        prompts.append(prompt)
        for k, ids in enumerate(words):
            if len(prompts) == 1 and k == stop_at[0]:
                raise KeyboardInterrupt
            yield from ids
        yield tokenizer.eos_id
    monkeypatch.setattr(chat, "stream_tokens", fake_stream)
    model = small_model()
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt):  # at the third prompt: the session ends (exit 130)
        chat.chat_loop(model, tokenizer, Lines("hello\n", "again\n"), out, 10, 1.0, 0, 1.0,
                       None)
    assert len(prompts) == 2 and out.getvalue().count("assistant>") == 2
    shown = tokenizer.decode(words[0] + words[1])
    assert shown + " [stopped]\n" in out.getvalue()
    want = tokenizer.encode_chat([{"role": "user", "content": "hello"},
                                  {"role": "assistant", "content": shown},
                                  {"role": "user", "content": "again"}], True)[0]
    assert prompts[1] == want
    # stopped before its first word: the question is forgotten too
    prompts.clear()
    stop_at[0] = 0
    with pytest.raises(KeyboardInterrupt):
        chat.chat_loop(model, tokenizer, Lines("hello\n", "again\n"), io.StringIO(), 10, 1.0,
                       0, 1.0, None)
    assert prompts[1] == tokenizer.chat_prompt("again")
    # Ctrl-D (end of input) ends it quietly, after the answers so far
    assert chat.chat_loop(model, tokenizer, io.StringIO("hi\n"), io.StringIO(), 10, 1.0, 0, 1.0,
                          None) == 1
