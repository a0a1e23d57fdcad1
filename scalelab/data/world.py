"""
The built-in pretraining corpus: simple English text about a small, fixed world.

A World is a seeded cast of people with fixed facts (Mia always lives in Oakford).
Document generators turn (world, rng) into short texts of a few kinds: facts,
comparisons, counting, arithmetic, lists and sorting, quantity-tracking stories and
Q/A. The vocabulary is a few hundred words and the patterns are repetitive, so a ~1M
parameter model learns the easy parts in minutes, while multi-digit addition and
multi-step stories leave room for bigger models. Pure stdlib, deterministic.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# the world's word lists. small on purpose.

FEMALE = ["Mia", "Ava", "Lily", "Emma", "Zoe", "Ella", "Nora", "Ruby", "Anna", "Lucy",
          "Sara", "Ivy"]
MALE = ["Tom", "Sam", "Ben", "Max", "Leo", "Jack", "Noah", "Finn", "Owen", "Adam",
        "Luke", "Eli"]
PLACES = ["Oakford", "Pinehill", "Riverton", "Stonebridge", "Millbrook", "Ashdale",
          "Fernwood", "Lakeside", "Redcliff", "Elmstead"]
# (singular, plural, edible)
OBJECTS = [
    ("apple", "apples", True), ("pear", "pears", True), ("egg", "eggs", True),
    ("cake", "cakes", True), ("plum", "plums", True), ("book", "books", False),
    ("coin", "coins", False), ("cup", "cups", False), ("pencil", "pencils", False),
    ("ball", "balls", False), ("box", "boxes", False), ("key", "keys", False),
    ("shell", "shells", False), ("card", "cards", False), ("hat", "hats", False),
    ("stone", "stones", False),
]
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "white",
           "black", "brown"]
PETS = ["cat", "dog", "rabbit", "bird", "fish", "horse", "hamster", "turtle"]
PET_NAMES = ["Biscuit", "Pepper", "Rex", "Daisy", "Milo", "Luna", "Coco", "Bruno",
             "Poppy", "Ziggy", "Oscar", "Rosie", "Toby", "Willow", "Ginger", "Shadow"]
JOBS = ["baker", "farmer", "teacher", "doctor", "painter", "driver", "cook", "nurse",
        "builder", "singer"]


@dataclass(frozen=True)
class Person:
    name: str
    female: bool
    home: str
    age: int
    colour: str
    pet: str
    pet_name: str
    job: str

    @property
    def he(self) -> str:
        return "She" if self.female else "He"

    @property
    def his(self) -> str:
        return "her" if self.female else "his"


@dataclass(frozen=True)
class World:
    seed: int
    people: tuple[Person, ...]

    @classmethod
    def create(cls, seed: int = 0) -> World:
        """Draw a cast of 24 people with fixed facts. Same seed -> same world."""
        rng = random.Random(seed)
        names = [(n, True) for n in FEMALE] + [(n, False) for n in MALE]
        rng.shuffle(names)
        ages = rng.sample(range(6, 80), len(names))  # distinct, so "older" is never a tie
        # every place gets at least one resident, the rest are random
        homes = PLACES + [rng.choice(PLACES) for _ in range(len(names) - len(PLACES))]
        rng.shuffle(homes)
        people = tuple(
            Person(name, female, home, age, rng.choice(COLOURS), rng.choice(PETS),
                   rng.choice(PET_NAMES), rng.choice(JOBS))
            for (name, female), home, age in zip(names, homes, ages, strict=True)
        )
        return cls(seed, people)

    def person(self, name: str) -> Person:
        """Look a person up by first name."""
        for p in self.people:
            if p.name == name:
                return p
        raise KeyError(name)

    def residents(self, place: str) -> list[Person]:
        return [p for p in self.people if p.home == place]

    def facts(self) -> list[tuple[str, str, str]]:
        """All (person, attribute, value) triples, e.g. ("Mia", "home", "Oakford")."""
        out = []
        for p in self.people:
            out += [(p.name, "home", p.home), (p.name, "age", str(p.age)),
                    (p.name, "colour", p.colour), (p.name, "pet", p.pet),
                    (p.name, "pet_name", p.pet_name), (p.name, "job", p.job)]
        return out


# -----------------------------------------------------------------------------
# small text helpers

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _below_1000(n: int) -> str:
    parts = []
    if n >= 100:
        parts.append(ONES[n // 100] + " hundred")
        n %= 100
    if n >= 20:
        parts.append(TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else ""))
    elif n > 0 or not parts:
        parts.append(ONES[n])
    return " ".join(parts)


def number_to_words(n: int) -> str:
    """0..99999 in English words: 105 -> 'one hundred five', 45 -> 'forty-five'."""
    if not 0 <= n <= 99999:
        raise ValueError(f"number_to_words supports 0..99999, got {n}")
    if n < 1000:
        return _below_1000(n)
    s = _below_1000(n // 1000) + " thousand"
    return s + (" " + _below_1000(n % 1000) if n % 1000 else "")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join_and(items: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'"""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def count_of(n: int, obj: tuple[str, str, bool]) -> str:
    """3, apple -> '3 apples'; 1, apple -> '1 apple'"""
    return f"{n} {obj[0] if n == 1 else obj[1]}"


