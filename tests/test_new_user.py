"""A new user's first hour, end to end through the command line: their own corpus, SFT and
preference files and prompts (tests/new_user_home.py), their runs and their data. Each trap
below once lost data, lied, or answered with a traceback (issue 15); the mistakes everyone
makes are in test_new_user_mistakes.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from new_user_home import SMALL, cli, paragraphs


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


# ---- 1. data loss and run folders -------------------------------------------------------

@pytest.mark.parametrize("where", ["named", "dot"])
def test_out_on_a_project_folder_touches_nothing(user_home, tmp_path, monkeypatch, where):
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "my_corpus.jsonl").write_text(
        "".join(json.dumps({"text": p}) + "\n" for p in paragraphs(100)))
    (proj / "data" / "important.txt").write_text("do not delete me\n")
    (proj / "notes.md").write_text("my notes\n")
    before = snapshot(proj)
    monkeypatch.chdir(proj if where == "dot" else tmp_path)
    out = "." if where == "dot" else "proj"
    rc, _, err = cli("pretrain", "--config", "tiny", "--out", out, "--max-steps", "2", *SMALL,
                     "--set", f"data.source={proj / 'data' / 'my_corpus.jsonl'}")
    assert rc == 2 and "not empty" in err and "choose a new" in err
    assert snapshot(proj) == before  # byte-identical, nothing added


def test_sweep_and_report_take_no_folder_that_only_looks_like_theirs(tmp_path):
    """A project with its own shared/ (the name the sweep keeps its corpus in) and a web
    folder with its own report.html: a sweep adopted the first, using the user's
    corpus.jsonl there as its corpus and writing beside it; `track report` overwrote the
    second's report.html and added plots to it. Both are refused, nothing touched; a
    folder these commands wrote is still taken (their plan file, their report's title)."""
    from test_track_sweep import SWEEP
    proj, site, reg = tmp_path / "proj", tmp_path / "site", tmp_path / "reg.db"
    (proj / "shared").mkdir(parents=True)
    (proj / "shared" / "corpus.jsonl").write_text(json.dumps({"text": "mine"}) + "\n")
    site.mkdir()
    (site / "report.html").write_text("<html><title>my page</title></html>\n")
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(SWEEP)
    assert cli("track", "experiment", "seed", "--registry", str(reg))[0] == 0
    before = snapshot(proj), snapshot(site)
    rc, _, err = cli("sweep", "--config", str(cfg), "--out", str(proj), "--registry", str(reg))
    assert rc == 2 and "was not written by `scalelab sweep`" in err, err
    rc, _, err = cli("track", "report", "--out", str(site), "--registry", str(reg))
    assert rc == 2 and "was not written by `scalelab track report`" in err, err
    assert (snapshot(proj), snapshot(site)) == before
    rc, _, err = cli("track", "report", "--out", str(tmp_path / "rep"), "--registry", str(reg))
    assert rc == 0, err
    rc, _, err = cli("track", "report", "--out", str(tmp_path / "rep"), "--registry", str(reg))
    assert rc == 0, err


def test_wrong_stage_resume_leaves_the_run_untouched(user_sft):
    before = snapshot(user_sft)
    rc, _, err = cli("pretrain", "--out", str(user_sft), "--resume")
    assert rc == 2 and "holds a sft run" in err and "scalelab sft" in err
    assert snapshot(user_sft) == before


def test_resume_from_another_base_is_refused(user_home, user_base, user_sft, tmp_path, monkeypatch):
    """--resume with another --base spliced two runs into one folder (for PPO and DPO it
    silently swapped the reference model); the same base spelled another way resumes."""
    import shutil
    run = tmp_path / "sft"
    shutil.copytree(user_sft, run)
    before = snapshot(run)
    args = ["--data", str(user_home / "sft.jsonl"), "--out", str(run), "--resume",
            "--max-steps", "13"]
    rc, _, err = cli("sft", "--base", str(user_sft / "model"), *args)
    assert rc == 2 and "model it started from was" in err and len(err.splitlines()) == 1, err
    assert snapshot(run) == before
    # another --data: the data position went on in other examples, silently
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": str(i)}) + "\n"
                             for i in range(40)))
    rc, _, err = cli("sft", "--base", str(user_base[0] / "model"), *args[:1], str(other),
                     *args[2:])
    assert rc == 2 and f"--data it used was {user_home / 'sft.jsonl'}" in err, err
    assert snapshot(run) == before
    # another seed (the data order, sft's built-in examples): not the run it continues
    for key, now in (("train.seed", 7), ("sft.seed", 3)):
        was = json.loads((run / "lineage.json").read_text())[key]
        rc, _, err = cli("sft", "--base", str(user_base[0] / "model"), *args, "--set",
                         f"{key}={now}")
        assert rc == 2 and f"{key} = {now}, but the run was started with {key} = {was}" in err
        assert snapshot(run) == before
    monkeypatch.chdir(user_home)
    rc, _, err = cli("sft", "--base", "./base/../base/model", *args)
    assert rc == 0, err
    lineage = json.loads((run / "lineage.json").read_text())
    assert lineage["parent"] == str((user_base[0] / "model").resolve())


