"""Load on `scalelab serve`: N concurrent streaming chat clients for a bounded time.

    python bench/serve_load.py [--model DIR] [--clients 32] [--seconds 30] [--max-tokens 32]

Starts the server as its own process on a loopback port (a tiny random-weight model of the
`tiny` preset's shape unless --model is given), runs a single-client baseline and then N
clients, each for --seconds, and prints requests/s, tokens/s, p50/p99 time to first token
and latency, errors and malformed streams, and the N-client tokens/s over the single-client
tokens/s: the gain from batching concurrent requests. Every stream is checked: every chunk
parses, the first carries the role, one finish_reason, usage, and `data: [DONE]` last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["What is 12 plus 30?", "Where does Alice live?", "Name three colours.",
           "Sort 5, 2, 9.", "Tell me a story about a cat.", "Is 7 bigger than 3?"]


async def one_stream(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int,
                     seed: int) -> dict:
    """One streaming request; its timings, token count and any problem with the stream."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": max_tokens, "temperature": 1.0, "seed": seed,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, finish, tokens, done, problem, first = None, 0, 0, False, None, True
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line:
                    continue
                if not line.startswith("data: ") or done:
                    problem = problem or f"unexpected line {line[:80]!r}"
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    problem = f"error chunk {chunk['error']}"
                    continue
                if chunk.get("object") != "chat.completion.chunk":
                    problem = problem or f"bad object {chunk.get('object')!r}"
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk["choices"]:
                    if first and c["delta"].get("role") != "assistant":
                        problem = problem or "first chunk lacks the role"
                    first = False
                    if c["delta"].get("content") and ttft is None:
                        ttft = time.perf_counter() - t0
                    finish += c["finish_reason"] is not None
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not done:
        problem = problem or "no data: [DONE]"
    elif finish != 1:
        problem = problem or f"{finish} finish_reasons"
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": latency if ttft is None else ttft, "tokens": tokens,
            "malformed": problem}


async def run_load(base_url: str, model: str, clients: int, seconds: float,
                   max_tokens: int = 32, api_key: str | None = None) -> dict:
    """`clients` loops of back-to-back streaming requests until `seconds` have passed (each
    request started in time runs to its end). Returns the summary (see summarise)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    results: list[dict] = []
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(120.0)) as client:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def loop(i: int) -> None:
            k = 0
            while time.perf_counter() < deadline:
                results.append(await one_stream(client, model, PROMPTS[(i + k) % len(PROMPTS)],
                                                max_tokens, seed=1000 * i + k))
                k += 1
        await asyncio.gather(*(loop(i) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return summarise(results, elapsed, clients)


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def summarise(results: list[dict], elapsed: float, clients: int) -> dict:
    ok = [r for r in results if "error" not in r]
    return {"clients": clients, "seconds": elapsed, "requests": len(results),
            "errors": len(results) - len(ok),
            "malformed": sum(r["malformed"] is not None for r in ok),
            "problems": sorted({r.get("error") or r["malformed"] for r in results
                                if r.get("error") or r.get("malformed")})[:5],
            "requests_per_s": len(ok) / elapsed,
            "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
            "ttft_p50": percentile([r["ttft"] for r in ok], 50),
            "ttft_p99": percentile([r["ttft"] for r in ok], 99),
            "latency_p50": percentile([r["latency"] for r in ok], 50),
            "latency_p99": percentile([r["latency"] for r in ok], 99),
            "mean_tokens": statistics.mean([r["tokens"] for r in ok]) if ok else 0.0}


def tiny_model(folder: Path) -> Path:
    """A random-weight model of the tiny preset's shape with a quickly trained tokenizer:
    serving speed does not depend on what the weights learned."""
    import torch

    from scalelab.config import load_config, resolve_config_path
    from scalelab.data.world import generate_documents
    from scalelab.model import Transformer
    from scalelab.tokenizer import Tokenizer
    from scalelab.train.checkpoint import save_model

    cfg = load_config(resolve_config_path("tiny"))
    tok = Tokenizer.train(generate_documents(2000, seed=0), cfg.data.tokenizer_vocab)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    save_model(Transformer(cfg.model).eval(), tok, folder / "model")
    return folder / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "scalelab", "serve", "--model",
                             f"m={model_dir}", "--port", str(port), *extra])
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start within 60 s")


def phase(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """run_load plus how many batches the engine ran for it (from /health)."""
    before = httpx.get(f"{url}/health").json()["models"]["m"]
    s = asyncio.run(run_load(url, "m", clients, seconds, max_tokens))
    after = httpx.get(f"{url}/health").json()["models"]["m"]
    return {**s, **{k: after[k] - before[k] for k in ("batches", "rows", "steps", "row_steps")}}


def line(s: dict) -> str:
    return (f"{s['clients']:>7} {s['requests']:>8} {s['requests_per_s']:>9.2f} "
            f"{s['tokens_per_s']:>9.1f} {1000 * s['ttft_p50']:>9.1f} {1000 * s['ttft_p99']:>9.1f} "
            f"{1000 * s['latency_p50']:>9.1f} {1000 * s['latency_p99']:>9.1f} "
            f"{s['errors']:>6} {s['malformed']:>9}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: a tiny random-weight model)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--baseline-seconds", type=float, default=None,
                    help="single-client run length (default: --seconds)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else tiny_model(Path(tmp))
        port = free_port()
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        proc = start_server(model_dir, port, ["--device", args.device,
                                              "--labels", str(Path(tmp) / "labels.jsonl")])
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_load(url, "m", 1, 2.0, args.max_tokens))  # warm-up
            single = phase(url, 1, args.baseline_seconds or args.seconds, args.max_tokens)
            many = phase(url, args.clients, args.seconds, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"model {model_dir if args.model else 'tiny (random weights)'}, "
          f"max_tokens {args.max_tokens}, {args.seconds:g} s per run")
    print(f"{'clients':>7} {'requests':>8} {'req/s':>9} {'tok/s':>9} {'ttft p50':>9} "
          f"{'ttft p99':>9} {'lat p50':>9} {'lat p99':>9} {'errors':>6} {'malformed':>9}")
    print(line(single))
    print(line(many))
    for s in (single, many):
        for p in s["problems"]:
            print(f"  problem ({s['clients']} clients): {p}")
    for s in (single, many):
        print(f"{s['clients']} client(s): {s['steps']} decode steps, mean "
              f"{s['row_steps'] / max(1, s['steps']):.1f} rows per step; {s['rows']} requests "
              f"joined in {s['batches']} prefills")
    print(f"tokens/s with {args.clients} clients / tokens/s with 1 client: "
          f"{many['tokens_per_s'] / single['tokens_per_s']:.2f}x "
          f"(times in ms; ttft = time to first token)")


if __name__ == "__main__":
    main()