# -----------------------------------------------------------------------------
# arithmetic building blocks (also used by the emergence experiments)

DIGIT_WEIGHTS = [0.35, 0.25, 0.18, 0.12, 0.10]  # how often 1..5 digit sums show up


def random_number(rng: random.Random, digits: int) -> int:
    """A number with exactly `digits` digits (0 counts as a 1-digit number)."""
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


# Train/test halves of the operand pairs. The corpus only ever shows "train" pairs, the
# tracker's builtin:addition / builtin:subtraction items and the held-out arithmetic tasks
# only "test" pairs, so a correct answer on them cannot be recall of a corpus line. The half
# depends on the unordered pair, so "3 + 5" and "5 + 3" (and "8 - 5") fall on the same side.
# Not split: the stories' gains and losses ("has 3 apples ... finds 4 ... Now has 7"), which
# state every 1-digit test sum; the split holds for arithmetic lines, not for the facts.
HALVES = ("train", "test")


def pair_half(a: int, b: int) -> str:
    """'train' or 'test' for the operand pair {a, b}: a fixed hash, order ignored."""
    lo, hi = min(a, b), max(a, b)
    return HALVES[zlib.crc32(f"{lo},{hi}".encode()) & 1]


def _operands(rng: random.Random, digits: int, half: str) -> tuple[int, int]:
    # one operand has exactly `digits` digits; the other too half the time, else fewer.
    # Redraw until the pair is in the wanted half (about two tries on average).
    while True:
        a = random_number(rng, digits)
        b = random_number(rng, digits if rng.random() < 0.5 else rng.randint(1, digits))
        if pair_half(a, b) == half:
            return (a, b) if rng.random() < 0.5 else (b, a)


def addition_problem(rng: random.Random, digits: int, half: str = "train") -> tuple[str, str]:
    """('4821 + 377 =', '5198'): operands of up to `digits` digits, at least one exactly,
    the pair from the given half (see pair_half)."""
    a, b = _operands(rng, digits, half)
    return f"{a} + {b} =", str(a + b)


def subtraction_problem(rng: random.Random, digits: int, half: str = "train"
                        ) -> tuple[str, str]:
    """('4821 - 377 =', '4444'): like addition_problem, never negative."""
    a, b = sorted(_operands(rng, digits, half), reverse=True)
    return f"{a} - {b} =", str(a - b)


def small_pair(rng: random.Random, top: int, half: str = "train") -> tuple[int, int]:
    """Two numbers in 0..top whose pair is in the given half (the sums said in words)."""
    while True:
        x, y = rng.randint(0, top), rng.randint(0, top)
        if pair_half(x, y) == half:
            return x, y


def multiplication_problem(rng: random.Random, max_factor: int = 12) -> tuple[str, str]:
    """('7 * 8 =', '56'): times tables up to max_factor."""
    a, b = rng.randint(0, max_factor), rng.randint(0, max_factor)
    return f"{a} * {b} =", str(a * b)


def sample_digits(rng: random.Random) -> int:
    return rng.choices(range(1, 6), weights=DIGIT_WEIGHTS)[0]


# -----------------------------------------------------------------------------
# document kinds. each is (world, rng) -> str

def doc_facts(world: World, rng: random.Random) -> str:
    """A few facts about one person, later sentences sometimes use a pronoun."""
    p = rng.choice(world.people)
    templates = [
        lambda s, ps: f"{s} lives in {p.home}.",
        lambda s, ps: f"{s} is {p.age} years old.",
        lambda s, ps: f"{ps} favourite colour is {p.colour}.",
        lambda s, ps: f"{s} has {article(p.pet)} {p.pet} named {p.pet_name}.",
        lambda s, ps: f"{s} works as {article(p.job)} {p.job}.",
    ]
    chosen = rng.sample(templates, rng.randint(2, len(templates)))
    out = []
    for i, t in enumerate(chosen):
        use_pronoun = i > 0 and rng.random() < 0.3
        s, ps = (p.he, p.his.capitalize()) if use_pronoun else (p.name, p.name + "'s")
        out.append(t(s, ps))
    return " ".join(out)


