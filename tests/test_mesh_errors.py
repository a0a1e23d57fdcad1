"""Bad input on a device mesh (2 gloo processes under torchrun) fails on every rank with the
same UserError: only rank 0 prints, so an error that one other rank alone hit was lost, and
a rank that left would leave the others waiting in a collective."""

import json
from pathlib import Path

from conftest import save_policy_and_reward_model
from test_parallel_dist import torchrun

from scalelab.config import ModelConfig
from scalelab.model import ScalarModel, Transformer
from scalelab.train.checkpoint import save_model

ROOT = Path(__file__).resolve().parents[1]


def test_errors_on_a_mesh_reach_every_rank(tmp_path, tokenizer):
    save_policy_and_reward_model(tokenizer, tmp_path, reward_std=0.1)
    mc = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=128, n_layer=2, n_head=1,
                     d_model=32)
    save_model(ScalarModel(Transformer(mc)), tokenizer, tmp_path / "rm1",
               extra_json={"reward.json": {"mean": 0.0, "std": 0.1}})
    r = torchrun(2, str(ROOT / "tests" / "mesh_errors_worker.py"), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"errors_rank_{i}.json").read_text()) for i in range(2)]
    # rank 1's corrupt RNG file: rank 0 (which read its own, good one) raises it too
    for got in ranks:
        assert got["rng"].startswith("UserError: ") and "rank_1.safetensors" in got["rng"]
    # a reward model whose heads tp=2 cannot split: named before anything runs (it was a
    # RuntimeError from a view in its first forward, with the run folder half made)
    for got in ranks:
        assert got["ppo_tp"].startswith("UserError: --reward ") and \
            "parallel.tp=2 does not divide heads (1)" in got["ppo_tp"], got["ppo_tp"]
    assert not (tmp_path / "ppo").exists()
    # a full disk on rank 1 alone (its rng file): every rank stops with rank 1's error, which
    # rank 0 prints (it waited in a barrier for ever, and nothing was printed); no partial
    # checkpoint is left
    full = tmp_path / "full" / "checkpoints"
    for got in ranks:
        assert got["full"] == (f"RunFailed: could not write {full / 'step_1'} (No space left "
                               f"on device); nothing was replaced: {full / 'step_1'} is as it "
                               "was"), got["full"]
    assert not list(full.iterdir())
    # rank 0 working alone for longer than a collective may wait: the others wait
    assert [got["wait"] for got in ranks] == [None, None]


def test_a_gpu_index_under_torchrun_is_refused(monkeypatch):
    """train.device = "cuda:1" under torchrun: every rank took the GPU of its LOCAL_RANK and
    the index was silently not used. (This machine may have no GPU: torch is told it has 2.)"""
    import pytest
    import torch

    from scalelab.config import ParallelConfig, UserError
    from scalelab.parallel import mesh
    monkeypatch.setenv("WORLD_SIZE", "2")  # refused before any process group is started
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="train.device 'cuda:1': under torchrun each process "
                                        "takes the GPU of its LOCAL_RANK.*CUDA_VISIBLE_DEVICES"):
        mesh.setup(ParallelConfig(dp=2), "cuda:1")
