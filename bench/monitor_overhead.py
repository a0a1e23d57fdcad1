"""What the run monitor costs: training throughput with `[monitor] enabled = true` (one host
sync of two scalars per step, plus the watchdog thread) against `enabled = false` (no sync
between logged steps), measured in the same process, alternating runs.

    python bench/monitor_overhead.py [--preset small] [--steps 60] [--rounds 2] [--cpu]

Random tokens (no data preparation): the shared loop, `fit`, runs `--steps` steps per run;
tokens/s is the median over logged intervals after the first, from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scalelab.config import load_config, resolve_config_path  # noqa: E402
from scalelab.hardware import pick_device  # noqa: E402
from scalelab.model import Transformer  # noqa: E402
from scalelab.train.loop import Run, fit  # noqa: E402


class RandomTokens:
    def __init__(self, vocab: int, batch: int, seq: int, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.batch, self.seq, self.i = vocab, batch, seq, 0

    def next_batch(self):
        self.i += 1
        x = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=self.g)
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def one_run(preset: str, steps: int, monitor: bool, device_name: str, sets: list[str]) -> float:
    cfg = load_config(resolve_config_path(preset), [
        f"train.max_steps={steps}", "train.log_every=10", f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}", "train.warmup_steps=5",
        f"train.device=\"{device_name}\"", f"monitor.enabled={str(monitor).lower()}",
        *sets])
    cfg.model.vocab_size = cfg.model.vocab_size or 1024
    device = pick_device(cfg.train.device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    tc, mc = cfg.train, model.cfg
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp) / "run", cfg, resume=False)
        fit(run, cfg, model, RandomTokens(mc.vocab_size, tc.batch_size, mc.seq_len), device,
            loss_fn, tokens_per_micro_batch=tc.batch_size * mc.seq_len,
            flops_per_token=model.flops_per_token())
        rows = [json.loads(x) for x in (run.out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="a tiny CPU smoke run")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    if args.steps < 20:  # rates come from the logged 10-step intervals after the first
        ap.error(f"--steps {args.steps}: at least 20 (tokens/s is the median of the "
                 "logged 10-step intervals after the first)")
    device = "cpu" if args.cpu else "auto"
    sets = args.set + (["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.seq_len=64",
                        "train.batch_size=8"] if args.cpu else [])
    results: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for on in (True, False):
            results[on].append(one_run(args.preset, args.steps, on, device, sets))
    on, off = statistics.median(results[True]), statistics.median(results[False])
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu \
        else "cpu"
    print(f"device {name}, preset {args.preset} {' '.join(sets)}, {args.steps} steps x "
          f"{args.rounds} rounds")
    print(f"monitor on : {on:,.0f} tokens/s  (runs: {[round(x) for x in results[True]]})")
    print(f"monitor off: {off:,.0f} tokens/s  (runs: {[round(x) for x in results[False]]})")
    print(f"ratio on/off: {on / off:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
