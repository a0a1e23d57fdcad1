"""Behaviour tests for the instruction task suite (scalelab/tasks)."""

import os
import random
import re
import subprocess
import sys

import pytest

from scalelab.data.world import OBJECTS, ONES, TENS, World, number_to_words, pair_half
from scalelab.tasks import (
    HELDOUT_TASKS,
    TASKS,
    TRAIN_TASKS,
    Example,
    default_world,
    make_examples,
    normalize,
)
from scalelab.tasks.core import render_options
from scalelab.tasks.families import WORDS


def examples(name: str, per: int = 8) -> list[Example]:
    """`per` examples for every (difficulty, template) of one family."""
    fam, rng = TASKS[name], random.Random(name)
    return [fam.make(rng, d, t) for d in range(1, fam.max_difficulty + 1)
            for t in range(len(fam.templates)) for _ in range(per)]


def perturbed(ex: Example) -> str:
    """A plausible but wrong response."""
    if ex.answer in ("yes", "no"):
        return "no" if ex.answer == "yes" else "yes"
    if ex.options:
        return next(o for o in ex.options if o != ex.answer)
    if ex.answer.isdigit():
        return str(int(ex.answer) + 1)
    if "," in ex.answer or " and " in ex.answer:  # a list: swap the first two items
        items = ex.answer.replace(" and ", ", ").split(", ")
        return ", ".join([items[1], items[0]] + items[2:])
    return ex.answer + "s"


def test_suite_shape():
    assert len(TASKS) >= 20
    assert 4 <= len(HELDOUT_TASKS) <= 6
    assert not set(TRAIN_TASKS) & set(HELDOUT_TASKS)
    assert set(TRAIN_TASKS) | set(HELDOUT_TASKS) == set(TASKS)
    for name, fam in TASKS.items():
        assert fam.name == name and fam.description
        assert len(fam.templates) >= 3 and fam.max_difficulty >= 1


def test_deterministic():
    a = make_examples(TRAIN_TASKS, 200, seed=0)
    assert a == make_examples(TRAIN_TASKS, 200, seed=0)
    assert a != make_examples(TRAIN_TASKS, 200, seed=1)
    assert make_examples(TRAIN_TASKS, 50, seed=0) == a[:50]  # prefix-stable
    assert [e.family for e in a[:len(TRAIN_TASKS)]] == list(TRAIN_TASKS)  # round-robin
    ex = TASKS["story"].make(random.Random(7), 2, 1)
    assert ex == TASKS["story"].make(random.Random(7), 2, 1)


def test_deterministic_across_processes():
    # per-example seeds are strings: random.Random hashes them with sha512, not hash()
    code = "from scalelab.tasks import *; print(make_examples(list(TASKS), 300, seed=0))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": h}, check=True).stdout
            for h in ("1", "2")}
    assert outs == {str(make_examples(list(TASKS), 300, seed=0)) + "\n"}


@pytest.mark.parametrize("name", list(TASKS))
def test_reference_scores_one_and_wrong_scores_zero(name):
    fam = TASKS[name]
    for ex in examples(name):
        assert ex.family == name and ex.answer and ex.prompt
        assert fam.score(ex, ex.answer) == 1.0, ex
        assert fam.score(ex, " " + ex.answer + ".\n") == 1.0, ex
        assert fam.score(ex, "zzz") == 0.0, ex
        assert fam.score(ex, "") == 0.0, ex
        assert fam.score(ex, perturbed(ex)) == 0.0, (ex, perturbed(ex))


@pytest.mark.parametrize("name", list(TASKS))
def test_prompts_short_and_templates_all_used(name):
    fam = TASKS[name]
    exs = make_examples([name], 300, seed=0)
    assert {e.template for e in exs} == set(range(len(fam.templates)))
    assert {e.difficulty for e in exs} == set(range(1, fam.max_difficulty + 1))
    for ex in exs + examples(name, 3):
        assert len(ex.prompt.split()) < 60, ex.prompt
        assert len(ex.answer.split()) <= 12, ex.answer
        assert "{" not in ex.prompt and "}" not in ex.prompt, ex.prompt
        assert bool(ex.options) == ("{options}" in fam.templates[ex.template])
        if ex.options:
            assert ex.answer in ex.options and len(set(ex.options)) == len(ex.options)