def doc_compare(world: World, rng: random.Random) -> str:
    """Who is older, which number is bigger, the largest of three."""
    out = []
    for _ in range(rng.randint(2, 4)):
        r = rng.random()
        if r < 0.4:  # people by age
            a, b = sorted(rng.sample(world.people, 2), key=lambda p: -p.age)  # a is older
            if rng.random() < 0.3:
                out.append(f"{a.name} is {a.age} and {b.name} is {b.age}, "
                           f"so {a.name} is older than {b.name}.")
            elif rng.random() < 0.5:
                out.append(f"{a.name} is older than {b.name}.")
            else:
                out.append(f"{b.name} is younger than {a.name}.")
        elif r < 0.8:  # two numbers, in digits or words
            d = rng.choice([1, 1, 2, 2, 3])
            x, y = random_number(rng, d), random_number(rng, d)
            fmt = number_to_words if rng.random() < 0.3 else str
            if x == y:
                s = f"{fmt(x)} is equal to {fmt(y)}."
            elif rng.random() < 0.5:
                s = f"{fmt(max(x, y))} is greater than {fmt(min(x, y))}."
            else:
                s = f"{fmt(min(x, y))} is less than {fmt(max(x, y))}."
            out.append(s[0].upper() + s[1:])
        else:  # largest / smallest of three
            xs = [rng.randint(0, 99) for _ in range(3)]
            which, v = ("largest", max(xs)) if rng.random() < 0.5 else ("smallest", min(xs))
            out.append(f"The {which} of {join_and([str(x) for x in xs])} is {v}.")
    return " ".join(out)


def doc_counting(world: World, rng: random.Random) -> str:
    """Counting things in words, counting up and down, next/previous, numbers in words."""
    out = []
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.4:
            p, obj, n = rng.choice(world.people), rng.choice(OBJECTS), rng.randint(1, 10)
            said = ", ".join(number_to_words(i) for i in range(1, n + 1))
            out.append(f"{p.name} counts {p.his} {obj[1]}: {said}. "
                       f"{p.name} has {count_of(n, obj)}.")
        elif r < 0.6:
            a = rng.randint(0, 95)
            b = a + rng.randint(2, 6)
            out.append(f"Count from {a} to {b}: {', '.join(map(str, range(a, b + 1)))}.")
        elif r < 0.75:
            b = rng.randint(0, 30)
            a = b + rng.randint(2, 6)
            out.append(f"Count down from {a} to {b}: "
                       f"{', '.join(map(str, range(a, b - 1, -1)))}.")
        elif r < 0.85:
            a = rng.randint(0, 20)
            b = a + rng.randint(2, 5)
            said = ", ".join(number_to_words(i) for i in range(a, b + 1))
            out.append(f"Count from {number_to_words(a)} to {number_to_words(b)}: {said}.")
        elif r < 0.93:
            x = rng.randint(1, 998)
            out.append(f"The number after {x} is {x + 1}. The number before {x} is {x - 1}.")
        else:
            x = random_number(rng, sample_digits(rng))
            out.append(f"In words, {x} is {number_to_words(x)}.")
    return " ".join(out)


def doc_arithmetic(world: World, rng: random.Random) -> str:
    """A worksheet of 2-5 lines: digit sums (1-5 digits), differences, products, words."""
    lines = []
    for _ in range(rng.randint(2, 5)):
        r = rng.random()
        if r < 0.5:
            q, a = addition_problem(rng, sample_digits(rng))
        elif r < 0.65:
            q, a = subtraction_problem(rng, sample_digits(rng))
        elif r < 0.75:
            q, a = multiplication_problem(rng)
        else:  # in words, small numbers
            x, y = small_pair(rng, 50)
            w = number_to_words
            r = rng.random()
            if r < 0.5:
                lines.append(f"{w(x)} plus {w(y)} is {w(x + y)}.")
            elif r < 0.8:
                x, y = max(x, y), min(x, y)
                lines.append(f"{w(x)} minus {w(y)} is {w(x - y)}.")
            else:
                x, y = x % 11, y % 11
                lines.append(f"{w(x)} times {w(y)} is {w(x * y)}.")
            continue
        lines.append(f"{q} {a}")  # no trailing period: same format as the eval prompts
    return "\n".join(lines)


def doc_lists(world: World, rng: random.Random) -> str:
    """Shopping lists (with first/last) and sorting small number lists."""
    out = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.5:
            p = rng.choice(world.people)
            things = [o[0] for o in rng.sample(OBJECTS, rng.randint(2, 5))]
            named = [f"{article(t)} {t}" for t in things]
            verb = rng.choice(["bought", "found", "packed"])
            s = f"{p.name} {verb} {number_to_words(len(things))} things: {join_and(named)}."
            if rng.random() < 0.4:
                s += f" The first thing was {named[0]}. The last thing was {named[-1]}."
            out.append(s)
        else:
            xs = [rng.randint(0, 99 if rng.random() < 0.7 else 999)
                  for _ in range(rng.randint(3, 6))]
            nums = ", ".join(map(str, xs))
            if rng.random() < 0.75:
                out.append(f"Numbers: {nums}. Sorted: {', '.join(map(str, sorted(xs)))}.")
            else:
                desc = ", ".join(map(str, sorted(xs, reverse=True)))
                out.append(f"Numbers: {nums}. Sorted from largest: {desc}.")
    return " ".join(out)


