"""Task specs: what an experiment asks a model. Either a built-in family with a difficulty,

    builtin:addition?digits=3        '4821 + 377 =' -> ' 5198'   (1..5 digits)
    builtin:subtraction?digits=2     '83 - 27 =' -> ' 56'
    builtin:story?steps=3            a quantity-tracking story, 'Q: How many ... A:' -> ' 7'
    builtin:qa                       'Q: Where does Mia live? A:' -> ' Oakford'
    builtin:older                    multiple choice: 'Q: Who is older, Mia or Tom? A:'

(each also takes n= items, default 100, and seed=, default 0), or a JSONL file with rows
{"prompt", "target"} or {"prompt", "choices": [...], "answer": index}.

Addition and subtraction items use operand pairs the world corpus never shows as a sum or
difference line (the 'test' half, data/world.py), so passing them is generalisation; `seen=1`
asks pairs from the half the corpus does show instead, the memorisation control
(builtin:addition?digits=2&seen=1). The corpus' stories still state small sums and
differences ("Mia has 3 apples. Mia finds 4 apples. Now Mia has 7 apples."): for 1 digit,
all 100 addition items and 92 of 100 subtraction items occur so in 20000 documents.
The qa and older items are about the world's facts, which the corpus states: recall by
design.

The built-ins use the world corpus' own formats, so a model that was only pretrained can be
asked directly: no instruction tuning needed. For instruction-tuned models there is also

    tasks:FAMILY?difficulty=2        a scalelab.tasks family (e.g. tasks:addition), asked
                                     through the chat template and scored by the family's
                                     own lenient scorer (scalelab models only)
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from scalelab.config import UserError
from scalelab.data.formats import read_jsonl
from scalelab.data.world import (
    HALVES,
    OBJECTS,
    World,
    addition_problem,
    count_of,
    qa_pair,
    subtraction_problem,
)


@dataclass
class Item:
    prompt: str
    target: str = ""  # generation items
    choices: tuple[str, ...] = ()  # multiple-choice items
    answer: int = 0
    example: object = None  # a scalelab.tasks Example: chat prompt, scored by its family
    source: str = ""  # FILE:LINE of a JSONL item, for messages

    @property
    def is_choice(self) -> bool:
        return bool(self.choices)


def story_item(world: World, rng: random.Random, steps: int) -> Item:
    """A story of `steps` gains and losses with the running count hidden (the hard format)."""
    p, q = rng.sample(world.people, 2)
    obj = rng.choice(OBJECTS)
    n = rng.randint(0, 10)
    out = [f"{p.name} has {count_of(n, obj)}."]
    for _ in range(steps):
        take = n > 0 and rng.random() < 0.5
        k = rng.randint(1, n) if take else rng.randint(1, 9)
        if take:
            out.append(rng.choice([f"{p.name} gives {q.name} {count_of(k, obj)}.",
                                   f"{p.name} loses {count_of(k, obj)}."]))
        else:
            out.append(rng.choice([f"{q.name} gives {p.name} {count_of(k, obj)}.",
                                   f"{p.name} buys {count_of(k, obj)}.",
                                   f"{p.name} finds {count_of(k, obj)}."]))
        n += -k if take else k
    out.append(f"Q: How many {obj[1]} does {p.name} have? A:")
    return Item(" ".join(out), f" {n}")


def older_item(world: World, rng: random.Random) -> Item:
    a, b = rng.sample(world.people, 2)
    return Item(f"Q: Who is older, {a.name} or {b.name}? A:", choices=(f" {a.name}", f" {b.name}"),
                answer=0 if a.age > b.age else 1)


# family -> its parameters with their defaults (every family also takes n, seed and world)
BUILTINS = {
    "addition": {"digits": 3, "seen": 0},
    "subtraction": {"digits": 3, "seen": 0},
    "story": {"steps": 2},
    "qa": {},
    "older": {},
}
LIMITS = {"digits": (1, 5), "seen": (0, 1), "steps": (1, 8), "n": (1, 100000), "seed": (0, 2**31),
          "world": (0, 2**31)}


def query_pairs(spec: str, query: str) -> list[tuple[str, str]]:
    """key=value pairs of a spec's query; a key given twice is refused (which would win?)."""
    pairs = parse_qsl(query, keep_blank_values=True)
    twice = next((k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])), None)
    if twice is not None:
        raise UserError(f"task {spec!r}: {twice} given twice")
    return pairs


def parse_builtin(spec: str) -> tuple[str, dict[str, int]]:
    family, _, query = spec.removeprefix("builtin:").partition("?")
    if family not in BUILTINS:
        raise UserError(f"task {spec!r}: unknown built-in family {family!r} "
                        f"(known: {', '.join(BUILTINS)})")
    params = {**BUILTINS[family], "n": 100, "seed": 0, "world": 0}
    for key, raw in query_pairs(spec, query):
        if key not in params:
            raise UserError(f"task {spec!r}: unknown parameter {key!r} for builtin:{family} "
                            f"(known: {', '.join(params)})")
        lo, hi = LIMITS[key]
        if not raw.isdigit() or not lo <= int(raw) <= hi:
            raise UserError(f"task {spec!r}: {key} must be an integer in {lo}..{hi}")
        params[key] = int(raw)
    return family, params


