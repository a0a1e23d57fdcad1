"""The serving engine without HTTP: batched answers equal answers computed alone, per-row
sampling draws from the right distribution, and streamed text holds back partial stops."""

import threading

import pytest
import torch

import scalelab.serve.engine as serve_engine
from scalelab.config import ModelConfig, UserError
from scalelab.generate import generate
from scalelab.model import Transformer
from scalelab.serve.app import ServeOptions, load_engines
from scalelab.serve.engine import Engine, Job, Sampling, held_back, sample_rows
from scalelab.train.checkpoint import save_model


@pytest.fixture(scope="module")
def engine(tokenizer):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=2, n_head=4,
                      n_kv_head=2, d_model=32)
    return Engine(Transformer(cfg).eval(), tokenizer, window_s=0.2)


def submit_all(engine, jobs_args):
    """Submit every job at once (they land in one batch) and wait for all rows."""
    results = [dict() for _ in jobs_args]
    deltas = [dict() for _ in jobs_args]
    left = threading.Semaphore(0)

    def emit_for(k):
        def emit(ev):
            if ev["type"] == "delta":
                deltas[k].setdefault(ev["index"], []).append(ev["text"])
            elif ev["type"] == "done":
                results[k][ev["index"]] = ev
                left.release()
            else:
                raise AssertionError(ev)
        return emit
    before = engine.batches
    for k, (prompt, s, n) in enumerate(jobs_args):
        engine.submit(Job(prompt, s, emit_for(k), n))
    for _ in range(sum(n for _, _, n in jobs_args)):
        assert left.acquire(timeout=60)
    return results, deltas, engine.batches - before


def test_batched_greedy_equals_each_prompt_alone(engine):
    tok = engine.tok
    prompts = [tok.chat_prompt(t) for t in ("Hi", "What is 4821 plus 377?", "Sort 3, 1, 2.")]
    jobs = [(p, Sampling(max_tokens=m, temperature=0.0), 1) for p, m in zip(prompts, (5, 9, 7))]
    results, deltas, batches = submit_all(engine, jobs)
    assert batches == 1
    for k, (p, s, _) in enumerate(jobs):
        alone = generate(engine.model, [p], s.max_tokens, tok.pad_id, tok.eos_id,
                         temperature=0.0)[0]
        done = results[k][0]
        assert done["text"] == tok.decode(alone)
        assert done["tokens"] == len(alone)
        assert "".join(deltas[k].get(0, [])) == done["text"]


def test_seeded_rows_do_not_depend_on_batch_mates(engine):
    p = engine.tok.chat_prompt("Where does Alice live?")
    s = Sampling(max_tokens=12, temperature=0.9, top_p=0.9, seed=42)
    (alone,), _, _ = submit_all(engine, [(p, s, 2)])
    other = Sampling(max_tokens=20, temperature=1.3, seed=None)
    results, _, batches = submit_all(engine, [(engine.tok.chat_prompt("x y z"), other, 3),
                                              (p, s, 2)])
    assert batches == 1
    assert [alone[i]["text"] for i in (0, 1)] == [results[1][i]["text"] for i in (0, 1)]


def test_unseeded_requests_differ_between_server_starts(engine):
    """Without a seed, a restarted server (a new Engine) must not replay the same samples:
    the Label view would offer the same pair again and the labels file repeat a line."""
    starts = [Engine(engine.model, engine.tok) for _ in range(2)]
    p, s = engine.tok.chat_prompt("Where does Alice live?"), Sampling(max_tokens=16)
    answers = [submit_all(e, [(p, s, 1)])[0][0][0]["text"] for e in starts]
    assert answers[0] != answers[1]


