"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions, /v1/completions.

Requests are checked by hand (not by a schema library) so every refusal is one OpenAI-shaped
error naming the parameter at fault. Prompts longer than the model's context are refused;
max_tokens is clamped to the room the context leaves (these models have 128-1024 token
contexts), and the answer then ends with finish_reason "length".
"""

from __future__ import annotations

import asyncio
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from scalelab.config import UserError
from scalelab.serve.engine import Engine, Job, Sampling

router = APIRouter()
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_messages: int = 128
    max_chars: int = 64_000  # all message contents / prompts of one request together
    max_tokens: int = 1024
    max_n: int = 8
    max_stop: int = 4
    max_logprobs: int = 5


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = \
            status, message, param, code, type

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---- checking a request ------------------------------------------------------------------

def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


def number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise bad(key, f"must be a number from {lo} to {hi}, got {v!r}")
    return float(v)


def integer(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad(key, f"must be an integer from {lo} to {hi}, got {v!r}")
    return v


def stops(body: dict, limits: Limits) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v) \
            or len(v) > limits.max_stop:
        raise bad("stop", f"must be a non-empty string or a list of at most {limits.max_stop}")
    return v


async def read_body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def engine_for(request: Request, body: dict) -> tuple[str, Engine]:
    name = body.get("model")
    engines: dict[str, Engine] = request.app.state.engines
    if not isinstance(name, str):
        raise bad("model", f"required; one of {sorted(engines)}")
    if name not in engines:  # names only: a request never names a file
        raise APIError(404, f"The model '{name}' does not exist; loaded: {sorted(engines)}",
                       "model", "model_not_found")
    return name, engines[name]


def sampling(body: dict, engine: Engine, prompt_len: int, limits: Limits,
             default_max: int | None, echo: bool = False) -> Sampling:
    """echo (completions only; chat has no such parameter): the prompt may fill the context
    and max_tokens may be 0, since the answer is the prompt's own log-probabilities."""
    room = engine.seq_len - prompt_len
    if room < 1 and not echo:
        raise APIError(400, f"the prompt is {prompt_len} tokens; the served context is "
                       f"{engine.seq_len}", "messages", "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    lo = 0 if echo else 1
    asked = integer(body, key, default_max, lo, limits.max_tokens)
    return Sampling(
        max_tokens=min(room if asked is None else asked, room, limits.max_tokens),
        temperature=number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0),
        stop=stops(body, limits), seed=integer(body, "seed", None, -2**63, 2**64 - 1))


def chat_messages(body: dict, limits: Limits) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "required: a non-empty list of {role, content}")
    if len(msgs) > limits.max_messages:
        raise bad("messages", f"at most {limits.max_messages} messages, got {len(msgs)}")
    out, chars = [], 0
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(where, f"role must be one of {sorted(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and
                       isinstance(p.get("text"), str) for p in content):
                raise bad(f"{where}.content", "only text content parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"{where}.content", "must be a string")
        chars += len(content)
        out.append({"role": ROLES[m["role"]], "content": content})
    if chars > limits.max_chars:
        raise bad("messages", f"{chars} characters; the limit is {limits.max_chars}")
    return out


def chat_ids(engine: Engine, messages: list[dict], param: str = "messages") -> list[int]:
    """The conversation in the model's chat format, the assistant's turn left open. One the
    template refuses (Mistral's refuses a system message), or a model with no chat format
    at all, is a 400."""
    try:
        return engine.tok.encode_chat(messages, generation_prompt=True)[0]
    except UserError as e:
        raise bad(param, f"this model cannot take them: {e}") from None


# ---- running jobs ------------------------------------------------------------------------

def start(engine: Engine, prompt: list[int], s: Sampling, n: int
          ) -> tuple[Job, asyncio.Queue]:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(prompt, s, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev), n)
    try:
        engine.submit(job)
    except queue.Full:
        raise APIError(503, "the server is busy; retry shortly", code="overloaded",
                       type="server_error") from None
    return job, events


