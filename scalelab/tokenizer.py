"""Byte-level BPE (HF `tokenizers`) with scalelab's special tokens and chat template.

Byte-level means any Unicode string round-trips exactly: unknown characters fall back to
their UTF-8 bytes. PAD is distinct from EOS (PPO needs to tell "stopped" from "padding").

Chat template, one turn per role marker:
    <|bos|> <|system|> text <|end|> <|user|> text <|end|> <|assistant|> text <|eos|> ...
An assistant turn ends with EOS (as pretraining documents do), so a model stops by emitting
EOS; only assistant text and its EOS carry loss in fine-tuning.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing

from scalelab.config import UserError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END]
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class Tokenizer:
    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        ids = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise UserError(f"tokenizer lacks special tokens {missing}")
        # Text that merely spells a special token ("<|eos|>") is encoded as plain text, so
        # user data cannot inject control tokens; code adds special ids explicitly.
        hf.encode_special_tokens = True
        self.bos_id, self.eos_id, self.pad_id = ids[BOS], ids[EOS], ids[PAD]
        self.doc_eos_id = self.eos_id  # ends a document (an HF chat tokenizer's eos_id ends a turn)
        self.special_ids = ids
        # Every training document starts with BOS, so a prompt does too: the post-processor
        # adds it where special tokens are on (transformers' and vLLM's default, so an
        # exported model reads prompts as it was trained). Set here, not only in train(),
        # so a tokenizer.json saved before it existed behaves the same. scalelab's own
        # encode calls turn it off and add the special ids they need themselves.
        hf.post_processor = TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, self.bos_id)])

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: tokenizer file not found")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None

    def save(self, path: str | Path) -> None:
        from scalelab.io import atomic_write_text
        atomic_write_text(Path(path), self.hf.to_str(pretty=True))

    extra_stop_ids: tuple[int, ...] = ()  # more ids that end a generation (an HF folder's)

    @property
    def stop_ids(self) -> list[int]:
        """Every id that ends a generation: the end of a turn, of a document, and any other
        that the model's folder names (generation_config.json's eos_token_id list)."""
        return list(dict.fromkeys([self.eos_id, self.doc_eos_id, *self.extra_stop_ids]))

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    @property
    def prompt_prefix(self) -> list[int]:
        """The ids the tokenizer's post-processor puts before a text (what transformers and
        vLLM start a prompt with): BOS for scalelab's own and Llama-style tokenizers, nothing
        for GPT-2-style ones (even with a bos_token) or Qwen2.5's."""
        plain = self.hf.encode("x", add_special_tokens=False).ids
        return ids_before(self.hf.encode("x").ids, plain)

    def encode_prompt(self, text: str) -> list[int]:
        """A (non-chat) prompt as this tokenizer begins one: prompt_prefix, then the text."""
        return self.prompt_prefix + self.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes: for a byte-level token that is part of a character, that
        part (its decoded text is only "\ufffd"). Other tokens: their text's UTF-8."""
        piece = self.hf.id_to_token(token_id)
        table = byte_level_chars()
        if isinstance(self.hf.decoder, decoders.ByteLevel) and piece is not None \
                and token_id not in self.hf.get_added_tokens_decoder() \
                and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self.decode([token_id], skip_special=False).encode()

    def encode_chat(self, messages: list[dict], generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        """Token ids and a loss mask (True on assistant text and its closing EOS).

        generation_prompt: end with an open assistant turn for the model to complete."""
        ids = [self.bos_id] if self.bos_id is not None else []  # some HF tokenizers have none
        mask = [False] * len(ids)
        for m in messages:
            role = self.special_ids[ROLES[m["role"]]]
            body = self._message_ids(m["content"])
            is_assistant = m["role"] == "assistant"
            close = self.eos_id if is_assistant else self.special_ids[END]
            ids += [role, *body, close]
            mask += [False] + [is_assistant] * (len(body) + 1)
        if generation_prompt:
            ids.append(self.special_ids[ASSISTANT])
            mask.append(False)
        return ids, mask

    def _message_ids(self, text: str) -> list[int]:
        """A message's text as encode_chat writes it, after its role token."""
        return self.encode(text)

    def chat_prompt(self, user_text: str) -> list[int]:
        """A one-turn conversation ready for the assistant's answer."""
        return self.encode_chat([{"role": "user", "content": user_text}], True)[0]


def ids_before(ids: list[int], part: list[int]) -> list[int]:
    """The ids before the first occurrence of `part` in `ids` (none if it is not there)."""
    starts = (i for i in range(len(ids) - len(part) + 1) if ids[i: i + len(part)] == part)
    return ids[: next(starts, 0)]


@functools.cache
def byte_level_chars() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte is a printable character, itself for
    the printable Latin-1 bytes and 256 + k for the k-th of the others."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
