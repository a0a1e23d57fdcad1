"""train.compile ("auto" resolution), train.activation_checkpointing (same gradients,
fewer saved activations, applied by fit() from outside the model) and train.grad_clip."""

import json

import pytest
import torch
from conftest import save_policy_and_reward_model

from scalelab.config import ModelConfig, UserError, load_config
from scalelab.hardware import use_compile
from scalelab.model import Transformer
from scalelab.parallel.ac import apply_activation_checkpointing, checkpointed_blocks
from scalelab.train.loop import Run, fit, loss_step
from scalelab.train.pretrain import next_token_loss

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


def test_compile_auto_resolves_per_device():
    assert load_config().train.compile == "auto"  # the default
    assert [use_compile("auto", d) for d in (CPU, CUDA, MPS)] == [False, True, False]
    assert [use_compile(v, d) for v in (True, False) for d in (CPU, CUDA)] == \
        [True, True, False, False]
    for value, want in (("true", True), ("false", False), ('"auto"', "auto")):
        assert load_config(None, [f"train.compile={value}"]).train.compile is want or \
            load_config(None, [f"train.compile={value}"]).train.compile == want
    for bad in ("1", '"yes"', "0.5"):
        with pytest.raises(UserError, match="'train.compile' must be one of auto, true, false"):
            load_config(None, [f"train.compile={bad}"])


def test_loss_step_compiles_only_where_resolved_on():
    cfg = load_config()
    assert loss_step(next_token_loss, cfg.train, CPU) is next_token_loss  # auto on CPU: eager
    assert loss_step(next_token_loss, cfg.train, CUDA) is not next_token_loss  # a compiled fn
    cfg.train.compile = False
    assert loss_step(next_token_loss, cfg.train, CUDA) is next_token_loss


def model_and_batch(layers: int = 3):
    torch.manual_seed(0)
    mc = ModelConfig(vocab_size=96, seq_len=16, n_layer=layers, n_head=2, d_model=32)
    model = Transformer(mc)
    x = torch.randint(0, 96, (4, 17), generator=torch.Generator().manual_seed(1))
    return model, (x[:, :-1], x[:, 1:])


