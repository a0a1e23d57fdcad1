"""Gold labelers: programmatic stand-ins for human raters.

A labeler scores one response to one task example: `(example, response, stopped) -> float`,
higher is better; `stopped` says whether the model ended its answer with EOS. Preferences
between two responses come from comparing scores. Bring your own with
`--set reward.labeler=my_module:my_function`.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable
from difflib import SequenceMatcher

from scalelab.config import RewardConfig, UserError

Labeler = Callable[[object, str, bool], float]


def gold(example, response: str, stopped: bool) -> float:
    """Correct first, then concise, then close to correct, then a clean stop: no single
    right answer, a ranking.

    correct answer          +1.0   (the task's own scorer, which reads the first line)
    closeness               +0.5 * character similarity of the first line to the reference
                                   answer (a nearly right answer beats a wildly wrong one)
    ended with EOS          +0.3   (a rambling answer that never stops is worse)
    each extra word         -0.1   beyond the reference answer's length, at most -0.5 (the
                                   raters dislike filler such as "I hope this helps!")
    """
    from scalelab.tasks import TASKS, normalize
    score = TASKS[example.family].score(example, response)
    score += 0.5 * SequenceMatcher(None, normalize(response), normalize(example.answer)).ratio()
    if stopped:
        score += 0.3
    extra = len(response.split()) - len(example.answer.split())
    return score - min(0.5, 0.1 * max(0, extra))


def get_labeler(spec: str) -> Labeler:
    if spec == "builtin:gold":
        return gold
    module, sep, name = spec.partition(":")
    if not sep:
        raise UserError(f"reward.labeler: expected builtin:gold or module:function, got {spec!r}")
    if "" not in sys.path and "." not in sys.path:  # the `scalelab` script leaves out the
        sys.path.insert(0, "")                       # working folder, where a user's module is
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward.labeler: cannot load {spec!r} ({e})") from None

    def checked(example, response: str, stopped: bool) -> float:
        value = fn(example, response, stopped)
        try:
            score = math.nan if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not math.isfinite(score):
            raise UserError(f"reward.labeler: {spec} returned {value!r} for the response "
                            f"{response[:60]!r}; it must return a finite number")
        return score
    return checked


def refuse_unused(spec: str, given: str, why: str) -> None:
    """reward.labeler set (to anything but the default) where nothing gets labelled is
    refused, exit 2 before any work: a user who names a labeler expects it to score."""
    if spec != RewardConfig.labeler:
        raise UserError(f"reward.labeler = {spec!r} has no effect with {given}: {why}; "
                        "drop reward.labeler")
