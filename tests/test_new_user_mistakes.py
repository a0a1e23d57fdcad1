"""A new user's mistakes, through the command line: one clear line and exit 2, nothing lost
(issue 15 and later hunts). Their project is tests/new_user_home.py's."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_sets
from new_user_home import SMALL, WORDS, cli, paragraphs

from scalelab.config import PRESETS

# ---- 4. mistakes: one clear line, exit 2 ------------------------------------------------

@pytest.fixture(scope="module")
def reward_dir(user_home, user_base) -> Path:
    """A reward-model folder (random head: only its kind matters here)."""
    from scalelab.model import ScalarModel
    from scalelab.train.checkpoint import load_model, save_model
    model, tok = load_model(user_base[0] / "model")
    out = user_home / "rm" / "model"
    save_model(ScalarModel(model), tok, out, extra_json={"reward.json": {"mean": 0, "std": 1}})
    return out


GENERATE_MISTAKES = [
    (["--num-samples", "0"], "--num-samples 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--max-new-tokens", "5000"], "at most"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--top-p", "-0.1"], "--top-p -0.1"),
    (["--top-k", "-5"], "--top-k -5"),
    (["--temperature", "-1"], "--temperature -1"),
    (["--temperature", "inf"], "--temperature inf"),
    (["--temperature", "0", "--num-samples", "3"], "would be the same"),
    (["--seed", str(2**64)], f"--seed {2**64}"),
]


@pytest.mark.parametrize("args, message", GENERATE_MISTAKES)
def test_generate_value_mistakes(user_base, args, message):
    rc, out, err = cli("generate", "--model", str(user_base[0] / "model"), "--prompt", "river",
                       *args)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(user_base):
    rc, _, err = cli("generate", "--model", str(user_base[0] / "model"), "--prompt", "x",
                     "--device", "cuda")
    assert rc == 2 and "no CUDA GPU" in err


def test_wrong_kind_of_folder_is_named(user_base, reward_dir, user_sft, tmp_path):
    rc, _, err = cli("generate", "--model", str(user_base[0]), "--prompt", "x")
    assert rc == 2 and f"did you mean {user_base[0] / 'model'}" in err
    for args in (["generate", "--model", str(reward_dir), "--prompt", "x"],
                 ["sft", "--base", str(reward_dir), "--data", "builtin:tasks",
                  "--out", str(tmp_path / "s")],
                 ["track", "model", "add", str(reward_dir), "--no-run",
                  "--registry", str(tmp_path / "reg.db")]):
        rc, _, err = cli(*args)
        assert rc == 2 and "this is a reward model" in err, args
    assert not (tmp_path / "s").exists()
    rc, _, err = cli("ppo", "--policy", str(user_sft / "model"), "--reward", str(reward_dir.parent),
                     "--prompts", "builtin:tasks", "--out", str(tmp_path / "p"))
    assert rc == 2 and f"did you mean {reward_dir}" in err


@pytest.mark.parametrize("args, message", [
    (["--config", "tny"], "presets: "),
    (["--config", "."], "is a folder"),
    (["--config", "tiny", "--set", "model.n_layer=-3"], "model.n_layer = -3"),
    (["--config", "tiny", "--set", "train.batch_size=0"], "train.batch_size = 0"),
    (["--config", "tiny", "--set", "model.n_head=7"], "n_head = 7"),  # before any data work
])
def test_config_mistakes(tmp_path, args, message):
    rc, out, err = cli("pretrain", "--out", str(tmp_path / "r"), *args)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert "corpus:" not in out  # refused before the corpus and tokenizer were built
    assert not (tmp_path / "r").exists()  # nothing claimed for a mistake in the command
    if message == "presets: ":
        assert "tiny" in err and "small" in err


STAGE_ARGS = {"sft": ["--base", "b", "--data", "builtin:tasks"],
              "reward": ["--base", "b", "--data", "builtin:tasks"],
              "dpo": ["--policy", "b", "--data", "prefs.jsonl"],
              "ppo": ["--policy", "b", "--reward", "rm", "--prompts", "builtin:tasks"]}


@pytest.mark.parametrize("stage", STAGE_ARGS)
def test_a_post_training_config_with_model_or_data_is_refused(tmp_path, stage):
    """[model] and [data] in a post-training --config were accepted and ignored (the model
    comes from the base folder): now exit 2 naming each key, before anything is made."""
    config = tmp_path / "my.toml"
    config.write_text("[model]\nn_layer = 8\nd_model = 512\n\n[data]\nsource = \"c.txt\"\n\n"
                      "[train]\nlr = 1e-4\n")
    rc, out, err = cli(stage, *STAGE_ARGS[stage], "--out", str(tmp_path / "r"),
                       "--config", str(config))
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not out, err
    assert str(config) in err and "model.n_layer, model.d_model, data.source" in err
    assert "base model folder" in err
    assert not (tmp_path / "r").exists()
    config.write_text("[model]\nn_layer = 8\n[train]\nlr = 1e-4\n")  # [model] alone
    rc, _, err = cli(stage, *STAGE_ARGS[stage], "--out", str(tmp_path / "r"),
                     "--config", str(config))
    assert rc == 2 and "model.n_layer: " in err and "[data]" not in err, err


def test_a_labeler_with_nothing_to_label_is_refused(user_home, tmp_path):
    """reward.labeler was silently unused with a reward --data file of pairs and with PPO on
    the user's own prompts: exit 2 naming it, before any work."""
    labeler = ["--set", "reward.labeler=my_raters:score"]
    rc, out, err = cli("reward", "--base", "b", "--data", str(user_home / "prefs.jsonl"),
                       "--out", str(tmp_path / "r"), *labeler)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not out, err
    assert "reward.labeler = 'my_raters:score' has no effect" in err and "prefs.jsonl" in err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in WORDS))
    rc, out, err = cli("ppo", "--policy", "b", "--reward", "rm", "--prompts", str(prompts),
                       "--out", str(tmp_path / "p"), *labeler)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not out, err
    assert "reward.labeler = 'my_raters:score' has no effect" in err and "prompts.jsonl" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "p").exists()


