"""`scalelab serve` with models whose tokenizers differ from scalelab's own: no BOS (as
Qwen2.5's), a chat template that refuses a conversation, no chat format at all."""

import pytest
import torch

pytest.importorskip("fastapi", reason="scalelab[serve] not installed")
pytest.importorskip("httpx")

from scalelab.model import Transformer  # noqa: E402
from scalelab.serve.app import ServeOptions, create_app  # noqa: E402

MSGS = [{"role": "user", "content": "Where does Alice live?"}]


@pytest.fixture(scope="module")
def bosless(tokenizer, tmp_path_factory):
    """An app over a random model whose tokenizer has no BOS (as Qwen2.5's has none)."""
    from fastapi.testclient import TestClient
    from tokenizers import Tokenizer as HFTokenizer

    from scalelab.config import ModelConfig
    from scalelab.hf_tokenizer import HFStyleTokenizer
    from scalelab.serve.engine import Engine
    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    hf.post_processor = None  # Qwen2.5's tokenizer.json adds no BOS to a text either
    tok = HFStyleTokenizer(hf, {"eos_token": "<|eos|>", "pad_token": "<|pad|>"})
    assert tok.bos_id is None and tok.prompt_prefix == []
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, seq_len=32, n_layer=1,
                                    n_head=2, d_model=32)).eval()
    opts = ServeOptions(models={}, labels=str(tmp_path_factory.mktemp("bosless") / "l.jsonl"))
    app = create_app({"nobos": Engine(model, tok, window_s=0.0)}, opts)
    return TestClient(app, base_url="http://localhost"), model, tok


