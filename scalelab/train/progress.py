"""Training progress: a tqdm bar on a terminal; without one (a log file, a pipe, a CI job)
plain lines on stderr, at the first step, then every `every` seconds, and at the end."""

from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool = True,
                 every: float = 30.0):
        self.total, self.n, self.desc, self.every = total, initial, desc, every
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True) \
            if self.tty else None
        self.post: dict[str, str] = {}
        self.t0 = self.last = time.perf_counter()
        self.start, self.said = initial, initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.enabled and (self.said == self.start or now - self.last >= self.every):
            self._line(now)

    def goto(self, n: int) -> None:
        """Back to step n (after a rewind)."""
        self.n = n
        if self.bar is not None:
            self.bar.n = n
            self.bar.refresh()

    def set_postfix(self, post: dict) -> None:
        self.post = {k: str(v) for k, v in post.items()}
        if self.bar is not None:
            self.bar.set_postfix(post)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def _line(self, now: float) -> None:
        done = self.n - self.start
        rate = done / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        extra = "".join(f"  {k} {v}" for k, v in self.post.items())
        print(f"{self.desc}: step {self.n}/{self.total}{extra}  {now - self.t0:.0f}s elapsed, "
              f"~{eta:.0f}s left", file=sys.stderr, flush=True)
        self.last, self.said = now, self.n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.said != self.n:
            self._line(time.perf_counter())


def is_rank0() -> bool:
    """This process is rank 0 under torchrun (RANK: torchrun's), or the only one: the one
    that prints and holds the run folder. Usable before any process group exists (a mesh's
    Parallel.is_main says the same once it does)."""
    return os.environ.get("RANK", "0") == "0"


def say(text: str) -> None:
    """A note for the user (beside the progress bar), from rank 0 only: under torchrun every
    rank runs the same stage code and would print it once each."""
    if is_rank0():
        tqdm.write(text)