def test_sampling_settings_with_a_file_of_pairs_are_refused(user_home, tmp_path):
    """reward.n_prompts and the other sampling settings were silently unused with --data FILE
    (nothing is sampled): exit 2 naming them. The preset's own values pass: a config file
    copied from it is no mistake."""
    data = ["--data", str(user_home / "prefs.jsonl")]
    rc, out, err = cli("reward", "--base", "b", *data, "--out", str(tmp_path / "r"),
                       "--set", "reward.n_prompts=50", "--set", "reward.temperature=0.7")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not out, err
    assert "reward.n_prompts = 50, reward.temperature = 0.7: no effect with --data" in err
    assert "prefs.jsonl" in err and not (tmp_path / "r").exists()
    copied = tmp_path / "reward.toml"
    copied.write_text((PRESETS / "reward.toml").read_text())
    rc, _, err = cli("reward", "--base", "b", *data, "--out", str(tmp_path / "r"),
                     "--config", str(copied))
    assert rc == 2 and "b: model folder not found" in err, err  # past the check, to --base


def test_resume_reads_the_runs_own_config_with_every_section(user_sft):
    """A run's config.toml holds [model] and [data] too: --resume reads it without complaint."""
    assert "[model]" in (user_sft / "config.toml").read_text()
    rc, out, err = cli("sft", "--base", "unused", "--data", "builtin:tasks",
                       "--out", str(user_sft), "--resume")
    assert rc == 0 and "nothing to do" in out, err


def test_nothing_to_do_is_said_by_rank_0_only(user_sft, monkeypatch):
    """Under torchrun every worker finds the run finished: only rank 0 says so."""
    monkeypatch.setenv("RANK", "1")
    rc, out, err = cli("sft", "--base", "unused", "--data", "builtin:tasks",
                       "--out", str(user_sft), "--resume")
    assert (rc, out) == (0, ""), err


def test_status_json_into_a_closed_pipe(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "scalelab", "track", "status", "--json",
                             "--registry", str(tmp_path / "reg.db")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `| head` that has already exited
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_ppo_on_own_prompts_shows_progress_without_a_terminal(user_home, user_sft, reward_dir):
    prompts = user_home / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in WORDS))
    rc, _, err = cli("ppo", "--policy", str(user_sft / "model"), "--reward", str(reward_dir),
                     "--prompts", str(prompts), "--out", str(user_home / "ppo"), "--max-steps", "2",
                     "--set", "ppo.rollout_batch=8", "--set", "ppo.samples_per_prompt=2",
                     "--set", "ppo.max_new_tokens=6", "--set", "train.checkpoint_every=2")
    assert rc == 0, err
    assert "ppo: step 1/2" in err and "ppo: step 2/2" in err


# ---- 6. honest numbers ------------------------------------------------------------------

