"""Hugging Face chat templates (sentencepiece and generation tags) and generation_config
stop ids, checked against `transformers` itself (a test dependency)."""

import io
import json

import pytest
import torch
from hf_folders import make_hf_folder
from test_hf import hf_model, rewrite_json, run_cli

from scalelab.config import UserError
from scalelab.generate import generate
from scalelab.train.checkpoint import load_model, save_model

transformers = pytest.importorskip("transformers")



ZEPHYR = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token }}"
          "\n{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + m['content'].strip() + ' [/INST]' }}"
          "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("prepend", ["normalizer", "first"])
@pytest.mark.parametrize("template", ["zephyr", "llama2"])
def test_sentencepiece_chat_matches_transformers(tmp_path, prepend, template):
    """A SentencePiece-style tokenizer (TinyLlama's, Mistral's) starts every string it is
    given with a word boundary: the conversation must be encoded as transformers encodes
    it, not message by message (which added a boundary before each message)."""
    from hf_folders import sentencepiece_tokenizer_json

    from scalelab.hf_tokenizer import HFStyleTokenizer
    (tmp_path / "tokenizer.json").write_text(sentencepiece_tokenizer_json(prepend))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "chat_template": ZEPHYR if template == "zephyr" else LLAMA2}))
    ours = HFStyleTokenizer.from_folder(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    conv = [{"role": "user", "content": "Where does Mia live?"},
            {"role": "assistant", "content": "Mia lives in Paris."},
            {"role": "user", "content": "And Ben?"},
            {"role": "assistant", "content": "Ben lives in Rome."}]
    ids, mask = ours.encode_chat(conv)
    assert ids == theirs.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert ours.chat_prompt("And Ben?") == theirs.apply_chat_template(
        conv[2:3], add_generation_prompt=True, tokenize=True, return_dict=False)
    # the loss covers each answer and the end-of-turn token (with llama2's space before it)
    owned = ours.decode([t for t, m in zip(ids, mask) if m], skip_special=False)
    space = " " if template == "llama2" else ""
    assert owned == f"Mia lives in Paris.{space}</s>Ben lives in Rome.{space}</s>"


@pytest.mark.parametrize("prepend", ["normalizer", "first"])
def test_sentencepiece_role_tokens_match_the_exported_template(tmp_path, prepend):
    """Without a chat template scalelab's role tokens are added; the exported template must
    give transformers the ids scalelab trained on (no word boundary after a role token
    where Metaspace adds one only at the start of the text)."""
    from hf_folders import sentencepiece_tokenizer_json

    from scalelab.hf_export import tokenizer_config
    from scalelab.hf_tokenizer import HFStyleTokenizer
    (tmp_path / "tokenizer.json").write_text(sentencepiece_tokenizer_json(prepend))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                                "eos_token": "</s>"}))
    ours = HFStyleTokenizer.from_folder(tmp_path)
    ours.add_role_tokens()
    out = tmp_path / "out"
    out.mkdir()
    ours.hf.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(ours, 64)))
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    conv = [{"role": "user", "content": "Where does Mia live?"},
            {"role": "assistant", "content": "Mia lives in Paris."}]
    assert ours.encode_chat(conv)[0] == theirs.apply_chat_template(conv, tokenize=True,
                                                                   return_dict=False)


