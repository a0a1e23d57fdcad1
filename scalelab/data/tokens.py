"""Text -> token files -> batches.

A corpus is a list of documents. Each split is one flat memory-mapped array of token ids
(`train.bin`, `val.bin`) in which every document is BOS ... EOS, so document boundaries
survive packing and a pretrained model learns to stop. `TokenLoader` cuts it into fixed
windows in a seeded order per epoch; its position (epoch, index) is part of the checkpoint,
so a resumed run gets the exact next batch.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import numpy as np
import torch

from scalelab.config import DataConfig, UserError
from scalelab.data.batches import EpochSampler
from scalelab.data.formats import read_jsonl, read_utf8
from scalelab.io import fresh_tmp, replace_dir
from scalelab.tokenizer import Tokenizer


def read_documents(cfg: DataConfig, source: str | None = None) -> list[str]:
    """Documents from `builtin:world`, a .txt file (split per data.txt_split: at blank
    lines, at every line, or the whole file as one), a .jsonl file of {"text": ...} rows, or
    a folder of such files. `source` overrides cfg.source (used for data.val_source)."""
    source = cfg.source if source is None else source
    if not source.strip():  # Path("") would be the current folder
        raise UserError("data.source is empty: name a .txt/.jsonl file or folder, or "
                        "builtin:world")
    if source == "builtin:world":
        from scalelab.data.world import generate_documents
        docs = generate_documents(cfg.n_docs, seed=cfg.seed)
    elif source.startswith("builtin:"):
        raise UserError(f"data.source: unknown built-in corpus {source!r} "
                        "(known: builtin:world)")
    else:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            read = [p.suffix.lower() in (".txt", ".jsonl") for p in found]
            files = [p for p, r in zip(found, read) if r]
            if not files:
                raise UserError(f"{path}: no .txt or .jsonl files in this folder")
            note_skipped(path, [p for p, r in zip(found, read) if not r])
        elif path.is_file():
            files = [path]
        else:
            raise UserError(f"{path}: corpus file or folder not found")
        docs = [doc for f in files for doc in _read_file(f, cfg.txt_split)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"{source}: the corpus is empty (no non-blank documents)")
    return docs


def note_skipped(folder: Path, skipped: list[Path], shown: int = 3) -> None:
    """One line naming the files of a corpus folder that are not read (a README.md, a .csv),
    so a user who expected them in the corpus is told."""
    if not skipped:
        return
    from tqdm import tqdm
    names = ", ".join(str(p.relative_to(folder)) for p in skipped[:shown])
    more = f" and {len(skipped) - shown} more" if len(skipped) > shown else ""
    tqdm.write(f"note: {folder}: skipped {len(skipped)} file(s) that are not .txt or .jsonl: "
               f"{names}{more}")


def split_text(text: str, how: str) -> list[str]:
    """One .txt file -> documents: 'blank_lines' (paragraphs separated by an empty line),
    'lines' (one per line) or 'file' (the whole file)."""
    if how == "file":
        return [text]
    # only \n ends a line (files are read with CRLF and CR as \n); str.splitlines would
    # also cut at U+2028, NEL and \x1c-\x1e, characters that belong to the document
    lines = text.split("\n")
    if how == "lines":
        return [line for line in lines if line.strip()]
    runs = itertools.groupby(lines, key=lambda line: bool(line.strip()))
    return ["\n".join(run) for not_blank, run in runs if not_blank]


def _read_file(path: Path, txt_split: str = "blank_lines") -> list[str]:
    if path.suffix.lower() == ".jsonl":  # NOTES.JSONL too (Windows, old tools)
        rows = read_jsonl(path)
        for n, row in rows:
            if not isinstance(row.get("text"), str):
                raise UserError(f'{path}:{n}: expected an object with a "text" string')
        return [row["text"] for _, row in rows]
    return split_text(read_utf8(path), txt_split)


def split_documents(docs: list[str], cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train, val): data.val_source if given, else a seeded random sample of whole documents
    (data.val_fraction of them). Never the same documents for both: a copy of a validation
    document (the world corpus repeats some short ones, user data has duplicates) is dropped
    from train, else validation would score text the model trained on."""
    if cfg.val_source:
        val = read_documents(cfg, cfg.val_source)
        held = set(val)
        if held <= set(docs):
            raise UserError(f"data.val_source {cfg.val_source}: every one of its documents is "
                            "also in data.source, so validation would be training text; name "
                            "held-out text, or leave it empty to sample data.val_fraction")
        train = [d for d in docs if d not in held]
        if not train:
            raise UserError(f"data.source {cfg.source}: every one of its documents is also in "
                            f"data.val_source {cfg.val_source}, so nothing is left to train on")
        if len(train) < len(docs):
            from tqdm import tqdm
            tqdm.write(f"note: {len(docs) - len(train)} document(s) of data.source are also in "
                       f"data.val_source {cfg.val_source}: left out of training")
        return train, val
    n_val = round(len(docs) * cfg.val_fraction)
    if n_val < 1 or n_val >= len(docs):
        raise UserError(f"{cfg.source}: {len(docs)} document(s) with data.val_fraction "
                        f"{cfg.val_fraction} leaves no real validation split (val would be "
                        "training data); raise data.val_fraction, add documents (a .txt file "
                        "is split at blank lines, see data.txt_split), or name held-out text "
                        "with data.val_source")
    order = list(range(len(docs)))
    random.Random(f"{cfg.seed}:val").shuffle(order)
    val = set(order[:n_val])
    held = {docs[i] for i in val}
    train = [d for i, d in enumerate(docs) if i not in val and d not in held]
    if not train:
        raise UserError(f"{cfg.source}: every document is a copy of a validation one, so "
                        "nothing is left to train on; use more varied documents")
    return train, [d for i, d in enumerate(docs) if i in val]