def test_dpo_logs_real_tokens_and_registry_adds_its_base(user_home, user_base, user_sft, tmp_path):
    rc, _, err = cli("dpo", "--policy", str(user_sft / "model"), "--data",
                     str(user_home / "prefs.jsonl"), "--out", str(user_home / "dpo"),
                     "--max-steps", "4",
                     *train_sets(), "--set", "train.batch_size=4")
    assert rc == 0, err
    rows = [json.loads(r) for r in (user_home / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert all(r["tokens_per_s"] > 0 for r in train_rows)
    # 4 steps x 4 pairs x 2 answers: real tokens, fewer than the padded batches would hold
    assert 0 < train_rows[-1]["tokens"] < 4 * 8 * 32

    reg = str(tmp_path / "reg.db")
    got = {}
    for name, folder in (("base", user_base[0]), ("sft", user_sft), ("dpo", user_home / "dpo")):
        rc, _, err = cli("track", "model", "add", str(folder / "model"), "--name", name,
                         "--no-run", "--registry", reg)
        assert rc == 0, err
    from scalelab.track.registry import Registry
    got = {m["name"]: m for m in Registry(Path(reg)).models()}

    def logged_tokens(run):
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["tokens"] for r in rows if "tokens" in r][-1]
    assert got["base"]["tokens"] == 20 * 8 * 32 == logged_tokens(user_base[0])
    assert got["dpo"]["tokens"] == sum(logged_tokens(r)
                                       for r in (user_base[0], user_sft, user_home / "dpo"))
    assert got["dpo"]["flops"] > got["sft"]["flops"] > got["base"]["flops"]
    # val_loss is the pretraining next-token loss only; SFT and DPO losses are not it
    last_val = [json.loads(r) for r in (user_base[0] / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in r][-1]["val_loss"]
    assert got["base"]["val_loss"] == last_val
    assert got["sft"]["val_loss"] is None and got["dpo"]["val_loss"] is None


def test_no_scaling_fit_on_models_of_one_size(user_base, tmp_path):
    reg = str(tmp_path / "reg.db")
    for name in ("a", "b", "c"):  # three runs of one size (one folder twice is refused)
        shutil.copytree(user_base[0], tmp_path / name)
        assert cli("track", "model", "add", str(tmp_path / name / "model"), "--name", name,
                   "--no-run", "--registry", reg)[0] == 0
    rc, _, err = cli("track", "report", "--out", str(tmp_path / "rep"), "--registry", reg)
    assert rc == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "no L(N) fit" in page and "L(N) = " not in page and "different corpora" not in page
    other = tmp_path / "other.jsonl"  # a second corpus
    other.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs(200, seed=1)))
    rc, _, err = cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "o"),
                     "--max-steps", "2", *SMALL, "--set", "model.d_model=48",
                     "--set", f"data.source={other}")
    assert rc == 0, err
    assert cli("track", "model", "add", str(tmp_path / "o" / "model"), "--no-run",
               "--registry", reg)[0] == 0
    rc, _, err = cli("track", "report", "--out", str(tmp_path / "rep"), "--registry", reg)
    page = (tmp_path / "rep" / "report.html").read_text()
    assert rc == 0 and "different corpora" in page and str(other) in page, err


def test_tracker_keeps_task_files_usable_from_any_folder(user_base, tmp_path, monkeypatch):
    reg = str(tmp_path / "reg.db")
    (tmp_path / "proj").mkdir()
    monkeypatch.chdir(tmp_path / "proj")
    Path("qa.jsonl").write_text(json.dumps({"prompt": "river", "target": " stone"}) + "\n")
    rc, out, err = cli("track", "model", "add", str(user_base[0] / "model"), "--registry", reg)
    assert rc == 0 and "track experiment seed" in out, err  # empty registry: told what to do
    assert cli("track", "experiment", "add", "--name", "mine", "--task", "qa.jsonl",
               "--threshold", "0.5", "--registry", reg)[0] == 0
    monkeypatch.chdir(tmp_path)
    rc, out, err = cli("track", "run", "--registry", reg)
    assert rc == 0 and "mine" in out, err


# ---- 7. the user's own small models and files (session 7) -------------------------------

def test_default_max_new_tokens_fits_a_small_context(user_base, user_sft):
    """A model of 32 tokens' context: generate and chat without --max-new-tokens used to
    refuse their own default (64); the default now takes what the context leaves."""
    rc, out, err = cli("generate", "--model", str(user_base[0] / "model"), "--prompt", "river")
    assert rc == 0 and out.startswith("river"), err
    rc, out, err = cli("chat", "--model", str(user_sft / "model"), stdin="Say river.\n")
    assert rc == 0 and out.count("assistant> ") == 1, err
    rc, _, err = cli("generate", "--model", str(user_base[0] / "model"), "--prompt", "river",
                     "--max-new-tokens", "64")  # asked for explicitly: still refused
    assert rc == 2 and "at most" in err


