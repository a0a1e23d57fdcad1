"""Hugging Face folders in and out, checked against `transformers` itself (a test dependency):
tiny random-weight models of each architecture, saved with save_pretrained."""

import contextlib
import io
import json
import shutil
import subprocess

import pytest
import torch
from hf_folders import CHATML, left_pad, make_hf_folder, ragged
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from scalelab.cli import main
from scalelab.config import ModelConfig, UserError
from scalelab.generate import generate, padded_attention
from scalelab.model import Transformer
from scalelab.train.checkpoint import load_model, save_model

transformers = pytest.importorskip("transformers")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """In process: a new interpreter per call would spend most of the test importing torch."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())

CASES = {  # name: make_hf_folder options
    "llama-untied-llama3-rope": dict(arch="llama", rope_scaling=True),
    "llama-tied-sharded": dict(arch="llama", tie=True, shard=True),
    "qwen2-bf16": dict(arch="qwen2", dtype=torch.bfloat16),
    "mistral": dict(arch="mistral"),
}


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def compare_with_transformers(model, tok, ref, vocab):
    """Logits on a ragged left-padded batch, and greedy tokens, ours vs transformers'."""
    seqs = ragged(vocab, [5, 23, 40, 1], seed=1)
    ids, valid = left_pad(seqs, tok.pad_id)
    positions, mask = padded_attention(valid)
    with torch.no_grad():
        ours = model(ids, positions, mask)
        theirs = ref(input_ids=ids, attention_mask=valid.long(), position_ids=positions).logits
    assert (ours - theirs)[valid].abs().max().item() < 1e-4
    prompts = [s[:9] for s in seqs]
    new = generate(model, prompts, 12, tok.pad_id, None, temperature=0)
    ids, valid = left_pad(prompts, tok.pad_id)
    out = ref.generate(input_ids=ids, attention_mask=valid.long(), max_new_tokens=12,
                       do_sample=False, pad_token_id=tok.pad_id, eos_token_id=None)
    assert out[:, ids.size(1):].tolist() == new


@pytest.mark.parametrize("case", CASES)
def test_import_matches_transformers(tmp_path, case):
    folder = make_hf_folder(tmp_path / case, **CASES[case])
    model, tok = load_model(folder)
    assert model.cfg.tie_embeddings == CASES[case].get("tie", False)
    assert model.cfg.qkv_bias == (CASES[case]["arch"] == "qwen2")
    compare_with_transformers(model, tok, hf_model(folder), model.cfg.vocab_size)


def test_llama3_rope_scaling_changes_the_logits(tmp_path):
    """The scaled RoPE is really in use: without it the logits move well past tolerance."""
    from scalelab.model import rope_tables
    model, _ = load_model(make_hf_folder(tmp_path / "m", rope_scaling=True))
    ids = torch.tensor(ragged(model.cfg.vocab_size, [100]))
    with torch.no_grad():
        scaled = model(ids)
        model.rope_cos[:], model.rope_sin[:] = rope_tables(16, 128, model.cfg.rope_theta)
        assert (model(ids) - scaled).abs().max() > 1e-3


def test_chat_template_matches_transformers_and_masks_assistant_turns(tmp_path):
    folder = make_hf_folder(tmp_path / "m")
    _, tok = load_model(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    conv = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And three?"},
            {"role": "assistant", "content": "Five, no: six."}]
    ids, mask = tok.encode_chat(conv)
    assert ids == theirs.apply_chat_template(conv, tokenize=True, return_dict=False)
    end = tok.hf.token_to_id("<|im_end|>")
    assert tok.eos_id == end  # the turn end is where generation stops
    masked = [t for t, m in zip(ids, mask) if m]
    assert tok.decode(masked, skip_special=False) == "Four.<|im_end|>Five, no: six.<|im_end|>"
    prompt = tok.chat_prompt("Hi there")
    assert prompt == theirs.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                add_generation_prompt=True, tokenize=True,
                                                return_dict=False)
    # exported again, the folder keeps its template, specials and both stop tokens
    out = tmp_path / "again"
    assert run_cli("export", "--model", str(folder), "--out", str(out)).returncode == 0
    again = transformers.AutoTokenizer.from_pretrained(out)
    assert again.apply_chat_template(conv, tokenize=True, return_dict=False) == ids
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<s>", "</s>", "<pad>")
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [end, tok.hf.token_to_id("</s>")]
    # message text that spells a control token stays plain text
    spoof = tok.encode_chat([{"role": "user", "content": "<|im_end|>"},
                             {"role": "assistant", "content": "ok"}])[0]
    assert spoof.count(end) == 2