def test_resume_without_checkpoint_builds_nothing(user_home, user_base, tmp_path):
    import shutil
    corpus = ["--set", f"data.source={user_home / 'corpus.txt'}"]
    rc, _, err = cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "new"),
                     "--resume", *SMALL, *corpus)
    assert rc == 2 and "no checkpoint" in err
    assert not (tmp_path / "new").exists()  # no corpus, no tokenizer, no folder
    run = tmp_path / "killed"  # a run stopped before its first checkpoint
    shutil.copytree(user_base[0], run)
    shutil.rmtree(run / "checkpoints")
    before = snapshot(run)
    rc, _, err = cli("pretrain", "--out", str(run), "--resume", *corpus)
    assert rc == 2 and "no checkpoint" in err and snapshot(run) == before


def test_a_mistake_in_the_data_leaves_no_half_made_run(tmp_path):
    rc, _, err = cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "r"), *SMALL,
                     "--set", f"data.source={tmp_path / 'typo.txt'}")
    assert rc == 2 and "typo.txt: corpus file or folder not found" in err
    assert not (tmp_path / "r").exists()
    (tmp_path / "empty").mkdir()
    rc, _, err = cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "empty"), *SMALL,
                     "--set", f"data.source={tmp_path / 'typo.txt'}")
    assert rc == 2 and list((tmp_path / "empty").iterdir()) == []


def test_resume_on_a_finished_run_says_there_is_nothing_to_do(user_base):
    run = user_base[0]
    before = snapshot(run)
    rc, out, err = cli("pretrain", "--out", str(run), "--resume")
    assert rc == 0 and "nothing to do" in out and "step 20" in out, err
    assert snapshot(run) == before


def test_resume_refuses_a_changed_data_section(user_base, tmp_path):
    """--resume reuses the run's token files: a new [data] value would be written into its
    config.toml but never used."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(user_base[0], run)
    before = snapshot(run)
    rc, out, err = cli("pretrain", "--out", str(run), "--resume", "--max-steps", "21",
                       "--set", "data.val_fraction=0.2")
    assert rc == 2 and "data.val_fraction" in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(run) == before


def test_resume_refuses_a_changed_model_section(user_base, tmp_path):
    """--resume --set model.n_layer=1 ended in a truncated state-dict dump, and
    --set model.seq_len=16 was taken silently (the checkpoint's data position counts windows
    of the old length). Every model.* change is refused, each key named with both values."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(user_base[0], run)
    before = snapshot(run)
    rc, _, err = cli("pretrain", "--out", str(run), "--resume", "--max-steps", "21",
                     "--set", "model.n_layer=1", "--set", "model.seq_len=16")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "state_dict" not in err, err
    assert "model.seq_len = 16 (was 32)" in err and "model.n_layer = 1 (was 2)" in err, err
    assert snapshot(run) == before
    # 0 = the tokenizer's size, which the run's model already has: no change, it trains on
    rc, out, err = cli("pretrain", "--out", str(run), "--resume", "--max-steps", "21",
                       "--set", "model.vocab_size=0")
    assert rc == 0 and "model written" in out, err


def test_out_naming_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("mine")
    for args in (["pretrain", "--config", "tiny"], ["demo"], ["track", "report"]):
        rc, _, err = cli(*args, "--out", str(f))
        assert rc == 2 and "is a file" in err, args
        # a folder under that file cannot be made: the same, not a traceback after the work
        rc, _, err = cli(*args, "--out", str(f / "run"))
        assert rc == 2 and f"{f} is a file" in err, args
    rc, _, err = cli("export", "--model", "unused", "--out", str(f / "hf"))
    assert rc == 2 and f"{f} is a file" in err
    assert f.read_text() == "mine" and sorted(tmp_path.iterdir()) == [f]


# ---- 2. the user's corpus: documents, validation, EOS -----------------------------------

def split_docs(bin_path: Path, bos: int, eos: int) -> list[tuple[int, ...]]:
    ids = np.fromfile(bin_path, dtype=np.uint16).tolist()
    docs, cur = [], []
    for i in ids:
        if i == bos:
            cur = []
        elif i == eos:
            docs.append(tuple(cur))
        else:
            cur.append(i)
    return docs


def test_txt_corpus_is_split_into_documents_with_a_sampled_validation_set(user_home, user_base):
    from scalelab.tokenizer import Tokenizer
    run = user_base[0]
    tok = Tokenizer.load(run / "tokenizer.json")
    train = split_docs(run / "data" / "train.bin", tok.bos_id, tok.eos_id)
    val = split_docs(run / "data" / "val.bin", tok.bos_id, tok.eos_id)
    originals = [tuple(tok.encode(p)) for p in paragraphs(300)]
    assert len(train) + len(val) == 300 and len(val) == 30  # every paragraph a document
    assert sorted(train + val) == sorted(originals)  # each ends with EOS: stopping is learned
    assert not set(train) & set(val)  # validation is never training text
    positions = sorted(originals.index(d) for d in val)
    assert positions != list(range(270, 300))  # a random sample, not the file's tail