def test_a_tokenizer_larger_than_the_model_is_named(user_base, tmp_path):
    """tokenizer.json copied from another run: ids past the embedding crashed generate, sft
    and reward with an IndexError traceback (sft leaving a half-made run) and export wrote
    a folder transformers cannot run."""
    import shutil

    from scalelab.data.world import generate_documents
    from scalelab.tokenizer import Tokenizer
    folder = tmp_path / "model"
    shutil.copytree(user_base[0] / "model", folder)
    rows = json.loads((folder / "config.json").read_text())["vocab_size"]
    bigger = Tokenizer.train(generate_documents(3000, seed=0), rows + 200)
    assert bigger.vocab_size > rows
    bigger.save(folder / "tokenizer.json")
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    for args in (["generate", "--model", str(folder), "--prompt", "Mia has",
                  "--max-new-tokens", "4"],
                 ["sft", "--base", str(folder), "--data", str(tmp_path / "d.jsonl"),
                  "--out", str(tmp_path / "sft")],
                 ["export", "--model", str(folder), "--out", str(tmp_path / "hf")]):
        rc, out, err = cli(*args)
        assert rc == 2 and str(folder / "tokenizer.json") in err, (args, err)
        assert f"{bigger.vocab_size} tokens" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sft").exists() and not (tmp_path / "hf").exists()


def test_a_second_command_on_a_run_being_written_is_refused(user_home, tmp_path):
    """Two `pretrain --resume` into one folder both trained, interleaving their rows in
    metrics.jsonl and their checkpoints. The second is refused while the first lives; once
    it is killed (-9), the lock is gone with it and the run resumes."""
    import time

    from scalelab.train.rundir import list_checkpoints
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "scalelab", "pretrain", "--config", "tiny", "--out", str(run),
         *SMALL, "--set", f"data.source={user_home / 'corpus.txt'}", "--max-steps", "100000",
         "--set", "train.checkpoint_every=2", "--set", "train.eval_every=1000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(run) and time.time() < deadline:
            time.sleep(0.05)
        assert list_checkpoints(run) and proc.poll() is None
        rc, out, err = cli("pretrain", "--out", str(run), "--resume")
        assert rc == 2 and "another scalelab command" in err and not out, err
        assert len(err.strip().splitlines()) == 1
        assert proc.poll() is None  # the first one goes on
    finally:
        proc.kill()
        proc.wait()
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()
            if r.endswith("}")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps))  # one writer: every step once, in order
    last = int(list_checkpoints(run)[-1].name[5:])
    rc, _, err = cli("pretrain", "--out", str(run), "--resume", "--max-steps", str(last + 1))
    assert rc == 0, err


def test_a_misspelled_field_and_a_bad_byte_are_named(tmp_path):
    good = "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n"
                   for i in range(4))
    typo = tmp_path / "typo.jsonl"
    typo.write_text(good + json.dumps({"prompt": "q", "completon": "a"}) + "\n")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(good.encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    from scalelab.data.formats import read_conversations, read_preferences
    with pytest.raises(Exception) as e:
        read_conversations(typo)
    assert str(e.value) == (f'{typo}:5: no "completion" (this row has "prompt", '
                            '"completon")')
    with pytest.raises(Exception) as e:
        read_conversations(latin)
    assert str(e.value).startswith(f"{latin}:5: not UTF-8 text")
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "q", "choosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(Exception) as e:
        read_preferences(prefs)
    assert '"chosen"' in str(e.value) and '"choosen"' in str(e.value)


def test_answers_too_long_for_the_context_are_said_to_be_the_reason(user_home, user_sft, tmp_path):
    """Every pair longer than the model's context: the error told the user to add pairs or
    lower the batch size, and not that their answers are too long."""
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w,
                                        "rejected": " ".join([w] * 40)}) + "\n"
                            for w in WORDS))
    for stage, flag in (("reward", "--base"), ("dpo", "--policy")):
        rc, _, err = cli(stage, flag, str(user_sft / "model"), "--data", str(long),
                         "--out", str(tmp_path / stage), *train_sets())
        last = err.splitlines()[-1]
        assert rc == 2 and "context of" in last and "shorten them" in last, err
        assert not (tmp_path / stage).exists()


