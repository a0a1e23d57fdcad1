"""Behaviour tests for the built-in world corpus (scalelab/data/world.py)."""

import random
import re

import pytest

from scalelab.data.world import (
    DOC_KINDS,
    KIND_WEIGHTS,
    World,
    addition_problem,
    generate_documents,
    number_to_words,
    sample_document,
    subtraction_problem,
)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return generate_documents(2000, seed=0)


def test_deterministic_and_seed_dependent(docs):
    assert generate_documents(2000, seed=0) == docs
    other = generate_documents(2000, seed=1)
    assert other != docs
    assert World.create(0) == World.create(0)
    assert World.create(0) != World.create(1)


def test_prefix_stable(docs):
    assert generate_documents(37, seed=0) == docs[:37]


def test_lives_in_consistent_with_world(docs):
    world = World.create(0)
    names = {p.name for p in world.people}
    seen = 0
    for doc in docs:
        for name, place in re.findall(r"\b([A-Z][a-z]+) lives in ([A-Z][a-z]+)", doc):
            if name in names:
                assert world.person(name).home == place, doc
                seen += 1
    assert seen > 100


def test_other_facts_consistent(docs):
    world = World.create(0)
    text = "\n".join(docs)
    names = "|".join(p.name for p in world.people)
    n_checked = 0
    for name, age in re.findall(rf"\b({names}) is (\d+) years old", text):
        assert world.person(name).age == int(age)
        n_checked += 1
    for name, place in re.findall(rf"\b({names}) is at home in (\w+)", text):
        assert world.person(name).home == place
        n_checked += 1
    for name, colour in re.findall(rf"({names})'s favourite colour is (\w+)", text):
        assert world.person(name).colour == colour
        n_checked += 1
    for name, colour in re.findall(rf"What is ({names})'s favourite colour\? A: (\w+)", text):
        assert world.person(name).colour == colour
        n_checked += 1
    for a, b in re.findall(rf"\b({names}) is older than ({names})", text):
        assert world.person(a).age > world.person(b).age
        n_checked += 1
    for a, b in re.findall(rf"\b({names}) is younger than ({names})", text):
        assert world.person(a).age < world.person(b).age
        n_checked += 1
    for a, b, ans in re.findall(rf"Who is older, ({names}) or ({names})\? A: ({names})\.", text):
        assert ans == max(a, b, key=lambda n: world.person(n).age)
        n_checked += 1
    assert n_checked > 300


def test_arithmetic_correct(docs):
    text = "\n".join(docs)
    adds = re.findall(r"(\d+) \+ (\d+) = (\d+)", text)
    subs = re.findall(r"(\d+) - (\d+) = (\d+)", text)
    muls = re.findall(r"(\d+) \* (\d+) = (\d+)", text)
    assert len(adds) > 200 and len(subs) > 50 and len(muls) > 20
    assert all(int(a) + int(b) == int(c) for a, b, c in adds)
    assert all(int(a) - int(b) == int(c) for a, b, c in subs)
    assert all(int(a) * int(b) == int(c) for a, b, c in muls)
    # every addition digit count 1..5 shows up
    assert {max(len(a), len(b)) for a, b, _ in adds} == {1, 2, 3, 4, 5}


def test_stories_and_sorting_correct(docs):
    for doc in docs:
        for nums, out in re.findall(r"Numbers: ([\d, ]+)\. Sorted: ([\d, ]+)\.", doc):
            assert sorted(int(x) for x in nums.split(", ")) == [int(x) for x in out.split(", ")]
    # replay stories: every "Now X has N" and the final answer match a running count
    gain = r"(?:(\w+) gives (\w+)|(\w+) buys|(\w+) finds|(\w+) eats|(\w+) loses) (\d+) \w+\."
    for doc in docs:
        m = re.match(r"(?:\w+ is at home in \w+\. )?(\w+) has (\d+) \w+\. ", doc)
        if not m or "How many" not in doc and "Now" not in doc:
            continue
        who, n = m.group(1), int(m.group(2))
        for step in re.finditer(gain + r"|Now (\w+) has (\d+)|A: (\d+)\.", doc[m.end():]):
            g = step.groups()
            if g[0] is not None:  # X gives Y k
                n += int(g[6]) if g[1] == who else -int(g[6])
            elif g[2] or g[3]:
                n += int(g[6])
            elif g[4] or g[5]:
                n -= int(g[6])
            else:
                assert int(g[8] or g[9]) == n, doc
        assert n >= 0


def test_number_to_words():
    assert number_to_words(0) == "zero"
    assert number_to_words(13) == "thirteen"
    assert number_to_words(40) == "forty"
    assert number_to_words(99) == "ninety-nine"
    assert number_to_words(105) == "one hundred five"
    assert number_to_words(1000) == "one thousand"
    assert number_to_words(12345) == "twelve thousand three hundred forty-five"
    assert number_to_words(99999) == "ninety-nine thousand nine hundred ninety-nine"
    with pytest.raises(ValueError):
        number_to_words(100000)


@pytest.mark.parametrize("digits", [1, 2, 3, 4, 5])
def test_addition_problem_digits(digits):
    rng = random.Random(digits)
    for _ in range(200):
        q, ans = addition_problem(rng, digits)
        a, b = re.fullmatch(r"(\d+) \+ (\d+) =", q).groups()
        assert max(len(a), len(b)) == digits
        assert int(a) + int(b) == int(ans)
        q, ans = subtraction_problem(rng, digits)
        a, b = re.fullmatch(r"(\d+) - (\d+) =", q).groups()
        assert max(len(a), len(b)) == digits and int(a) - int(b) == int(ans) >= 0


def test_all_kinds_appear():
    rng, world = random.Random(0), World.create(0)
    kinds = {sample_document(world, rng)[0] for _ in range(2000)}
    assert kinds == set(DOC_KINDS) == set(KIND_WEIGHTS)


def test_facts_table():
    world = World.create(0)
    facts = world.facts()
    assert len(world.people) == 24 and len(facts) == 24 * 6
    mia = world.person("Mia")
    assert ("Mia", "home", mia.home) in facts and ("Mia", "age", str(mia.age)) in facts


def test_vocab_small_and_ascii():
    docs = generate_documents(5000, seed=3)
    words = set(re.findall(r"[A-Za-z]+", " ".join(docs)))
    assert len(words) < 800
    assert all(d.isascii() and d.strip() for d in docs)

