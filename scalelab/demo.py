"""`scalelab demo`: the whole pipeline on built-in data, with a report of what each stage did.

Each stage writes its own run directory under DIR; a stage whose model already exists is
skipped, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scalelab.config import PRESETS, load_config
from scalelab.generate import generate
from scalelab.train.checkpoint import list_checkpoints, load_model

PROMPTS = ["Mia lives in", "Tom has 5 apples. Tom eats 2 apples. Now Tom has",
           "12 + 7 =", "Q: Where does Leo live? A:", "Numbers: 8, 3, 5. Sorted:"]


def stage_done(run_dir: Path, max_steps: int) -> bool:
    ckpts = list_checkpoints(run_dir)
    return bool(ckpts) and ckpts[-1].name == f"step_{max_steps}"


def run_pretrain(out: Path, quick: bool) -> Path:
    from scalelab.train.pretrain import pretrain
    cfg = load_config(PRESETS / "tiny.toml")
    if quick:
        cfg.train.max_steps = 300
    run_dir = out / "pretrain"
    if not stage_done(run_dir, cfg.train.max_steps):
        pretrain(cfg, run_dir, resume=bool(list_checkpoints(run_dir)))
    return run_dir


def completions(model_dir: Path, prompts: list[str], max_new_tokens: int = 24) -> list[str]:
    model, tok = load_model(model_dir)
    outs = generate(model, [tok.encode(p, bos=True) for p in prompts], max_new_tokens,
                    tok.pad_id, tok.eos_id, temperature=0.0)
    return [tok.decode(o) for o in outs]


def run_demo(out: Path, quick: bool = False) -> None:
    t0 = time.time()
    pre = run_pretrain(out, quick)
    rows = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    answers = completions(pre / "model", PROMPTS)

    lines = ["# scalelab demo", "",
             f"Everything below was produced by `scalelab demo --out {out}"
             f"{' --quick' if quick else ''}` in {time.time() - t0:.0f} s.", "",
             "## Pretraining on the built-in world corpus", "",
             "| step | val loss (nats/token) | val bits/byte |", "|---|---|---|"]
    lines += [f"| {r['step']} | {r['val_loss']:.3f} | {r['val_bpb']:.3f} |" for r in evals]
    if speed:
        lines += ["", f"Median training speed: {sorted(speed)[len(speed) // 2]:,.0f} tokens/s."]
    lines += ["", "## Greedy completions of the pretrained model", "",
              "| prompt | completion |", "|---|---|"]
    lines += [f"| `{p}` | `{a.strip()}` |".replace("\n", " ") for p, a in zip(PROMPTS, answers)]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport written to {report}")