def doc_story(world: World, rng: random.Random) -> str:
    """1-4 steps of gaining and losing things; the count is always tracked correctly.
    Sometimes the running count is hidden and only the final answer is given (harder)."""
    p, q = rng.sample(world.people, 2)
    obj = rng.choice(OBJECTS)
    n = rng.randint(0, 10)
    show_steps = rng.random() < 0.7
    out = [f"{p.name} is at home in {p.home}."] if rng.random() < 0.3 else []
    out.append(f"{p.name} has {count_of(n, obj)}.")
    for _ in range(rng.randint(1, 4)):
        moves = ["get", "buy", "find"] + (["give", "eat" if obj[2] else "lose"] if n else [])
        move = rng.choice(moves)
        k = rng.randint(1, 9) if move in ("get", "buy", "find") else rng.randint(1, n)
        if move == "get":
            out.append(f"{q.name} gives {p.name} {count_of(k, obj)}.")
        elif move == "buy":
            out.append(f"{p.name} buys {count_of(k, obj)}.")
        elif move == "find":
            out.append(f"{p.name} finds {count_of(k, obj)}.")
        elif move == "give":
            out.append(f"{p.name} gives {q.name} {count_of(k, obj)}.")
        else:
            out.append(f"{p.name} {'eats' if move == 'eat' else 'loses'} {count_of(k, obj)}.")
        n += k if move in ("get", "buy", "find") else -k
        if show_steps:
            out.append(f"Now {p.name} has {count_of(n, obj)}.")
    if not show_steps or rng.random() < 0.5:
        out.append(f"Q: How many {obj[1]} does {p.name} have? A: {n}.")
    return " ".join(out)


def qa_pair(world: World, rng: random.Random) -> tuple[str, str]:
    """One question about world facts and its answer, e.g. ('Where does Mia live?', 'Oakford')."""
    p, o = rng.sample(world.people, 2)
    r = rng.randrange(8)
    if r == 0:
        return f"Where does {p.name} live?", p.home
    if r == 1:
        return f"How old is {p.name}?", str(p.age)
    if r == 2:
        return f"What is {p.name}'s favourite colour?", p.colour
    if r == 3:
        return f"What pet does {p.name} have?", f"{article(p.pet)} {p.pet}"
    if r == 4:
        return f"What is the name of {p.name}'s {p.pet}?", p.pet_name
    if r == 5:
        return f"What is {p.name}'s job?", f"{article(p.job)} {p.job}"
    if r == 6:
        return f"Who is older, {p.name} or {o.name}?", max(p, o, key=lambda x: x.age).name
    place = rng.choice(PLACES)
    return f"Who lives in {place}?", join_and([x.name for x in world.residents(place)])


def doc_qa(world: World, rng: random.Random) -> str:
    return "\n".join(f"Q: {q} A: {a}." for q, a in (qa_pair(world, rng)
                                                    for _ in range(rng.randint(2, 4))))


DOC_KINDS: dict[str, Callable[[World, random.Random], str]] = {
    "facts": doc_facts,
    "compare": doc_compare,
    "counting": doc_counting,
    "arithmetic": doc_arithmetic,
    "lists": doc_lists,
    "story": doc_story,
    "qa": doc_qa,
}
KIND_WEIGHTS: dict[str, float] = {
    "facts": 0.15, "compare": 0.10, "counting": 0.10, "arithmetic": 0.25,
    "lists": 0.10, "story": 0.15, "qa": 0.15,
}


def sample_document(world: World, rng: random.Random) -> tuple[str, str]:
    """Pick a kind by KIND_WEIGHTS and generate one document: (kind, text)."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    return kind, DOC_KINDS[kind](world, rng)


def generate_documents(n_docs: int, seed: int = 0, world: World | None = None) -> list[str]:
    """n_docs documents from World.create(seed) (or the given world).
    Each document gets its own rng seeded from (seed, i), so the output is deterministic
    and prefix-stable: document i is the same whatever n_docs is."""
    world = world or World.create(seed)
    return [sample_document(world, random.Random(seed * 2**32 + i))[1] for i in range(n_docs)]


if __name__ == "__main__":
    for doc in generate_documents(8):
        print(doc, end="\n\n")