def scalelab_folder(tmp_path, tokenizer, **cfg) -> "tuple":
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=2,
                                    n_head=4, n_kv_head=2, d_model=64, **cfg)).eval()
    with torch.no_grad():  # random norms and biases too, so a missed tensor shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    save_model(model, tokenizer, tmp_path / "model")
    return model, tmp_path / "model"


def tensors(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


LLAMA3_ROPE = {"factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


@pytest.mark.parametrize("shape", [dict(tie_embeddings=True, rope_scaling=LLAMA3_ROPE),
                                   dict(tie_embeddings=False, rope_scaling=LLAMA3_ROPE),
                                   dict(qkv_bias=True, rope_theta=500.0)])  # as Qwen2
def test_export_loads_in_transformers_with_same_logits_and_tokens(tmp_path, tokenizer, shape):
    model, folder = scalelab_folder(tmp_path, tokenizer, **shape)
    out = tmp_path / "hf"
    r = run_cli("export", "--model", str(folder), "--out", str(out), "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in out.iterdir()}
    compare_with_transformers(model, tokenizer, hf_model(out), model.cfg.vocab_size)
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    assert (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id) == \
        (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    # a prompt starts with BOS in transformers too, as every document did in training
    assert theirs("Mia has").input_ids == [tokenizer.bos_id] + tokenizer.encode("Mia has")
    conv = [{"role": "user", "content": "Mia has two apples"},
            {"role": "assistant", "content": "She has two."}]
    assert theirs.apply_chat_template(conv, tokenize=True, return_dict=False) == \
        tokenizer.encode_chat(conv)[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_export_import_export_is_byte_identical(tmp_path, tokenizer, dtype):
    _, folder = scalelab_folder(tmp_path, tokenizer, qkv_bias=True)
    with torch.no_grad():  # nonzero biases, so they must survive the trip
        m, tok = load_model(folder)
        for b in m.blocks:
            b.attn.wq.bias.normal_()
        save_model(m, tok, folder)
    first, second = tmp_path / "a", tmp_path / "b"
    for src, dst in ((folder, first), (first, second)):
        r = run_cli("export", "--model", str(src), "--out", str(dst), "--dtype", dtype)
        assert r.returncode == 0, r.stderr
    assert json.loads((first / "config.json").read_text())["architectures"] == \
        ["Qwen2ForCausalLM"]  # q/k/v biases without an o_proj bias is Qwen2, not Llama
    a, b = tensors(first), tensors(second)
    assert a.keys() == b.keys() and "model.layers.0.self_attn.q_proj.bias" in a
    for k in a:
        assert a[k].dtype == b[k].dtype == getattr(torch, dtype)
        assert a[k].view(torch.uint8).equal(b[k].view(torch.uint8)), k
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (first / name).read_text() == (second / name).read_text(), name


def test_relu2_model_does_not_export(tmp_path, tokenizer):
    _, folder = scalelab_folder(tmp_path, tokenizer, mlp="relu2")
    r = run_cli("export", "--model", str(folder), "--out", str(tmp_path / "hf"))
    assert r.returncode == 2 and "relu2" in r.stderr and not (tmp_path / "hf").exists()


def test_export_out_touches_no_file_of_yours(tmp_path, tokenizer, monkeypatch):
    """--out must be new, empty or an earlier export: a folder with other files, or a file,
    is exit 2 with everything left as it was; an earlier export is rewritten."""
    _, folder = scalelab_folder(tmp_path, tokenizer)
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "notes.txt").write_text("mine")
    (tmp_path / "config.toml").write_text("[train]\n")
    for out in ("project", "config.toml"):
        r = run_cli("export", "--model", str(folder), "--out", str(tmp_path / out))
        assert r.returncode == 2 and f"--out {tmp_path / out}" in r.stderr, r.stderr
    assert (tmp_path / "project" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "config.toml").read_text() == "[train]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "model", "project"]
    for _ in range(2):  # an earlier export is rewritten
        assert run_cli("export", "--model", str(folder), "--out", str(tmp_path / "hf")
                       ).returncode == 0
    other = tmp_path / "other"  # another model folder is not an export: kept
    save_model(Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=8, n_layer=1,
                                       n_head=1, d_model=8)), tokenizer, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    monkeypatch.chdir(tmp_path / "hf")
    for out in (str(other), ".", ""):
        r = run_cli("export", "--model", str(folder), "--out", out)
        assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr, out
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "hf", "model", "other",
                                                         "project"]


def rewrite_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def break_folder(d, how):
    """Each way a folder can be wrong, and the file the message must name."""
    if how == "missing config":
        (d / "config.json").unlink()
        return "config.json"
    if how == "unknown architecture":
        rewrite_json(d / "config.json", architectures=["GPT2LMHeadModel"])
        return "GPT2LMHeadModel"
    if how == "sliding window":
        rewrite_json(d / "config.json", architectures=["MistralForCausalLM"],
                     model_type="mistral", sliding_window=32)
        return "sliding_window"
    if how == "rope type":
        rewrite_json(d / "config.json", rope_parameters={"rope_type": "yarn", "factor": 2.0})
        return "yarn"
    if how == "odd head dim":
        rewrite_json(d / "config.json", hidden_size=60, num_attention_heads=4, head_dim=15)
        return "hidden_size / num_attention_heads = 15"
    if how == "eos id past the tokenizer":  # generation could never stop
        data = json.loads((d / "tokenizer_config.json").read_text())
        del data["eos_token"]
        (d / "tokenizer_config.json").write_text(json.dumps(data))
        rewrite_json(d / "config.json", eos_token_id=[99999])
        return "config.json: eos_token_id 99999 is not a token"
    if how == "wrong shapes":
        rewrite_json(d / "config.json", intermediate_size=128)
        return "model.safetensors"
    if how == "truncated safetensors":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    if how == "eps not a number":
        rewrite_json(d / "config.json", rms_norm_eps="1e-5x")
        return "rms_norm_eps"
    if how == "theta not a number":
        rewrite_json(d / "config.json", rope_parameters={"rope_type": "default",
                                                         "rope_theta": None})
        return "rope_theta"
    if how == "integer weights":  # e.g. a quantized checkpoint: not silently cast to floats
        tensors = load_file(d / "model.safetensors")
        name = "model.layers.0.input_layernorm.weight"
        tensors[name] = tensors[name].round().to(torch.int8)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        return f"model.safetensors: {name} holds torch.int8"
    if how == "pickle only":
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"not unpickled")
        return "pytorch_model.bin"
    raise ValueError(how)


BAD = ["missing config", "unknown architecture", "sliding window", "rope type",
       "odd head dim", "eos id past the tokenizer", "wrong shapes", "truncated safetensors",
       "eps not a number", "theta not a number", "integer weights", "pickle only"]


def test_bad_folders_are_clear_errors(tmp_path, monkeypatch):
    import pickle
    good = make_hf_folder(tmp_path / "good", template=None)

    def no_unpickling(*a, **k):
        raise AssertionError("something was unpickled")
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    for how in BAD:
        d = tmp_path / how.replace(" ", "_")
        shutil.copytree(good, d)
        named = break_folder(d, how)
        with pytest.raises(UserError, match=named):
            load_model(d)
    # and through the CLI: exit 2, one line, the file named
    r = run_cli("generate", "--model", str(tmp_path / "pickle_only"), "--prompt", "Mia")
    assert r.returncode == 2 and "pytorch_model.bin" in r.stderr and "Traceback" not in r.stderr


def test_post_training_an_imported_model_via_the_cli(tmp_path):
    """SFT, reward, DPO and a few PPO steps start from an imported Qwen2 folder with a chat
    template; SFT also from a Llama folder without one (role tokens are added)."""
    base = make_hf_folder(tmp_path / "qwen", arch="qwen2", template=CHATML)
    plain = make_hf_folder(tmp_path / "llama", arch="llama", template=None, tie=True)
    quick = ["--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
             "--set", "train.batch_size=4", "--set", "train.log_every=1"]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Mia has {i} apples. How many?",
                                        "completion": f"{i}"}) + "\n" for i in range(40)))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Add {i} and 1.", "chosen": f"{i + 1}",
                                         "rejected": f"{i + 2}"}) + "\n" for i in range(40)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}."}) + "\n" for i in range(16)))

    r = run_cli("sft", "--base", str(base), "--data", str(data), "--out",
                str(tmp_path / "sft"), "--max-steps", "3", *quick)
    assert r.returncode == 0, r.stderr
    sft = tmp_path / "sft/model"
    saved = json.loads((sft / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == CHATML
    r = run_cli("reward", "--base", str(sft), "--data", str(pairs), "--out",
                str(tmp_path / "rm"), "--max-steps", "2", *quick)
    assert r.returncode == 0, r.stderr
    r = run_cli("dpo", "--policy", str(sft), "--data", str(pairs), "--out",
                str(tmp_path / "dpo"), "--max-steps", "2", *quick)
    assert r.returncode == 0, r.stderr
    r = run_cli("ppo", "--policy", str(sft), "--reward", str(tmp_path / "rm/model"),
                "--prompts", str(prompts), "--out", str(tmp_path / "ppo"), "--max-steps", "2",
                "--set", "ppo.rollout_batch=4", "--set", "ppo.max_new_tokens=4",
                "--set", "ppo.n_prompts=16", *quick)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (tmp_path / "ppo/metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == 2

    r = run_cli("sft", "--base", str(plain), "--data", str(data), "--out",
                str(tmp_path / "sft2"), "--max-steps", "2", *quick)
    assert r.returncode == 0, r.stderr
    assert "added scalelab's role tokens" in r.stdout + r.stderr
    model, tok = load_model(tmp_path / "sft2/model")
    assert tok.has_chat_format and model.cfg.vocab_size >= tok.vocab_size
    ids, mask = tok.encode_chat([{"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Yo"}])
    assert tok.special_ids["<|assistant|>"] in ids and ids[-1] == tok.eos_id and mask[-1]


def test_track_model_add_on_an_imported_folder(tmp_path):
    """Registered through scalelab's own engine (kind hf), parameters as transformers counts
    them, no tokens or FLOPs claimed; experiments run on it."""
    from scalelab.track.registry import Registry
    folder = make_hf_folder(tmp_path / "qwen-tiny", arch="qwen2", tie=True)
    reg = tmp_path / "reg.db"
    r = run_cli("track", "experiment", "add", "--name", "a", "--task",
                "builtin:addition?digits=2&n=4", "--threshold", "0.5", "--registry", str(reg))
    assert r.returncode == 0, r.stderr
    r = run_cli("track", "model", "add", str(folder), "--registry", str(reg))
    assert r.returncode == 0, r.stderr
    assert "parameter axis only" in r.stdout
    m = Registry(reg).model("qwen-tiny")
    ref = hf_model(folder)
    n = sum(p.numel() for p in ref.parameters())
    assert (m["kind"], m["params"], m["tokens"], m["flops"]) == ("hf", n, None, None)
    # N: every parameter, the input table only when it is not also the output layer
    emb = ref.get_input_embeddings().weight
    tied = ref.get_output_embeddings().weight is emb
    assert m["non_embedding_params"] == (n if tied else n - emb.numel())
    assert len(Registry(reg).results()) == 1


def test_tied_import_shares_one_tensor(tmp_path):
    folder = make_hf_folder(tmp_path / "m", tie=True)
    model, _ = load_model(folder)
    assert model.lm_head.weight is model.embed.weight
    # Some tied checkpoints store lm_head.weight too (a copy of the embedding), as
    # transformers accepts; one that differs from the embedding is not tied: exit 2.
    weights = load_file(folder / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    save_file({**weights, "lm_head.weight": embed.clone()}, folder / "model.safetensors")
    again, _ = load_model(folder)
    assert again.lm_head.weight is again.embed.weight
    assert torch.equal(again.embed.weight, model.embed.weight)
    save_file({**weights, "lm_head.weight": embed + 1}, folder / "model.safetensors")
    with pytest.raises(UserError, match="lm_head.weight.*tie_word_embeddings"):
        load_model(folder)


def test_folder_without_bos_token(tmp_path):
    """Qwen2 tokenizers have no BOS: nothing is prepended, and generation still runs."""
    folder = make_hf_folder(tmp_path / "m", arch="qwen2")
    rewrite_json(folder / "tokenizer_config.json", bos_token=None)
    rewrite_json(folder / "config.json", bos_token_id=None)
    _, tok = load_model(folder)
    assert tok.bos_id is None and tok.encode("Mia", bos=True) == tok.encode("Mia")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert tok.encode_chat(conv)[0] == theirs.apply_chat_template(conv, tokenize=True,
                                                                   return_dict=False)
    r = run_cli("generate", "--model", str(folder), "--prompt", "Mia has", "--max-new-tokens",
                "4", "--temperature", "0")
    assert r.returncode == 0 and r.stdout.startswith("Mia has"), r.stderr
    # An empty prompt has no token to start from here: one clear line, exit 2.
    r = run_cli("generate", "--model", str(folder), "--prompt", "", "--max-new-tokens", "4")
    assert r.returncode == 2 and "no BOS" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_qwen_layout_bos_null_in_tokenizer_config_means_no_bos(tmp_path):
    """Qwen2.5 ships bos_token: null in tokenizer_config.json beside a bos_token_id in
    config.json: transformers prepends nothing, so neither may scalelab, or `generate`
    continues another token sequence than transformers does for the same text."""
    folder = make_hf_folder(tmp_path / "m", arch="qwen2", seed=3)
    rewrite_json(folder / "tokenizer_config.json", bos_token=None)  # config.json keeps its id
    _, tok = load_model(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Mia has a cat"
    assert tok.bos_id is None and tok.encode(text, bos=True) == theirs(text).input_ids
    assert_cli_greedy_is_transformers(folder, tok, theirs, text)


@pytest.mark.parametrize("bos_processor", [False, True])
def test_generate_prompt_starts_as_transformers_starts_it(tmp_path, bos_processor):
    """`generate --prompt` begins the prompt with what the folder's tokenizer adds to a text,
    as transformers does: BOS where its post-processor adds one (Llama), nothing where it
    adds none though the folder names a bos_token (GPT-2 style, SmolLM2); so it continues
    the same tokens as transformers' greedy search."""
    folder = make_hf_folder(tmp_path / "m", seed=5, bos_processor=bos_processor, template=None)
    _, tok = load_model(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    text = "Mia has a cat"
    assert tok.bos_id == theirs.bos_token_id is not None
    ids = theirs(text).input_ids
    assert (ids[0] == tok.bos_id) == bos_processor
    assert tok.encode_prompt(text) == ids
    assert_cli_greedy_is_transformers(folder, tok, theirs, text)


def assert_cli_greedy_is_transformers(folder, tok, theirs, text: str) -> None:
    """`scalelab generate --prompt text` prints transformers' greedy continuation."""
    ids = theirs(text, return_tensors="pt").input_ids
    out = hf_model(folder).generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None,
                                    pad_token_id=tok.pad_id)
    r = run_cli("generate", "--model", str(folder), "--prompt", text, "--max-new-tokens", "8",
                "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == text + tok.decode(out[0, ids.size(1):].tolist()) + "\n"


@pytest.mark.parametrize("bos_processor", [False, True])
def test_tracker_prompts_start_as_the_folders_tokenizer_starts_them(tmp_path, bos_processor):
    """The tracker's prompts on an imported folder, through scalelab's engine or through
    transformers, start with what the tokenizer adds to a text (as lm-eval's do): BOS only
    where its post-processor adds it."""
    from scalelab.track.evaluate import HFLM, ScalelabLM
    folder = make_hf_folder(tmp_path / "m", bos_processor=bos_processor, template=None)
    ours = ScalelabLM(folder, torch.device("cpu"), kind="hf")
    via_transformers = HFLM(folder, torch.device("cpu"))
    want = [ours.tok.bos_id] if bos_processor else []
    assert ours.prefix == via_transformers.prefix == want and ours.tok.bos_id is not None


@pytest.mark.parametrize("engine", ["scalelab", "transformers"])
def test_tracker_scores_an_empty_prompt_after_the_end_of_text_token(tmp_path, engine):
    """With no BOS to start from, an empty prompt leaves the first target token without a
    context: it is scored after the end-of-text token, as lm-eval scores an empty context
    (it read the log-probability of another position)."""
    from scalelab.track.evaluate import HFLM, ScalelabLM, contexts, loglik
    from scalelab.track.specs import Item
    folder = make_hf_folder(tmp_path / "m", bos_processor=False, template=None)
    lm = ScalelabLM(folder, torch.device("cpu"), kind="hf") if engine == "scalelab" else \
        HFLM(folder, torch.device("cpu"))
    target = lm.encode(" Mia has a cat")
    got = loglik(lm, contexts(lm, [Item("", "Mia has a cat")]), [target])[0]
    eos = transformers.AutoTokenizer.from_pretrained(folder).eos_token_id
    ids = torch.tensor([[eos] + target])
    with torch.no_grad():
        logp = hf_model(folder)(ids).logits[0, :-1].float().log_softmax(-1)
    want = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=0)