def test_addition_difficulty_is_digit_count():
    rng = random.Random(0)
    for d in range(1, 6):
        for _ in range(50):
            ex = TASKS["addition"].make(rng, d, 0)
            a, _, b, _ = ex.prompt.split()
            assert max(len(a), len(b)) == d
            assert int(ex.answer) == int(a) + int(b)


def test_facts_match_the_world():
    world = default_world()
    assert world == World.create(0)
    for ex in examples("fact_home", 5):
        question = ex.prompt.split("\n")[-1]  # after a 1-shot demo
        name = next(p.name for p in world.people if p.name in question.split())
        assert ex.answer == world.person(name).home
    other = World.create(5)
    ex = TASKS["fact_age"].make(random.Random(0), template=0, world=other)
    name = ex.prompt.split()[-1].rstrip("?")
    assert ex.answer == str(other.person(name).age)


def test_normalize_and_leniency():
    assert normalize(" 5198.\n") == "5198"
    assert normalize("\n  Oakford!\nmore text") == "oakford"
    assert normalize("A  Cat.") == "a cat"
    add = TASKS["addition"]
    ex = Example("addition", "4821 + 377 =", "5198", 0, 4)
    for ok in ["5198", " 5198.\n", "5198\nblah", "5,198"]:
        assert add.score(ex, ok) == 1.0, ok
    # by design the response must be the answer itself, not a sentence containing it
    for bad in ["The answer is 5198.", "5199", "51 98", "five thousand"]:
        assert add.score(ex, bad) == 0.0, bad
    pet = Example("fact_pet", "What pet does Mia have?", "a cat", 0, 1)
    assert all(TASKS["fact_pet"].score(pet, r) == 1.0 for r in ["cat", "A cat.", "the cat"])
    words = Example("number_to_words", "Write 145 in words.", "one hundred forty-five", 0, 3)
    assert TASKS["number_to_words"].score(words, "One hundred and forty five.") == 1.0
    srt = Example("sort_ascending", "Sort: 5, 3, 7", "3, 5, 7", 0, 1)
    for ok in ["3, 5, 7", "3,5,7", "3 5 7", "3, 5 and 7."]:
        assert TASKS["sort_ascending"].score(srt, ok) == 1.0, ok
    assert TASKS["sort_ascending"].score(srt, "7, 5, 3") == 0.0
    fmt = Example("list_format", "Join with 'and': cup, key, hat", "cup, key and hat", 0, 2)
    assert TASKS["list_format"].score(fmt, "Cup, key, and hat.") == 1.0
    assert TASKS["list_format"].score(fmt, "cup, key, hat") == 0.0
    yn = Example("fact_yesno", "Does Mia live in Oakford?", "yes", 0, 1)
    assert TASKS["fact_yesno"].score(yn, "Yes, she does.") == 1.0
    assert TASKS["fact_yesno"].score(yn, "no") == 0.0


def test_multiple_choice_accepts_letter_or_text():
    fam = TASKS["fact_home"]
    shot = next(i for i, t in enumerate(fam.templates) if "{options}" in t)
    ex = fam.make(random.Random(3), template=shot)
    assert len(ex.options) == 3 and "A) " in ex.prompt and "C) " in ex.prompt
    i = ex.options.index(ex.answer)
    letter, wrong = "ABC"[i], "ABC"[(i + 1) % 3]
    for ok in [ex.answer, letter, letter.lower(), f"({letter})", f"{letter})",
               f"{letter}) {ex.answer}"]:
        assert fam.score(ex, ok) == 1.0, ok
    for bad in [wrong, f"({wrong})", "E", ex.options[(i + 1) % 3]]:
        assert fam.score(ex, bad) == 0.0, bad


# ---- the held-out rule (families.py docstring): new wording, new skill x format ----------

SLOT_WORDS = {w.lower() for w in WORDS} | {o[1] for o in OBJECTS} | \
    set(ONES) | set(TENS[2:]) | {"hundred", "thousand"}


