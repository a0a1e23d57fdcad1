"""The runtime every stage shares (issue 10): one checkpointer, the shared post-training
helpers, per-stage config checks, nothing written before the inputs are good, and an import
graph without circles."""

import ast
import contextlib
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_sets

from scalelab.config import STAGE_READS, ModelConfig, TrainConfig, UserError, load_config
from scalelab.model import ScalarModel, Transformer
from scalelab.train.checkpoint import Checkpointer
from scalelab.train.loop import make_optimizer
from scalelab.train.rundir import list_checkpoints

ROOT = Path(__file__).resolve().parent.parent / "scalelab"


# ---- the import graph --------------------------------------------------------------------

def module_imports() -> dict[str, set[str]]:
    """scalelab module -> the scalelab modules it imports at module level (imports inside
    functions run later, on use, and cannot make a circle at import time)."""
    graph = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles_and_parallel_knows_no_stage():
    graph = module_imports()
    assert "scalelab.train.loop" in graph and "scalelab.io" in graph
    assert find_cycle(graph) is None, find_cycle(graph)
    for m, deps in graph.items():
        if m.startswith("scalelab.parallel") or m == "scalelab.io":
            assert not [d for d in deps if d.startswith("scalelab.train")], m


# ---- the checkpointer --------------------------------------------------------------------

def small_model(d_model: int = 16) -> Transformer:
    return Transformer(ModelConfig(vocab_size=64, seq_len=16, n_layer=1, n_head=2,
                                   d_model=d_model))


def train_a_step(model, opt) -> None:
    x = torch.randint(0, 64, (2, 8))
    model(x).float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad()