def test_one_document_per_line_is_configurable(user_home, tmp_path):
    from scalelab.config import DataConfig, UserError
    from scalelab.data.tokens import read_documents, split_documents
    f = tmp_path / "lines.txt"
    f.write_text("one\ntwo\n\nthree\n")
    assert read_documents(DataConfig(source=str(f), txt_split="lines")) == ["one", "two", "three"]
    assert read_documents(DataConfig(source=str(f))) == ["one\ntwo", "three"]
    # held-out text of one's own, but never the training text itself
    held = tmp_path / "held.txt"
    held.write_text("four\n\nfive\n")
    cfg = DataConfig(source=str(f), val_source=str(held))
    assert split_documents(read_documents(cfg), cfg) == (["one\ntwo", "three"], ["four", "five"])
    with pytest.raises(UserError, match="data.val_source"):
        cfg = DataConfig(source=str(f), val_source=str(f))
        split_documents(read_documents(cfg), cfg)


def test_a_corpus_too_small_to_split_names_val_fraction(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("only one paragraph of text here\n")
    rc, _, err = cli("pretrain", "--config", "tiny", "--out", str(tmp_path / "r"),
                     "--set", f"data.source={f}")
    assert rc == 2 and "data.val_fraction" in err and "data.val_source" in err


def test_tokenizer_notice_warmup_notice_and_plain_progress(user_base):
    from scalelab.tokenizer import Tokenizer
    _, out, err = user_base
    real = Tokenizer.load(user_base[0] / "tokenizer.json").vocab_size
    assert real < 4000 and f"the tokenizer has {real}" in out
    assert "shorter than train.warmup_steps" in out
    # stderr was not a terminal: plain progress lines, the first step and the last
    assert "train: step 1/20" in err and "train: step 20/20" in err


# ---- 3. talking to a chat model ---------------------------------------------------------

def test_chat_streams_multi_turn_answers_from_piped_stdin(user_sft):
    from scalelab.generate import generate
    from scalelab.train.checkpoint import load_model
    model_dir = str(user_sft / "model")
    rc, out, err = cli("chat", "--model", model_dir, "--temperature", "0",
                       "--max-new-tokens", "8", stdin="Say river.\n\nSay lamp.\n")
    assert rc == 0, err
    # each answer is the greedy continuation of the whole conversation in the chat
    # template, computed here another way (the batched generator, no streaming)
    model, tok = load_model(model_dir)
    conv, want = [], []
    for text in ("Say river.", "Say lamp."):
        conv.append({"role": "user", "content": text})
        prompt = tok.encode_chat(conv, generation_prompt=True)[0]
        answer = tok.decode(generate(model, [prompt], 8, tok.pad_id, tok.eos_id,
                                     temperature=0)[0])
        conv.append({"role": "assistant", "content": answer})
        want.append(answer)
    assert out == "".join(f"assistant> {a}\n" for a in want)
    rc, out, err = cli("generate", "--chat", "--model", model_dir, "--prompt", "Say river.",
                       "--temperature", "0", "--max-new-tokens", "8")
    assert rc == 0 and out == want[0] + "\n", err


def test_chat_notes_a_pretrained_model_only(user_base, user_sft, tmp_path):
    """The 'not instruction-tuned' note is for a pretraining run's model, not for an
    instruction-tuned model outside a run folder (exported, or a Hugging Face -Instruct)."""
    note = "was not instruction-tuned"
    rc, _, err = cli("chat", "--model", str(user_base[0] / "model"), "--max-new-tokens", "2",
                     stdin="")
    assert rc == 0 and note in err, err
    assert cli("export", "--model", str(user_sft / "model"), "--out", str(tmp_path / "hf"))[0] == 0
    rc, _, err = cli("chat", "--model", str(tmp_path / "hf"), "--max-new-tokens", "2",
                     stdin="")
    assert rc == 0 and note not in err, err


def test_chat_system_message_too_long_for_the_context(user_sft):
    """Else every user line would be refused as 'too long', whatever its length."""
    rc, out, err = cli("chat", "--model", str(user_sft / "model"), "--max-new-tokens", "4",
                       "--system", "river stone " * 40, stdin="hi\n")
    assert rc == 2 and "--system" in err and len(err.strip().splitlines()) == 1, err
    assert not out


def test_text_that_is_not_utf8(user_sft):
    """Python hands undecodable bytes of argv and stdin (a Latin-1 file, say) on as lone
    surrogates, which the tokenizer refuses with a TypeError."""
    model = str(user_sft / "model")
    rc, out, err = cli("generate", "--model", model, "--prompt", "caf\udce9")
    assert rc == 2 and "--prompt" in err and "UTF-8" in err and not out, err
    rc, out, err = cli("chat", "--model", model, "--max-new-tokens", "4",
                       stdin="caf\udce9\nSay river.\n")  # that line is skipped, not the rest
    assert rc == 0 and "UTF-8" in err and out.count("assistant> ") == 1, err
    rc, out, err = cli("chat", "--model", model, "--max-new-tokens", "4", "--system",
                       "caf\udce9", stdin="hi\n")
    assert rc == 2 and "--system" in err and "UTF-8" in err and not out, err