def test_chat_template_with_generation_tags(tmp_path):
    """transformers' templates may wrap the assistant's text in {% generation %} tags (for
    its assistant masks): such a folder renders as transformers renders it."""
    from hf_folders import tokenizer_json

    from scalelab.hf_tokenizer import HFStyleTokenizer
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                "{% if m['role'] == 'assistant' %}{% generation %}"
                "{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
                "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}")
    (tmp_path / "tokenizer.json").write_text(tokenizer_json())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
         "chat_template": template}))
    ours = HFStyleTokenizer.from_folder(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo there"}]
    ids, mask = ours.encode_chat(conv)
    assert ids == theirs.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert ours.decode([t for t, m in zip(ids, mask) if m], skip_special=False) == \
        "Yo there<|im_end|>"


def test_trimming_chat_template_trims_as_transformers(tmp_path):
    """Llama 3's template trims each message (`| trim`): text with outer whitespace (a
    pasted line) gets the ids transformers gives it, and the loss still covers the answer."""
    from hf_folders import tokenizer_json
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from scalelab.hf_tokenizer import HFStyleTokenizer
    hf = HFTokenizer.from_str(tokenizer_json())
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t in ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]])
    hf.save(str(tmp_path / "tokenizer.json"))
    template = ("{{- bos_token }}{%- for m in messages %}{{- '<|start_header_id|>' + m['role'] "
                "+ '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
                "{%- if add_generation_prompt %}"
                "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}))
    ours = HFStyleTokenizer.from_folder(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    conv = [{"role": "user", "content": "  Where does Mia live? \n"},
            {"role": "assistant", "content": " Mia lives in Paris.  "},
            {"role": "user", "content": " "}]
    ids, mask = ours.encode_chat(conv, generation_prompt=True)
    assert ids == theirs.apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    assert ours.decode([t for t, m in zip(ids, mask) if m], skip_special=False) == \
        "Mia lives in Paris.<|eot_id|>"


def test_generation_config_stop_ids_end_generate_chat_and_serve_as_in_transformers(tmp_path):
    """generation_config.json may name more ids that end a generation than the tokenizer's
    EOS (Llama 3's <|eot_id|> and <|eom_id|>, Qwen2.5's <|im_end|> and <|endoftext|>):
    transformers' generate stops at any of them, and so do `scalelab generate`, `chat` and
    the server; they stay in a saved (post-trained) copy, and its export."""
    import threading

    from scalelab.chat import chat_loop
    from scalelab.serve.engine import Engine, Job, Sampling
    folder = make_hf_folder(tmp_path / "m", seed=3)
    model, tok = load_model(folder)
    prompt = tok.chat_prompt("Mia has")
    free = generate(model, [prompt], 12, tok.pad_id, None, temperature=0,
                    vocab_limit=tok.vocab_size)[0]
    k = next(k for k in range(2, 12) if free[k] not in free[:k])
    assert not set(free[:k + 1]) & set(tok.stop_ids)
    stops = [tok.eos_id, tok.doc_eos_id, free[k]]  # an ordinary text token made a stop too
    rewrite_json(folder / "generation_config.json", eos_token_id=stops)
    want = free[:k + 1]
    out = hf_model(folder).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                    pad_token_id=tok.pad_id)
    assert out[0, len(prompt):].tolist() == want
    model, tok = load_model(folder)
    assert tok.stop_ids == stops

    r = run_cli("generate", "--model", str(folder), "--prompt", "Mia has", "--chat",
                "--max-new-tokens", "12", "--temperature", "0")
    assert (r.returncode, r.stdout) == (0, tok.decode(want) + "\n"), r.stderr
    said = io.StringIO()
    chat_loop(model, tok, io.StringIO("Mia has\n"), said, 12, 0.0, 0, 1.0, None)
    assert said.getvalue() == "assistant> " + tok.decode(want) + "\n"
    events, finished = [], threading.Event()
    Engine(model, tok).submit(Job(prompt, Sampling(12, temperature=0.0), lambda ev: (
        events.append(ev), ev["type"] != "delta" and finished.set())))
    assert finished.wait(60)
    assert (events[-1]["finish_reason"], events[-1]["tokens"], events[-1]["text"]) == \
        ("stop", k + 1, tok.decode(want[:-1]))

    save_model(model, tok, tmp_path / "again")
    assert load_model(tmp_path / "again")[1].stop_ids == stops
    r = run_cli("export", "--model", str(tmp_path / "again"), "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())[
        "eos_token_id"] == stops
    # a model folder holds an export's file names now, but is never taken for an export
    r = run_cli("export", "--model", str(folder), "--out", str(tmp_path / "again"))
    assert r.returncode == 2 and "not empty" in r.stderr


def test_a_bad_generation_config_stop_id_is_named(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    rewrite_json(folder / "generation_config.json", eos_token_id=[2, "3"])
    with pytest.raises(UserError, match=r"generation_config\.json: eos_token_id \[2, '3'\]"):
        load_model(folder)
