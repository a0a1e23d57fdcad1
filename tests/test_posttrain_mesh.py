"""Post-training on the device mesh: SFT, reward and DPO under torchrun (4 CPU processes,
gloo) match one process step for step, resume across mappings, and their losses are means
over the whole step (SFT's over assistant tokens, reward's and DPO's over pairs), whatever
grad_accum and the number of data ranks."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from test_parallel_dist import max_rel_diff, torchrun

from scalelab.config import ModelConfig, load_config
from scalelab.model import Transformer
from scalelab.train.checkpoint import read_tensors, save_model
from scalelab.train.dpo import dpo
from scalelab.train.reward import train_reward
from scalelab.train.sft import encode_conversations, sft

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
ONE_PROCESS = ["train.batch_size=8", "train.grad_accum=1", f"train.max_steps={STEPS}",
               "train.log_every=1", "train.eval_every=5", "train.checkpoint_every=5",
               "train.warmup_steps=2", "train.lr=3e-3", "train.device=cpu",
               "reward.n_prompts=48", "reward.max_new_tokens=8", "reward.min_margin=0.05",
               "dpo.min_margin=0.05"]


def rows(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r
    return out


def conversations(path: Path, n: int = 48) -> Path:
    """Answers of very different lengths, so micro-batches hold unequal token counts."""
    rng = random.Random(0)
    words = "Mia Leo has two cats and a dog in the town of Oak".split()
    with path.open("w") as f:
        for i in range(n):
            answer = " ".join(rng.choice(words) for _ in range(rng.choice([1, 2, 12, 20])))
            f.write(json.dumps({"prompt": f"Tell me {i}", "completion": answer}) + "\n")
    return path


def losses(run: Path) -> dict[int, float]:
    return {k: r["loss"] for k, r in rows(run).items()}


def base_model(folder: Path, tokenizer, **kw) -> Path:
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=kw.pop("seq_len", 64),
                     n_layer=kw.pop("n_layer", 1), n_head=2, d_model=32, **kw)
    save_model(Transformer(mc), tokenizer, folder)
    return folder


def test_sft_grad_accum_weighs_every_assistant_token_the_same(tmp_path, tokenizer):
    """grad_accum=2 x batch 4 must take the same steps as one batch of 8: the loss is the
    mean over all assistant tokens of the step (per micro-batch means would weigh a token of
    a short answer more). So is val_loss, over every held-out assistant token (it was the
    mean of per-batch means, batches of train.batch_size: it moved with the batch size and
    so with the mapping, 1.4e-3 between one process and dp=2)."""
    base = base_model(tmp_path / "base", tokenizer)
    data = conversations(tmp_path / "conv.jsonl", 96)  # 9 held out: batches of 8+1, 4+4+1
    got, val = {}, {}
    for batch, accum in ((8, 1), (4, 2)):
        cfg = load_config(overrides=[f"train.batch_size={batch}", f"train.grad_accum={accum}",
                                     "train.max_steps=4", "train.log_every=1",
                                     "train.eval_every=100", "train.checkpoint_every=100",
                                     "train.warmup_steps=1", "train.lr=3e-3",
                                     "train.device=cpu"])
        sft(cfg, base, str(data), tmp_path / f"sft_{batch}x{accum}")
        got[accum] = rows(tmp_path / f"sft_{batch}x{accum}")
        lines = (tmp_path / f"sft_{batch}x{accum}" / "metrics.jsonl").read_text().splitlines()
        val[accum] = [r["val_loss"] for r in map(json.loads, lines) if "val_loss" in r]
    assert sorted(got[1]) == [1, 2, 3, 4]
    assert len(val[1]) == 2 and val[2] == pytest.approx(val[1], rel=1e-6)
    for step, want in got[1].items():
        assert got[2][step]["loss"] == pytest.approx(want["loss"], rel=1e-5), step
        assert got[2][step]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), step


def test_stage_notes_come_from_rank_0_only(tokenizer, monkeypatch, capsys):
    """Under torchrun every rank runs the stage's code: its notes (here: a conversation too
    long for the context, skipped) are printed by rank 0 only, not once per rank."""
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": w}]
             for w in ("yes", "Mia has two cats " * 20)]
    printed = []
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        assert len(encode_conversations(convs, tokenizer, 16)) == 1
        printed.append(capsys.readouterr().out)
    assert printed == ["", "skipped 1 of 2 conversations longer than 16 tokens\n"]


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory, tokenizer):
    """One-process runs of each stage, then one torchrun launch of 4 processes (see
    posttrain_dist_worker.py)."""
    refs, base = tmp_path_factory.mktemp("refs"), tmp_path_factory.mktemp("mesh")
    model = base_model(refs / "base", tokenizer, seq_len=96, n_layer=2)
    data = str(conversations(refs / "conv.jsonl", 64))
    cfg = lambda: load_config(overrides=ONE_PROCESS)  # noqa: E731
    sft(cfg(), model, data, refs / "sft")
    train_reward(cfg(), model, "builtin:tasks", refs / "reward")
    dpo(cfg(), model, str(refs / "reward" / "preferences.jsonl"), refs / "dpo")
    r = torchrun(4, str(ROOT / "tests" / "posttrain_dist_worker.py"), str(base), str(refs),
                 data)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("reward data:") == 3  # 3 reward runs: rank 0 alone prints
    return refs, base


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
@pytest.mark.parametrize("mapping", ["2_1_2", "1_2_2"])
def test_stage_on_a_mesh_matches_one_process(mesh_runs, stage, mapping):
    refs, base = mesh_runs
    run, want = base / f"{stage}_{mapping}", losses(refs / stage)
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max_rel_diff(want, got) < 1e-4
    assert len(set(want.values())) > 5  # it trained
    # rank 0 wrote the consolidated model: the same weights as the one-process run
    a, b = read_tensors(refs / stage / "model/model.safetensors"), \
        read_tensors(run / "model/model.safetensors")
    assert set(a) == set(b)
    for k in set(a) - {"head.bias"}:  # Bradley-Terry sees only differences of scores, so
        # the bias gets a zero gradient up to rounding, which Adam scales to full steps
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
    if stage == "reward":  # rank 0 sampled the same preference data
        assert (run / "preferences.jsonl").read_text() == \
            (refs / "reward/preferences.jsonl").read_text()


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_killed_fsdp_tp_run_resumes_under_dp_tp(mesh_runs, stage):
    refs, base = mesh_runs
    got, want = losses(base / f"{stage}_resumed"), losses(refs / stage)
    assert sorted(got) == list(range(1, STEPS + 1))  # rows 6-7 of the killed run replaced
    assert got[6] == pytest.approx(want[6], rel=1e-5)
    assert max_rel_diff(want, got) < 1e-4


def test_one_process_checkpoint_resumes_on_a_mesh_and_back(mesh_runs, tmp_path):
    refs, base = mesh_runs
    assert max_rel_diff(losses(refs / "sft"), losses(base / "sft_from_one")) < 1e-4
    # the fsdp=2 x tp=2 reward run's sharded step_5, resumed in one plain process
    one = tmp_path / "reward_one"
    shutil.copytree(base / "reward_1_2_2", one,
                    ignore=shutil.ignore_patterns("step_10", "model"))
    cfg = load_config(overrides=ONE_PROCESS)
    train_reward(cfg, refs / "base", "builtin:tasks", one, resume=True)
    want = losses(refs / "reward")
    assert losses(one)[6] == pytest.approx(want[6], rel=1e-5)
    assert max_rel_diff(want, losses(one)) < 1e-4