def grads_and_saved_bytes(mode: str):
    """Gradients of one backward, the bytes autograd saved for it, and how many times the
    attention modules ran (forward plus any recompute)."""
    model, batch = model_and_batch()
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model, mode) == len(checkpointed_blocks(3, mode))
    assert list(model.state_dict()) == keys  # names untouched: checkpoints still load
    calls = []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda *_: calls.append(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = next_token_loss(model, batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved), len(calls)


def test_activation_checkpointing_same_gradients_less_saved():
    ref, saved_none, calls_none = grads_and_saved_bytes("none")
    assert calls_none == 3
    for mode, recomputed in (("full", 3), ("selective", 2), (True, 3)):
        grads, saved, calls = grads_and_saved_bytes(mode)
        assert calls == 3 + recomputed  # the checkpointed blocks ran their forward again
        assert saved < saved_none
        for name, g in grads.items():
            torch.testing.assert_close(g, ref[name], rtol=1e-6, atol=1e-6, msg=name)
    assert grads_and_saved_bytes("full")[1] < grads_and_saved_bytes("selective")[1]


def test_no_recompute_without_grad():
    model, batch = model_and_batch(2)
    apply_activation_checkpointing(model, "full")
    apply_activation_checkpointing(model, "full")  # twice: still one wrapper per block
    calls = []
    model.blocks[0].attn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(batch[0])
    assert calls == [1]


class Tokens:
    def __init__(self, batch):
        self.batch = batch

    def next_batch(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_fit_applies_activation_checkpointing(tmp):
    """fit() (every stage's loop) applies the option; the logged losses match no AC."""
    losses = {}
    for m in ("none", "full"):
        model, batch = model_and_batch(2)
        cfg = load_config(None, ["train.max_steps=4", "train.log_every=1", "train.lr=1e-2",
                                 "train.warmup_steps=1", "train.checkpoint_every=100",
                                 f"train.activation_checkpointing=\"{m}\"",
                                 "monitor.enabled=false"])
        out = tmp / m
        fit(Run(out, cfg, resume=False), cfg, model, Tokens(batch), CPU, next_token_loss,
            tokens_per_micro_batch=64)
        assert ("forward" in vars(model.blocks[0])) == (m == "full")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[m] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["full"]) == 4
    assert losses["full"] == pytest.approx(losses["none"], rel=1e-6)


def test_ppo_gets_activation_checkpointing_from_fit(tmp, tokenizer, monkeypatch):
    """PPO runs in fit() too: its policy's and value model's blocks recompute in backward,
    and every logged number stays the same."""
    import scalelab.parallel.ac as ac
    from scalelab.train.ppo import ppo
    save_policy_and_reward_model(tokenizer, tmp, reward_std=1.0)
    calls, plain = [], ac.checkpoint
    monkeypatch.setattr(ac, "checkpoint", lambda *a, **kw: calls.append(1) or plain(*a, **kw))
    rows = {}
    for m in ("none", "full"):
        cfg = load_config(None, ["train.max_steps=2", "train.device=cpu", "ppo.n_prompts=16",
                                 "ppo.rollout_batch=4", "ppo.samples_per_prompt=2",
                                 "ppo.max_new_tokens=4", "ppo.ppo_epochs=1",
                                 f"train.activation_checkpointing=\"{m}\""])
        ppo(cfg, tmp / "base", tmp / "rm", "builtin:tasks", tmp / m)
        rows[m] = [{k: v for k, v in json.loads(line).items() if k != "episodes_per_s"}
                   for line in (tmp / m / "metrics.jsonl").read_text().splitlines()]
    assert len(calls) == 2 * 2 * 2 * 2  # steps x minibatches x (policy, value) x blocks
    assert len(rows["full"]) == 2 and rows["full"] == rows["none"]


def test_grad_accum_repeats_one_batch_past_the_epoch_end(tmp):
    """Pretraining with batch 4 x train.grad_accum 2 logs the losses of batch 8, also after
    the first epoch ends (87 windows of 32 tokens: 10 steps, 7 rows over). The ragged end
    was dropped per micro-batch: step 11 took 4 rows of epoch 0 and 4 of epoch 1, and every
    later step read other rows than one batch of 8 (as under dp=2 x grad_accum=2)."""
    from scalelab.train.pretrain import pretrain

    sets = ["model.seq_len=32", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
            "data.n_docs=40", "data.val_fraction=0.1", "data.tokenizer_vocab=300",
            "train.eval_every=100", "train.eval_batches=1", "train.log_every=1",
            "train.checkpoint_every=100", "train.warmup_steps=2", "train.sample_every=100",
            "train.max_steps=11"]
    losses = {}
    for batch, accum in ((8, 1), (4, 2)):
        out = tmp / f"b{batch}"
        cfg = load_config("configs/tiny.toml", [*sets, f"train.batch_size={batch}",
                                                f"train.grad_accum={accum}"])
        pretrain(cfg, out)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[accum] = [row["loss"] for row in rows if "loss" in row]
    meta = json.loads((tmp / "b8" / "data" / "meta.json").read_text())
    assert (meta["train"]["tokens"] - 1) // 32 == 87  # the epoch this test is about
    assert len(losses[1]) == 11
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)


def test_grad_clip_zero_means_no_clipping(monkeypatch):
    """train.grad_clip = 0 (accepted by the config, nanoGPT's "off") scaled every gradient by
    min(1, 0 / norm) = 0: the run trained nothing (4 steps of the tiny model: loss 5.760,
    5.771, 5.757, 5.769). Now the gradients stay as they are and the norm is still
    returned, in one process and on the mesh path (its one all-reduce a no-op here)."""
    from types import SimpleNamespace

    from scalelab.parallel import apply

    model = Transformer(ModelConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2,
                                    d_model=16))
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    next_token_loss(model, (x[:, :-1], x[:, 1:])).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    by_hand = sum(g.double().square().sum() for g in grads).sqrt().item()
    monkeypatch.setattr(apply.dist, "all_reduce", lambda t: None)  # one rank: sum = itself
    mesh_path = SimpleNamespace(single=False, world=1, device=CPU)
    for par in (None, mesh_path):
        norm = apply.clip_grads(model, 0.0, par)
        assert norm.item() == pytest.approx(by_hand, rel=1e-5)
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    apply.clip_grads(model, by_hand / 2, mesh_path)  # clipping itself still clips
    assert all(torch.allclose(p.grad, g / 2, rtol=1e-4) for p, g in zip(model.parameters(),
                                                                          grads))
