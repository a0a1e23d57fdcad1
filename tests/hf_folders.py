"""Tiny random-weight Hugging Face folders built with `transformers` (a test dependency), in
each architecture scalelab imports. No hub: the tokenizer is trained here on world documents."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.processors import TemplateProcessing

from scalelab.data.world import generate_documents

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(generate_documents(300, seed=0), trainer=trainer)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return hf.to_str()


@lru_cache(maxsize=2)
def sentencepiece_tokenizer_json(prepend: str) -> str:
    """A tokenizer.json as converted from SentencePiece (Llama 2, TinyLlama, Mistral): words
    start with "\u2581", added either by a Prepend normalizer to every string (prepend =
    "normalizer", the older conversion) or by Metaspace to the start of the text ("first")."""
    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    if prepend == "normalizer":
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                              normalizers.Replace(" ", "\u2581")])
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=["\u2581", "\n"] + [chr(c) for c in
                                                                      range(33, 127)])
    hf.train_from_iterator(generate_documents(200, seed=0), trainer=trainer)
    return hf.to_str()


def make_hf_folder(out: Path, arch: str = "llama", tie: bool = False, rope_scaling: bool = False,
                   template: str | None = CHATML, shard: bool = False,
                   dtype: torch.dtype = torch.float32, seed: int = 0, seq_len: int = 128,
                   extra_vocab: int = 3, bos_processor: bool = False) -> Path:
    """save_pretrained a random model of `arch` (llama, qwen2, mistral) with its tokenizer.
    bos_processor: its tokenizer.json adds BOS ("<s>") to a text, as Llama's do; without it
    the tokenizer adds nothing, as GPT-2-style ones (SmolLM2's) do despite their bos_token."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
    out.mkdir(parents=True, exist_ok=True)
    hf = HFTokenizer.from_str(tokenizer_json())
    if bos_processor:
        hf.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                               special_tokens=[("<s>", hf.token_to_id("<s>"))])
    (out / "tokenizer.json").write_text(hf.to_str())
    vocab = hf.get_vocab_size() + extra_vocab  # checkpoints often pad the vocabulary
    ids = {t: hf.token_to_id(t) for t in SPECIALS}
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=ids["<s>"],
                  eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    rope = {"rope_type": "default", "rope_theta": 5000.0}
    if rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}
    if arch == "llama":
        cfg = LlamaConfig(**common, rope_parameters=rope)
    elif arch == "qwen2":
        cfg = Qwen2Config(**common, rope_parameters=rope)
    elif arch == "mistral":
        cfg = MistralConfig(**common, rope_parameters=rope, sliding_window=None)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random norms and biases too, so a missed tensor shows
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else
                        0.2 * torch.randn_like(p))
    model.to(dtype).save_pretrained(out, max_shard_size="40KB" if shard else "5GB")
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "pad_token": "<pad>"}
    if template:
        tok_cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out


def ragged(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):], valid[i, T - len(s):] = torch.tensor(s), True
    return ids, valid