def test_a_failed_atomic_write_names_its_file_and_leaves_no_partial_one(tmp_path,
                                                                        monkeypatch):
    """progress.json on a full disk: the error named no file (write() raises without one)
    and the half-written hidden .progress.json.tmp stayed in the run folder."""
    import errno

    from scalelab.io import atomic_write_json
    path = tmp_path / "progress.json"
    path.write_text('{"step": 1}\n')
    real = Path.write_text

    def full_disk(self, text, *a, **kw):
        real(self, text[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError) as e:
        atomic_write_json(path, {"step": 2})
    monkeypatch.undo()
    assert e.value.filename == str(path)
    assert [p.name for p in tmp_path.iterdir()] == ["progress.json"]
    assert path.read_text() == '{"step": 1}\n'


def test_checkpointer_restores_model_optimizer_rng_and_stage_state(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    ckpts = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        train_a_step(model, opt)
        ckpts.save(step, model, opt, {"loader": {"index": step}, "kl_coef": 0.5 * step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_3"]  # pruned
    assert (ckpts.latest() / "rng" / "rank_0.safetensors").is_file()
    want_next = torch.rand(5)  # what the CPU generator gives right after the save
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_opt = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    torch.manual_seed(123)
    fresh = small_model()
    fresh_opt = make_optimizer(fresh, TrainConfig(), torch.device("cpu"))
    meta = Checkpointer(tmp_path).load(fresh, fresh_opt)
    assert meta["step"] == 3 and meta["kl_coef"] == 1.5 and meta["loader"] == {"index": 3}
    assert torch.equal(torch.rand(5), want_next)
    assert all(torch.equal(want[k], v) for k, v in fresh.state_dict().items())
    assert all(torch.equal(want_opt[k], v)
               for k, v in fresh_opt.state_dict()["state"][0].items())


class OneRankMesh:
    """What the Checkpointer asks of a mesh, for one process: it then writes DCP shards."""
    rank, is_main, sizes = 0, True, {"dp": 1, "fsdp": 1, "tp": 1}

    def barrier(self) -> None:
        pass

    def together(self):
        return contextlib.nullcontext()


def test_sharded_checkpoint_saves_every_rng_and_loads_in_one_process(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    train_a_step(model, opt)
    saved = Checkpointer(tmp_path, keep=1, parallel=OneRankMesh()).save(
        4, model, opt, {"kl_coef": 0.25})
    assert (saved / "dcp").is_dir() and not (saved / "model.safetensors").exists()
    from scalelab.io import read_tensors
    rng = read_tensors(saved / "rng" / "rank_0.safetensors")
    assert torch.equal(rng["cpu"], torch.get_rng_state())
    assert ("cuda" in rng) == torch.cuda.is_available()
    want_next = torch.rand(3)
    torch.manual_seed(9)
    fresh = small_model()
    fresh_opt = make_optimizer(fresh, TrainConfig(), torch.device("cpu"))
    meta = Checkpointer(tmp_path).load(fresh, fresh_opt)
    assert meta["kl_coef"] == 0.25 and meta["mapping"] == OneRankMesh.sizes
    assert torch.equal(torch.rand(3), want_next)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in fresh.state_dict().items())


def test_sharded_checkpoint_full_disk_and_damage_are_clear(tmp_path, monkeypatch):
    """DCP wraps each rank's error in a CheckpointException (a BaseException): a full disk
    while saving must still say which checkpoint is intact, and a damaged dcp/ folder on
    resume must be a UserError naming it, not a traceback."""
    import errno
    import os

    import torch.distributed.checkpoint.filesystem as dcp_fs

    from scalelab.config import RunFailed
    model = small_model()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    train_a_step(model, opt)
    ckpts = Checkpointer(tmp_path, keep=2, parallel=OneRankMesh())
    first = ckpts.save(1, model, opt, {})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        m.setattr(dcp_fs, "_write_item", full_disk)
        with pytest.raises(RunFailed, match="No space left on device.*step_1 is intact"):
            ckpts.save(2, model, opt, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_1"]
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no partial folder left
    shard = next((first / "dcp").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a torn shard
    with pytest.raises(UserError, match=f"{first / 'dcp'}: cannot load"):
        Checkpointer(tmp_path).load(model, opt)


def test_checkpoints_with_optimizer_state_by_position_still_load(tmp_path):
    """Before name keys, state.safetensors held opt.<position>.<name> and state.json's
    param_groups listed positions, with the RNG in state.safetensors too."""
    from safetensors.torch import save_file

    from scalelab.io import read_tensors
    torch.manual_seed(0)
    model = small_model()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    train_a_step(model, opt)
    ckpt = Checkpointer(tmp_path).save(1, model, opt, {})
    meta = json.loads((ckpt / "state.json").read_text())
    order = [n for g in meta["param_groups"] for n in g["params"]]
    old = {f"opt.{order.index(k[4:].rsplit('.', 1)[0])}.{k.rsplit('.', 1)[1]}": v
           for k, v in read_tensors(ckpt / "state.safetensors").items()}
    old["rng.cpu"] = read_tensors(ckpt / "rng" / "rank_0.safetensors")["cpu"]
    save_file(old, str(ckpt / "state.safetensors"))
    for g in meta["param_groups"]:
        g["params"] = [order.index(n) for n in g["params"]]
    (ckpt / "state.json").write_text(json.dumps(meta))
    (ckpt / "rng" / "rank_0.safetensors").unlink()
    want_next = torch.rand(4)
    fresh = small_model()
    fresh_opt = make_optimizer(fresh, TrainConfig(), torch.device("cpu"))
    Checkpointer(tmp_path).load(fresh, fresh_opt)
    assert torch.equal(torch.rand(4), want_next)
    got, want = fresh_opt.state_dict()["state"], opt.state_dict()["state"]
    assert all(torch.equal(got[i][k], want[i][k]) for i in want for k in want[i])


def test_a_checkpoint_without_its_rng_folder_is_a_user_error(tmp_path):
    import shutil
    model = small_model()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    ckpt = Checkpointer(tmp_path).save(1, model, opt, {})
    shutil.rmtree(ckpt / "rng")
    with pytest.raises(UserError, match=f"{ckpt / 'rng'}"):
        Checkpointer(tmp_path).load(model, opt)


def test_a_checkpoint_of_another_architecture_is_a_user_error(tmp_path):
    model = small_model()
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    Checkpointer(tmp_path).save(1, model, opt, {})
    wider = small_model(d_model=32)
    with pytest.raises(UserError, match="do not match the model"):
        Checkpointer(tmp_path).load(wider, make_optimizer(wider, TrainConfig(),
                                                          torch.device("cpu")))


# ---- nothing written before the inputs and the checkpoint are good -----------------------

def test_failed_resume_leaves_the_config_for_the_next_resume(tmp_path):
    run = tmp_path / "run"
    r = run_cli("pretrain", "--config", "tiny", "--out", str(run), "--max-steps", "2",
                *tiny_sets(), "--set", "data.n_docs=600", "--set", "train.checkpoint_every=2")
    assert r.returncode == 0, r.stderr
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    r = run_cli("pretrain", "--out", str(run), "--resume", "--max-steps", "3",
                "--set", "model.d_model=64")
    assert r.returncode == 2 and "a resumed run keeps the model" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    r = run_cli("pretrain", "--out", str(run), "--resume", "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(row["step"] for row in rows) == 3


# ---- per-stage configs --------------------------------------------------------------------

@pytest.mark.parametrize("stage, item, message", [
    ("sft", "reward.min_margin=0.5", "does not read [reward]"),
    ("sft", "data.n_docs=10", "does not read [data]"),
    ("dpo", "reward.min_margin=0.5", "does not read [reward]"),
    ("reward", "ppo.kl_coef=0.1", "does not read [ppo]"),
    ("ppo", "reward.n_prompts=5", "does not read [reward]"),
    ("pretrain", "sft.n_examples=5", "does not read [sft]"),
    ("sft", "model.d_model=64", "model.d_model"),
    ("dpo", "model.n_layer=2", "model.n_layer"),
])
def test_set_on_what_a_stage_ignores_is_refused(stage, item, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [item], stage=stage)


def test_what_each_stage_reads_is_accepted():
    assert load_config(None, ["reward.labeler=builtin:gold"], stage="ppo")
    assert load_config(None, ["dpo.min_margin=0.5"], stage="dpo").dpo.min_margin == 0.5
    for stage, reads in STAGE_READS.items():
        assert {"train", "monitor", "parallel"} <= reads, stage
        assert ("model" in reads) == (stage == "pretrain")


def test_config_saved_before_the_one_held_out_rule_still_loads(tmp_path):
    (tmp_path / "config.toml").write_text("[reward]\nheldout_fraction = 0.15\n")
    assert load_config(tmp_path / "config.toml").reward.min_margin == 0.3


def test_cli_names_the_ignored_key_and_writes_nothing(tmp_path):
    from scalelab.cli import main
    out = tmp_path / "sft"
    rc = main(["sft", "--base", str(tmp_path / "nowhere"), "--data", "builtin:tasks",
               "--out", str(out), "--set", "reward.min_margin=0.5"])
    assert rc == 2 and not out.exists()


# ---- shared post-training pieces ------------------------------------------------------------

def test_one_held_out_rule():
    from scalelab.data.batches import split_heldout
    assert [len(split_heldout(list(range(n)))[1]) for n in (3, 40, 999, 10_000)] == \
        [1, 4, 99, 256]
    train, held = split_heldout(list(range(40)))
    assert held == [0, 1, 2, 3] and train == list(range(4, 40))


def test_a_copy_of_a_held_out_item_is_not_trained_on(tokenizer):
    """The built-in task examples repeat (24 people, a few templates): 55 of the 256
    held-out SFT conversations had a copy in train, so val_loss was partly training loss."""
    from scalelab.data.batches import split_heldout
    from scalelab.train.sft import encode_conversations, task_conversations
    items = encode_conversations(task_conversations(3000, 0)[0], tokenizer, 256)
    train, held = split_heldout(items)
    as_text = [tokenizer.decode(x, skip_special=False) for x, _ in items]
    copies = sum(t in set(as_text[:len(held)]) for t in as_text[len(held):])
    assert len(held) == 256 and copies > 0  # the built-in data does repeat
    assert len(train) == len(items) - len(held) - copies
    assert not {repr(i) for i in train} & {repr(i) for i in held}
    assert split_heldout([7] * 4 + [1, 7] * 18) == ([1] * 18, [7] * 4)
    from scalelab.data.batches import held_out_words  # the "too few" messages say so
    assert held_out_words(40, 18, 4) == "4 held out, 18 copies of those"
    assert held_out_words(40, 36, 4) == "4 held out"


def test_builtin_or_file_and_stopped():
    from scalelab.data.formats import is_builtin_tasks
    from scalelab.generate import stopped
    assert is_builtin_tasks("builtin:tasks", "--data") is True
    assert is_builtin_tasks("my.jsonl", "--data") is False
    with pytest.raises(UserError, match="--prompts: unknown built-in data 'builtin:taks'"):
        is_builtin_tasks("builtin:taks", "--prompts")
    assert stopped([5, 2], eos_id=2) and not stopped([2, 5], eos_id=2)
    assert not stopped([], eos_id=2)


def test_token_logprobs_masks_and_scales_by_temperature():
    from scalelab.train.losses import IGNORE, token_logprobs
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (2, 5))
    targets[1, 3:] = IGNORE
    got = token_logprobs(h, w, targets, temperature=0.7)
    ref = torch.log_softmax(h @ w.t() / 0.7, -1).gather(-1, targets.clamp(min=0)[..., None])
    ref = ref.squeeze(-1) * (targets != IGNORE)
    assert torch.allclose(got, ref, atol=1e-5) and (got[1, 3:] == 0).all()


def test_tracker_loglik_matches_plain_log_softmax(tmp_path, tokenizer):
    from scalelab.track.evaluate import ScalelabLM, loglik
    from scalelab.train.checkpoint import save_model
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=32, n_layer=1,
                                    n_head=2, d_model=16))
    save_model(model, tokenizer, tmp_path / "m")
    lm = ScalelabLM(tmp_path / "m", torch.device("cpu"))
    ctx, tgt = [[1, 5, 9], [1, 7]], [[4, 4], [3, 8, 2]]
    got = loglik(lm, ctx, tgt)
    for c, t, g in zip(ctx, tgt, got):
        seq = torch.tensor([c + t])
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(seq).float(), -1)[0]
        want = [logp[len(c) - 1 + i, tok].item() for i, tok in enumerate(t)]
        assert g == pytest.approx(want, abs=1e-5)


def test_scalar_model_lives_beside_the_model():
    import scalelab.model
    import scalelab.train.reward
    assert ScalarModel.__module__ == "scalelab.model"
    assert "class ScalarModel" not in Path(scalelab.train.reward.__file__).read_text()


# ---- FSDP follows train.dtype ---------------------------------------------------------------

@pytest.mark.parametrize("device, dtype, param", [
    ("cpu", "auto", None), ("cpu", "float32", None), ("cpu", "bfloat16", torch.bfloat16),
    ("cuda", "auto", torch.bfloat16), ("cuda", "float32", None),
    ("cuda", "bfloat16", torch.bfloat16),
])
def test_fsdp_mixed_precision_follows_train_dtype(device, dtype, param):
    from scalelab.parallel.apply import mixed_precision
    mp = mixed_precision(torch.device(device), dtype)
    assert mp.param_dtype == param and mp.reduce_dtype == torch.float32


@pytest.mark.parametrize("name, row", [("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA H100 PCIe", "h100-pcie"),
                                       ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-80GB", "a100"),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_takes_the_peak_of_the_card_torch_names(monkeypatch, name, row):
    """The PCIe H100 (756 dense bf16 TFLOP/s) was taken for the SXM one (989): its MFU read
    a quarter low. An unknown card gets no row (no MFU shown) rather than a guess."""
    from scalelab.hardware import detect
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    hw = detect(torch.device("cuda"))
    assert (hw.name if hw else None) == row
    if row == "h100-pcie":
        assert hw.peak_flops == 756e12
