"""PPO on the device mesh: under torchrun (4 CPU processes, gloo) with dp=2 x tp=2 and
fsdp=2 x tp=2 it samples the same responses and logs the same losses, step for step, as one
process drawing the rollout batch in as many chunks (ppo.rollout_shards=2); a run killed
after step 7 resumes under another mapping to the same curve, and so does a mesh checkpoint
in one process."""

import json
import shutil
import types
from pathlib import Path

import pytest
import torch
from conftest import save_policy_and_reward_model
from test_parallel_dist import max_rel_diff, torchrun

import scalelab.train.ppo as ppo_module
from scalelab.config import PPOConfig, UserError, load_config
from scalelab.train.checkpoint import read_tensors

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10
ONE_PROCESS = [f"train.max_steps={STEPS}", "train.checkpoint_every=5", "train.lr=3e-3",
               "train.device=cpu", "ppo.n_prompts=32", "ppo.rollout_batch=8",
               "ppo.samples_per_prompt=2", "ppo.max_new_tokens=6", "ppo.minibatches=2",
               "ppo.ppo_epochs=2", "ppo.temperature=1.0", "ppo.adaptive_kl=true",
               "ppo.kl_horizon=40", "ppo.target_kl=0.01", "ppo.rollout_shards=2"]
KEYS = ["loss", "loss/value", "objective/scores", "objective/entropy", "kl_coef",
        "val/response_len"]
# Small means of terms of both signs (the clipped surrogate; KL, a sum of differences of two
# log-probs): float32 rounding is larger relative to them (measured 3.5e-5 and 1.8e-5).
LOOSER = ["loss/policy", "objective/kl"]


def rel_diff(want: dict[int, dict], got: dict[int, dict], key: str) -> float:
    """Largest relative difference of `key` over the steps of got (step 1's KL is exactly 0:
    policy == reference, so below 1e-6 the difference is taken as absolute)."""
    return max(abs(want[s][key] - r[key]) / max(abs(want[s][key]), 1e-6) for s, r in got.items())


def rows(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                      .splitlines()) if "loss" in r}


def run_recording(monkeypatch, *args, **kwargs) -> dict[int, list]:
    """ppo(...) in this process; returns {chunk seed: the responses sampled from it}."""
    seen = {}
    sample = ppo_module.sample_responses

    def recording(*a, **kw):
        responses = sample(*a, **kw)
        size = len(responses) // len(a[4].seeds)
        seen.update({s: responses[k * size:(k + 1) * size] for k, s in enumerate(a[4].seeds)})
        return responses
    monkeypatch.setattr(ppo_module, "sample_responses", recording)
    ppo_module.ppo(*args, **kwargs)
    monkeypatch.setattr(ppo_module, "sample_responses", sample)
    return seen


def mesh_responses(run: Path) -> list[dict[int, list]]:
    """Per rank: {chunk seed: responses} (one chunk per data rank here)."""
    out = []
    for r in range(4):
        records = json.loads((run / "responses" / f"rank_{r}.json").read_text())
        assert all(len(rec["seeds"]) == 1 for rec in records)
        out.append({rec["seeds"][0]: rec["responses"] for rec in records})
    return out


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory, tokenizer):
    refs, base = tmp_path_factory.mktemp("ppo_refs"), tmp_path_factory.mktemp("ppo_mesh")
    save_policy_and_reward_model(tokenizer, refs, reward_std=0.1)
    mp = pytest.MonkeyPatch()
    seen = run_recording(mp, load_config(overrides=ONE_PROCESS), refs / "base", refs / "rm",
                         "builtin:tasks", refs / "ppo")
    r = torchrun(4, str(ROOT / "tests" / "ppo_dist_worker.py"), str(base), str(refs))
    assert r.returncode == 0, r.stderr[-3000:]
    return refs, base, seen


@pytest.mark.parametrize("mapping", ["2_1_2", "1_2_2", "resumed"])
def test_ppo_on_a_mesh_matches_one_process(ppo_runs, mapping):
    refs, base, seen = ppo_runs
    run = base / f"ppo_{mapping}"
    want, got = rows(refs / "ppo"), rows(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert len({r["loss"] for r in want.values()}) > 5  # it trained
    assert len({r["kl_coef"] for r in want.values()}) > 5  # PPO's own state moves
    for key in KEYS:
        assert rel_diff(want, got, key) < 1e-4, key
    for key in LOOSER:
        assert rel_diff(want, got, key) < 1e-3, key
    for s, r in got.items():  # the gold labeler's mean, summed over the data ranks
        assert r["gold_reward"] == pytest.approx(want[s]["gold_reward"], abs=1e-6)
    # the same tokens, chunk by chunk; the two tp ranks of a data group hold identical ones
    per_rank = mesh_responses(run)
    assert per_rank[0] == per_rank[1] and per_rank[2] == per_rank[3]
    assert set(per_rank[0]).isdisjoint(per_rank[2])  # each data rank its own chunk
    steps = 5 if mapping == "resumed" else STEPS  # resumed: steps 6..10 only
    assert len(per_rank[0]) + len(per_rank[2]) == 2 * steps
    for mine in (per_rank[0], per_rank[2]):
        for seed, responses in mine.items():
            assert responses == seen[seed]
    a, b = read_tensors(refs / "ppo/model/model.safetensors"), \
        read_tensors(run / "model/model.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)


def test_mesh_checkpoint_resumes_in_one_process(ppo_runs, tmp_path, monkeypatch):
    """The dp=2 x tp=2 run's sharded step_5 (DCP, kl_coef in state.json) in one process."""
    refs, base, seen = ppo_runs
    one = tmp_path / "ppo_one"
    shutil.copytree(base / "ppo_2_1_2", one,
                    ignore=shutil.ignore_patterns("step_10", "model", "responses"))
    assert (one / "checkpoints/step_5/dcp").is_dir()
    got = run_recording(monkeypatch, load_config(overrides=ONE_PROCESS), refs / "base",
                        refs / "rm", "builtin:tasks", one, resume=True)
    want = rows(refs / "ppo")
    assert max_rel_diff({s: want[s]["loss"] for s in want},
                        {s: r["loss"] for s, r in rows(one).items()}) < 1e-4
    assert len(got) == 10 and all(seen[s] == r for s, r in got.items())


def test_rollout_chunks_per_data_rank():
    par = types.SimpleNamespace(data_world=2, data_rank=1)
    assert ppo_module.rollout_chunks(PPOConfig(rollout_batch=8, samples_per_prompt=2), par) \
        == (2, 1, 1)
    pc = PPOConfig(rollout_batch=16, samples_per_prompt=2, rollout_shards=4)
    assert ppo_module.rollout_chunks(pc, par) == (4, 2, 2)
    with pytest.raises(UserError, match="ppo.rollout_shards=3"):
        ppo_module.rollout_chunks(PPOConfig(rollout_shards=3), par)
    with pytest.raises(UserError, match="ppo.rollout_batch=12"):
        ppo_module.rollout_chunks(PPOConfig(rollout_batch=12, samples_per_prompt=4), par)
    # 4 rows per chunk cut into 3 minibatches would silently be 2 (torch.chunk): refused
    with pytest.raises(UserError, match="ppo.minibatches=3"):
        ppo_module.rollout_chunks(PPOConfig(rollout_batch=8, samples_per_prompt=2,
                                            minibatches=3), par)
