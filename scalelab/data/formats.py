"""Post-training data in the HF/TRL JSONL conventions, validated line by line.

    prompt-completion  {"prompt": str, "completion": str}
    conversational     {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    preference         {"prompt": str, "chosen": str, "rejected": str}
    prompt             {"prompt": str}   (PPO prompts)

Everything is normalised to conversations (lists of messages). A SPEC is a .jsonl path or
`builtin:NAME` for data made from the task suite.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from scalelab.config import UserError

ROLES = ("system", "user", "assistant")
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]", re.ASCII)  # \ud800-\udfff


def read_utf8(path: Path) -> str:
    """A text file's contents, CRLF and CR read as \n (as open() does); a byte that is not
    UTF-8 is bad input naming its line. utf-8-sig: a byte-order mark (many Windows tools
    write one) is not part of line 1."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte "
                        f"{data[e.start:e.start + 1]!r}); save the file as UTF-8") from None


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line; a malformed line is an error."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a .jsonl file")
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    # split at \n only (CRLF reads as \n): a JSON string may hold U+2028 or NEL unescaped,
    # where str.splitlines would cut the line
    lines = read_utf8(path).split("\n")
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected a JSON object")
        if SURROGATE_ESCAPE.search(line) and not _encodable(row):
            raise UserError(f"{path}:{n}: a \\u escape is half of a character (a lone "
                            "surrogate such as \\ud800): not text; fix or drop the line")
        rows.append((n, row))
    if not rows:
        raise UserError(f"{path}: no examples")
    return rows


def _encodable(row: dict) -> bool:
    """JSON may escape half of a UTF-16 pair ("\\ud800"); the string it gives cannot be
    written as UTF-8, so the tokenizer (and any file it is saved in) would fail on it."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(row: dict, key: str, where: str) -> str:
    if key not in row:  # most often a misspelled key: show the ones the row has
        keys = ", ".join(json.dumps(k) for k in row)
        raise UserError(f'{where}: no "{key}" (this row has {keys or "no keys"})')
    value = row[key]
    if not isinstance(value, str) or not value.strip():
        raise UserError(f'{where}: "{key}" must be a non-empty string')
    return value


def _messages(row: dict, where: str) -> list[dict]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f'{where}: "messages" must be a non-empty list')
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise UserError(f'{where}: messages[{i}] needs "role" (system/user/assistant) '
                            'and a "content" string')
    if msgs[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message must be the assistant's")
    return msgs


def read_conversations(path: str | Path) -> list[list[dict]]:
    """SFT data: prompt-completion or conversational rows, as message lists."""
    out = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        if "messages" in row:
            out.append(_messages(row, where))
        elif "prompt" in row or "completion" in row:
            out.append([{"role": "user", "content": _text(row, "prompt", where)},
                        {"role": "assistant", "content": _text(row, "completion", where)}])
        else:
            raise UserError(f'{where}: expected "messages" or "prompt"/"completion"')
    return out


def read_preferences(path: str | Path) -> list[tuple[str, str, str]]:
    """Preference data: (prompt, chosen, rejected)."""
    return [tuple(_text(row, k, f"{path}:{n}") for k in ("prompt", "chosen", "rejected"))
            for n, row in read_jsonl(path)]


def read_prompts(path: str | Path) -> list[str]:
    return [_text(row, "prompt", f"{path}:{n}") for n, row in read_jsonl(path)]


def is_builtin_tasks(spec: str, flag: str) -> bool:
    """True for `builtin:tasks` (data made from the task suite), False for a file path; any
    other `builtin:NAME` is bad input naming the flag."""
    if spec == "builtin:tasks":
        return True
    if spec.startswith("builtin:"):
        raise UserError(f"{flag}: unknown built-in data {spec!r} (known: builtin:tasks)")
    return False
