"""`scalelab demo`: the whole pipeline on built-in data, and a report of what each stage did.

    world corpus -> tokenizer -> pretrain -> SFT on the training task families
      -> reward model on ranked samples of the SFT model -> PPO against it -> evaluation

Each stage writes its own run directory under DIR; a finished stage is skipped and an
interrupted one resumed, so rerunning the same command picks up where it stopped.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from scalelab.config import Config, UserError, load_config, resolve_config_path
from scalelab.io import (
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_json_if_any,
    read_rows,
)
from scalelab.train.monitor import read_record
from scalelab.train.rundir import check_folder, is_fresh, resume_or_restart

# Steps per stage. Quick: under 10 minutes on 2 CPU cores; full: well under 45. The full
# demo also runs PPO against the gold labeler itself ("oracle"): a perfect reward model,
# the ceiling for the learned one.
SCHEDULES = {
    "quick": {"pretrain": 600, "sft": 1000, "reward": 60, "ppo": 120, "oracle": 0},
    "full": {"pretrain": 3000, "sft": 2000, "reward": 60, "ppo": 200, "oracle": 200},
}
ORACLE = "PPO vs gold labeler"
STAGES = ("pretrain", "sft", "reward", "ppo", "ppo_gold")  # its run folders, in order
MARKER = "demo.json"  # makes a folder the demo's own: {"schedule": "quick" | "full"}
SHOWCASE = ["What is 23 plus 41?", "Numbers: 9, 2, 7. Sorted:", "Where does Mia live?",
            "Repeat after me: red apple", "Which is the largest number: 12, 45, 7?",
            "Write in digits: forty-two"]


def preset_config(preset: str, steps: int) -> Config:
    cfg = load_config(resolve_config_path(preset))
    cfg.train.max_steps = steps
    return cfg


def claim_folder(out: Path, schedule: str) -> None:
    """--out must be new, empty, or a demo folder (demo.json) of the same schedule. The demo
    resumes the stage folders inside, and removes one killed before its first checkpoint, so
    it takes over no other folder (one holding a `pretrain/` of the user's own); and a
    --quick folder continued as a full demo would splice two schedules into each model."""
    if not (out / MARKER).exists() and (out / "pretrain" / "run.json").is_file():
        raise UserError(f"--out {out}: holds a pretrain run but no {MARKER}: a demo from before "
                        f"2026-11-29, or a folder of yours; to go on with such a demo, write "
                        f'{out / MARKER} with {{"schedule": "quick"}} (or "full"), else choose a '
                        "new --out")
    check_folder(out, MARKER, "demo", mark=b'"schedule"')
    if is_fresh(out):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / MARKER, {"schedule": schedule}, indent=None)
        return
    was = read_json_if_any(out / MARKER).get("schedule")
    if was not in SCHEDULES:
        raise UserError(f"{out / MARKER}: schedule {was!r} is none of the demo's "
                        f"({', '.join(SCHEDULES)}); choose a new --out")
    if was != schedule:
        flag = " --quick" if was == "quick" else ""
        raise UserError(f"--out {out}: holds a demo run by `scalelab demo{flag}` ({out / MARKER}"
                        f" says schedule {was!r}); finish it with that command, or choose a "
                        "new --out")


def run_stage(run_dir: Path, cfg: Config, fn, *args) -> Path:
    """Run fn(cfg, *args, run_dir, resume) unless its final checkpoint already exists."""
    resume = resume_or_restart(run_dir, cfg.train.max_steps)
    if resume is None:
        tqdm.write(f"{run_dir.name}: already done, skipping")
    else:
        tqdm.write(f"== {run_dir.name} ==")
        fn(cfg, *args, run_dir, resume=resume)
    return run_dir / "model"


def read_metrics(run_dir: Path) -> list[dict]:
    return read_rows(run_dir / "metrics.jsonl")


def trained_prompts() -> set[str]:
    """Every task prompt a stage of the demo trains on: SFT's conversations (its held-out
    tenth too), the reward model's preference prompts, PPO's prompts (their seeds and
    counts come from the presets; the demo changes only step counts)."""
    from scalelab.train.ppo import load_prompts
    from scalelab.train.reward import preference_examples
    from scalelab.train.sft import task_conversations
    sft, rm, ppo = (load_config(resolve_config_path(p)) for p in ("sft", "reward", "ppo"))
    return ({e.prompt for e in task_conversations(sft.sft.n_examples, sft.sft.seed)[1]}
            | {e.prompt for e in preference_examples(rm.reward)}
            | set(load_prompts("builtin:tasks", ppo.ppo.n_prompts, ppo.ppo.seed)[0]))


def evaluation_sets() -> dict[str, list]:
    """The examples the demo evaluates on: 32 per held-in family and per held-out family
    (greedy accuracy), 1024 over the held-in families (sampled answers and the gold reward).
    Every prompt is new: none that a stage trained on (trained_prompts), none twice."""
    from scalelab.tasks import HELDOUT_TASKS, TRAIN_TASKS, unseen_examples
    trained = trained_prompts()
    return {"held_in": unseen_examples(TRAIN_TASKS, 32 * len(TRAIN_TASKS), 1001, trained),
            "held_out": unseen_examples(HELDOUT_TASKS, 32 * len(HELDOUT_TASKS), 1001, trained),
            "gold": unseen_examples(TRAIN_TASKS, 1024, 2002, trained)}


@torch.no_grad()
def evaluate_policies(models: dict[str, Path]) -> dict:
    """Task accuracy (greedy) on held-in and held-out families, and for sampled answers
    (temperature 1, as PPO samples) to held-in prompts: the mean gold reward and what it is
    made of (correct, said more than the answer, stopped), for each model; on the prompts of
    evaluation_sets."""
    from scalelab.evaluate import respond_ids, task_accuracy
    from scalelab.generate import stopped
    from scalelab.tasks import TASKS
    from scalelab.train.checkpoint import load_model
    from scalelab.train.labelers import gold
    sets = evaluation_sets()
    held_in, held_out, gold_prompts = sets["held_in"], sets["held_out"], sets["gold"]
    results = {}
    for name, path in models.items():
        model, tok = load_model(path)
        g = torch.Generator().manual_seed(0)
        sampled = respond_ids(model, tok, [e.prompt for e in gold_prompts], temperature=1.0,
                              generator=g)
        texts = [tok.decode(ids) for ids in sampled]
        ended = [stopped(ids, tok.eos_id) for ids in sampled]
        golds = [gold(e, t, st) for e, t, st in zip(gold_prompts, texts, ended)]
        greedy = respond_ids(model, tok, SHOWCASE)
        results[name] = {
            "held_in": task_accuracy(model, tok, held_in),
            "held_out": task_accuracy(model, tok, held_out),
            "gold_reward": statistics.fmean(golds),
            "gold_reward_se": statistics.stdev(golds) / len(golds) ** 0.5,
            "sampled_correct": statistics.fmean([TASKS[e.family].score(e, t)
                                     for e, t in zip(gold_prompts, texts)]),
            "sampled_extra_words": statistics.fmean([len(t.split()) > len(e.answer.split())
                                         for e, t in zip(gold_prompts, texts)]),
            "sampled_stopped": statistics.fmean(ended),
            "showcase": [tok.decode(ids) for ids in greedy],
        }
    return results


def plot(out: Path, pre: list[dict], sft: list[dict], ppo: list[dict], oracle: list[dict]
         ) -> list[str]:
    from scalelab.track.report import pyplot, save_figure
    plt = pyplot()

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for rows, name, ax in ((pre, "pretrain", axes[0]), (sft, "SFT", axes[1])):
        ax.plot(*series(rows, "loss"), label="train loss", alpha=0.6)
        ax.plot(*series(rows, "val_loss"), "o-", label="val loss")
        ax.set(title=f"{name} loss", xlabel="step", ylabel="nats / token")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "losses.png")
    plt.close(fig)

    def noisy(ax, rows, key, label):
        """Each step's value faint, a 10-step running mean on top: a step sees 32 answers."""
        x, y = series(rows, key)
        line, = ax.plot(x, y, alpha=0.25)
        mean = [statistics.fmean(y[max(0, i - 9): i + 1]) for i in range(len(y))]
        ax.plot(x, mean, color=line.get_color(), label=label)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    noisy(axes[0], ppo, "objective/scores", "proxy reward (reward model)")
    noisy(axes[0], ppo, "gold_reward", "gold reward (labeler)")
    if oracle:
        noisy(axes[0], oracle, "gold_reward", "gold reward, PPO against the labeler")
    axes[0].set(title="PPO: reward of sampled responses", xlabel="PPO step")
    axes[0].legend()
    noisy(axes[1], ppo, "objective/kl", "KL k1 (sum over tokens)")
    noisy(axes[1], ppo, "objective/kl_k3", "KL k3")
    axes[1].set(title="PPO: KL to the SFT reference", xlabel="PPO step")
    axes[1].legend()
    fig.tight_layout()
    save_figure(fig, out / "ppo.png")
    plt.close(fig)
    return ["losses.png", "ppo.png"]


