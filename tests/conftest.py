import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scalelab.config import ModelConfig
from scalelab.data.world import generate_documents
from scalelab.model import Transformer
from scalelab.tokenizer import Tokenizer

pytest_plugins = ["new_user_home"]  # a new user's project, shared by test_new_user*.py

# A few seconds of CPU per run: 2 layers x 32 wide, 400-token BPE, 2000 documents.
TINY_SETS = [
    "model.seq_len=32", "model.n_layer=2", "model.n_head=2", "model.d_model=32",
    "data.n_docs=2000", "data.tokenizer_vocab=400", "train.batch_size=8",
    "train.eval_every=10", "train.eval_batches=2", "train.log_every=1",
    "train.checkpoint_every=10", "train.warmup_steps=5",
]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalelab", *args], capture_output=True,
                          text=True, timeout=timeout)


def tiny_sets() -> list[str]:
    return [a for s in TINY_SETS for a in ("--set", s)]


def train_sets() -> list[str]:
    """The [train] part of tiny_sets: what a post-training stage reads (its [model] is its
    parent's, and `--set` on a section a stage ignores is an error)."""
    return [a for s in TINY_SETS if s.startswith("train.") for a in ("--set", s)]


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(generate_documents(1000, seed=0), 512)


@pytest.fixture
def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32)
    return Transformer(cfg).eval()


def toy_ppo(tokenizer: Tokenizer, **train) -> tuple:
    """Policy, frozen reference, value model (zero head) and one optimizer over policy and
    value: the smallest PPO setup, 1 layer x 32 wide."""
    import copy

    from scalelab.config import TrainConfig
    from scalelab.model import ScalarModel
    from scalelab.train.loop import make_optimizer
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=1, n_head=2,
                      d_model=32)
    policy = Transformer(cfg)
    ref = copy.deepcopy(policy).requires_grad_(False)
    value = ScalarModel(copy.deepcopy(policy), zero_head=True)
    both = torch.nn.ModuleDict({"policy": policy, "value": value})
    opt = make_optimizer(both, TrainConfig(**train), torch.device("cpu"))
    return policy, ref, value, opt, both


def save_policy_and_reward_model(tokenizer: Tokenizer, folder: Path, reward_std: float) -> None:
    """folder/base (a 2 x 32 policy) and folder/rm (a reward model of that shape, its score
    normalised with mean 0 and std reward_std): what a PPO run starts from."""
    from scalelab.model import ScalarModel
    from scalelab.train.checkpoint import save_model
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=128, n_layer=2, n_head=2,
                     d_model=32)
    save_model(Transformer(mc), tokenizer, folder / "base")
    save_model(ScalarModel(Transformer(mc)), tokenizer, folder / "rm",
               extra_json={"reward.json": {"mean": 0.0, "std": reward_std}})


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
