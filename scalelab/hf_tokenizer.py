"""A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) behind scalelab's
Tokenizer interface: the same encode/decode/encode_chat/chat_prompt, with the folder's own
BOS/EOS/PAD and, where it has one, its own chat template.

Chat templates are Jinja, rendered in a sandbox as Hugging Face does. To know which tokens
are the assistant's (the only ones that carry loss), each message's text is replaced by a
unique marker before rendering; the rendered text is then cut at the markers. Template text
is tokenized with special tokens recognised ("<|im_start|>" is one token), message text with
them spelled out as plain text, so a user cannot inject control tokens; the text between two
special tokens is encoded as one string, as transformers encodes it. The assistant's mask
covers its text and the template's first special token after it (the end-of-turn token the
model must learn to emit; it becomes `eos_id`, where generation stops). A template that
trims message text (`| trim`) trims it as transformers would (see `_segments`); any other
edit of message text edits only the marker: the text goes in as given.

Without a chat template, `add_role_tokens` adds scalelab's role tokens (<|user|>, ...) and
the conversation format of scalelab.tokenizer is used.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

from jinja2.ext import Extension
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.pre_tokenizers import Metaspace

from scalelab.config import UserError
from scalelab.io import read_json
from scalelab.tokenizer import ASSISTANT, END, SYSTEM, USER, Tokenizer

ROLE_TOKENS = [SYSTEM, USER, ASSISTANT, END]
MARK = "\u2983scalelab-message-{}\u2984"  # brackets no template or tokenizer treats specially
MARK_RE = re.compile("\u2983scalelab-message-(\\d+)\u2984")


def token_text(value) -> str | None:
    """tokenizer_config.json writes a special token as "text" or {"content": "text", ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def first_id(value) -> int | None:
    """config.json's eos_token_id may be one id or a list of them."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def eos_token_ids(d: Path, model_config: dict | None, vocab: int) -> list[int]:
    """The ids at which transformers ends a generation of this folder's model: the
    eos_token_id (one id or a list) of generation_config.json, else of config.json."""
    where = d / "generation_config.json"
    found = read_json(where) if where.is_file() else {}
    if "eos_token_id" not in found:
        where, found = d / "config.json", model_config or {}
    value = found.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for tid in ids:
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab:
            raise UserError(f"{where}: eos_token_id {value!r} must be a token id of "
                            f"tokenizer.json (0..{vocab - 1}) or a list of them")
    return ids


class GenerationTag(Extension):
    """{% generation %}...{% endgeneration %}, which transformers' templates may use to mark
    the assistant's text: rendered as its body (scalelab finds that text by markers)."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class HFStyleTokenizer(Tokenizer):
    def __init__(self, hf: HFTokenizer, config: dict, model_config: dict | None = None,
                 where: str = "tokenizer_config.json"):
        self.hf, self.config, self.where = hf, dict(config), where
        model_config = model_config or {}
        self.chat_template = self._template(config.get("chat_template"))
        ids = {}
        # A bos_token written as null means no BOS, as transformers reads it (Qwen2.5 ships
        # that beside a bos_token_id in config.json): only an absent one falls back.
        for name in ("bos", "eos", "pad"):
            text = token_text(config.get(f"{name}_token"))
            tid = hf.token_to_id(text) if text is not None else None
            if text is not None and tid is None:
                raise UserError(f"{where}: {name}_token {text!r} is not in tokenizer.json")
            if tid is None and not (name == "bos" and "bos_token" in config):
                tid = first_id(model_config.get(f"{name}_token_id"))
                if name != "pad" and tid is not None and not 0 <= tid < hf.get_vocab_size():
                    raise UserError(f"{Path(where).parent / 'config.json'}: {name}_token_id "
                                    f"{tid} is not a token of tokenizer.json "
                                    f"({hf.get_vocab_size()} tokens)")
            ids[name] = tid
        if ids["eos"] is None:
            raise UserError(f"{where}: no eos_token (nor eos_token_id in config.json): "
                            "scalelab needs one to know where an answer stops")
        self.bos_id, self.doc_eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else ids["eos"]  # as HF does
        self.eos_id = self.doc_eos_id
        self.special_ids = {t: hf.token_to_id(t) for t in ROLE_TOKENS
                            if hf.token_to_id(t) is not None}
        self.special_texts = {t.content for t in hf.get_added_tokens_decoder().values()
                              if t.special}
        hf.encode_special_tokens = True
        if self.chat_template is not None:
            self.eos_id = self._turn_end_id()

    @staticmethod
    def _template(value) -> str | None:
        if isinstance(value, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        return value if isinstance(value, str) and value.strip() else None

    @classmethod
    def from_folder(cls, d: Path, model_config: dict | None = None) -> HFStyleTokenizer:
        tok_file, cfg_file = d / "tokenizer.json", d / "tokenizer_config.json"
        if not tok_file.is_file():
            extra = " (only a SentencePiece tokenizer.model: convert it to tokenizer.json)" \
                if (d / "tokenizer.model").is_file() else ""
            raise UserError(f"{tok_file}: tokenizer file not found{extra}")
        try:
            hf = HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserError(f"{tok_file}: not a valid tokenizer.json ({e})") from None
        config = read_json(cfg_file) if cfg_file.is_file() else {}
        if "chat_template" not in config and (d / "chat_template.jinja").is_file():
            config["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        tok = cls(hf, config, model_config, str(cfg_file))
        # e.g. Llama 3's <|eot_id|> and <|eom_id|> beside <|end_of_text|>
        tok.extra_stop_ids = tuple(i for i in eos_token_ids(d, model_config, hf.get_vocab_size())
                                   if i not in (tok.eos_id, tok.doc_eos_id))
        return tok

    def save(self, path: str | Path) -> None:
        """tokenizer.json at path, tokenizer_config.json beside it (specials, template), and
        generation_config.json if more ids than the two EOS end a generation."""
        path = Path(path)
        self.hf.save(str(path))
        config = {k: v for k, v in self.config.items() if k != "added_tokens_decoder"}
        for name, tid in (("bos", self.bos_id), ("eos", self.doc_eos_id), ("pad", self.pad_id)):
            config[f"{name}_token"] = self.hf.id_to_token(tid) if tid is not None else None
        config["chat_template"] = self.chat_template
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (path.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        if self.extra_stop_ids:
            (path.parent / "generation_config.json").write_text(
                json.dumps({"eos_token_id": self.stop_ids}, indent=2))

    # ---- chat ---------------------------------------------------------------------------

    @property
    def has_chat_format(self) -> bool:
        return self.chat_template is not None or len(self.special_ids) == len(ROLE_TOKENS)

    def add_role_tokens(self) -> None:
        """No chat template: add scalelab's role tokens (the caller resizes the model)."""
        self.hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in ROLE_TOKENS])
        self.special_ids = {t: self.hf.token_to_id(t) for t in ROLE_TOKENS}
        self.special_texts |= set(ROLE_TOKENS)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        head = [self.bos_id] if bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if eos else [])

    def _template_encoding(self, text: str):
        self.hf.encode_special_tokens = False
        try:
            return self.hf.encode(text, add_special_tokens=False)
        finally:
            self.hf.encode_special_tokens = True

    def _template_ids(self, text: str) -> list[int]:
        return self._template_encoding(text).ids

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise UserError(f"{self.where}: the chat template refused the conversation: "
                            f"{message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols, GenerationTag])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: \
            json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        text = lambda tid: self.hf.id_to_token(tid) if tid is not None else ""  # noqa: E731
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=generation_prompt,
                bos_token=text(self.bos_id), eos_token=text(self.doc_eos_id),
                pad_token=text(self.pad_id), tools=None, documents=None)
        except jinja2.TemplateError as e:
            raise UserError(f"{self.where}: chat_template does not render ({e})") from None

    def _segments(self, messages: list[dict], generation_prompt: bool
                  ) -> list[tuple[str, int | None]]:
        """The rendered conversation as (text, message index or None for template text).
        A marker keeps its message's outer whitespace, which thus stays template text: a
        template that trims messages (`| trim`, `.strip()`, as Llama's do) trims it too."""
        def marked_text(i: int, text: str) -> str:
            core = text.strip()
            lead = text[:len(text) - len(text.lstrip())]
            return lead + MARK.format(i) + (text[len(text.rstrip()):] if core else "")

        marked = [{**m, "content": marked_text(i, m["content"])} for i, m in enumerate(messages)]
        rendered = self.render(marked, generation_prompt)
        found = [int(i) for i in MARK_RE.findall(rendered)]
        if sorted(found) != list(range(len(messages))):
            raise UserError(f"{self.where}: the chat template drops, repeats or rewrites "
                            "message text, so the assistant's tokens cannot be located")
        parts = MARK_RE.split(rendered)  # text, index, text, index, ..., text
        return [(part, None) if k % 2 == 0 else (messages[int(part)]["content"].strip(),
                                                 int(part))
                for k, part in enumerate(parts)]

    def _turn_end_id(self) -> int:
        """The first special token the template writes after an assistant's text."""
        segs = self._segments([{"role": "user", "content": "x"},
                               {"role": "assistant", "content": "y"}], False)
        after = next(text for (text, i), (_, prev) in zip(segs[1:], segs) if prev == 1)
        for tid in self._template_ids(after):
            if self.hf.id_to_token(tid) in self.special_texts:
                return tid
        return self.doc_eos_id

    def encode_chat(self, messages: list[dict], generation_prompt: bool = False
                    ) -> tuple[list[int], list[bool]]:
        if self.chat_template is None:
            if not self.has_chat_format:
                raise UserError(f"{self.where}: no chat template and no role tokens")
            return super().encode_chat(messages, generation_prompt)
        labelled = self._labelled_tokens(self._segments(messages, generation_prompt))
        ids = [tid for tid, _ in labelled]
        mask = [i is not None and messages[i]["role"] == "assistant" for _, i in labelled]
        for k in range(1, len(ids)):  # the assistant's turn also owns the template's
            # end-of-turn token after its text (and the template text before that token)
            if mask[k - 1] and labelled[k - 1][1] is not None and labelled[k][1] is None:
                end = k
                while end < len(ids) and labelled[end][1] is None and ids[end] != self.eos_id:
                    end += 1
                if end < len(ids) and ids[end] == self.eos_id:
                    mask[k:end + 1] = [True] * (end + 1 - k)
        return ids, mask

    def _encode_plain(self, text: str, at_start: bool):
        """text's encoding, special tokens spelled out; at_start False: the text follows a
        special token, where Metaspace's prepend_scheme "first" adds no word boundary."""
        pt = self.hf.pre_tokenizer
        later = not at_start and isinstance(pt, Metaspace) and pt.prepend_scheme == "first"
        if later:
            pt.prepend_scheme = "never"
        try:
            return self.hf.encode(text, add_special_tokens=False)
        finally:
            if later:
                pt.prepend_scheme = "first"

    def _message_ids(self, text: str) -> list[int]:
        return self._encode_plain(text, at_start=False).ids  # after a role token

    def _labelled_tokens(self, segments: list[tuple[str, int | None]]
                         ) -> list[tuple[int, int | None]]:
        """(token id, message index or None for template text) for the rendered conversation.
        The text between two of the template's special tokens is encoded as one string, as
        transformers encodes the whole rendering (a SentencePiece tokenizer starts every
        string it is given with a word boundary "\u2581": encoding a message apart would add
        one), with special tokens in message text kept as plain text. A token that straddles
        a message's edge belongs to the message."""
        out: list[tuple[int, int | None]] = []
        run, spans = "", []  # text since the last special token; (start, end, index) of messages

        def flush() -> None:
            if not run:
                return
            enc = self._encode_plain(run, at_start=not out)
            for tid, (a, b) in zip(enc.ids, enc.offsets):
                owner = next((i for s, e, i in spans if (a < e and b > s) or s <= a == b < e),
                             None)
                out.append((tid, owner))

        for text, index in segments:
            if index is not None:
                spans.append((len(run), len(run) + len(text), index))
                run += text
                continue
            enc, pos = self._template_encoding(text), 0
            for tid, (a, b) in zip(enc.ids, enc.offsets):
                name = self.hf.id_to_token(tid)  # a special token spelled here (not <unk>)
                if name in self.special_texts and name in text[a:b]:
                    run += text[pos:a]
                    flush()
                    out.append((tid, None))
                    run, spans, pos = "", [], b
            run += text[pos:]
        flush()
        return out
