import random

from scalelab.tokenizer import EOS, SPECIAL_TOKENS


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF),
              (0x1F300, 0x1F64F), (0x0, 0x1F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_round_trip_on_arbitrary_unicode(tokenizer):
    rng = random.Random(0)
    texts = [random_unicode(rng, rng.randint(0, 80)) for _ in range(300)]
    texts += ["", " ", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "e\u0301 \u200b",
              "Mia has 3 apples. 12345 + 678 = 13023"]
    for t in texts:
        assert tokenizer.decode(tokenizer.encode(t)) == t, repr(t)


def test_special_tokens_are_distinct_and_not_injectable(tokenizer):
    ids = [tokenizer.special_ids[t] for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids)
    assert tokenizer.pad_id != tokenizer.eos_id
    # Text that spells a special token stays text: user data cannot forge control tokens.
    enc = tokenizer.encode(f"hello {EOS} world")
    assert tokenizer.eos_id not in enc
    assert tokenizer.decode(enc) == f"hello {EOS} world"
    assert tokenizer.encode("hi", bos=True, eos=True)[0] == tokenizer.bos_id
    assert tokenizer.encode("hi", bos=True, eos=True)[-1] == tokenizer.eos_id


def test_world_text_compresses(tokenizer):
    text = "Mia lives in Oakford. Tom has 5 apples."
    assert len(tokenizer.encode(text)) < len(text) / 2


def test_save_load(tokenizer, tmp):
    from scalelab.tokenizer import Tokenizer
    tokenizer.save(tmp / "t.json")
    again = Tokenizer.load(tmp / "t.json")
    assert again.encode("Mia has 3 cats") == tokenizer.encode("Mia has 3 cats")
    assert again.pad_id == tokenizer.pad_id


def test_tokenizer_vocab_below_the_byte_alphabet_is_refused():
    """data.tokenizer_vocab=10 printed 'training a 10-token BPE tokenizer' and silently made
    a 263-token one (256 bytes + the special tokens). Now it is bad input, and the floor is
    the size BPE really makes when it may add no merge."""
    import pytest

    from scalelab.config import MIN_TOKENIZER_VOCAB, UserError, load_config
    from scalelab.tokenizer import Tokenizer
    assert Tokenizer.train(["ab ab ab"], 1).vocab_size == MIN_TOKENIZER_VOCAB
    assert Tokenizer.train(["ab ab ab"], MIN_TOKENIZER_VOCAB).vocab_size == MIN_TOKENIZER_VOCAB
    with pytest.raises(UserError, match=f"data.tokenizer_vocab = 10 must be >= "
                                        f"{MIN_TOKENIZER_VOCAB}"):
        load_config(overrides=["data.tokenizer_vocab=10"])
    assert load_config(overrides=[f"data.tokenizer_vocab={MIN_TOKENIZER_VOCAB}"])


def test_tokenizer_vocab_too_large_is_refused():
    """data.tokenizer_vocab=1000000000 aborted the whole process in the BPE trainer (a Rust
    'memory allocation of 70866960400 bytes failed' and a core dump); 1e20 was an
    OverflowError traceback. Both are bad input now; a large real size still loads."""
    import pytest

    from scalelab.config import MAX_TOKENIZER_VOCAB, UserError, load_config
    for v in (10**9, 10**20):
        with pytest.raises(UserError, match=f"data.tokenizer_vocab = {v} must be <= "):
            load_config(overrides=[f"data.tokenizer_vocab={v}"])
    assert load_config(overrides=[f"data.tokenizer_vocab={MAX_TOKENIZER_VOCAB}"])
    assert load_config(overrides=["data.tokenizer_vocab=262144"])


def test_a_tokenizer_saved_before_the_bos_post_processor_starts_prompts_with_bos(tokenizer, tmp):
    """A run's tokenizer.json written before scalelab's tokenizer had a post-processor loads
    with one: a prompt (and transformers' default encoding) starts with BOS, as every training
    document does; scalelab's own encodes add nothing, so token files keep exactly one BOS
    per document; saving it again writes the post-processor (which `export` then carries)."""
    import json

    import numpy as np

    from scalelab.data.tokens import write_token_files
    from scalelab.tokenizer import Tokenizer
    old = json.loads(tokenizer.hf.to_str())
    old["post_processor"] = None
    (tmp / "old.json").write_text(json.dumps(old))
    tok = Tokenizer.load(tmp / "old.json")
    text = "Mia has 3 cats"
    plain = tokenizer.hf.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == plain and tok.bos_id not in plain
    assert tok.prompt_prefix == [tok.bos_id]
    assert tok.encode_prompt(text) == tok.hf.encode(text).ids == [tok.bos_id] + plain
    docs = [text, "Tom has 5 apples."]
    write_token_files({"train": docs, "val": docs[:1]}, tok, tmp / "data")
    ids = np.fromfile(tmp / "data" / "train.bin", dtype=np.uint16).tolist()
    assert ids == [tok.bos_id, *plain, tok.eos_id, tok.bos_id, *tok.encode(docs[1]), tok.eos_id]
    tok.save(tmp / "new.json")
    assert json.loads((tmp / "new.json").read_text())["post_processor"]["type"] == \
        "TemplateProcessing"