def test_ctrl_c_while_the_token_files_are_written_then_the_same_command(user_home, tmp_path,
                                                                        monkeypatch):
    """Ctrl-C while pretraining wrote its token files left only `.data.tmp` in --out, and the
    same command again was refused: "folder is not empty (.data.tmp) and is not a scalelab
    run". The folder is claimed (run.json) before the first write now, so it runs."""
    import scalelab.train.pretrain as pretrain
    from scalelab.io import fresh_tmp
    real = pretrain.write_token_files

    def interrupted(splits, tok, data_dir):
        (fresh_tmp(data_dir) / "train.bin").write_bytes(b"\0" * 10)  # half written
        raise KeyboardInterrupt
    monkeypatch.setattr(pretrain, "write_token_files", interrupted)
    args = ["pretrain", "--config", "tiny", "--out", str(tmp_path / "r"), "--max-steps", "2",
            *SMALL, "--set", f"data.source={user_home / 'corpus.txt'}"]
    assert cli(*args)[0] == 130
    monkeypatch.setattr(pretrain, "write_token_files", real)
    rc, out, err = cli(*args)
    assert rc == 0 and "model written" in out, err
    assert not (tmp_path / "r" / ".data.tmp").exists()


def test_ctrl_c_during_a_lazy_import_is_an_interrupt(user_base, tmp_path, monkeypatch):
    """Ctrl-C in the first seconds of a run, while torch imported torch._dynamo for the
    optimizer, came out as a RuntimeError traceback ("Error calling __set_name__" on a
    dataclass, caused by the KeyboardInterrupt), exit 1."""
    import scalelab.train.loop as loop

    def importing(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise RuntimeError("Error calling __set_name__ on 'Field' instance") from e
    monkeypatch.setattr(loop, "make_optimizer", importing)
    rc, _, err = cli("sft", "--base", str(user_base[0] / "model"), "--data",
                     str(user_base[0].parent / "sft.jsonl"), "--out", str(tmp_path / "s"),
                     *train_sets())
    assert rc == 130 and err.strip() == "scalelab: interrupted", err


def test_a_path_that_is_not_there_or_a_folder_is_named_as_such(user_sft, tmp_path):
    """`--reward nope` said "not a reward model folder (no reward.json)" and `--data` given a
    folder said "data file not found" while the folder is right there."""
    model = str(user_sft / "model")
    rc, _, err = cli("ppo", "--policy", model, "--reward", str(tmp_path / "nope"),
                     "--prompts", "builtin:tasks", "--out", str(tmp_path / "p"))
    assert rc == 2 and f"{tmp_path / 'nope'}: model folder not found" in err, err
    rc, _, err = cli("sft", "--base", model, "--data", str(user_sft), "--out",
                     str(tmp_path / "s"))
    assert rc == 2 and f"{user_sft}: is a folder" in err, err
    assert not (tmp_path / "p").exists() and not (tmp_path / "s").exists()


def test_a_checkpoint_given_as_a_model_is_named(user_base):
    """`generate --model RUN/checkpoints/step_N` said only "config.json: file not found"."""
    step = sorted((user_base[0] / "checkpoints").glob("step_*"))[-1]
    rc, out, err = cli("generate", "--model", str(step), "--prompt", "x")
    assert rc == 2 and "is a training checkpoint" in err and not out, err
    assert str(user_base[0] / "model") in err


def test_a_reward_model_with_another_tokenizer_is_refused(user_sft, tmp_path):
    """PPO fed the policy's token ids to a reward model of another tokenizer: an IndexError
    traceback leaving a half-made run, or, when the ids fit, rewards for nonsense."""
    import math

    from scalelab.config import ModelConfig
    from scalelab.data.world import generate_documents
    from scalelab.model import ScalarModel, Transformer
    from scalelab.tokenizer import Tokenizer
    from scalelab.train.checkpoint import save_model
    other = Tokenizer.train(generate_documents(500, seed=3), 300)
    model = Transformer(ModelConfig(vocab_size=64 * math.ceil(other.vocab_size / 64),
                                    seq_len=32, n_layer=1, n_head=2, d_model=32))
    rm = tmp_path / "rm"
    save_model(ScalarModel(model), other, rm, extra_json={"reward.json": {"mean": 0, "std": 1}})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n" for w in WORDS))
    rc, out, err = cli("ppo", "--policy", str(user_sft / "model"), "--reward", str(rm),
                       "--prompts", str(prompts), "--out", str(tmp_path / "p"),
                       "--max-steps", "1", "--set", "ppo.rollout_batch=8",
                       "--set", "ppo.samples_per_prompt=2", "--set", "ppo.max_new_tokens=6")
    assert rc == 2 and "tokenizer is not the policy's" in err and not out, err
    assert not (tmp_path / "p").exists()
