"""Test items never seen in pretraining: the tracker's arithmetic items come from the 'test'
half of the operand pairs, the world corpus only shows the 'train' half (data/world.py).
These tests scan a generated corpus, with the arithmetic-heavy mix of the CPU sweep, for
every item the starter experiments ask, so they fail if a generator stops respecting the
split."""

import json
import re

from scalelab.data.world import generate_documents, number_to_words, pair_half
from scalelab.track.specs import STARTER, load_items
from scalelab.track.sweep import write_corpus

SWEEP_CPU_MIX = {"arithmetic": 0.75, "qa": 0.10, "story": 0.08, "facts": 0.04, "counting": 0.03}


def _corpus(tmp_path, n_docs: int = 20000) -> str:
    path = tmp_path / "corpus.jsonl"
    write_corpus(path, n_docs, 0, SWEEP_CPU_MIX)
    return "\n".join(json.loads(line)["text"] for line in path.read_text().splitlines())


def test_no_tracker_arithmetic_item_in_the_corpus(tmp_path):
    text = _corpus(tmp_path)
    lines = set(text.split("\n"))
    seen_pairs = {(int(a), int(b)) for a, b in re.findall(r"^(\d+) [-+] (\d+) =", text, re.M)}
    assert len(seen_pairs) > 15000  # the scan looks at a real worksheet corpus
    assert all(pair_half(a, b) == "train" for a, b in seen_pairs)
    # the corpus shows nearly every small pair of its half, so without the split the
    # 1-digit tracker items would be (and were: 100 of 100) corpus lines
    small_train = {(a, b) for a in range(10) for b in range(10) if pair_half(a, b) == "train"}
    assert len(small_train & seen_pairs) > 0.9 * len(small_train)
    checked = 0
    for _, spec, _, _ in STARTER:
        if "addition" not in spec and "subtraction" not in spec:
            continue
        for it in load_items(spec):
            assert f"{it.prompt}{it.target}" not in lines, (spec, it.prompt)
            a, _, b, _ = it.prompt.split()
            assert (int(a), int(b)) not in seen_pairs and (int(b), int(a)) not in seen_pairs
            checked += 1
    assert checked == 800


def test_split_is_not_vacuous():
    # both halves are populated, the half ignores operand order, tracker items are 'test'
    one_digit = {(a, b) for a in range(10) for b in range(10)}
    test_half = {p for p in one_digit if pair_half(*p) == "test"}
    assert 30 < len(test_half) < 70
    assert all(pair_half(b, a) == pair_half(a, b) for a, b in one_digit)
    items = load_items("builtin:addition?digits=1")
    assert all(pair_half(*map(int, it.prompt.split()[::2][:2])) == "test" for it in items)


def test_word_sums_in_the_corpus_use_the_train_half():
    docs = generate_documents(3000, seed=0)
    words = {number_to_words(n): n for n in range(101)}
    sums = re.findall(r"([a-z-]+) plus ([a-z-]+) is", "\n".join(docs).lower())
    assert len(sums) > 100
    assert all(pair_half(words[x], words[y]) == "train" for x, y in sums)


def test_seen_items_are_the_memorisation_control(tmp_path):
    """seen=1 draws from the corpus's own half: those items are in the corpus, so a model's
    score on them beside the unseen ones separates recall from generalisation."""
    text = _corpus(tmp_path, 5000)
    lines = set(text.split("\n"))
    seen = load_items("builtin:addition?digits=1&seen=1")
    assert all(pair_half(*map(int, it.prompt.split()[::2][:2])) == "train" for it in seen)
    assert sum(f"{it.prompt}{it.target}" in lines for it in seen) > 90
    assert load_items("builtin:addition?digits=1") != seen


def test_held_out_formats_are_not_in_the_corpus():
    """The held-out task families are yes/no, options and words-in-words-out formats that
    no trained prompt shows (test_tasks.py); pretraining text is training too: the corpus
    never answers yes or no, and never holds a held-out prompt."""
    from scalelab.tasks import HELDOUT_TASKS, make_examples
    docs = generate_documents(3000, seed=0)
    text = "\n".join(docs)
    assert not re.search(r"\b(yes|no)\b", text, re.I)
    held_out = make_examples(HELDOUT_TASKS, 500, seed=0)
    assert not [e.prompt for e in held_out if e.prompt in text]
    assert not re.search(r"together make|[A-D]\) \d", text)  # addition_words, options


def test_demo_evaluates_on_prompts_no_stage_trained_on():
    """The demo's accuracy and gold-reward prompts are none of the prompts its SFT
    conversations, reward-model preferences or PPO rollouts use (the task families' item
    spaces are small: 175 of the 832 held-in prompts drawn before were SFT prompts word for
    word), none is asked twice, and each family still gets its share."""
    from collections import Counter

    from scalelab.demo import evaluation_sets, preset_config
    from scalelab.tasks import HELDOUT_TASKS, TRAIN_TASKS
    from scalelab.train.ppo import load_prompts
    from scalelab.train.reward import preference_examples
    from scalelab.train.sft import task_conversations
    sft, rm, ppo = (preset_config(p, 1) for p in ("sft", "reward", "ppo"))
    convs = task_conversations(sft.sft.n_examples, sft.sft.seed, sft.sft.chatty_fraction)[0]
    trained = ({c[0]["content"] for c in convs} | {e.prompt for e in preference_examples(rm.reward)}
               | set(load_prompts("builtin:tasks", ppo.ppo.n_prompts, ppo.ppo.seed)[0]))
    assert len(trained) > 15000
    sets = evaluation_sets()
    for name, examples in sets.items():
        prompts = [e.prompt for e in examples]
        assert len(set(prompts)) == len(prompts), name
        assert not trained & set(prompts), name
    assert Counter(e.family for e in sets["held_in"]) == dict.fromkeys(TRAIN_TASKS, 32)
    assert Counter(e.family for e in sets["held_out"]) == dict.fromkeys(HELDOUT_TASKS, 32)
    assert len(sets["gold"]) == 1024