async def event_batches(job: Job, events: asyncio.Queue) -> AsyncIterator[list[dict]]:
    """Events until every row is done, in lists of those already waiting (a stream then
    writes them to the socket together); an engine error becomes an APIError."""
    left = job.n
    try:
        while left:
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            for ev in batch:
                if ev["type"] == "error":
                    raise APIError(500, ev["message"], type="server_error")
                left -= ev["type"] == "done"
            yield batch
    finally:
        job.cancelled = left > 0  # the client left (or failed) early: free the rows


async def collect(jobs: list[tuple[Job, asyncio.Queue]]) -> list[list[dict]]:
    """The done event of every row of every job."""
    async def one(job, q):
        done = [ev async for b in event_batches(job, q) for ev in b if ev["type"] == "done"]
        return sorted(done, key=lambda ev: ev["index"])
    return list(await asyncio.gather(*(one(j, q) for j, q in jobs)))


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events: the chunks, an error event if the engine failed, then [DONE]."""
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as e:
            yield sse(error_body(e.message, e.type, e.param, e.code))
        yield sse("[DONE]")
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage_wanted(body: dict) -> bool:
    """stream_options.include_usage: a last chunk with no choices and the usage."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", 'must be an object, e.g. {"include_usage": true}')
    return bool(options.get("include_usage"))


def chat_logprobs(entries: list[dict] | None) -> dict | None:
    """The chat API's logprobs: each token, its bytes, and its top alternatives alike."""
    if entries is None:
        return None

    def token(text: str, logprob: float, raw: bytes) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(raw)}
    return {"content": [{**token(e["token"], e["logprob"], e["bytes"]),
                         "top_logprobs": [token(*alt) for alt in e["top"]]}
                        for e in entries]}


def usage(prompt_tokens: int, done: list[dict]) -> dict:
    completion = sum(ev["tokens"] for ev in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


# ---- endpoints ---------------------------------------------------------------------------

@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    created = request.app.state.started
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "scalelab"}
        for name in request.app.state.engines]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    limits: Limits = request.app.state.limits
    body = await read_body(request)
    name, engine = engine_for(request, body)
    messages = chat_messages(body, limits)
    prompt = chat_ids(engine, messages)
    s = sampling(body, engine, len(prompt), limits, None)
    n = integer(body, "n", 1, 1, limits.max_n)
    if body.get("logprobs"):
        s.logprobs = integer(body, "top_logprobs", 0, 0, limits.max_logprobs)
    want_usage = usage_wanted(body)
    job, events = start(engine, prompt, s, n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "created": created, "model": name}

    if body.get("stream"):
        async def chunks() -> AsyncIterator[str]:
            def chunk(choices: list, **extra) -> str:
                return sse({**head, "object": "chat.completion.chunk", "choices": choices,
                            **extra})
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None} for i in range(n)])
            done = []
            async for batch in event_batches(job, events):
                out = []
                for ev in batch:
                    if ev["type"] == "delta":  # logprobs: its tokens' (when asked for)
                        delta, reason, lp = {"content": ev["text"]}, None, ev.get("logprobs")
                    else:
                        done.append(ev)
                        delta, reason, lp = {}, ev["finish_reason"], None
                    out.append(chunk([{"index": ev["index"], "delta": delta,
                                       "logprobs": chat_logprobs(lp), "finish_reason": reason}]))
                yield "".join(out)
            if want_usage:
                yield chunk([], usage=usage(len(prompt), done))
        return stream(chunks())

    (done,) = await collect([(job, events)])
    choices = [{"index": ev["index"], "finish_reason": ev["finish_reason"],
                "message": {"role": "assistant", "content": ev["text"]},
                "logprobs": chat_logprobs(ev["logprobs"])} for ev in done]
    return {**head, "object": "chat.completion", "choices": choices,
            "usage": usage(len(prompt), done)}


