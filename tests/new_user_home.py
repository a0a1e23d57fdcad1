"""A new user's project for tests/test_new_user*.py, made once a session: their own corpus,
SFT and preference files, a model pretrained on the corpus and one fine-tuned on the SFT file
(pytest fixtures user_home, user_base, user_sft; a plugin of conftest.py), and `cli`, which
runs `scalelab` in this process."""

import contextlib
import io
import json
import random
import sys
from pathlib import Path

import pytest
from conftest import tiny_sets, train_sets

from scalelab.cli import main

WORDS = ("river stone lamp garden window orange quiet bread yellow market winter letter "
         "forest candle copper morning harbour violin pepper ladder cotton meadow").split()


def cli(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """Run `scalelab ARGS` in this process; (exit code, stdout, stderr). A traceback would
    propagate and fail the test."""
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(list(args))
    finally:
        sys.stdin = old_stdin
    return rc, out.getvalue(), err.getvalue()


def paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) + "."
            for _ in range(n)]


SMALL = [*tiny_sets(), "--set", "data.val_fraction=0.1"]


@pytest.fixture(scope="session")
def user_home(tmp_path_factory) -> Path:
    """The user's project: a .txt corpus of 300 paragraphs, SFT and preference files."""
    user_home = tmp_path_factory.mktemp("home")
    (user_home / "corpus.txt").write_text("\n\n".join(paragraphs(300)) + "\n")
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in WORDS] * 3
    # written with a byte-order mark, as many Windows tools do
    (user_home / "sft.jsonl").write_text(
        "\ufeff" + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs = [{"prompt": f"Say {w}.", "chosen": w, "rejected": f"{w} {w} {w}"} for w in WORDS]
    (user_home / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return user_home


@pytest.fixture(scope="session")
def user_base(user_home) -> tuple[Path, str, str]:
    """Pretrained on the user's corpus, stderr not a terminal. Max steps below the warmup and
    a tokenizer vocabulary the corpus cannot fill, on purpose."""
    rc, out, err = cli("pretrain", "--config", "tiny", "--out", str(user_home / "base"),
                       "--max-steps", "20", *SMALL,
                       "--set", f"data.source={user_home / 'corpus.txt'}",
                       "--set", "train.warmup_steps=30", "--set", "data.tokenizer_vocab=4000")
    assert rc == 0, err
    return user_home / "base", out, err


@pytest.fixture(scope="session")
def user_sft(user_home, user_base) -> Path:
    rc, _, err = cli("sft", "--base", str(user_base[0] / "model"),
                     "--data", str(user_home / "sft.jsonl"), "--out", str(user_home / "sft"),
                     "--max-steps", "12", *train_sets(), "--set", "train.lr=3e-3")
    assert rc == 0, err
    return user_home / "sft"