def test_completions_without_a_bos_token(bosless):
    c, model, tok = bosless
    url = "/v1/completions"
    r = c.post(url, json={"model": "nobos", "prompt": "", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    prompt = "Alice lives in"
    ids = tok.encode(prompt)
    with torch.no_grad():
        want = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    for sent in (prompt, ids):  # a string, or token ids as lm-eval sends them
        r = c.post(url, json={"model": "nobos", "prompt": sent, "max_tokens": 0, "echo": True,
                              "logprobs": 1})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"] == prompt and "".join(lp["tokens"]) == prompt
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(
            [want[i, ids[i + 1]].item() for i in range(len(ids) - 1)], abs=1e-4)
    r = c.post(url, json={"model": "nobos", "prompt": ids, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)


def test_chat_ignores_echo_so_a_long_prompt_is_still_refused(bosless):
    c = bosless[0]
    r = c.post("/v1/chat/completions", json={"model": "nobos", "echo": True, "messages": [
        {"role": "user", "content": "Alice " * 40}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = c.post("/v1/chat/completions", json={"model": "nobos", "echo": True, "max_tokens": 0,
                                             "messages": MSGS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_bad_stream_options_are_refused_before_any_work(bosless):
    c = bosless[0]
    engine = c.app.state.engines["nobos"]
    before = engine.rows_served
    r = c.post("/v1/chat/completions", json={"model": "nobos", "messages": MSGS,
                                             "stream": True, "stream_options": "usage"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    assert engine.rows_served == before and engine.queue.empty()


def test_chat_logprobs_give_each_tokens_bytes_and_every_alternative(bosless):
    """Byte-level tokens that are pieces of one character: their `bytes` join into the
    answer's UTF-8, and top_logprobs keeps alternatives whose text looks alike ("\ufffd")."""
    from scalelab.tokenizer import SPECIAL_TOKENS
    c = bosless[0]
    pieces = 0
    for seed in range(4):
        r = c.post("/v1/chat/completions", json={
            "model": "nobos", "messages": [{"role": "user", "content": "日本"}], "seed": seed,
            "temperature": 1.5, "max_tokens": 8, "logprobs": True, "top_logprobs": 5}).json()
        answer = r["choices"][0]["message"]["content"]
        entries = r["choices"][0]["logprobs"]["content"]
        assert all(len(e["top_logprobs"]) == 5 for e in entries)
        raw = b"".join(bytes(e["bytes"]) for e in entries if e["token"] not in SPECIAL_TOKENS)
        assert raw.decode("utf-8", "replace") == answer
        pieces += any(e["token"] == "\ufffd" for e in entries)
    assert pieces  # the check above met tokens that are parts of a character


def test_chat_a_model_cannot_take_is_a_400(tokenizer, tmp_path):
    """A template that refuses a conversation (as Mistral's refuses a system message), or a
    base model with no chat format at all: an OpenAI-shaped 400, not a bare 500."""
    from fastapi.testclient import TestClient
    from hf_folders import tokenizer_json
    from tokenizers import Tokenizer as HFTokenizer

    from scalelab.config import ModelConfig
    from scalelab.hf_tokenizer import HFStyleTokenizer
    from scalelab.serve.engine import Engine
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('no system messages') }}{% endif %}"
              "{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    toks = {"strict": HFStyleTokenizer(HFTokenizer.from_str(tokenizer.hf.to_str()),
                                       {"eos_token": "<|eos|>", "chat_template": strict}),
            "base": HFStyleTokenizer(HFTokenizer.from_str(tokenizer_json()),
                                     {"eos_token": "</s>"})}
    torch.manual_seed(0)
    engines = {name: Engine(Transformer(ModelConfig(
        vocab_size=tok.vocab_size, seq_len=32, n_layer=1, n_head=2, d_model=32)).eval(), tok)
        for name, tok in toks.items()}
    c = TestClient(create_app(engines, ServeOptions(models={}, labels=str(tmp_path / "l.jsonl"))),
                   base_url="http://localhost")
    system = [{"role": "system", "content": "Be brief."}, *MSGS]
    for name, messages, says in [("strict", system, "no system messages"),
                                 ("base", MSGS, "no chat template")]:
        r = c.post("/v1/chat/completions", json={"model": name, "messages": messages})
        assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    assert c.post("/v1/chat/completions", json={"model": "strict", "messages": MSGS,
                                                "max_tokens": 2}).status_code == 200
    r = c.post("/api/label/pair", json={"model": "base", "source": "typed", "prompt": "hi"})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_completion_prompts_start_as_the_tokenizer_starts_them(tokenizer, tmp_path):
    """A /v1/completions prompt starts with what the tokenizer's post-processor adds, as
    vLLM's does: BOS for scalelab's own tokenizer (as in training), nothing for a GPT-2-style
    folder whose post-processor adds none even though it names a bos_token."""
    from fastapi.testclient import TestClient
    from tokenizers import Tokenizer as HFTokenizer

    from scalelab.config import ModelConfig
    from scalelab.hf_tokenizer import HFStyleTokenizer
    from scalelab.serve.engine import Engine
    plain = HFTokenizer.from_str(tokenizer.hf.to_str())
    plain.post_processor = None
    toks = {"own": tokenizer,
            "gpt2style": HFStyleTokenizer(plain, {"bos_token": "<|bos|>", "eos_token": "<|eos|>"})}
    assert toks["gpt2style"].bos_id == tokenizer.bos_id
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=1,
                                    n_head=2, d_model=32)).eval()
    engines = {name: Engine(model, tok, window_s=0.0) for name, tok in toks.items()}
    c = TestClient(create_app(engines, ServeOptions(models={}, labels=str(tmp_path / "l.jsonl"))),
                   base_url="http://localhost")
    prompt = "Alice lives in"
    ids = tokenizer.encode(prompt)
    for name, head in [("own", [tokenizer.bos_id]), ("gpt2style", [])]:
        seq = head + ids
        with torch.no_grad():
            want = model(torch.tensor([seq])).float().log_softmax(-1)[0]
        expect = [want[i, seq[i + 1]].item() for i in range(len(seq) - 1)]
        r = c.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 0,
                                            "echo": True, "logprobs": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(seq), name
        got = r.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert got[len(got) - len(expect):] == pytest.approx(expect, abs=1e-4), name
        assert (got[0] is None) == (not head), name  # nothing before the first text token
