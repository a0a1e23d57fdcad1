"""The web app's own endpoints (/api/...): preference labelling and the tracker.

Chat and Compare need nothing beyond the OpenAI API. Labelling appends one preference per
judgment to a JSONL in exactly the format `scalelab reward --data` and `dpo --data` read,
{"prompt", "chosen", "rejected"}: one os.write of the whole line on an O_APPEND descriptor,
then fsync, so a crash loses at most the label in flight. Lines are never rewritten; undo
removes only the line this session appended last, and only while it is still the file's end.
Ties and skips train nothing and are not written; they count in the session's tallies.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import tempfile
import threading
import uuid
from contextlib import closing
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from scalelab.config import UserError
from scalelab.serve.api import (
    APIError,
    bad,
    chat_ids,
    collect,
    engine_for,
    integer,
    number,
    read_body,
    start,
)
from scalelab.serve.engine import Sampling

router = APIRouter()
CHOICES = ("A", "B", "tie", "skip")
MAX_PENDING = 64


class LabelStore:
    def __init__(self, path: Path, prompts_file: str | None = None):
        from scalelab.data.formats import read_preferences, read_prompts
        self.path = path
        if not path.parent.is_dir():
            raise UserError(f"--labels {path}: folder {path.parent} does not exist")
        if path.exists() and not path.is_file():
            raise UserError(f"--labels {path}: not a file (a folder?); name a .jsonl file")
        self.existing = 0
        if path.is_file() and path.stat().st_size:
            if not path.read_bytes().endswith(b"\n"):
                raise UserError(f"--labels {path}: the last line is incomplete (a crash while "
                                "writing?); remove it, then start again")
            self.existing = len(read_preferences(path))  # refuses a file in another format
        self.prompts = read_prompts(prompts_file) if prompts_file else []
        self.prompts_file = prompts_file
        self.next_prompt = 0
        self.lock = threading.Lock()
        self.pending: dict[str, dict] = {}
        self.history: list[dict] = []  # this session's judgments, newest last

    def take_prompt(self) -> str:
        with self.lock:
            p = self.prompts[self.next_prompt % len(self.prompts)]
            self.next_prompt += 1
            return p

    def append(self, row: dict) -> tuple[int, int]:
        """Append one line whole or not at all: a short or failed write (a full disk) is cut
        off again and raised, so the file never ends in half a line."""
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.lseek(fd, 0, os.SEEK_END)
            try:
                n = os.write(fd, line)
                if n != len(line):
                    raise OSError(errno.ENOSPC, f"wrote {n} of {len(line)} bytes")
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)
        return before, before + len(line)

    def judge(self, pair_id: str, choice: str) -> dict:
        with self.lock:
            pair = self.pending.pop(pair_id, None)
            if pair is None:
                raise APIError(404, f"no pair {pair_id!r} waiting for a label", "id")
            rec = {"pair": pair, "choice": choice, "written": None}
            if choice in ("A", "B"):
                if not all(a.strip() for a in pair["answers"]):
                    self.pending[pair_id] = pair
                    raise APIError(400, "an answer is blank, and the preference format has no "
                                   "place for one: skip this pair", "choice")
                chosen = 0 if choice == "A" else 1
                try:
                    rec["written"] = self.append({"prompt": pair["prompt"],
                                                  "chosen": pair["answers"][chosen],
                                                  "rejected": pair["answers"][1 - chosen]})
                except OSError as e:  # the pair stays to be labelled again
                    self.pending[pair_id] = pair
                    raise APIError(500, f"could not write to {self.path} ({e.strerror or e}); "
                                   "nothing was saved", "choice") from None
            self.history.append(rec)
            return {"gold": pair["gold"], **self.tallies()}

    def undo(self) -> dict:
        with self.lock:
            if not self.history:
                raise APIError(400, "nothing to undo in this session")
            rec = self.history[-1]
            if rec["written"] is not None:
                before, after = rec["written"]
                size = self.path.stat().st_size if self.path.is_file() else None
                if size != after:  # moved away, or appended to by someone else
                    raise APIError(409, f"{self.path} changed since that label was written; "
                                   "not undoing")
                os.truncate(self.path, before)
            self.history.pop()
            pair = rec["pair"]
            self.pending[pair["id"]] = pair
            return {"undone": rec["choice"], "pair": public(pair), **self.tallies()}

    def tallies(self) -> dict:
        counts = {c: sum(r["choice"] == c for r in self.history) for c in CHOICES}
        gold = [r for r in self.history if r["pair"]["gold"] and r["choice"] != "skip"]
        agree = sum(r["choice"] == r["pair"]["gold"]["choice"] for r in gold)
        return {"counts": counts, "written": self.existing + counts["A"] + counts["B"],
                "file": str(self.path), "agreement": {"agree": agree, "total": len(gold)}}


def public(pair: dict) -> dict:
    """What the page sees before labelling: not the gold ranking (it would bias the person)."""
    return {k: pair[k] for k in ("id", "prompt", "answers", "source", "model")} | \
        {"has_gold": pair["gold"] is not None}


def gold_ranking(example, answers: list[str], stopped: list[bool]) -> dict:
    from scalelab.train.labelers import gold
    scores = [gold(example, a, s) for a, s in zip(answers, stopped)]
    choice = "tie" if scores[0] == scores[1] else ("A" if scores[0] > scores[1] else "B")
    return {"choice": choice, "scores": scores, "answer": example.answer}


@router.get("/api/info")
async def info(request: Request) -> dict:
    store: LabelStore = request.app.state.labels
    opts = request.app.state.opts
    return {"models": list(request.app.state.engines),
            "label_sources": ["tasks"] + (["file"] if store.prompts else []) + ["typed"],
            "label_prompts": store.prompts_file, "registry": registry_file(opts),
            **store.tallies()}


@router.post("/api/label/pair")
async def label_pair(request: Request) -> dict:
    """Two sampled answers to one prompt, in random order."""
    store: LabelStore = request.app.state.labels
    body = await read_body(request)
    name, engine = engine_for(request, body)
    source, example = body.get("source", "tasks"), None
    if source == "tasks":
        from scalelab.tasks import TASKS, TRAIN_TASKS
        rng = random.Random()
        example = TASKS[rng.choice(TRAIN_TASKS)].make(rng)
        prompt = example.prompt
    elif source == "file" and store.prompts:
        prompt = store.take_prompt()
    elif source == "typed":
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad("prompt", "type a prompt")
        if len(prompt) > request.app.state.limits.max_chars:
            raise bad("prompt", "too long")
    else:
        raise bad("source", "one of tasks, file (with --label-prompts), typed")
    ids = chat_ids(engine, [{"role": "user", "content": prompt}], "model")
    if len(ids) >= engine.seq_len:
        raise bad("prompt", f"{len(ids)} tokens; the served context is {engine.seq_len}")
    s = Sampling(max_tokens=min(integer(body, "max_tokens", 48, 1, 1024),
                                engine.seq_len - len(ids)),
                 temperature=number(body, "temperature", 1.0, 0.0, 2.0))
    for _ in range(4):  # the preference format needs two non-blank answers
        (done,) = await collect([start(engine, ids, s, 2)])
        if all(ev["text"].strip() for ev in done):
            break
    order = [0, 1]
    random.shuffle(order)
    answers = [done[i]["text"] for i in order]
    stopped = [done[i]["finish_reason"] == "stop" for i in order]
    pair = {"id": uuid.uuid4().hex[:12], "prompt": prompt, "answers": answers,
            "source": source, "model": name,
            "gold": None if example is None else gold_ranking(example, answers, stopped)}
    with store.lock:
        store.pending[pair["id"]] = pair
        while len(store.pending) > MAX_PENDING:  # pairs asked for and never judged
            store.pending.pop(next(iter(store.pending)))
    return public(pair)


@router.post("/api/label")
async def label(request: Request) -> dict:
    body = await read_body(request)
    if body.get("choice") not in CHOICES:
        raise bad("choice", f"one of {CHOICES}")
    return request.app.state.labels.judge(str(body.get("id")), body["choice"])


@router.post("/api/label/undo")
async def label_undo(request: Request) -> dict:
    return request.app.state.labels.undo()


# ---- tracker -----------------------------------------------------------------------------

def registry_file(opts) -> str:
    from scalelab.track.registry import registry_path
    return str(registry_path(opts.registry))


def open_registry(request: Request):
    from scalelab.track.registry import Registry
    path = Path(registry_file(request.app.state.opts))
    if not path.is_file():  # viewing must not create one
        raise APIError(404, f"no registry at {path}: register models with --register or "
                       "`scalelab track model add`, or start serve with --registry FILE",
                       code="no_registry")
    try:
        return Registry(path)
    except UserError as e:  # damaged, or not a registry
        raise APIError(400, str(e)) from None


@router.get("/api/tracker")
async def tracker(request: Request) -> dict:
    from scalelab.track.commands import status
    with closing(open_registry(request)) as reg:
        return {"registry": str(reg.path), **status(reg)}


@router.post("/api/tracker/report")
async def tracker_report(request: Request) -> dict:
    """Draw the report's plots (matplotlib, a second or two) into this server's own folder."""
    from scalelab.track.report import write_report
    state = request.app.state
    if not hasattr(state, "report_dir"):
        state.report_dir = Path(tempfile.mkdtemp(prefix="scalelab-serve-report-"))

    def draw() -> list[str]:
        with closing(open_registry(request)) as reg:
            write_report(reg, state.report_dir)
        return sorted(p.name for p in state.report_dir.glob("*.png"))
    try:
        return {"plots": await asyncio.to_thread(draw)}
    except UserError as e:
        raise APIError(400, str(e)) from None


@router.get("/api/tracker/plot/{name}")
async def tracker_plot(request: Request, name: str):
    folder = getattr(request.app.state, "report_dir", None)
    names = {p.name for p in folder.glob("*.png")} if folder else set()
    if name not in names:  # only files the report wrote, by exact name
        raise APIError(404, f"no plot {name!r}")
    return FileResponse(folder / name)