def test_rows_joining_mid_batch_and_a_full_cache_shift_change_nothing(tokenizer):
    """A chain of seeded jobs, each submitted when the previous one has streamed 4 pieces of
    text, so they join a running batch at later and later columns until the cache is full and
    shifts; every answer must equal the same job run alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=40, n_layer=2, n_head=4,
                      n_kv_head=2, d_model=32)
    eng = Engine(Transformer(cfg).eval(), tokenizer)
    prompts = [tokenizer.chat_prompt(q) for q in ("Hi", "Who is Bob?", "Count to 3", "Yes?",
                                                  "Where is Mia?", "Add 2 and 2", "Ok")]
    samplings = [Sampling(max_tokens=14, temperature=1.0, seed=100 + i) for i in range(7)]
    alone = [submit_all(eng, [(p, s, 1)])[0][0][0]["text"] for p, s in zip(prompts, samplings)]
    assert all(alone)

    texts, finished = {}, threading.Semaphore(0)

    def launch(i):
        pieces = []

        def emit(ev):
            if ev["type"] == "delta":
                pieces.append(ev["text"])
            if i + 1 < len(prompts) and (len(pieces) == 4 and ev["type"] == "delta" or
                                         ev["type"] == "done" and len(pieces) < 4):
                launch(i + 1)
            if ev["type"] == "done":
                texts[i] = ev["text"]
                finished.release()
            assert ev["type"] != "error", ev
        eng.submit(Job(prompts[i], samplings[i], emit))
    shifts = eng.shifts
    launch(0)
    for _ in prompts:
        assert finished.acquire(timeout=60)
    assert [texts[i] for i in range(len(prompts))] == alone
    assert eng.shifts > shifts  # the chain ran past the cache's end


def test_sample_rows_follows_temperature_and_top_p():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40_000
    temp, top_p = 0.7, 0.8
    got = sample_rows(logits.expand(n, 5), torch.full((n,), temp), torch.full((n,), top_p),
                      torch.rand(n, 5))
    probs = (logits / temp).softmax(-1)
    keep = (probs.cumsum(-1) - probs) <= top_p  # sorted already: the nucleus
    want = torch.where(keep, probs, 0) / probs[keep].sum()
    freq = torch.bincount(got, minlength=5).float() / n
    assert torch.allclose(freq, want, atol=0.01), (freq, want)
    greedy = sample_rows(logits.expand(3, 5), torch.zeros(3), torch.ones(3), torch.rand(3, 5))
    assert greedy.tolist() == [0, 0, 0]


def test_held_back_keeps_partial_stop_strings():
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("abc\ufffd", []) == 1  # half a UTF-8 character
    assert held_back("say ##", ["###", "#!"]) == 2


def test_the_document_end_also_ends_a_row(tokenizer):
    """An imported base model with a chat template (as Qwen2.5 base models have): its end of turn
    (eos_id, where a chat answer stops) is not its end of document (doc_eos_id, as
    <|endoftext|>). A completion that samples the end of document has ended too."""
    from tokenizers import Tokenizer as HFTokenizer

    from scalelab.hf_tokenizer import HFStyleTokenizer
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    tok = HFStyleTokenizer(HFTokenizer.from_str(tokenizer.hf.to_str()),
                           {"eos_token": "<|eos|>", "chat_template": template})
    assert tok.eos_id != tok.doc_eos_id

    class EndsAtOnce(Transformer):
        def forward(self, *args, **kw):
            logits = super().forward(*args, **kw)
            logits[..., tok.doc_eos_id] = 1e4
            return logits
    torch.manual_seed(0)
    model = EndsAtOnce(ModelConfig(vocab_size=tok.vocab_size, seq_len=32, n_layer=1, n_head=2,
                                   d_model=32)).eval()
    (done,), _, _ = submit_all(Engine(model, tok), [(tok.encode("Alice lives"), Sampling(8), 1)])
    assert (done[0]["finish_reason"], done[0]["tokens"], done[0]["text"]) == ("stop", 1, "")


def test_padded_vocabulary_ids_are_never_served(tokenizer):
    """A model whose vocabulary is padded past the tokenizer's: the padded ids' logits are
    forced high (and the special tokens', which decode to nothing too, low), yet every
    answer, sampled or greedy, is 12 tokens of text, and no padded id is a top alternative;
    the logprobs stay the model's own."""
    real, special = tokenizer.vocab_size, list(tokenizer.special_ids.values())

    class HotPadding(Transformer):
        def forward(self, *args, **kw):
            logits = super().forward(*args, **kw)
            logits[..., real:] += 30.0
            logits[..., special] -= 30.0
            return logits
    torch.manual_seed(0)
    model = HotPadding(ModelConfig(vocab_size=real + 64, seq_len=64, n_layer=1, n_head=2,
                                   d_model=32)).eval()
    eng = Engine(model, tokenizer, window_s=0.2)
    jobs = [(tokenizer.chat_prompt("Hi"), Sampling(12, temperature=t, seed=s, logprobs=3), 2)
            for t, s in ((1.0, 1), (0.0, None), (2.0, 2))]
    results, _, _ = submit_all(eng, jobs)
    for rows in results:
        for done in rows.values():
            # a padded id decodes to nothing: its entry would be empty, or cut off at the end
            assert done["tokens"] == 12 and len(done["logprobs"]) == 12, done["text"]
            for e in done["logprobs"]:
                assert e["token"] and all(alt[0] for alt in e["top"]), e
                assert e["logprob"] < -20  # the padded ids hold nearly all the mass


def test_a_served_context_below_the_models_caps_the_cache_and_no_answer(engine, tmp_path,
                                                                      capsys, monkeypatch):
    # An imported model may take 128k tokens: every row's KV cache would hold that many
    # columns, attended over at every step. `serve --context N` (default: at most 8192)
    # serves fewer; answers that fit are the same.
    sizes = []

    class Recorded(serve_engine.KVCache):
        def __init__(self, cfg, batch, max_len, *args):
            sizes.append(max_len)
            super().__init__(cfg, batch, max_len, *args)
    monkeypatch.setattr(serve_engine, "KVCache", Recorded)
    tok = engine.tok
    capped = Engine(engine.model, tok, window_s=0.2, context=24)
    prompts = [tok.chat_prompt(t) for t in ("Hi", "Sort 3, 1, 2.")]
    jobs = [(p, Sampling(max_tokens=24 - len(p), temperature=0.0), 1) for p in prompts]
    results, _, _ = submit_all(capped, jobs)
    for k, (p, s, _) in enumerate(jobs):
        alone = generate(engine.model, [p], s.max_tokens, tok.pad_id, tok.eos_id,
                         temperature=0.0)[0]
        assert results[k][0]["text"] == tok.decode(alone)
    assert max(sizes) == 24  # the rows' cache; the others are prompts' scratch caches
    with pytest.raises(ValueError, match="1..64"):
        Engine(engine.model, tok, context=65)

    torch.manual_seed(0)  # a long-context model, as an imported one would be
    long = Transformer(ModelConfig(vocab_size=tok.vocab_size, seq_len=10_000, n_layer=1,
                                   n_head=2, d_model=16))
    save_model(long, tok, tmp_path / "long")
    served = load_engines(ServeOptions(models={"long": str(tmp_path / "long")}))["long"]
    assert served.seq_len == 8192 and "8192-token context of its 10000" in capsys.readouterr().out
    chosen = load_engines(ServeOptions(models={"m": str(tmp_path / "long")}, context=100))["m"]
    assert chosen.seq_len == 100 and capsys.readouterr().out == ""
    with pytest.raises(UserError, match="--context 20000: .*long takes 1 to 10000 tokens"):
        load_engines(ServeOptions(models={"m": str(tmp_path / "long")}, context=20000))