def shape(ex: Example) -> list[str]:
    """The prompt's words with names, numbers, number words and the option list replaced by
    one '#' per run: what is left is the instruction's own wording."""
    text = ex.prompt.replace(render_options(ex.options), " # ") if ex.options else ex.prompt
    out: list[str] = []
    for w in re.findall(r"[a-z]+|\d+", text.lower()):
        w = "#" if w.isdigit() or w in SLOT_WORDS else w
        if not (w == "#" and out and out[-1] == "#"):
            out.append(w)
    return out


def grams(words: list[str], n: int = 4) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def answer_formats(name: str) -> set[tuple[str, bool]]:
    fam = TASKS[name]
    return {(fam.kind, "{options}" in t) for t in fam.templates}


def test_heldout_wording_never_appears_in_training():
    trained = set().union(*(grams(shape(e)) for n in TRAIN_TASKS for e in examples(n, 4)))
    for name in HELDOUT_TASKS:
        for ex in examples(name, 4):
            shared = grams(shape(ex)) & trained
            assert not shared, f"{name} template {ex.template} reuses trained wording {shared}"


def test_heldout_skill_is_trained_but_never_in_its_format():
    for name in HELDOUT_TASKS:
        skill = TASKS[name].skill
        siblings = [t for t in TRAIN_TASKS if TASKS[t].skill == skill]
        assert siblings, f"{name}: its skill {skill!r} is not trained at all"
        trained = set().union(*(answer_formats(t) for t in siblings))
        assert not answer_formats(name) & trained, (name, siblings)


def test_heldout_rule_catches_the_old_split():
    """The checks above fail on what used to be held out: a mirror of a trained template
    (list_max beside list_min) and a trained format for a trained skill (facts with options)."""
    trained = set().union(*(grams(shape(e)) for e in examples("list_min", 4)))
    assert any(grams(shape(e)) & trained for e in examples("list_max", 4))
    options_fact = {("text", True)}
    assert options_fact & answer_formats("fact_home")
    assert TASKS["fact_home"].skill == TASKS["fact_yesno"].skill


def test_heldout_arithmetic_uses_unseen_operand_pairs():
    for ex in examples("addition_choice", 4):
        a, b = (int(x) for x in re.findall(r"\d+", ex.prompt.split("\n")[-1])[:2])
        assert pair_half(a, b) == "test" and int(ex.answer) == a + b
        assert ex.answer in ex.options and len(set(ex.options)) == 3
    words = {number_to_words(n): n for n in range(200)}
    for ex in examples("addition_words", 4):
        m = re.search(r"(?:Add|total when|^|\n)\s*([a-z-]+) (?:to|and|is added to) ([a-z-]+)",
                      ex.prompt.split("\n")[-1])
        x, y = words[m.group(1)], words[m.group(2)]
        assert pair_half(x, y) == "test" and words[ex.answer] == x + y


def test_one_shot_demo_differs_and_has_answer():
    fam = TASKS["addition"]
    shot = next(i for i, t in enumerate(fam.templates) if "{s_" in t)
    ex = fam.make(random.Random(0), difficulty=3, template=shot)
    demo, question = ex.prompt.split("\n")
    assert demo != question and "=" in demo and question.endswith("=")
    a, _, b, _, c = demo.split()
    assert int(a) + int(b) == int(c)


def test_demonstrations_and_the_gold_labelers_taste():
    """Some demonstrations end with a pleasantry: still correct by the task's scorer, but the
    gold labeler ranks the bare answer above it by more than the reward model's tie margin,
    and a correct chatty answer above a wrong bare one."""
    from scalelab.config import RewardConfig
    from scalelab.tasks.core import demonstration
    from scalelab.train.labelers import gold
    exs = make_examples(TRAIN_TASKS, 400, seed=3)
    rng = random.Random(0)
    demos = [demonstration(e, rng, 0.3) for e in exs]
    chatty = [(e, d) for e, d in zip(exs, demos) if d != e.answer]
    assert 0.2 < len(chatty) / len(exs) < 0.4
    assert all(demonstration(e, rng, 0.0) == e.answer for e in exs)
    margin = RewardConfig().min_margin
    for e, d in chatty:
        assert d.startswith(e.answer + "\n")
        assert TASKS[e.family].score(e, d) == 1.0
        assert gold(e, e.answer, True) - gold(e, d, True) > margin
        assert gold(e, d, True) - gold(e, perturbed(e), True) > margin