def completion_prompts(body: dict, engine: Engine, limits: Limits) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of such lists.
    Each starts with the tokenizer's prompt_prefix: BOS where its post-processor adds one, as
    transformers and vLLM do (Qwen2.5's and GPT-2-style tokenizers add none)."""
    p = body.get("prompt")
    vocab = engine.model.cfg.vocab_size
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(t, int) for t in p)):
        p = [p]
    if not isinstance(p, list) or not p or len(p) > limits.max_n:
        raise bad("prompt", f"required: a string, token ids, or a list of at most "
                  f"{limits.max_n} of those")
    if sum(len(x) for x in p if isinstance(x, str)) > limits.max_chars:
        raise bad("prompt", f"more than {limits.max_chars} characters")
    out, head = [], engine.tok.prompt_prefix
    for x in p:
        if isinstance(x, str):
            ids = engine.tok.encode(x)
        elif isinstance(x, list) and all(isinstance(t, int) and 0 <= t < vocab for t in x):
            ids = list(x)
        else:
            raise bad("prompt", f"token ids must be integers in [0, {vocab})")
        if not head + ids:
            raise bad("prompt", "empty, and this model's tokenizer starts a prompt with no BOS "
                      "token")
        out.append(head + ids)
    return out


def legacy_logprobs(entries: list[dict]) -> dict:
    def top(alts: list | None) -> dict | None:  # a dict by text: alike texts keep the best
        if alts is None:
            return None
        best: dict = {}
        for text, logprob, _ in alts:
            best.setdefault(text, logprob)
        return best
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [top(e["top"]) for e in entries],
            "text_offset": [e["offset"] for e in entries]}


@router.post("/v1/completions")
async def completions(request: Request):
    limits: Limits = request.app.state.limits
    body = await read_body(request)
    name, engine = engine_for(request, body)
    prompts = completion_prompts(body, engine, limits)
    n = integer(body, "n", 1, 1, limits.max_n)
    if n * len(prompts) > limits.max_n:
        raise bad("n", f"n times the number of prompts is at most {limits.max_n}")
    echo, k = bool(body.get("echo")), integer(body, "logprobs", None, 0, limits.max_logprobs)
    if echo and body.get("stream"):
        raise bad("echo", "echo is not supported with stream")
    want_usage = usage_wanted(body)
    jobs = []
    for ids in prompts:
        if len(ids) > engine.seq_len or (not echo and len(ids) >= engine.seq_len):
            raise APIError(400, f"a prompt is {len(ids)} tokens; the served context is "
                           f"{engine.seq_len}", "prompt", "context_length_exceeded")
        s = sampling(body, engine, len(ids), limits, 16, echo)
        s.logprobs, s.echo = k, echo
        jobs.append((ids, s))
    started = [start(engine, ids, s, n) for ids, s in jobs]
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": name}

    if body.get("stream"):
        async def chunks() -> AsyncIterator[str]:
            done = []
            for p, (job, events) in enumerate(started):
                async for batch in event_batches(job, events):
                    out = []
                    for ev in batch:
                        delta = ev["type"] == "delta"
                        if not delta:
                            done.append(ev)
                        lp = ev.get("logprobs") if delta else None
                        out.append(sse({**head, "choices": [{
                            "index": p * n + ev["index"], "text": ev["text"] if delta else "",
                            "logprobs": None if lp is None else legacy_logprobs(lp),
                            "finish_reason": None if delta else ev["finish_reason"]}]}))
                    yield "".join(out)
            if want_usage:
                yield sse({**head, "choices": [],
                           "usage": usage(sum(len(x) for x in prompts), done)})
        return stream(chunks())

    results = await collect(started)
    choices, skip = [], len(engine.tok.prompt_prefix)
    for p, done in enumerate(results):
        prompt_text = engine.tok.decode(prompts[p][skip:]) if echo else ""
        for ev in done:
            entries = ev["logprobs"]
            if echo and k is not None:  # the prompt's tokens first, then the answer's
                scored = ev["prompt_logprobs"][skip:]  # without BOS
                if not skip:  # the first token, with nothing before it, has no logprob
                    first = engine.tok.decode(prompts[p][:1], skip_special=False)
                    scored[0] = {"token": first, "logprob": None, "top": None}
                for j, e in enumerate(scored):
                    e["offset"] = len(engine.tok.decode(prompts[p][skip: skip + j]))
                entries = scored + [{**e, "offset": len(prompt_text) + e["offset"]}
                                    for e in entries]
            choices.append({"index": p * n + ev["index"], "text": prompt_text + ev["text"],
                            "logprobs": None if k is None else legacy_logprobs(entries),
                            "finish_reason": ev["finish_reason"]})
    return {**head, "choices": choices,
            "usage": usage(sum(len(x) for x in prompts), [e for d in results for e in d])}
