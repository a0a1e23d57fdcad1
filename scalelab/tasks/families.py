"""
The task families: generators and templates over the built-in world.

Every generator is gen(world, rng, difficulty) -> (fields, answer, choices); the
templates are plain instructions, questions, corpus-style completions, an options
variant where choices make sense, and a 1-shot variant (see core.py).

Held-out split: the rule. A held-out family is a new instruction, a combination of skill
and answer format that no trained template shows:
  1. its skill (TaskFamily.skill: what is computed) is trained, but never in its answer
     format (the scorer's kind, and whether options are shown);
  2. its wording is new: no word 4-gram of a held-out prompt (names, numbers and the
     option list replaced by a slot) occurs in any trained prompt.
tests/test_tasks.py checks both on generated prompts, so a template that borrows trained
wording or format fails the suite. The five held-out families:

  held out         skill (trained as)                 new format
  fact_yesno       fact recall (fact_*: the value)    yes/no: "Is red the favourite colour of Mia?"
  older_yesno      ages (compare_ages: a name)        yes/no: "Is Mia older than Tom?"
  addition_choice  addition (addition: a number)      pick from options
  addition_words   addition (addition: digits)        operands and answer in words
  words_to_number  number words (number_to_words)     the other direction, digits out

The corpus has each skill (facts, "Mia is older than Tom.", worksheets, "forty plus two is
forty-two", "In words, 45 is ..."), never yes/no answers. The held-out arithmetic draws
its operand pairs from the 'test' half (data/world.py), which no corpus arithmetic line
shows (its stories do state small sums: see track/specs.py).
The mirrored families (sort_descending, list_max, last_item), held out before this rule,
now train: a mirror of a trained template is trained wording with one word swapped.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from scalelab.data.world import (
    COLOURS,
    FEMALE,
    JOBS,
    MALE,
    OBJECTS,
    PET_NAMES,
    PETS,
    PLACES,
    Person,
    World,
    addition_problem,
    article,
    count_of,
    join_and,
    multiplication_problem,
    number_to_words,
    random_number,
    small_pair,
    subtraction_problem,
)
from scalelab.tasks.core import Example, Generator, Instance, TaskFamily

TASKS: dict[str, TaskFamily] = {}


def task(name: str, description: str, templates: Sequence[str], max_difficulty: int = 1,
         kind: str = "text", skill: str = "") -> Callable[[Generator], Generator]:
    """Decorator: register a generator as a TaskFamily in TASKS (skill defaults to name)."""
    def register(gen: Generator) -> Generator:
        TASKS[name] = TaskFamily(name, description, tuple(templates), max_difficulty, gen, kind,
                                 skill or name)
        return gen
    return register


def _with_choices(rng: random.Random, answer: str, pool: Sequence[str], n: int = 3
                  ) -> tuple[str, ...]:
    """The answer plus n-1 distinct distractors from pool, shuffled."""
    others = sorted({x for x in pool if x != answer})
    choices = [answer] + rng.sample(others, n - 1)
    rng.shuffle(choices)
    return tuple(choices)


def _nums(xs: Sequence[int]) -> str:
    return ", ".join(map(str, xs))


def _things(rng: random.Random, k: int) -> list[str]:
    return [o[0] for o in rng.sample(OBJECTS, k)]


# -----------------------------------------------------------------------------
# arithmetic. difficulty = digit count of the larger operand (1..5)

@task("addition", "add two numbers of up to `difficulty` digits", [
    "{a} + {b} =",
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Q: What is {a} + {b}? A:",
    "{s_a} + {s_b} = {s_answer}\n{a} + {b} =",
], max_difficulty=5, kind="number")
def gen_addition(world: World, rng: random.Random, d: int) -> Instance:
    q, ans = addition_problem(rng, d)
    a, _, b, _ = q.split()
    return {"a": a, "b": b}, ans, ()


@task("subtraction", "subtract a smaller number from a larger one (up to 5 digits)", [
    "{a} - {b} =",
    "What is {a} minus {b}?",
    "Subtract {b} from {a}.",
    "Q: What is {a} - {b}? A:",
    "{s_a} - {s_b} = {s_answer}\n{a} - {b} =",
], max_difficulty=5, kind="number")
def gen_subtraction(world: World, rng: random.Random, d: int) -> Instance:
    q, ans = subtraction_problem(rng, d)
    a, _, b, _ = q.split()
    return {"a": a, "b": b}, ans, ()


@task("multiplication", "times tables up to 5, 9 or 12 (difficulty 1..3)", [
    "{a} * {b} =",
    "What is {a} times {b}?",
    "Multiply {a} by {b}.",
    "{s_a} * {s_b} = {s_answer}\n{a} * {b} =",
], max_difficulty=3, kind="number")
def gen_multiplication(world: World, rng: random.Random, d: int) -> Instance:
    q, ans = multiplication_problem(rng, (5, 9, 12)[d - 1])
    a, _, b, _ = q.split()
    return {"a": a, "b": b}, ans, ()


# -----------------------------------------------------------------------------
# numbers

@task("compare_numbers", "which of two numbers is bigger (difficulty = digits 1..4)", [
    "Which is bigger, {a} or {b}?",
    "Which number is larger: {a} or {b}?",
    "Q: Which is greater, {a} or {b}? A:",
    "Which number is bigger? {options}",
    "Q: Which is bigger, {s_a} or {s_b}? A: {s_answer}\nQ: Which is bigger, {a} or {b}? A:",
], max_difficulty=4)
def gen_compare_numbers(world: World, rng: random.Random, d: int) -> Instance:
    a = b = random_number(rng, d)
    while b == a:
        b = random_number(rng, rng.randint(1, d))
    a, b = (a, b) if rng.random() < 0.5 else (b, a)
    return {"a": str(a), "b": str(b)}, str(max(a, b)), (str(a), str(b))


@task("next_number", "the number after n (difficulty = digits 1..4)", [
    "What number comes after {n}?",
    "What is the next number after {n}?",
    "The number after {n} is",
    "What is one more than {n}?",
    "The number after {s_n} is {s_answer}. The number after {n} is",
], max_difficulty=4, kind="number")
def gen_next_number(world: World, rng: random.Random, d: int) -> Instance:
    n = random_number(rng, d)
    return {"n": str(n)}, str(n + 1), ()


@task("previous_number", "the number before n (difficulty = digits 1..4)", [
    "What number comes before {n}?",
    "What is one less than {n}?",
    "The number before {n} is",
    "The number before {s_n} is {s_answer}. The number before {n} is",
], max_difficulty=4, kind="number")
def gen_previous_number(world: World, rng: random.Random, d: int) -> Instance:
    n = max(1, random_number(rng, d))
    return {"n": str(n)}, str(n - 1), ()


@task("number_to_words", "write a number in English words (difficulty = digits 1..5)", [
    "Write {n} in words.",
    "How do you say {n} in words?",
    "In words, {n} is",
    "In words, {s_n} is {s_answer}.\nIn words, {n} is",
], max_difficulty=5, kind="words")
def gen_number_to_words(world: World, rng: random.Random, d: int) -> Instance:
    n = random_number(rng, d)
    return {"n": str(n)}, number_to_words(n), ()


@task("words_to_number", "write a number given in words as digits (difficulty = digits 1..5)", [
    "Write {w} as a number.",
    "What number is {w}?",
    "Write in digits: {w}",
    "{s_w} in digits is {s_answer}.\n{w} in digits is",
], max_difficulty=5, kind="number", skill="number_to_words")
def gen_words_to_number(world: World, rng: random.Random, d: int) -> Instance:
    n = random_number(rng, d)
    return {"w": number_to_words(n)}, str(n), ()


# -----------------------------------------------------------------------------
# lists of numbers: difficulty d means d + 2 distinct numbers below 100

def _number_list(rng: random.Random, d: int) -> list[int]:
    return rng.sample(range(100), d + 2)


@task("sort_ascending", "sort numbers from smallest to largest (3..6 numbers)", [
    "Sort from smallest to largest: {nums}",
    "Put these numbers in order, smallest first: {nums}",
    "Numbers: {nums}. Sorted:",
    "Numbers: {s_nums}. Sorted: {s_answer}\nNumbers: {nums}. Sorted:",
], max_difficulty=4, kind="list")
def gen_sort_ascending(world: World, rng: random.Random, d: int) -> Instance:
    xs = _number_list(rng, d)
    return {"nums": _nums(xs)}, _nums(sorted(xs)), ()


@task("sort_descending", "sort numbers from largest to smallest (3..6 numbers)", [
    "Sort from largest to smallest: {nums}",
    "Put these numbers in order, largest first: {nums}",
    "Numbers: {nums}. Sorted from largest:",
    "Numbers: {s_nums}. Sorted from largest: {s_answer}\nNumbers: {nums}. Sorted from largest:",
], max_difficulty=4, kind="list")
def gen_sort_descending(world: World, rng: random.Random, d: int) -> Instance:
    xs = _number_list(rng, d)
    return {"nums": _nums(xs)}, _nums(sorted(xs, reverse=True)), ()


@task("list_min", "the smallest number in a list (3..6 numbers)", [
    "What is the smallest number in {nums}?",
    "Find the minimum: {nums}",
    "The smallest of {nums_and} is",
    "Which is the smallest? {options}",
    "The smallest of {s_nums_and} is {s_answer}.\nThe smallest of {nums_and} is",
], max_difficulty=4, kind="number")
def gen_list_min(world: World, rng: random.Random, d: int) -> Instance:
    xs = _number_list(rng, d)
    fields = {"nums": _nums(xs), "nums_and": join_and([str(x) for x in xs])}
    return fields, str(min(xs)), tuple(map(str, xs))


@task("list_max", "the largest number in a list (3..6 numbers)", [
    "What is the largest number in {nums}?",
    "Find the maximum: {nums}",
    "The largest of {nums_and} is",
    "Which is the largest? {options}",
    "The largest of {s_nums_and} is {s_answer}.\nThe largest of {nums_and} is",
], max_difficulty=4, kind="number")
def gen_list_max(world: World, rng: random.Random, d: int) -> Instance:
    xs = _number_list(rng, d)
    fields = {"nums": _nums(xs), "nums_and": join_and([str(x) for x in xs])}
    return fields, str(max(xs)), tuple(map(str, xs))


# -----------------------------------------------------------------------------
# lists of words

@task("count_items", "count the items in a list (2-4, 5-7 or 8-10 items)", [
    "How many items are in this list: {items}?",
    "Count the things: {items}",
    "{items}. How many things is that?",
    "Q: How many items: {s_items}? A: {s_answer}\nQ: How many items: {items}? A:",
], max_difficulty=3, kind="number")
def gen_count_items(world: World, rng: random.Random, d: int) -> Instance:
    xs = _things(rng, rng.randint(3 * d - 1, 3 * d + 1))
    return {"items": ", ".join(xs)}, str(len(xs)), ()


@task("reverse_list", "reverse a list of words (2..5 words)", [
    "Reverse the list: {items}",
    "Write these in reverse order: {items}",
    "List these from last to first: {items}",
    "Reverse: {s_items} -> {s_answer}\nReverse: {items} ->",
], max_difficulty=4, kind="list")
def gen_reverse_list(world: World, rng: random.Random, d: int) -> Instance:
    xs = _things(rng, d + 1)
    return {"items": ", ".join(xs)}, ", ".join(reversed(xs)), ()


@task("first_item", "the first item of a list (2..6 items)", [
    "What is the first item in this list: {items}?",
    "Name the first thing: {items}",
    "{items}. Which comes first?",
    "Q: First of {s_items}? A: {s_answer}\nQ: First of {items}? A:",
], max_difficulty=5)
def gen_first_item(world: World, rng: random.Random, d: int) -> Instance:
    xs = _things(rng, d + 1)
    return {"items": ", ".join(xs)}, xs[0], ()


@task("last_item", "the last item of a list (2..6 items)", [
    "What is the last item in this list: {items}?",
    "Name the last thing: {items}",
    "{items}. Which comes last?",
    "Q: Last of {s_items}? A: {s_answer}\nQ: Last of {items}? A:",
], max_difficulty=5)
def gen_last_item(world: World, rng: random.Random, d: int) -> Instance:
    xs = _things(rng, d + 1)
    return {"items": ", ".join(xs)}, xs[-1], ()


@task("list_format", "rewrite a comma list as 'a, b and c' (2..5 items)", [
    "Join with 'and': {items}",
    "Rewrite with 'and' before the last item: {items}",
    "Write this list as a phrase: {items}",
    "{s_items} -> {s_answer}\n{items} ->",
], max_difficulty=4, kind="exact")
def gen_list_format(world: World, rng: random.Random, d: int) -> Instance:
    xs = _things(rng, d + 1)
    return {"items": ", ".join(xs)}, join_and(xs), ()


WORDS = sorted({w for w in PLACES + FEMALE + MALE + COLOURS + PETS + JOBS
                + [o[0] for o in OBJECTS] if len(w) >= 3})


@task("copy", "repeat a phrase of 1..4 world words exactly", [
    "Repeat after me: {text}",
    "Copy this: {text}",
    "Write the following exactly: {text}",
    "Copy: {s_text} -> {s_answer}\nCopy: {text} ->",
], max_difficulty=4, kind="exact")
def gen_copy(world: World, rng: random.Random, d: int) -> Instance:
    text = " ".join(rng.sample(WORDS, d))
    return {"text": text}, text, ()


@task("unscramble", "unscramble a world word (3-4, 5-6 or 7+ letters)", [
    "Unscramble the letters: {letters}",
    "What word do the letters {spaced} spell?",
    "Rearrange {letters} into a word.",
    "Unscramble: {s_letters} -> {s_answer}\nUnscramble: {letters} ->",
], max_difficulty=3)
def gen_unscramble(world: World, rng: random.Random, d: int) -> Instance:
    lo, hi = ((3, 4), (5, 6), (7, 99))[d - 1]
    word = rng.choice([w for w in WORDS if lo <= len(w) <= hi])
    letters = list(word.lower())
    while "".join(letters) == word.lower():  # every word has at least two distinct letters
        rng.shuffle(letters)
    return {"letters": "".join(letters), "spaced": " ".join(letters)}, word, ()


# -----------------------------------------------------------------------------
# people: compare ages, look up facts, yes/no and multiple choice

@task("compare_ages", "who is older; ages given (difficulty 1) or recalled (2)", [
    "{context}Who is older, {a} or {b}?",
    "{context}Q: Which person is older, {a} or {b}? A:",
    "{context}Tell me who is older: {a} or {b}.",
    "{context}Who is older? {options}",
    "{s_context}Q: Who is older, {s_a} or {s_b}? A: {s_answer}\n"
    "{context}Q: Who is older, {a} or {b}? A:",
], max_difficulty=2, skill="compare_ages")
def gen_compare_ages(world: World, rng: random.Random, d: int) -> Instance:
    p, q = rng.sample(world.people, 2)
    context = f"{p.name} is {p.age} and {q.name} is {q.age}. " if d == 1 else ""
    older = max(p, q, key=lambda x: x.age).name
    return {"context": context, "a": p.name, "b": q.name}, older, (p.name, q.name)


# attribute -> (question, yes/no question, value of a person, all values)
Fact = tuple[str, str, Callable[[Person], str], Callable[[World], list[str]]]
FACTS: dict[str, Fact] = {
    "home": ("Where does {name} live?", "Does {name} live in {value}?",
             lambda p: p.home, lambda w: PLACES),
    "age": ("How old is {name}?", "Is {name} {value} years old?",
            lambda p: str(p.age), lambda w: [str(p.age) for p in w.people]),
    "colour": ("What is {name}'s favourite colour?", "Is {value} the favourite colour of {name}?",
               lambda p: p.colour, lambda w: COLOURS),
    "pet": ("What pet does {name} have?", "Does {name} own {value}?",
            lambda p: f"{article(p.pet)} {p.pet}", lambda w: [f"{article(x)} {x}" for x in PETS]),
    "pet_name": ("What is the name of {name}'s {pet}?", "Is {name}'s {pet} named {value}?",
                 lambda p: p.pet_name, lambda w: PET_NAMES),
    "job": ("What is {name}'s job?", "Does {name} work as {value}?",
            lambda p: f"{article(p.job)} {p.job}", lambda w: [f"{article(x)} {x}" for x in JOBS]),
}
# instruction phrasings per attribute, besides the plain question
FACT_ASK = {
    "home": "Tell me where {name} lives.",
    "age": "Tell me the age of {name}.",
    "colour": "Name {name}'s favourite colour.",
    "pet": "Tell me what pet {name} has.",
    "pet_name": "Tell me the name of {name}'s {pet}.",
    "job": "Tell me what {name} does for work.",
}


def _fact_generator(attr: str) -> Generator:
    _, _, value, pool = FACTS[attr]

    def gen(world: World, rng: random.Random, d: int) -> Instance:
        p = rng.choice(world.people)
        answer = value(p)
        return {"name": p.name, "pet": p.pet}, answer, _with_choices(rng, answer, pool(world))
    return gen


for _attr, (_question, _, _, _) in FACTS.items():
    _s_question = _question.replace("{name}", "{s_name}").replace("{pet}", "{s_pet}")
    task(f"fact_{_attr}", f"recall a person's {_attr.replace('_', ' ')} from the world", [
        _question,
        f"Q: {_question} A:",
        FACT_ASK[_attr],
        f"{_question} {{options}}",
        f"Q: {_s_question} A: {{s_answer}}\nQ: {_question} A:",
    ], skill="fact_recall")(_fact_generator(_attr))


def _fact_question(world: World, rng: random.Random, yes: bool | None = None
                   ) -> tuple[str, str, str, list[str]]:
    """A random (attribute question, yes/no question about a random value, true value,
    all values) about a random person; the yes/no question is true when `yes`."""
    attr = rng.choice(sorted(FACTS))
    question, yesno, value, pool = FACTS[attr]
    p = rng.choice(world.people)
    true, values = value(p), pool(world)
    v = true if yes else rng.choice(sorted({x for x in values if x != true}))
    fill = {"name": p.name, "pet": p.pet}
    return question.format(**fill), yesno.format(value=v, **fill), true, values


@task("fact_yesno", "yes/no questions about world facts (held out)", [
    "{question}",
    "{question} Answer yes or no.",
    "Q: {question} A:",
    "Q: {s_question} A: {s_answer}\nQ: {question} A:",
], kind="yesno", skill="fact_recall")
def gen_fact_yesno(world: World, rng: random.Random, d: int) -> Instance:
    yes = rng.random() < 0.5
    _, question, _, _ = _fact_question(world, rng, yes)
    return {"question": question}, "yes" if yes else "no", ()


@task("older_yesno", "is one person older than another; ages given (1) or recalled (2)", [
    "{context}Is {a} older than {b}?",
    "{context}Is {a} older than {b}? Answer yes or no.",
    "{context}Q: Is {a} older than {b}? A:",
    "{s_context}Q: Is {s_a} older than {s_b}? A: {s_answer}\n"
    "{context}Q: Is {a} older than {b}? A:",
], max_difficulty=2, kind="yesno", skill="compare_ages")
def gen_older_yesno(world: World, rng: random.Random, d: int) -> Instance:
    p, q = rng.sample(world.people, 2)
    context = f"Ages: {p.name} {p.age}, {q.name} {q.age}. " if d == 1 else ""
    return {"context": context, "a": p.name, "b": q.name}, \
        "yes" if p.age > q.age else "no", ()


# -----------------------------------------------------------------------------
# held-out arithmetic: operand pairs from the 'test' half, which the corpus never shows

def _near_misses(rng: random.Random, answer: int, n: int = 3) -> tuple[str, ...]:
    """The answer and n-1 plausible wrong sums (off by 1, 2 or 10), shuffled."""
    wrong = sorted({answer + k for k in (-10, -2, -1, 1, 2, 10) if answer + k >= 0})
    choices = [str(answer)] + [str(x) for x in rng.sample(wrong, n - 1)]
    rng.shuffle(choices)
    return tuple(choices)


@task("addition_choice", "pick the sum of two numbers (up to 1..3 digits) from options", [
    "Choose the sum {a} + {b} from the options: {options}",
    "{a} + {b} equals which of these? {options}",
    "Q: Pick the value of {a} + {b}. {options} A:",
    "Choose the sum {s_a} + {s_b} from the options: {s_options} Answer: {s_answer}\n"
    "Choose the sum {a} + {b} from the options: {options} Answer:",
], max_difficulty=3, kind="number", skill="addition")
def gen_addition_choice(world: World, rng: random.Random, d: int) -> Instance:
    q, ans = addition_problem(rng, d, half="test")
    a, _, b, _ = q.split()
    return {"a": a, "b": b}, ans, _near_misses(rng, int(ans))


@task("addition_words", "add two numbers below 10, 20 or 50 given in words, answer in words", [
    "Add {wa} to {wb} and say the result in words.",
    "Say in words the total when {wa} is added to {wb}.",
    "{wa} and {wb} together make how many? Reply in words.",
    "{s_wa} and {s_wb} together make {s_answer}.\n{wa} and {wb} together make",
], max_difficulty=3, kind="words", skill="addition")
def gen_addition_words(world: World, rng: random.Random, d: int) -> Instance:
    x, y = small_pair(rng, (9, 19, 50)[d - 1], half="test")
    return {"wa": number_to_words(x), "wb": number_to_words(y)}, number_to_words(x + y), ()


# -----------------------------------------------------------------------------
# stories: track a quantity over `difficulty` steps (1..3)

@task("story", "track a count through a 1-3 step story", [
    "{story} How many {things} does {name} have?",
    "{story} Q: How many {things} does {name} have now? A:",
    "Read the story. {story} How many {things} does {name} have? Answer with a number.",
    "{s_story} Q: How many {s_things} does {s_name} have? A: {s_answer}\n"
    "{story} Q: How many {things} does {name} have? A:",
], max_difficulty=3, kind="number")
def gen_story(world: World, rng: random.Random, d: int) -> Instance:
    p, q = rng.sample(world.people, 2)
    obj = rng.choice(OBJECTS)
    n = rng.randint(0, 9)
    out = [f"{p.name} has {count_of(n, obj)}."]
    for _ in range(d):
        move = rng.choice(["get", "buy", "find"] + (["give", "lose"] if n else []))
        k = rng.randint(1, 9) if move in ("get", "buy", "find") else rng.randint(1, n)
        out.append({
            "get": f"{q.name} gives {p.name} {count_of(k, obj)}.",
            "buy": f"{p.name} buys {count_of(k, obj)}.",
            "find": f"{p.name} finds {count_of(k, obj)}.",
            "give": f"{p.name} gives {q.name} {count_of(k, obj)}.",
            "lose": f"{p.name} {'eats' if obj[2] else 'loses'} {count_of(k, obj)}.",
        }[move])
        n += k if move in ("get", "buy", "find") else -k
    return {"story": " ".join(out), "things": obj[1], "name": p.name}, str(n), ()


# -----------------------------------------------------------------------------
# splits and batches

HELDOUT_TASKS: tuple[str, ...] = ("fact_yesno", "older_yesno", "addition_choice",
                                  "addition_words", "words_to_number")
TRAIN_TASKS: tuple[str, ...] = tuple(t for t in TASKS if t not in HELDOUT_TASKS)


def make_examples(families: Sequence[str], n: int, seed: int, difficulty: int | None = None,
                  world: World | None = None) -> list[Example]:
    """n examples, round-robin over families. Example i has its own rng seeded by
    (seed, family, i), so the list is deterministic and prefix-stable. A difficulty
    above a family's max is clipped to it."""
    out = []
    for i in range(n):
        fam = TASKS[families[i % len(families)]]
        d = None if difficulty is None else min(difficulty, fam.max_difficulty)
        out.append(fam.make(random.Random(f"{seed}:{fam.name}:{i}"), d, world=world))
    return out


def unseen_examples(families: Sequence[str], n: int, seed: int, exclude: set[str]
                    ) -> list[Example]:
    """n examples round-robin over families, as make_examples, with prompts that are new:
    none in `exclude` (the prompts a model was trained on) and none twice. The families'
    item spaces are small (of 832 drawn for the demo's held-in set, 175 were SFT training
    prompts word for word), so this draws more and keeps the unseen ones."""
    per = -(-n // len(families))
    draws = 2 * per
    while True:
        pools: dict[str, list[Example]] = {f: [] for f in families}
        seen = set(exclude)
        for e in make_examples(families, draws * len(families), seed):
            if e.prompt not in seen:
                seen.add(e.prompt)
                pools[e.family].append(e)
        if all(len(p) >= per for p in pools.values()):
            return [pools[families[i % len(families)]][i // len(families)] for i in range(n)]
        if draws > 64 * per:
            short = min(pools, key=lambda f: len(pools[f]))
            raise ValueError(f"task family {short}: {len(pools[short])} unseen prompts in "
                             f"{draws} draws, {per} wanted")
        draws *= 2
