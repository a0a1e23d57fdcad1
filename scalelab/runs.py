"""`scalelab runs list|show|watch`: what runs are doing, from their run folders alone.

Reads DIR/summary.json (written when a run ends), DIR/progress.json (each logged step),
DIR/metrics.jsonl and DIR/events.jsonl; nothing here writes anything.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

from scalelab.config import UserError, read_toml
from scalelab.io import read_json_if_any, read_rows
from scalelab.train.monitor import describe, read_events, read_record
from scalelab.train.rundir import run_stage

BLOCKS = "▁▂▃▄▅▆▇█"


def is_run(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists()
                                 for f in ("metrics.jsonl", "summary.json", "progress.json"))


def find_runs(dirs: list[str]) -> list[Path]:
    """Each DIR that is a run folder, else the run folders inside it (two levels down)."""
    found: list[Path] = []
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise UserError(f"{p}: no such folder")
        if is_run(p):
            found.append(p)
            continue
        found += sorted(q for q in p.glob("*") if is_run(q))
        found += sorted(q for q in p.glob("*/*") if is_run(q))
    return found


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # no pid recorded (os.kill(0, 0) would signal our own process group)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: another user's process, alive
        pass
    return True


def state(run_dir: Path) -> dict:
    """Everything `runs show` prints, as one dict."""
    rows = read_rows(run_dir / "metrics.jsonl")
    summary, progress = (read_record(run_dir / f"{name}.json")
                         for name in ("summary", "progress"))
    train = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    evals = [r for r in rows if "val_loss" in r]
    cfg = {}
    with contextlib.suppress(UserError):  # no config (yet), or not one we can read
        cfg = read_toml(run_dir / "config.toml")
    max_steps = cfg.get("train", {}).get("max_steps")
    lineage = read_json_if_any(run_dir / "lineage.json")
    last_at = max(float(x.get("time_unix", 0)) for x in (summary, progress))
    if not last_at and (run_dir / "metrics.jsonl").exists():
        last_at = (run_dir / "metrics.jsonl").stat().st_mtime
    step = train[-1]["step"] if train else 0
    ended = bool(summary) and summary.get("time_unix", 0) >= progress.get("time_unix", 0)
    # the newer record: a run going again (restarted, resumed) runs on beside an old summary
    src = summary if ended else progress
    if ended:
        status = summary.get("status", "?")
        step = summary.get("step", step)
    elif progress and pid_alive(int(progress.get("pid", 0) or 0)):
        status = "running"
    elif (run_dir / "model").is_dir() and max_steps and step >= max_steps:
        status = "finished"
    elif not progress and last_at and time.time() - last_at < 120:
        status = "running?"  # a run without the monitor's files, whose metrics just moved
    else:
        status = "dead (killed or crashed; resume with --resume)" if rows else "not started"
    last = train[-1] if train else {}
    total = src.get("time") or {}
    wall = sum(total.values())
    return {
        "dir": str(run_dir), "stage": lineage.get("stage", "pretrain" if cfg else "?"),
        "status": status, "step": step, "max_steps": max_steps,
        "loss": last.get("loss"), "val_loss": evals[-1]["val_loss"] if evals else None,
        "tokens_per_s": last.get("tokens_per_s") or src.get("tokens_per_s") or None,
        "episodes_per_s": last.get("episodes_per_s"),
        "mfu": src.get("mfu", last.get("mfu")),
        "goodput": src.get("goodput") or (total.get("train", 0) / wall if wall else None),
        "time": total, "since_progress_s": time.time() - last_at if last_at else None,
        "events": read_events(run_dir), "losses": [r["loss"] for r in train],
    }


def fmt(x, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) else str(x)


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n:
            return f"{seconds / n:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def sparkline(values: list[float], width: int = 60) -> str:
    vals = [v for v in values if v == v and abs(v) != float("inf")]
    if not vals:
        return ""
    if len(vals) > width:  # average into `width` buckets
        k = len(vals) / width
        vals = [sum(vals[int(i * k): int((i + 1) * k)]) / max(1, int((i + 1) * k) - int(i * k))
                for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(BLOCKS[min(7, int((v - lo) / span * 8))] for v in vals)


def show_text(s: dict, n_events: int = 10) -> str:
    steps = f"{s['step']}/{s['max_steps']}" if s["max_steps"] else str(s["step"])
    lines = [f"{s['dir']}  ({s['stage']})",
             f"  status      {s['status']}",
             f"  step        {steps}",
             f"  loss        {fmt(s['loss'])}   val_loss {fmt(s['val_loss'])}",
             f"  tokens/s    {fmt(s['tokens_per_s'], ',.0f')}" + (
                 f"   episodes/s {fmt(s['episodes_per_s'], '.3g')}"
                 if s["episodes_per_s"] else ""),
             f"  MFU         {fmt(s['mfu'], '.1%')}",
             f"  goodput     {fmt(s['goodput'], '.1%')}  (share of wall time in train steps)",
             f"  progress    {ago(s['since_progress_s'])}"]
    if s["time"]:
        wall = sum(s["time"].values()) or 1.0
        lines.append("  wall time   " + "  ".join(
            f"{k} {v / wall:.0%}" for k, v in s["time"].items() if v > 0) +
            f"  (of {wall:,.1f} s)")
    if s["losses"]:
        lines.append(f"  loss curve  {sparkline(s['losses'])}")
    events = s["events"]
    lines.append(f"  events      {len(events)}" + (":" if events else ""))
    for ev in events[max(0, len(events) - n_events):]:  # the latest n ([-0:] would be all)
        lines.append(f"    {describe(ev)}" + (f" -> {ev['action']}" if "action" in ev else ""))
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> None:
    runs = find_runs(args.dirs or (["runs"] if Path("runs").is_dir() else ["."]))
    if not runs:
        print("no runs found")
        return
    head = ("run", "stage", "status", "step", "loss", "tok/s", "goodput", "events", "progress")
    table = [head]
    for r in runs:
        s = state(r)
        steps = f"{s['step']}/{s['max_steps']}" if s["max_steps"] else str(s["step"])
        table.append((str(r), s["stage"], s["status"].split(" (")[0], steps, fmt(s["loss"]),
                      fmt(s["tokens_per_s"], ",.0f"), fmt(s["goodput"], ".0%"),
                      str(len(s["events"])), ago(s["since_progress_s"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_show(args: argparse.Namespace) -> None:
    if not is_run(Path(args.dir)):
        raise UserError(f"{args.dir}: not a run folder (no metrics.jsonl)")
    if args.events < 0:
        raise UserError(f"--events {args.events}: must be >= 0 (latest events to print)")
    print(show_text(state(Path(args.dir)), args.events))


def watch_view(s: dict):
    """One frame of `runs watch`: a rich renderable."""
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    steps = f"{s['step']}/{s['max_steps']}" if s["max_steps"] else str(s["step"])
    for k, v in (("status", s["status"]), ("step", steps),
                 ("loss", f"{fmt(s['loss'])}   val {fmt(s['val_loss'])}"),
                 ("tokens/s", fmt(s["tokens_per_s"], ",.0f")), ("MFU", fmt(s["mfu"], ".1%")),
                 ("goodput", fmt(s["goodput"], ".1%")),
                 ("progress", ago(s["since_progress_s"]))):
        grid.add_row(k, v)
    grid.add_row("loss curve", Text(sparkline(s["losses"], 70), style="cyan"))
    events = Table(title="events", show_edge=False, expand=True)
    events.add_column("what")
    for ev in s["events"][-8:]:
        events.add_row(describe(ev) + (f" -> {ev['action']}" if "action" in ev else ""))
    outer = Table.grid()
    outer.add_row(grid)
    outer.add_row(events)
    return Panel(outer, title=f"{s['dir']} ({s['stage']})")


def cmd_watch(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.live import Live

    run_dir = Path(args.dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such folder")
    if not is_run(run_dir) and run_stage(run_dir) is None:  # else "not started" forever
        raise UserError(f"{run_dir}: not a run folder (no run.json, metrics.jsonl or "
                        "summary.json): give the --out folder of a training command")
    if not args.interval > 0:
        raise UserError(f"--interval {args.interval:g}: must be > 0 (seconds between refreshes)")
    console = Console()
    if args.once:
        console.print(watch_view(state(run_dir)))
        return
    with Live(watch_view(state(run_dir)), console=console, refresh_per_second=4) as live:
        while True:
            s = state(run_dir)
            live.update(watch_view(s))
            if s["status"] not in ("running", "not started"):
                break
            time.sleep(args.interval)


def register(sub) -> None:
    r = sub.add_parser("runs", help="list, show or watch training runs (status, goodput, "
                                    "events)")
    rs = r.add_subparsers(dest="runs_command", required=True)
    p = rs.add_parser("list", help="the runs in these folders (default: runs/ or .)")
    p.add_argument("dirs", nargs="*", metavar="DIR")
    p.set_defaults(func=cmd_list)
    p = rs.add_parser("show", help="one run: status, step, loss, tokens/s, MFU, goodput, "
                                   "events, time since last progress")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--events", type=int, default=10, help="latest events to print")
    p.set_defaults(func=cmd_show)
    p = rs.add_parser("watch", help="a live view of one run (until it stops)")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="print one frame and leave")
    p.set_defaults(func=cmd_watch)