def write_report(out: Path, command: str, seconds: float, results: dict, rm_stats: dict,
                 ppo_rows: list[dict], images: list[str]) -> str:
    names = list(results)
    # the steps (each logs its lr), not the monitor's event rows between them
    ppo_rows = [r for r in ppo_rows if "lr" in r]
    first, last = ppo_rows[: max(1, len(ppo_rows) // 10)], ppo_rows[-max(1, len(ppo_rows) // 10):]

    def avg(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    md = ["# scalelab demo", "",
          f"Produced by `{command}`; this invocation took {seconds / 60:.1f} minutes (stages "
          "finished by an earlier invocation are skipped). Every number below comes from this "
          "run directory.", "",
          "## Task accuracy (greedy answers, scored by each task's programmatic scorer)", "",
          "The prompts of this table and the next are new: no stage (SFT, reward model, PPO) "
          "trained on them, and none is asked twice.", "",
          "| model | held-in tasks (new prompts) | held-out tasks (never trained on) |",
          "|---|---|---|"]
    md += [f"| {n} | {results[n]['held_in']['mean']:.3f} | {results[n]['held_out']['mean']:.3f} |"
           for n in names]
    md += ["", "## Sampled answers (temperature 1, 1024 new prompts of the held-in tasks) and the "
           "gold labeler",
           "", "The gold labeler stands in for human raters: correct first, then no extra words "
           "(it dislikes pleasantries such as \"I hope this helps!\", which some demonstrations "
           "end with), then close to correct, then a clean stop.", "",
           "| model | gold reward (± standard error) | correct | said more than the answer "
           "| stopped |", "|---|---|---|---|---|"]
    md += [f"| {n} | {r['gold_reward']:.3f} ± {r['gold_reward_se']:.3f} | "
           f"{r['sampled_correct']:.3f} | {r['sampled_extra_words']:.3f} | "
           f"{r['sampled_stopped']:.3f} |" for n, r in results.items()]
    md += ["", f"Reward model: accuracy on held-out preference pairs "
           f"**{rm_stats['val_accuracy']:.3f}** (chance is 0.5).", "",
           f"PPO ({len(ppo_rows)} steps): proxy reward {avg(first, 'objective/scores'):.3f} -> "
           f"{avg(last, 'objective/scores'):.3f}, gold reward {avg(first, 'gold_reward'):.3f} -> "
           f"{avg(last, 'gold_reward'):.3f}, KL to the reference {avg(first, 'objective/kl'):.3f}"
           f" -> {avg(last, 'objective/kl'):.3f} nats per response (first vs last tenth of "
           "the steps).", ""]
    if ORACLE in results:
        md += [f"{ORACLE}: the same PPO with the gold labeler itself as the reward, a perfect "
               "reward model. The gap between it and PPO is what the learned reward model "
               "costs; its gain over SFT is what this PPO budget does with a perfect reward.", ""]
    md += ["## The same prompts, answered by each model", "",
           "| prompt | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for i, prompt in enumerate(SHOWCASE):
        cells = [results[n]["showcase"][i].strip().replace("\n", " ").replace("|", "/")
                 or "(nothing)" for n in names]
        md.append(f"| {prompt} | " + " | ".join(f"`{c}`" for c in cells) + " |")
    md += ["", "## Accuracy per task family", "",
           "| family | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for split in ("held_in", "held_out"):
        for fam in results[names[0]][split]:
            if fam != "mean":
                tag = " (held out)" if split == "held_out" else ""
                md.append(f"| {fam}{tag} | " + " | ".join(
                    f"{results[n][split][fam]:.2f}" for n in names) + " |")
    md += run_health(out)
    md += ["", "## Curves", ""] + [f"![{img}]({img})" for img in images]
    return "\n".join(md) + "\n"


def run_health(out: Path) -> list[str]:
    """Each stage's summary.json (the run monitor): how much of its wall time was training."""
    rows = []
    for summary in sorted(out.glob("*/summary.json"), key=lambda p: (
            STAGES.index(p.parent.name) if p.parent.name in STAGES else len(STAGES), p)):
        s = read_record(summary, needed=("status", "step", "wall_s"))
        mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "n/a"
        events = ", ".join(f"{k} {v}" for k, v in s.get("events", {}).items()) or "none"
        rows.append(f"| {summary.parent.name} | {s['status']} | {s['step']} | "
                    f"{s['wall_s']:.0f} s | {s.get('goodput') or 0:.0%} | {mfu} | {events} |")
    if not rows:
        return []
    return ["", "## Run health (scalelab runs show DIR)", "",
            "Goodput: the share of each stage's wall time spent in training steps (the rest: "
            "startup, data, evaluation, checkpoints, rewinds, restarts).", "",
            "| stage | status | steps | wall time | goodput | MFU | monitor events |",
            "|---|---|---|---|---|---|---|", *rows]


def markdown_to_html(md: str) -> str:
    """Just enough Markdown for this report: headings, tables, images, paragraphs."""
    import html
    body, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r) <= set("|-: ")]
            cells = [[html.escape(c.strip().strip("`")) for c in r.strip("|").split("|")]
                     for r in rows]
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>"
                                  for r in cells[1:]) + "</table>")
            table.clear()
    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1: -1]
            body.append(f'<img src="{html.escape(src)}" style="max-width:100%">')
        elif line.strip():
            text = html.escape(line).replace("**", "")
            body.append(f"<p>{text}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>scalelab demo</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def run_demo(out: Path, quick: bool = False) -> None:
    from scalelab.train.ppo import ppo
    from scalelab.train.pretrain import pretrain
    from scalelab.train.reward import train_reward
    from scalelab.train.sft import sft
    t0 = time.time()
    schedule = "quick" if quick else "full"
    claim_folder(out, schedule)
    steps = SCHEDULES[schedule]
    base = run_stage(out / "pretrain", preset_config("tiny", steps["pretrain"]), pretrain)
    sft_model = run_stage(out / "sft", preset_config("sft", steps["sft"]), sft, base,
                          "builtin:tasks")
    rm = run_stage(out / "reward", preset_config("reward", steps["reward"]), train_reward,
                   sft_model, "builtin:tasks")
    policy = run_stage(out / "ppo", preset_config("ppo", steps["ppo"]), ppo, sft_model, rm,
                       "builtin:tasks")
    models = {"pretrained": base, "SFT": sft_model, "PPO": policy}
    if steps["oracle"]:
        models[ORACLE] = run_stage(out / "ppo_gold", preset_config("ppo", steps["oracle"]),
                                   ppo, sft_model, "builtin:gold", "builtin:tasks")

    tqdm.write("== evaluation ==")
    results = evaluate_policies(models)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    ppo_rows = read_metrics(out / "ppo")
    oracle_rows = read_metrics(out / "ppo_gold") if steps["oracle"] else []
    images = plot(out, read_metrics(out / "pretrain"), read_metrics(out / "sft"), ppo_rows,
                  oracle_rows)
    command = f"scalelab demo --out {out}" + (" --quick" if quick else "")
    md = write_report(out, command, time.time() - t0, results, read_json(rm / "reward.json"),
                      ppo_rows, images)
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", markdown_to_html(md))
    print(md)
    print(f"report written to {out / 'report.html'} and {out / 'report.md'}")
