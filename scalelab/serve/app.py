"""`scalelab serve`: one process serving the OpenAI-compatible API and the web app.

Safe by default: binds 127.0.0.1 and answers only requests addressed to a loopback name
(a web page elsewhere cannot reach it through DNS rebinding). A non-loopback --host is refused
unless an API key is set (--api-key or SCALELAB_API_KEY); every request, API and web, must
then carry it: `Authorization: Bearer KEY`, or the cookie the /login page sets. Bodies are
capped before any JSON is parsed; CORS only for the origins named with --cors-origin.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import parse_qs

from scalelab.config import UserError

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
COOKIE = "scalelab_key"


@dataclass
class ServeOptions:
    models: dict[str, str]  # name -> model folder
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    labels: str = "labels.jsonl"  # the preference JSONL the Label view appends to
    label_prompts: str | None = None  # a prompts JSONL for the Label view
    registry: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    device: str = "auto"
    max_batch: int = 32
    context: int | None = None  # tokens served per row (default: the model's, at most below)


# The default cap on the served context: an imported model may take 128k tokens, and the
# engine keeps that many KV-cache columns per row and attends over all of them every step.
DEFAULT_SERVE_CONTEXT = 8192


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    if header.startswith("["):
        return header[1:header.find("]")]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def check_host(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        raise UserError(f"--host {host}: not a loopback address; serving beyond this machine "
                        "needs an API key (--api-key or SCALELAB_API_KEY)")


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before any model loads: a bad --port, or one in use, is
    one clear error, not a traceback after the models have loaded."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: must be from 0 to 65535")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there "
                        f"({e.strerror or e})") from None
    return sock


def parse_models(specs: list[str]) -> dict[str, str]:
    """['ppo=runs/demo/ppo/model', 'runs/x/sft/model'] -> {'ppo': ..., 'sft': ...}; a bare
    folder is named after itself, or its parent when it is called 'model'."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            p = Path(spec.rstrip("/"))
            name, path = (p.parent.name if p.name == "model" else p.name), spec
        if not name or not path:
            raise UserError(f"--model {spec!r}: expected DIR or NAME=DIR")
        if name in out:
            raise UserError(f"--model: two models named {name!r}; name them with NAME=DIR")
        out[name] = path
    return out


def cookie_value(key: str) -> str:
    """What the login cookie holds: a digest of the key, not the key itself."""
    return hmac.new(key.encode(), b"scalelab web login", hashlib.sha256).hexdigest()


LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>scalelab: log in</title>
<link rel="stylesheet" href="/static/style.css"></head><body class="login"><form method="post"
action="/login"><h1>scalelab</h1><p>This server needs its API key.</p><input type="password"
name="key" id="key" autofocus placeholder="API key"><button>Log in</button>{msg}</form></body>
</html>"""


class Guard:
    """ASGI middleware in front of everything: Host check, API key, body size."""

    def __init__(self, app, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope["headers"]}
        path = scope["path"]
        if not self.api_key and not is_loopback(host_name(headers.get("host", ""))):
            return await self.reply(send, 421, "requests must be addressed to localhost "
                                    "(Host header)", "misdirected_request")
        length = headers.get("content-length")
        too_large = length is not None and (not length.isdigit() or int(length) > self.max_body)
        body, more = b"", True
        while more and not too_large:  # read it all now: a chunked body is capped the same way
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            too_large = len(body) > self.max_body
        if too_large:
            return await self.reply(send, 413, f"request body over {self.max_body} bytes",
                                    "body_too_large")
        if self.api_key:
            if path == "/login":
                return await self.login(scope, body, send)
            # Open to all: the login page's own stylesheet. (A browser's CORS check, sent
            # without credentials, is answered before this, by the CORS middleware outside.)
            if not (self.authorised(headers) or path == "/static/style.css"):
                if path.startswith(("/v1/", "/api/", "/health")):
                    return await self.reply(send, 401, "missing or wrong API key "
                                            "(Authorization: Bearer KEY)", "invalid_api_key",
                                            "authentication_error")
                return await self.html(send, 401, LOGIN_PAGE.format(msg=""))

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, replay, send)

    def authorised(self, headers: dict) -> bool:
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].strip(), self.api_key):
            return True
        jar = SimpleCookie()
        jar.load(headers.get("cookie", ""))
        c = jar.get(COOKIE)
        return c is not None and hmac.compare_digest(c.value, cookie_value(self.api_key))

    async def login(self, scope, body: bytes, send) -> None:
        if scope["method"] != "POST":
            return await self.html(send, 200, LOGIN_PAGE.format(msg=""))
        key = parse_qs(body.decode("utf-8", "replace")).get("key", [""])[0]
        if not hmac.compare_digest(key, self.api_key):
            return await self.html(send, 401, LOGIN_PAGE.format(msg="<p>Wrong key.</p>"))
        cookie = f"{COOKIE}={cookie_value(self.api_key)}; Path=/; HttpOnly; SameSite=Strict"
        await send({"type": "http.response.start", "status": 303,
                    "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode())]})
        await send({"type": "http.response.body", "body": b""})

    async def html(self, send, status: int, text: str) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/html; charset=utf-8")]})
        await send({"type": "http.response.body", "body": text.encode()})

    async def reply(self, send, status: int, message: str, code: str,
                    type: str = "invalid_request_error") -> None:
        import json

        from scalelab.serve.api import error_body
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body",
                    "body": json.dumps(error_body(message, type, None, code)).encode()})


def create_app(engines: dict, opts: ServeOptions, limits=None):
    """The FastAPI app over already-started engines (name -> Engine)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException  # also catches routing's 404 and 405

    from scalelab.serve import api, web

    limits = limits or api.Limits()
    app = FastAPI(title="scalelab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engines, app.state.limits, app.state.opts = engines, limits, opts
    app.state.started = int(time.time())
    app.state.labels = web.LabelStore(Path(opts.labels), opts.label_prompts)

    @app.exception_handler(api.APIError)
    async def api_error(request: Request, e: api.APIError):
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(api.error_body(str(e.detail)), status_code=e.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": {
            n: {"batches": e.batches, "rows": e.rows_served, "steps": e.steps,
                "row_steps": e.row_steps, "queued": e.queue.qsize()}
            for n, e in engines.items()}}

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html")

    app.include_router(api.router)
    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Guard, api_key=opts.api_key, max_body=limits.max_body_bytes)
    if opts.cors_origins:  # added last, so outside the Guard: its refusals (a 401 for a bad
        # key) carry CORS headers too, and a browser shows them to the page
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=opts.cors_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def load_engines(opts: ServeOptions) -> dict:
    from scalelab.hardware import pick_device
    from scalelab.serve.engine import Engine
    from scalelab.train.checkpoint import load_model

    device = pick_device(opts.device)
    engines = {}
    for name, path in opts.models.items():
        model, tok = load_model(path, device)
        full = model.cfg.seq_len
        if opts.context is not None and not 0 < opts.context <= full:
            raise UserError(f"--context {opts.context}: {path} takes 1 to {full} tokens")
        context = opts.context or min(full, DEFAULT_SERVE_CONTEXT)
        if context < full and opts.context is None:
            print(f"scalelab serve: {name} is served with a {context}-token context of its "
                  f"{full} (every row's KV cache holds that many; --context N to change)",
                  flush=True)
        engines[name] = Engine(model, tok, max_batch=opts.max_batch, context=context)
    return engines


def serve(opts: ServeOptions) -> None:
    try:
        import uvicorn
    except ImportError:
        raise UserError("scalelab serve needs its extra: pip install 'scalelab[serve]'") from None
    opts.api_key = opts.api_key or os.environ.get("SCALELAB_API_KEY") or None
    check_host(opts.host, opts.api_key)
    sock = listen_socket(opts.host, opts.port)
    engines = load_engines(opts)
    app = create_app(engines, opts)
    shown = f"[{opts.host}]" if ":" in opts.host else opts.host
    port = sock.getsockname()[1]  # the one the OS picked for --port 0
    print(f"scalelab serve: models {', '.join(engines)}; open http://{shown}:{port}/ "
          f"(API at /v1{', key required' if opts.api_key else ''})", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
