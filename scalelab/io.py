"""File helpers for every layer below the stages: atomic writes (a crash leaves the old
file or folder or the new one, never half of one), and JSON / safetensors reads that turn
a missing or corrupt file into one UserError naming it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from scalelab.config import UserError


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) makes a file beside `path`, which then takes its place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with named_errors(path):
            write(tmp)
    except BaseException:  # a full disk, Ctrl-C: no partial file left beside the old one
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def append_row(path: Path, row: dict) -> None:
    """One JSON line onto a JSONL file a run appends to (metrics, events). After a torn last
    line (a kill or a full disk mid-write) it starts a line of its own: glued to the torn
    one, it would be unreadable too (read_rows skips the torn line alone)."""
    with named_errors(path), path.open("ab+") as f:
        torn = False
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(strict(row)) + "\n").encode())


@contextlib.contextmanager
def named_errors(path: Path) -> Iterator[None]:
    """A write error (a full disk) names the file: write() itself raises without a name."""
    try:
        yield
    except OSError as e:
        e.filename = e.filename or str(path)
        raise


def atomic_write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(strict(data), indent=indent) + "\n")


def strict(data: Any) -> Any:
    """JSON has no NaN or Infinity (json.dumps writes them, other readers refuse them): a
    non-finite number, a NaN loss say, is written as null."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    return data


def fresh_tmp(final: Path) -> Path:
    """An empty hidden folder beside `final` to build it in, then replace_dir."""
    tmp = final.with_name(f".{final.name}.tmp")  # hidden: globs such as step_* never match
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place (rename is atomic; the old one goes after)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_rows(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file that a run appends to (metrics, events): a missing
    file is empty, a torn last line (a kill mid-write) is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [row for row in rows if isinstance(row, dict)]


def read_json_if_any(path: Path) -> dict:
    """A JSON object that may be missing or torn (a run's own records, read while it runs):
    {} then."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def reading_safetensors(path: Path) -> Iterator[None]:
    """Around reads of one safetensors file: missing, corrupt or unreadable is a UserError."""
    from safetensors import SafetensorError
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        yield
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    with reading_safetensors(path):
        return load_file(str(path))
