"""Post-training behaviour: PPO learns a toy reward; the stages run end to end via the CLI."""

import json

import pytest
import torch
from conftest import run_cli, tiny_sets, toy_ppo

from scalelab.config import ModelConfig, PPOConfig
from scalelab.data.batches import split_heldout
from scalelab.train.ppo import ppo_step


def test_ppo_raises_a_toy_reward(tokenizer):
    """Reward = fraction of response tokens from the lower half of the vocabulary."""
    policy, ref, value, opt, _ = toy_ppo(tokenizer, lr=3e-3, weight_decay=0.0)
    pc = PPOConfig(max_new_tokens=8, kl_coef=0.01, missing_eos_penalty=0.0, minibatches=2)
    half = tokenizer.vocab_size // 2

    def reward_fn(idx, responses):
        return torch.tensor([sum(t < half for t in r) / max(len(r), 1) for r in responses])

    prompts = [tokenizer.encode(f"Mia has {i}", bos=True) for i in range(32)]
    g = torch.Generator().manual_seed(0)
    scores = [ppo_step(policy, ref, value, opt, reward_fn, list(range(32)), prompts, tokenizer,
                       pc, pc.kl_coef, g)[0]["objective/scores"] for _ in range(25)]
    assert sum(scores[:3]) / 3 < 0.65
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.2


def test_post_training_stages_end_to_end(tmp_path):
    base = tmp_path / "pre"
    small = [*tiny_sets(), "--set", "model.seq_len=96"]
    assert run_cli("pretrain", "--config", "tiny", "--out", str(base), "--max-steps", "30",
                   *small).returncode == 0
    quick = ["--set", "train.eval_every=10", "--set", "train.checkpoint_every=10",
             "--set", "train.batch_size=8"]
    r = run_cli("sft", "--base", str(base / "model"), "--data", "builtin:tasks",
                "--out", str(tmp_path / "sft"), "--max-steps", "20", *quick,
                "--set", "sft.n_examples=400")
    assert r.returncode == 0, r.stderr
    r = run_cli("reward", "--base", str(tmp_path / "sft/model"), "--data", "builtin:tasks",
                "--out", str(tmp_path / "rm"), "--max-steps", "10", *quick,
                "--set", "reward.n_prompts=120", "--set", "reward.max_new_tokens=8")
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "rm/model/reward.json").read_text())
    right, total = held_out_pair_accuracy(tmp_path / "rm")
    assert total > 0 and abs(stats["val_accuracy"] * total - right) <= 1  # a near-tie may flip
    r = run_cli("ppo", "--policy", str(tmp_path / "sft/model"), "--reward",
                str(tmp_path / "rm/model"), "--prompts", "builtin:tasks",
                "--out", str(tmp_path / "ppo"), "--max-steps", "4",
                "--set", "ppo.rollout_batch=8", "--set", "ppo.max_new_tokens=8",
                "--set", "ppo.n_prompts=64", "--set", "train.checkpoint_every=2",
                "--set", "ppo.adaptive_kl=true", "--set", "ppo.kl_horizon=100")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "ppo/metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "policy/clipfrac",
                "policy/approxkl", "loss/value", "val/ratio", "gold_reward", "loss", "lr"):
        assert all(key in r for r in rows), key
    assert abs(rows[0]["objective/kl"]) < 1e-5  # step 1: policy == reference

    # Crash after step 2 (drop what came later), resume: the same steps 3 and 4 again.
    import shutil
    crashed = tmp_path / "ppo_crashed"
    shutil.copytree(tmp_path / "ppo", crashed)
    shutil.rmtree(crashed / "checkpoints/step_4")
    r = run_cli("ppo", "--policy", str(tmp_path / "sft/model"), "--reward",
                str(tmp_path / "rm/model"), "--prompts", "builtin:tasks",
                "--out", str(crashed), "--resume")
    assert r.returncode == 0, r.stderr
    again = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "episodes_per_s"} for r in rows]
    assert strip(again) == strip(rows)
    # The demo's evaluation and report over these models.
    from scalelab.demo import evaluate_policies, markdown_to_html, read_metrics, write_report
    results = evaluate_policies({"SFT": tmp_path / "sft/model", "PPO": tmp_path / "ppo/model"})
    from scalelab.tasks import HELDOUT_TASKS, TRAIN_TASKS
    for r in results.values():
        assert set(r["held_out"]) == {*HELDOUT_TASKS, "mean"}
        assert set(r["held_in"]) == {*TRAIN_TASKS, "mean"}
        for split in (r["held_in"], r["held_out"]):
            fams = [v for k, v in split.items() if k != "mean"]
            assert abs(split["mean"] - sum(fams) / len(fams)) < 1e-9
        assert len(r["showcase"]) == 6
    md = write_report(tmp_path, "scalelab demo", 1.0, results, stats,
                      read_metrics(tmp_path / "ppo"), [])
    assert f"{results['PPO']['gold_reward']:.3f}" in md and "| PPO |" in md
    assert "<table>" in markdown_to_html(md)

    # The gold labeler itself as the reward (no reward model); the labeler's values are
    # checked by hand in test_posttrain_math.py.
    r = run_cli("ppo", "--policy", str(tmp_path / "sft/model"), "--reward", "builtin:gold",
                "--prompts", "builtin:tasks", "--out", str(tmp_path / "oracle"),
                "--max-steps", "2", "--set", "ppo.rollout_batch=8", "--set",
                "ppo.max_new_tokens=8", "--set", "ppo.n_prompts=64")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "oracle/metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("gold_reward" in r for r in rows)
    r = run_cli("dpo", "--policy", str(tmp_path / "sft/model"), "--data",
                str(tmp_path / "rm/preferences.jsonl"), "--out", str(tmp_path / "dpo"),
                "--max-steps", "3", "--set", "train.batch_size=4", "--set", "train.log_every=1")
    assert r.returncode == 0, r.stderr
    first = json.loads((tmp_path / "dpo/metrics.jsonl").read_text().splitlines()[1])
    assert first["step"] == 1 and abs(first["loss"] - 0.6931) < 1e-3  # ln 2 at step 1


