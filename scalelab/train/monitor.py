"""The run monitor: health checks, goodput accounting and a stall watchdog for the shared loop.

- Health: every step's loss and gradient norm are judged (non-finite, a loss spike above the
  running median by `spike_k` robust deviations, a gradient norm `grad_factor` x its median);
  `[monitor] policy` says what happens: stop, skip (drop the update) or rewind (back to the
  last checkpoint, past the data that led to the anomaly).
- Goodput: wall time split into train / data / eval / checkpoint / rewind / restart /
  startup, per logged interval (metrics.jsonl) and in total (DIR/summary.json).
- Stall: a watchdog thread that notices no step for `stall_factor` x the median step time
  (at least `stall_min_s`), dumps every thread's stack, logs the event and exits with code 1,
  so `torchrun --max-restarts=N` starts the run again; the restarted run resumes from the
  last checkpoint (TORCHELASTIC_RESTART_COUNT > 0; see cli.py).

Events go to DIR/events.jsonl (one JSON object per line) and metrics.jsonl (rows with
"event"); `monitor.on_event` runs a shell command with each event's JSON on stdin.
`monitor.inject` is for tests only: "nan@N" makes step N's loss NaN, "spike@N" poisons step
N's batch with random tokens, "stall@N" makes the loader sleep at step N. Injections fire
once, and never in a resumed or restarted process.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path

import torch

from scalelab.config import MonitorConfig, RunFailed, UserError
from scalelab.io import (
    append_row,
    atomic_write_json,
    atomic_write_text,
    read_json_if_any,
    read_rows,
    strict,
)
from scalelab.train.rundir import restart_count

PROCESS_START_UNIX = time.time()  # imported when a stage starts: the rest is "startup"
# Where the next stage's "startup" begins: the process start, then the end of the previous
# stage run in the same process (the demo and the sweep run several).
STAGE_ORIGIN = [time.monotonic()]
BUCKETS = ("train", "data", "eval", "checkpoint", "rewind", "restart", "startup")


def parse_inject(spec: str) -> dict[int, str]:
    """"nan@12,spike@20" -> {12: "nan", 20: "spike"} (config.py checked the form, as it
    checked every other [monitor] value)."""
    parts = (part.strip().partition("@") for part in spec.split(",") if part.strip())
    return {int(step): kind for kind, _, step in parts}


class Health:
    """Running statistics of healthy steps and the verdict on a new one."""

    def __init__(self, mc: MonitorConfig):
        self.mc = mc
        self.losses: deque[float] = deque(maxlen=mc.spike_window)
        self.norms: deque[float] = deque(maxlen=mc.spike_window)
        self.seen = 0  # healthy steps so far: a window shorter than min_history fills up

    def judge(self, loss: float, grad_norm: float) -> dict | None:
        """None when healthy (then the step joins the history), else what was seen."""
        mc = self.mc
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return {"event": "nonfinite", "loss": loss, "grad_norm": grad_norm}
        if self.seen >= mc.min_history and len(self.losses) >= 2:
            med = statistics.median(self.losses)
            mad = 1.4826 * statistics.median(abs(x - med) for x in self.losses)
            limit = med + max(mc.spike_k * mad, mc.spike_min_rise * abs(med))
            if mc.spike_k > 0 and loss > limit:
                return {"event": "spike", "loss": loss, "median": med, "limit": limit}
            gmed = statistics.median(self.norms)
            if mc.grad_factor > 0 and grad_norm > mc.grad_factor * gmed:
                return {"event": "grad_explosion", "grad_norm": grad_norm, "median": gmed,
                        "limit": mc.grad_factor * gmed}
        self.losses.append(loss)
        self.norms.append(grad_norm)
        self.seen += 1
        return None


class Watchdog(threading.Thread):
    """Fires `on_stall(waited_s, median_s)` when no beat came for stall_factor x the median
    step time (at least min_s). Paused while the loop evaluates or checkpoints."""

    def __init__(self, factor: float, min_s: float, on_stall):
        super().__init__(daemon=True, name="scalelab-watchdog")
        self.factor, self.min_s, self.on_stall = factor, min_s, on_stall
        self.steps: deque[float] = deque(maxlen=50)
        self.last, self.armed = time.monotonic(), False
        self.stop = threading.Event()

    def beat(self) -> None:
        now = time.monotonic()
        if self.armed:
            self.steps.append(now - self.last)
        self.last, self.armed = now, True

    def limit(self) -> float | None:
        if len(self.steps) < 3:  # the first steps (compile, warm caches) are not typical
            return None
        return max(self.min_s, self.factor * statistics.median(self.steps))

    def run(self) -> None:
        while not self.stop.is_set():
            limit = self.limit()
            self.stop.wait(0.05 if limit is None else max(0.01, limit / 50))
            if limit is None or not self.armed:
                continue
            waited = time.monotonic() - self.last
            if waited > limit:
                self.on_stall(waited, statistics.median(self.steps))
                return


class Monitor:
    """One per training process. `main` is False on ranks that write nothing."""

    def __init__(self, mc: MonitorConfig, out: Path, main: bool = True, resume: bool = False,
                 peak_flops: float = 0.0, flops_per_token: float = 0.0):
        self.mc, self.out, self.main = mc, out, main
        self.enabled = mc.enabled
        self.health = Health(mc)
        self.inject = {} if resume or restart_count() else parse_inject(mc.inject)
        self.peak_flops, self.flops_per_token = peak_flops, flops_per_token
        self.rewinds, self.lr_until, self.step, self.loss = 0, -1, 0, float("nan")
        self.tokens = 0  # tokens of steps that count (not undone by a rewind or a crash)
        self.interval_tokens = 0  # ... of them since the last logged row
        now = time.monotonic()
        self.total = dict.fromkeys(BUCKETS, 0.0)
        self.total["startup"] = now - STAGE_ORIGIN[0]
        self.interval = dict.fromkeys(BUCKETS, 0.0)
        self.mark, self.inside = now, None  # inside: the clock() bucket running now
        self.watchdog: Watchdog | None = None
        self.max_steps, self.started = 0, False
        self.tb = self.wb = None

    # ---- time ---------------------------------------------------------------------------

    def _bill(self, bucket: str, seconds: float) -> None:
        self.total[bucket] += seconds
        self.interval[bucket] += seconds

    def _bill_until_now(self) -> None:
        """The time since the last bill goes to the clock running now (a reading taken inside
        one, state_dict's in a checkpoint say, is that clock's time too), else to "train";
        before start(): loading, compiling, ... count as startup."""
        now = time.monotonic()
        self._bill(self.inside or ("train" if self.started else "startup"), now - self.mark)
        self.mark = now

    @contextlib.contextmanager
    def clock(self, bucket: str):
        """Bill the time inside to `bucket`; everything else in the loop is "train"."""
        self._bill_until_now()
        outer, self.inside = self.inside, bucket
        if self.watchdog is not None and bucket != "data":
            self.watchdog.armed = False
        try:
            yield
        finally:
            self._bill_until_now()
            self.inside = outer
            if self.watchdog is not None and bucket != "data":  # the step clock restarts
                self.watchdog.last, self.watchdog.armed = self.mark, True

    def interval_row(self) -> dict:
        """Shares of wall time since the last call, for a metrics row; starts a new interval."""
        self._bill_until_now()
        wall = max(1e-9, sum(self.interval.values()))
        row = {f"time/{k}": v / wall for k, v in self.interval.items() if v > 0}
        self.interval, self.interval_tokens = dict.fromkeys(BUCKETS, 0.0), 0
        return row

    def busy_seconds(self) -> float:
        """Train + data time of the current interval so far (what tokens/s is measured on)."""
        self._bill_until_now()
        return self.interval["train"] + self.interval["data"]

    def count_tokens(self, n: int) -> None:
        self.tokens += n
        self.interval_tokens += n

    def state_dict(self) -> dict:
        """Saved in each checkpoint: totals at that point, for goodput across restarts; and
        what the next steps depend on, so a resumed run judges and schedules as one that
        never stopped: the healthy history, the lowered-lr window after a rewind and the
        rewinds since the last checkpoint."""
        self._bill_until_now()
        return {"total": dict(self.total), "tokens": self.tokens, "lr_until": self.lr_until,
                "rewinds": self.rewinds, "losses": list(self.health.losses),
                "norms": list(self.health.norms), "seen": self.health.seen}

    def load_state_dict(self, state: dict | None, rewinding: bool = False) -> None:
        """Back at a checkpoint: the time spent since it was saved is lost work."""
        if not state:
            return
        self._bill_until_now()
        then = state["total"]
        if rewinding:  # the steps since the checkpoint were not useful after all
            for k in ("train", "data"):
                lost = max(0.0, self.total[k] - then.get(k, 0.0))
                self.total[k] -= lost
                self.total["rewind"] += lost
                unlogged = min(lost, self.interval[k])  # the row to come: its share and tokens/s
                self.interval[k] -= unlogged
                self.interval["rewind"] += unlogged
            self.interval_tokens = max(0, self.interval_tokens - self.tokens + state.get(
                "tokens", 0))
        else:  # a new process: the old one's time up to the checkpoint, then what it lost
            wall, at = self.previous_wall()
            lost = max(0.0, wall - sum(then.values()))
            if restart_count():
                lost += max(0.0, PROCESS_START_UNIX - at)  # torchrun's restart latency
            # (a manual --resume: the hours nobody ran it are not the run's time)
            mine = self.total["startup"]
            for k in BUCKETS:
                self.total[k] += then.get(k, 0.0)
            self.total["startup"] -= mine
            self.total["restart"] += mine + lost
            # (a rewind keeps its own: the history goes on, rewound() sets the lr window)
            self.lr_until, self.rewinds = state.get("lr_until", -1), state.get("rewinds", 0)
            self.health.losses.extend(state.get("losses", []))
            self.health.norms.extend(state.get("norms", []))
            self.health.seen = state.get("seen", len(self.health.losses))
        self.tokens = state.get("tokens", 0)

    def previous_wall(self) -> tuple[float, float]:
        """(wall time, unix time) the last attempt had reached when it last wrote
        progress.json or summary.json; (0, now) when neither can be read."""
        best = (0.0, PROCESS_START_UNIX)
        for name in ("progress.json", "summary.json"):
            try:
                rec = json.loads((self.out / name).read_text())
                wall, at = float(sum(rec["time"].values())), float(rec["time_unix"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            best = max(best, (wall, at))
        return best

    # ---- health -------------------------------------------------------------------------

    def check(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> dict | None:
        """The verdict on optimizer step `step` (one host sync); None when healthy."""
        if not self.enabled:
            return None
        loss_v, norm_v = torch.stack([loss.detach().float().reshape(()),
                                      grad_norm.detach().float().reshape(())]).tolist()
        seen = self.health.judge(loss_v, norm_v)
        return None if seen is None else {"step": step, **seen}

    def act(self, seen: dict, can_rewind: bool) -> str:
        """What to do about an anomaly: "skip" or "rewind" (stop raises RunFailed)."""
        policy = self.mc.policy
        if policy == "rewind" and not can_rewind:
            policy = "skip"
            seen.setdefault("note", "no checkpoint yet to rewind to: skipped the update")
        if policy == "rewind":
            self.rewinds += 1
            if self.rewinds > self.mc.max_rewinds:
                self.event({**seen, "action": "give_up"})
                self.finish("stopped", f"{describe(seen)}; too many rewinds")
                raise RunFailed(f"{describe(seen)} again after {self.mc.max_rewinds} rewinds "
                                "with no new checkpoint between them (monitor.max_rewinds); "
                                "giving up. Lower train.lr, raise train.warmup_steps or look "
                                "at the data around this step")
        if policy == "stop":
            self.event({**seen, "action": "stop"})
            self.finish("stopped", describe(seen))
            raise RunFailed(f"{describe(seen)} (monitor.policy = stop); "
                            "lower train.lr or set monitor.policy = \"rewind\"")
        return policy

    def checkpointed(self) -> None:
        """A new checkpoint is written: the run got past its last rewind, so rewinds count
        from zero again (max_rewinds gives up on a run stuck in a loop, not a long run
        with a few spikes far apart)."""
        self.rewinds = 0

    def rewound(self, seen: dict, to_step: int) -> dict:
        """Log the rewind; returns the metrics.jsonl row (at the step the run goes on from)."""
        if self.mc.rewind_lr_steps and self.mc.rewind_lr_factor != 1.0:
            self.lr_until = to_step + self.mc.rewind_lr_steps
        self.step = to_step
        self.event({**seen, "action": "rewind", "to_step": to_step,
                    "lr_factor": self.mc.rewind_lr_factor if self.lr_until > to_step else 1.0})
        return {"step": to_step, "event": seen["event"], "seen_step": seen["step"],
                "action": "rewind"}

    def skipped(self, seen: dict) -> dict:
        self.event({**seen, "action": "skip"})
        return {"step": seen["step"], "event": seen["event"], "action": "skip"}

    def lr_scale(self, step: int) -> float:
        return self.mc.rewind_lr_factor if step < self.lr_until else 1.0

    # ---- test-only fault injection ------------------------------------------------------

    def poison(self, step: int, batch: tuple) -> tuple:
        """spike@N: every token tensor of step N's batch becomes random tokens."""
        if self.inject.get(step) == "spike":
            return tuple(torch.randint_like(t, 0, int(t.max()) + 1)
                         if not t.is_floating_point() and t.numel() and t.min() >= 0 else t
                         for t in batch)
        return batch

    def corrupt(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """nan@N: step N's loss (and so its gradients) becomes NaN."""
        return loss * float("nan") if self.inject.get(step) == "nan" else loss

    def stall(self, step: int) -> None:
        """stall@N: the data loader sleeps at step N (until the watchdog ends the process)."""
        if self.inject.get(step) == "stall":
            del self.inject[step]
            time.sleep(3600)

    def step_done(self, step: int) -> None:
        """After each optimizer step's verdict: injections fire once; the watchdog beats."""
        if self.inject.get(step) in ("nan", "spike"):
            del self.inject[step]
        if self.watchdog is not None:
            self.watchdog.beat()
        self.step = step

    # ---- events, progress, summary ------------------------------------------------------

    def event(self, ev: dict) -> None:
        ev = {**{k: v if not isinstance(v, float) or math.isfinite(v) else str(v)
                 for k, v in ev.items()}, "time": time.time()}  # strict JSON: no NaN
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        append_row(self.out / "events.jsonl", ev)
        msg = f"monitor: {describe(ev)}" + (f" -> {ev['action']}" if "action" in ev else "")
        print(msg, file=sys.stderr, flush=True)
        self.notify(ev)

    def notify(self, ev: dict) -> None:
        if not self.mc.on_event:
            return
        try:
            subprocess.run(self.mc.on_event, shell=True, input=json.dumps(strict(ev)), text=True,
                           timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as e:  # a broken hook never stops a run
            print(f"monitor: on_event command failed: {e}", file=sys.stderr)

    def logged(self, row: dict) -> None:
        """A training row was logged: keep the numbers runs show reads (progress.json)."""
        self.loss = row.get("loss", self.loss)
        if self.main:
            atomic_write_json(self.out / "progress.json", self.progress(row), indent=1)
            self.mirror(row)

    def progress(self, row: dict | None = None) -> dict:
        self._bill_until_now()
        return {"step": self.step, "time_unix": time.time(), "pid": os.getpid(),
                "time": dict(self.total), "tokens": self.tokens, **(row or {})}

    def summary(self, status: str, message: str = "") -> dict:
        p = self.progress()
        wall = sum(self.total.values())
        busy = self.total["train"] + self.total["data"]
        out = {"status": status, "step": self.step, "max_steps": self.max_steps,
               "loss": self.loss, "tokens": self.tokens,
               "tokens_per_s": self.tokens / busy if busy else None,
               "goodput": self.total["train"] / wall if wall else None,
               "wall_s": wall, "time": p["time"], "time_unix": p["time_unix"],
               "events": count_events(self.out)}
        if self.peak_flops and self.flops_per_token and wall:
            out["mfu"] = self.flops_per_token * self.tokens / wall / self.peak_flops
            out["mfu_in_train_steps"] = (self.flops_per_token * self.tokens / busy /
                                         self.peak_flops) if busy else None
        if message:
            out["message"] = message
        return out

    def mirror(self, row: dict) -> None:
        """monitor.tensorboard / monitor.wandb: the numbers also go to DIR/tensorboard and to
        a W&B run (JSONL stays the truth). config.py made sure the packages are installed."""
        numbers = {k: v for k, v in row.items() if k != "step"
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.mc.tensorboard:
            if self.tb is None:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.mc.wandb:
            if self.wb is None:
                self.wb = start_wandb(self.out, self.mc.wandb_project)
            self.wb.log(numbers, step=row["step"])

    # ---- the whole run ------------------------------------------------------------------

    def on_stall(self, waited: float, median: float) -> None:
        """Watchdog thread: report, dump stacks, leave so a supervisor can restart us."""
        stacks = self.out / f"stacks-step{self.step}-pid{os.getpid()}.txt"
        with contextlib.suppress(OSError):
            with stacks.open("w") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        self.event({"event": "stall", "step": self.step, "waited_s": waited,
                    "median_step_s": median, "stacks": str(stacks), "action": "exit"})
        if self.main:  # every rank of a mesh stalls together: one writer, as for the rest
            with contextlib.suppress(Exception):
                atomic_write_json(self.out / "summary.json",
                                  self.summary("stalled", "no progress"), indent=1)
        sys.stderr.flush()
        os._exit(1)  # the main thread may be stuck in C code: leave without waiting for it

    def start(self, max_steps: int) -> None:
        """Before the first step: the first logged interval and the watchdog start."""
        self.max_steps = max_steps
        self._bill_until_now()
        self.interval = dict.fromkeys(BUCKETS, 0.0)
        self.started = True
        if self.mc.stall_factor > 0:
            self.watchdog = Watchdog(self.mc.stall_factor, self.mc.stall_min_s, self.on_stall)
            self.watchdog.start()

    def finish(self, status: str = "finished", message: str = "") -> None:
        """summary.json (a run that died without one crashed or was killed)."""
        if self.watchdog is not None:
            self.watchdog.stop.set()
        STAGE_ORIGIN[0] = time.monotonic()
        if self.main:
            summary = self.summary(status, message)
            atomic_write_json(self.out / "summary.json", summary, indent=1)
            self.notify({"event": status, "step": self.step, **summary})
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wb is not None:
            self.wb.finish()
            self.wb = None


def start_wandb(out: Path, project: str):
    """A W&B run named after the run folder; a resumed run continues the same W&B run (its
    id is kept in DIR/wandb-id.txt). W&B drops rows whose step it has already seen."""
    import wandb
    id_file = out / "wandb-id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else ""
    if not run_id:
        run_id = f"{out.resolve().name}-{os.urandom(4).hex()}"
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=project, name=out.resolve().name, id=run_id, resume="allow",
                      dir=str(out))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# What the readers of summary.json and progress.json compute with; other keys are not read.
RECORD_TYPES = {
    "status": ("a string", lambda v: isinstance(v, str)),
    **dict.fromkeys(("step", "max_steps", "tokens", "pid"), (
        "a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool))),
    **dict.fromkeys(("time_unix", "wall_s"), ("a number", _is_number)),
    **dict.fromkeys(("loss", "tokens_per_s", "goodput", "mfu"), (
        "a number or null", lambda v: v is None or _is_number(v))),
    "time": ("an object of numbers", lambda v: isinstance(v, dict) and all(
        _is_number(x) for x in v.values())),
    "events": ("an object of counts", lambda v: isinstance(v, dict) and all(
        isinstance(x, int) for x in v.values())),
}


def read_record(path: Path, needed: tuple[str, ...] = ()) -> dict:
    """DIR/summary.json or DIR/progress.json: {} when missing or torn (a run writes them as it
    goes); a key of the wrong type (a hand edit) or a `needed` key missing is a UserError."""
    record = read_json_if_any(path)
    for key in needed:
        if key not in record:
            raise UserError(f"{path}: no '{key}' (or not readable as a JSON object)")
    for key, (what, ok) in RECORD_TYPES.items():
        if key in record and not ok(record[key]):
            raise UserError(f"{path}: '{key}' must be {what}, got {record[key]!r}")
    return record


def read_events(run_dir: Path) -> list[dict]:
    return read_rows(run_dir / "events.jsonl")


def count_events(run_dir: Path) -> dict[str, int]:
    return dict(Counter(ev.get("event", "?") for ev in read_events(run_dir)))


def describe(ev: dict) -> str:
    kind = ev.get("event")
    if kind == "nonfinite":
        return f"step {ev['step']}: loss {ev['loss']}, grad norm {ev['grad_norm']} (non-finite)"
    if kind == "spike":
        return (f"step {ev['step']}: loss spike {ev['loss']:.4g} > {ev['limit']:.4g} "
                f"(running median {ev['median']:.4g})")
    if kind == "grad_explosion":
        return (f"step {ev['step']}: grad norm {ev['grad_norm']:.4g} > {ev['limit']:.4g} "
                f"(median {ev['median']:.4g})")
    if kind == "stall":
        return (f"stall after step {ev['step']}: no progress for {ev['waited_s']:.2f} s "
                f"(median step {ev['median_step_s']:.3f} s); stacks in {ev['stacks']}")
    if kind == "resumed":
        return f"resumed from the checkpoint at step {ev['step']} (restart {ev['restart']})"
    return json.dumps(ev)