def builtin_items(spec: str) -> list[Item]:
    family, p = parse_builtin(spec)
    world = World.create(p["world"])
    rng = random.Random(f"{family}/{p['seed']}")  # str seeds are stable across runs
    arithmetic = {"addition": addition_problem, "subtraction": subtraction_problem}
    items = []
    for _ in range(p["n"]):
        if family in arithmetic:
            q, a = arithmetic[family](rng, p["digits"], half=HALVES[1 - p["seen"]])
            items.append(Item(q, " " + a))
        elif family == "story":
            items.append(story_item(world, rng, p["steps"]))
        elif family == "qa":
            q, a = qa_pair(world, rng)
            items.append(Item(f"Q: {q} A:", " " + a))
        else:
            items.append(older_item(world, rng))
    return items


def jsonl_items(path: Path) -> list[Item]:
    """Items of a JSONL file. Whitespace that ends a prompt moves to the start of its target
    and choices (as lm-eval does): "A: " + "Paris" would be scored as the tokens " ", "P",
    ..., which a byte-level BPE never makes of "A: Paris" (" P..." is one piece)."""
    items = []
    for n, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str):
            raise UserError(f'{path}:{n}: expected an object with a "prompt" string')
        prompt = row["prompt"].rstrip()
        space = row["prompt"][len(prompt):]
        if "choices" in row:
            ch, ans = row["choices"], row.get("answer")
            if (not isinstance(ch, list) or len(ch) < 2
                    or not all(isinstance(c, str) and c for c in ch)):
                raise UserError(f'{path}:{n}: "choices" must be a list of 2+ non-empty strings')
            twice = next((c for i, c in enumerate(ch) if c in ch[:i]), None)
            if twice is not None:  # a tie that goes to the first: right by construction
                raise UserError(f'{path}:{n}: "choices" lists {twice!r} twice')
            if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(ch):
                raise UserError(f'{path}:{n}: "answer" must be an index into "choices"')
            items.append(Item(prompt, choices=tuple(space + c for c in ch), answer=ans,
                              source=f"{path}:{n}"))
        elif isinstance(row.get("target"), str) and row["target"]:
            items.append(Item(prompt, space + row["target"], source=f"{path}:{n}"))
        else:
            raise UserError(f'{path}:{n}: needs a non-empty "target" string or "choices"')
    if not items:
        raise UserError(f"{path}: no items")
    if len({it.is_choice for it in items}) > 1:
        raise UserError(f"{path}: mixes generation and multiple-choice items; use two files")
    return items


def suite_items(spec: str) -> list[Item]:
    """Instruction examples from the task suite (scalelab/tasks), one family, one difficulty."""
    from scalelab.tasks import TASKS
    family, _, query = spec.removeprefix("tasks:").partition("?")
    if family not in TASKS:
        raise UserError(f"task {spec!r}: unknown task family {family!r} "
                        f"(known: {', '.join(sorted(TASKS))})")
    fam = TASKS[family]
    params = {"difficulty": 1, "n": 100, "seed": 0}
    for key, raw in query_pairs(spec, query):
        if key not in params:
            raise UserError(f"task {spec!r}: unknown parameter {key!r} (known: "
                            f"{', '.join(params)})")
        if not raw.isdigit():
            raise UserError(f"task {spec!r}: {key} must be a non-negative integer")
        params[key] = int(raw)
    if not 1 <= params["difficulty"] <= fam.max_difficulty:
        raise UserError(f"task {spec!r}: difficulty must be in 1..{fam.max_difficulty}")
    for key in ("n", "seed"):  # the built-ins' limits (a huge n would run on for minutes)
        lo, hi = LIMITS[key]
        if not lo <= params[key] <= hi:
            raise UserError(f"task {spec!r}: {key} must be an integer in {lo}..{hi}")
    rng = random.Random(f"tasks/{family}/{params['seed']}")
    examples = [fam.make(rng, params["difficulty"]) for _ in range(params["n"])]
    return [Item(ex.prompt, ex.answer, example=ex) for ex in examples]


def load_items(spec: str) -> list[Item]:
    if spec.startswith("builtin:"):
        return builtin_items(spec)
    if spec.startswith("tasks:"):
        return suite_items(spec)
    return jsonl_items(Path(spec))


def is_choice_task(spec: str) -> bool:
    return load_items(spec)[0].is_choice


# The starter set: graded difficulty, so a ladder of sizes shows where each one turns.
STARTER = (
    [(f"addition-{d}d", f"builtin:addition?digits={d}", 0.8,
      f"{d}-digit addition, answer exactly right (operand pairs the corpus never shows)")
     for d in range(1, 6)]
    + [(f"subtraction-{d}d", f"builtin:subtraction?digits={d}", 0.8,
        f"{d}-digit subtraction (unseen operand pairs)") for d in (1, 2, 3)]
    + [(f"story-{s}step", f"builtin:story?steps={s}", 0.8,
        f"track a count through {s} hidden steps") for s in (1, 2, 4)]
    + [("fact-qa", "builtin:qa", 0.8,
        "recall facts about the world's people (memorisation: the corpus states them)"),
       ("older-mc", "builtin:older", 0.9,
        "who is older: multiple choice by log-likelihood (recall of the ages)")]
)