def write_token_files(splits: dict[str, list[str]], tok: Tokenizer, out: Path) -> dict:
    """Tokenise {"train": docs, "val": docs} into out/{train,val}.bin + meta.json. Writes
    to a temporary folder first and renames it into place, so an interrupted run never
    leaves half a data folder. `out` belongs to the run (see train.rundir)."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tmp = fresh_tmp(out)
    meta: dict = {"dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size}
    for split, texts in splits.items():
        framed = ([tok.bos_id, *seq, tok.eos_id] for seq in tok.encode_batch(texts))
        ids = np.fromiter((i for seq in framed for i in seq), dtype=dtype)
        ids.tofile(tmp / f"{split}.bin")
        meta[split] = {"docs": len(texts), "tokens": int(ids.size),
                       "bytes": sum(len(t.encode("utf-8")) for t in texts)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out)
    return meta


def load_meta(data_dir: Path) -> dict:
    """meta.json, checked against the .bin files' sizes (a damaged or half-copied run folder
    is bad input, not a numpy traceback)."""
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            size = (data_dir / f"{split}.bin").stat().st_size
            if size != meta[split]["tokens"] * itemsize or size == 0:
                raise ValueError(f"{split}.bin holds {size} bytes, meta.json says "
                                 f"{meta[split]['tokens']} tokens of {meta['dtype']}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{data_dir}: the run's token files are damaged ({e}); delete that "
                        "folder and --resume rebuilds it from data.source") from None
    return meta


class TokenLoader:
    """Batches of (inputs, targets), each (batch_size, seq_len), from one split: windows of
    seq_len+1 tokens at stride seq_len, in EpochSampler order. accum: micro-batches per
    optimizer step (train.grad_accum), so an epoch's ragged end is dropped per whole step."""

    def __init__(self, data_dir: Path, split: str, batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world: int = 1, accum: int = 1):
        meta = load_meta(data_dir)
        self.tokens = np.memmap(data_dir / f"{split}.bin", dtype=meta["dtype"], mode="r")
        self.batch_size, self.seq_len = batch_size, seq_len
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < batch_size * world * accum:
            raise UserError(f"{data_dir / split}.bin: {len(self.tokens)} tokens is too few for "
                            f"a step of {batch_size * world * accum} x {seq_len}; use more data "
                            "or a smaller batch_size / grad_accum / seq_len")
        self.sampler = EpochSampler(self.n_windows, batch_size, seed, rank, world, accum)

    def _batch(self, windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        rows = torch.stack([torch.from_numpy(self.tokens[i * L: (i + 1) * L + 1].astype(np.int64))
                            for i in windows])
        return rows[:, :-1], rows[:, 1:]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.sampler.next_indices())

    def fixed_batches(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """n batches spread evenly over the split, the same every call (for validation)."""
        want, B = min(n * self.batch_size, self.n_windows), self.batch_size
        idx = torch.linspace(0, self.n_windows - 1, want).long().tolist()
        return [self._batch(idx[b: b + B]) for b in range(0, want - B + 1, B)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