def held_out_pair_accuracy(run) -> tuple[int, int]:
    """The reward model's accuracy on its held-out preference pairs, recomputed one unpadded
    sequence at a time (training scores padded batches): (right, total)."""
    from scalelab.config import load_config
    from scalelab.train.reward import encode_rows, load_reward_model
    cfg = load_config(run / "config.toml")
    model, tok, _ = load_reward_model(run / "model")
    rows = [json.loads(line) for line in (run / "preferences.jsonl").read_text().splitlines()]
    items = encode_rows(rows, tok, model.cfg.seq_len, cfg.reward.min_margin)
    held = split_heldout(items)[1]
    right = total = 0
    with torch.no_grad():
        for seqs, pairs in held:
            r = [model(torch.tensor([s]))[0, -1].item() for s in seqs]
            right += sum(r[i] > r[j] for i, j in pairs)
            total += len(pairs)
    return right, total


def test_malformed_post_training_files_name_file_and_line(tmp_path, tokenizer):
    from scalelab.model import Transformer as T
    from scalelab.train.checkpoint import save_model
    model_dir = tmp_path / "m"
    save_model(T(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=1,
                             n_head=2, d_model=16)), tokenizer, model_dir)
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a"}\n')
    r = run_cli("dpo", "--policy", str(model_dir), "--data", str(bad), "--out",
                str(tmp_path / "d"))
    assert r.returncode == 2 and "prefs.jsonl:2" in r.stderr and "chosen" in r.stderr
    r = run_cli("reward", "--base", str(model_dir), "--data", str(bad), "--out",
                str(tmp_path / "r"))
    assert r.returncode == 2 and "prefs.jsonl:2" in r.stderr
    # too few pairs for a batch: the hint named reward.n_prompts, which a file does not read
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 3)
    r = run_cli("reward", "--base", str(model_dir), "--data", str(bad), "--out",
                str(tmp_path / "r"))
    assert r.returncode == 2 and "n_prompts" not in r.stderr and "prefs.jsonl" in r.stderr \
        and "train.batch_size" in r.stderr, r.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": 3}\n')
    r = run_cli("ppo", "--policy", str(model_dir), "--reward", str(model_dir), "--prompts",
                str(prompts), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "prompts.jsonl:2" in r.stderr
    prompts.write_text('{"prompt": "hi"}\n')
    r = run_cli("ppo", "--policy", str(model_dir), "--reward", "builtin:gold", "--prompts",
                str(prompts), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "builtin:tasks" in r.stderr
    sft_data = tmp_path / "sft.jsonl"
    sft_data.write_text('{"messages": [{"role": "user", "content": "x"}]}\n')
    r = run_cli("sft", "--base", str(model_dir), "--data", str(sft_data), "--out",
                str(tmp_path / "s"))
    assert r.returncode == 2 and "sft.jsonl:1" in r.stderr and "assistant" in r.stderr
    assert "Traceback" not in r.stderr
    # Found by a fuzz run: well-formed but too few examples to fill one training batch.
    sft_data.write_text('{"prompt": "a", "completion": "b"}\n' * 3)
    r = run_cli("sft", "--base", str(model_dir), "--data", str(sft_data), "--out",
                str(tmp_path / "s2"), "--set", "train.batch_size=4")
    assert r.returncode == 2 and "fewer than one batch" in r.stderr, r.stderr


def test_dpo_pairs_from_ranked_preferences_keep_ties_out_and_stops(tmp_path):
    from scalelab.train.dpo import load_pairs
    f = tmp_path / "preferences.jsonl"
    f.write_text(json.dumps({"prompt": "p", "responses": ["a", "b", "c"],
                             "stopped": [True, False, True], "scores": [1.5, 0.3, 1.4]}) + "\n")
    # "c" is within the tie margin of the best answer: no pair; "b" never stopped.
    assert load_pairs(str(f), 0.3) == [("p", "a", "b", True, False)]
    assert len(load_pairs(str(f), 0.0)) == 2


@pytest.mark.parametrize("row, key", [
    ({"prompt": "x", "responses": ["a", "b"]}, "scores"),
    ({"prompt": "x", "responses": ["a", "b"], "scores": [1.0]}, "scores"),
    ({"prompt": "x", "responses": "ab", "scores": [1.0, 0.0]}, "responses"),
    ({"responses": ["a", "b"], "scores": [1.0, 0.0]}, "prompt"),
    ({"prompt": "x", "responses": ["a", "b"], "scores": [1, 0], "stopped": [True]}, "stopped"),
])
def test_a_malformed_ranked_preference_row_is_named(tmp_path, row, key):
    """dpo --data on an edited reward-run preferences.jsonl: a row missing "scores" was a
    KeyError traceback."""
    from scalelab.config import UserError
    from scalelab.train.dpo import load_pairs
    good = {"prompt": "p", "responses": ["a", "b"], "scores": [1.0, 0.0]}
    f = tmp_path / "preferences.jsonl"
    f.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=f'preferences.jsonl:2: .*"{key}"'):
        load_pairs(str(f), 0.3)


def test_too_few_ppo_prompts_say_what_is_short(tmp_path, tokenizer, capsys):
    """A prompts file of 3 prompts said 'only 3 prompts fit the context with 24 new tokens;
    need 8', as if they were too long: the file is too short for one step's batch."""
    from conftest import save_policy_and_reward_model

    from scalelab.cli import main
    save_policy_and_reward_model(tokenizer, tmp_path, reward_std=1.0)
    prompts = tmp_path / "prompts.jsonl"

    def ppo_says(*rows: str) -> str:
        prompts.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
        assert main(["ppo", "--policy", str(tmp_path / "base"), "--reward", str(tmp_path / "rm"),
                     "--prompts", str(prompts), "--out", str(tmp_path / "p")]) == 2
        return capsys.readouterr().err

    err = ppo_says("a", "b", "c")  # 32 responses per step, 4 per prompt: 8 prompts
    assert "holds 3 prompts" in err and "needs 8" in err and "context" not in err, err
    assert "ppo.rollout_batch" in err and "ppo.samples_per_prompt" in err, err
    err = ppo_says(*["hi"] * 6, *["river " * 200] * 4)  # enough, but 4 too long for 128
    assert "only 6 of the 10 prompts fit" in err and "ppo.max_new_tokens" in err, err


def test_too_few_pairs_say_where_one_step_comes_from(tmp_path, tokenizer):
    """DPO's and reward's "too few" errors said a number (DPO's twice what one step needs)
    without where it comes from: batch size x data ranks x grad_accum, beside the held-out."""
    from scalelab.config import PRESETS, UserError, load_config
    from scalelab.model import Transformer
    from scalelab.train.checkpoint import save_model
    from scalelab.train.dpo import dpo
    from scalelab.train.reward import train_reward
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1, n_head=2,
                     d_model=32)
    save_model(Transformer(mc), tokenizer, tmp_path / "base")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Say {i}.", "chosen": str(i),
                                         "rejected": f"{i} {i} {i}"}) + "\n" for i in range(12)))
    sets = ["train.batch_size=4", "train.grad_accum=3", "train.device=cpu"]
    why = "one step trains on 12 (train.batch_size 4 x 1 data rank x train.grad_accum 3)"
    with pytest.raises(UserError) as e:
        dpo(load_config(PRESETS / "dpo.toml", sets), tmp_path / "base", str(pairs),
            tmp_path / "dpo")
    assert f"{pairs}: only 12 usable pairs (1 held out); {why}" in str(e.value)
    with pytest.raises(UserError) as e:
        train_reward(load_config(PRESETS / "reward.toml", sets), tmp_path / "base", str(pairs),
                     tmp_path / "rm")
    assert f"only 12 prompts with a preference (1 held out); {why}" in str(e.value)
    # 13 pairs: 12 to train on, one step's worth, which is enough (DPO asked for 24)
    pairs.write_text("".join(json.dumps({"prompt": f"Say {i}.", "chosen": str(i),
                                         "rejected": f"{i} {i}"}) + "\n" for i in range(13)))
    cfg = load_config(PRESETS / "dpo.toml", [*sets, "train.max_steps=1",
                                              "train.checkpoint_every=1"])
    dpo(cfg, tmp_path / "base", str(pairs), tmp_path / "dpo2")
    assert (tmp_path / "dpo2" / "model" / "model.safetensors").is_file()
