"""
The task machinery: Example, TaskFamily, normalize and the lenient scorers.

A TaskFamily owns a generator gen(world, rng, difficulty) -> (fields, answer, choices)
and a few str.format templates over those fields. Two placeholders are special:

  {options}   the choices rendered as "A) x B) y C) z"; the Example then carries them
  {s_...}     a 1-shot demonstration: a second instance drawn at difficulty 1, its fields
              prefixed with s_ ({s_a}, {s_answer}, {s_options}, ...)

Scoring compares normalize(response) with the reference answer by the family's kind:

  number  integer value ("5198", " 5198.\n", "5,198" pass; "The answer is 5198." fails:
          we score the response, not a sentence containing it)
  text    case-insensitive, a leading article ignored ("a cat" == "cat")
  words   number words, hyphens and "and" ignored ("forty five" == "forty-five")
  list    the sequence of items, split on commas, "and" and spaces ("3, 5 and 7" == "3 5 7")
  exact   the whole line, case-insensitive, whitespace collapsed (copying, list formatting)
  yesno   the first word is "yes" or "no" ("Yes, she does." passes)

With options, a letter ("B", "(b)", "b) 71") is also accepted, judged by the option it
names. Only the first line of a response counts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from scalelab.data.world import World

Fields = dict[str, str]
Instance = tuple[Fields, str, tuple[str, ...]]  # (template fields, answer, choices)
Generator = Callable[[World, random.Random, int], Instance]
KINDS = ("number", "text", "words", "list", "exact", "yesno")
LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Example:
    family: str
    prompt: str  # the user's instruction, may include a demonstration or options
    answer: str  # the reference response (what SFT trains on)
    template: int  # index into the family's templates
    difficulty: int
    options: tuple[str, ...] = ()  # the choices shown to the model (empty if none)


@lru_cache(maxsize=8)
def default_world(seed: int = 0) -> World:
    """The world the tasks ask about: the same as the corpus built with data seed `seed`."""
    return World.create(seed)


def render_options(choices: tuple[str, ...]) -> str:
    """('34', '71') -> 'A) 34 B) 71'"""
    return " ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(choices))


@dataclass(frozen=True)
class TaskFamily:
    name: str
    description: str
    templates: tuple[str, ...]
    max_difficulty: int
    generate: Generator
    kind: str = "text"
    skill: str = ""  # what is computed; families that share it differ only in format

    def make(self, rng: random.Random, difficulty: int | None = None,
             template: int | None = None, world: World | None = None) -> Example:
        """One seeded example. Difficulty and template are drawn from rng when None."""
        world = world or default_world()
        d = rng.randint(1, self.max_difficulty) if difficulty is None else difficulty
        if not 1 <= d <= self.max_difficulty:
            raise ValueError(f"{self.name}: difficulty {d} not in 1..{self.max_difficulty}")
        t = rng.randrange(len(self.templates)) if template is None else template
        fmt = self.templates[t]
        fields, answer, choices = self.generate(world, rng, d)
        fields = dict(fields)
        if "{s_" in fmt:  # 1-shot: a demonstration at difficulty 1, different from the question
            for _ in range(20):
                s_fields, s_answer, s_choices = self.generate(world, rng, 1)
                if s_fields != fields:
                    break
            fields |= {"s_" + k: v for k, v in s_fields.items()}
            fields |= {"s_answer": s_answer, "s_options": render_options(s_choices)}
        options = choices if "{options}" in fmt else ()
        fields["options"] = render_options(options)
        return Example(self.name, fmt.format(**fields), answer, t, d, tuple(options))

    def score(self, example: Example, response: str) -> float:
        """1.0 if the response matches the reference answer (leniently), else 0.0."""
        r = normalize(response)
        if example.options:
            m = re.fullmatch(r"\(?([a-h])\)(?:\s+.*)?|([a-h])", r)
            if m:
                i = LETTERS.lower().index(m.group(1) or m.group(2))
                ok = i < len(example.options) and same(self.kind, example.options[i],
                                                       example.answer)
                return float(ok)
        return float(same(self.kind, r, example.answer))


# Human demonstrators differ in habits: some end an answer with a pleasantry on a second
# line. Scoring reads only the first line, so these are still correct answers; the gold
# labeler (train/labelers.py) prefers them without the filler. SFT imitates the writers,
# RLHF can learn the raters' taste: see docs/posttraining.md.
PLEASANTRIES = ("I hope this helps!", "Let me know if you need anything else.",
                "Happy to help with more questions.", "Is there anything else I can do?")


def demonstration(example: Example, rng: random.Random, chatty_fraction: float) -> str:
    """The response a demonstrator writes: the reference answer, and with probability
    chatty_fraction a pleasantry on a second line."""
    if rng.random() < chatty_fraction:
        return f"{example.answer}\n{rng.choice(PLEASANTRIES)}"
    return example.answer


# -----------------------------------------------------------------------------
# normalisation and comparison

def normalize(response: str) -> str:
    """First non-empty line, stripped, trailing punctuation removed, lowercased,
    whitespace collapsed: ' 5198.\\n' -> '5198'."""
    line = response.strip().split("\n")[0]
    return " ".join(line.strip().rstrip(".!?,;:").lower().split())


def _int(s: str) -> int | None:
    s = s.strip()
    if re.fullmatch(r"\d{1,3}(,\d{3})+", s):
        s = s.replace(",", "")
    return int(s) if re.fullmatch(r"-?\d+", s) else None


def _drop_article(s: str) -> str:
    return re.sub(r"^(a|an|the) ", "", s)


def _number_words(s: str) -> list[str]:
    return [w for w in s.replace("-", " ").split() if w != "and"]


def _items(s: str) -> list[str]:
    return [w for w in re.split(r"[,\s]+", s) if w and w != "and"]


def same(kind: str, response: str, answer: str) -> bool:
    """Does `response` match `answer` for this kind of task? Both get normalized."""
    r, a = normalize(response), normalize(answer)
    if kind == "number":
        x = _int(r)
        return x is not None and x == _int(a)
    if kind == "text":
        return _drop_article(r) == _drop_article(a)
    if kind == "words":
        return _number_words(r) == _number_words(a)
    if kind == "list":
        return _items(r) == _items(a)
    if kind == "exact":
        return r.replace(", and ", " and ") == a
    if kind == "yesno":
        return r.split(" ")[0].strip(",.!") == a
    raise ValueError(f"unknown task kind {kind!r} (known: {KINDS})")
