"""The RLHF math against hand calculations, and the chat loss mask."""

import math

import pytest
import torch

from scalelab.train.dpo import dpo_loss, sequence_logprob
from scalelab.train.ppo import gae, kl_penalty, policy_loss, value_loss, whiten
from scalelab.train.reward import bradley_terry_loss
from scalelab.train.sft import IGNORE, encode_conversations


def test_gae_by_hand():
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]),
                   torch.ones(1, 3), gamma=1.0, lam=0.95)
    # t=2: 1 - .5 = .5; t=1: 0 + .95*.5; t=0: .95 * .475
    torch.testing.assert_close(adv, torch.tensor([[0.45125, 0.475, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[0.95125, 0.975, 1.0]]))


def test_gae_ignores_padding_after_the_response():
    adv, _ = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 9.0]]),
                 torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.475, 0.5, 0.0]]))


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    expect = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / math.sqrt(1.25)
    torch.testing.assert_close(whiten(x, mask)[0, :4], expect, atol=1e-5, rtol=1e-5)
    assert whiten(x, mask)[0, 4] == 0


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(logp, old, adv, torch.ones(1, 2), clip=0.2)
    # ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2;  ratio .5, A=-1: max(.5, .8) = .8
    assert loss.item() == pytest.approx(-0.2)
    assert stats["policy/clipfrac"] == 1.0
    loss, stats = policy_loss(old, old, adv, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.0) and stats["val/ratio"] == pytest.approx(1.0)


def test_clipped_value_loss_by_hand():
    m = torch.ones(1, 1)
    # v=2 from old 0, return 1: unclipped (2-1)^2=1, clipped (.2-1)^2=.64 -> .5*1
    assert value_loss(torch.tensor([[2.0]]), torch.zeros(1, 1), torch.ones(1, 1), m,
                      0.2).item() == pytest.approx(0.5)
    # v=.5: unclipped .25, clipped (.2-1)^2=.64 -> the max is the clipped one: .32
    assert value_loss(torch.tensor([[0.5]]), torch.zeros(1, 1), torch.ones(1, 1), m,
                      0.2).item() == pytest.approx(0.32)


def test_kl_estimators_by_hand_and_in_expectation():
    p, q = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(p, q, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(p, q, "k3").item() == pytest.approx(-0.5 + math.log(2))
    # Sampled from p, both estimate KL(p || q) without bias; k3 is never negative.
    torch.manual_seed(0)
    probs_p, probs_q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    exact = (probs_p * (probs_p / probs_q).log()).sum().item()
    x = torch.multinomial(probs_p, 200_000, replacement=True)
    lp, lq = probs_p.log()[x], probs_q.log()[x]
    assert kl_penalty(lp, lq, "k1").mean().item() == pytest.approx(exact, rel=0.03)
    assert kl_penalty(lp, lq, "k3").mean().item() == pytest.approx(exact, rel=0.03)
    assert (kl_penalty(lp, lq, "k3") >= 0).all()
    assert (kl_penalty(lp, lq, "k1") < 0).any()


def test_bradley_terry_by_hand():
    loss = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)


def test_dpo_loss_by_hand_with_a_different_reference(tiny_model):
    """sequence_logprob and dpo_loss against a hand computation in plain Python, with a
    reference that differs from the policy (with equal ones every DPO loss is ln 2)."""
    from scalelab.config import ModelConfig
    from scalelab.model import Transformer
    torch.manual_seed(1)
    ref = Transformer(ModelConfig(vocab_size=320, seq_len=64, n_layer=2, n_head=4,
                                  n_kv_head=2, d_model=32)).eval()
    x = torch.randint(0, 320, (4, 12))
    y = torch.randint(0, 320, (4, 12))
    y[:, :6] = IGNORE
    y[3, 9:] = IGNORE  # a shorter answer

    def by_hand(model) -> list[float]:
        with torch.no_grad():
            logits = model(x).double().tolist()
        out = []
        for b in range(4):
            total = 0.0
            for t in range(12):
                if y[b, t] != IGNORE:
                    row = logits[b][t]
                    top = max(row)
                    lse = top + math.log(sum(math.exp(v - top) for v in row))
                    total += row[y[b, t]] - lse
            out.append(total)
        return out

    with torch.no_grad():
        lp, lr = sequence_logprob(tiny_model, x, y), sequence_logprob(ref, x, y)
    hp, hr = by_hand(tiny_model), by_hand(ref)
    assert lp.tolist() == pytest.approx(hp, abs=1e-3)
    assert lr.tolist() == pytest.approx(hr, abs=1e-3)
    beta = 0.5  # pairs: (0 chosen, 2 rejected), (1 chosen, 3 rejected)
    z = [beta * ((hp[i] - hr[i]) - (hp[i + 2] - hr[i + 2])) for i in (0, 1)]
    expect = sum(math.log(1 + math.exp(-v)) for v in z) / 2
    loss = dpo_loss(lp[:2], lp[2:], lr[:2], lr[2:], beta=beta)
    assert loss.item() == pytest.approx(expect, rel=1e-4)
    assert abs(expect - math.log(2)) > 0.05  # the reference really differs
    assert dpo_loss(lp[:2], lp[2:], lp[:2], lp[2:], beta).item() == pytest.approx(math.log(2))


def test_gold_labeler_by_hand():
    """The gold reward of a few answers to one addition example, from its definition."""
    from scalelab.tasks.core import Example
    from scalelab.train.labelers import gold
    ex = Example("addition", "What is 4821 plus 377?", "5198", 1, 4)
    assert gold(ex, "5198", True) == pytest.approx(1.0 + 0.5 + 0.3)
    # a pleasantry on a second line: still correct and similar (first line), 4 extra words
    assert gold(ex, "5198\nI hope this helps!", True) == pytest.approx(1.8 - 0.4)
    # wrong by one digit, never stopped: similarity 2 * 3 / 8 = 0.75
    assert gold(ex, "5199", False) == pytest.approx(0.5 * 0.75)
    # words after the number on the first line: not correct (the scorer reads the whole
    # line), similarity 2 * 4 / (28 + 4), and eight extra words cost only the -0.5 cap
    assert gold(ex, "5198" + " so" * 8, True) == pytest.approx(0.5 * 0.25 + 0.3 - 0.5)


def test_only_assistant_tokens_carry_sft_loss(tokenizer):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2 ="},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3 + 3?"},
            {"role": "assistant", "content": "6"}]
    ids, mask = tokenizer.encode_chat(conv)
    supervised = [i for i, m in zip(ids, mask) if m]
    assert tokenizer.decode(supervised, skip_special=False) == "4<|eos|>6<|eos|>"
    (x, y), = encode_conversations([conv], tokenizer, 128)
    assert x == ids[:-1]
    assert [t for t in y if t != IGNORE] == supervised


def test_reward_probe_credits_a_pair_to_a_property_only_when_it_alone_differs():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parent.parent / "bench" / "reward_probe.py"
    spec = importlib.util.spec_from_file_location("reward_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    base = {"correct": 1.0, "extra": False, "stopped": True}
    assert probe.what_differs(base, {**base, "correct": 0.0}) == "correctness"
    assert probe.what_differs(base, {**base, "extra": True}) == "filler"
    assert probe.what_differs(base, {**base, "stopped": False}) == "stop"
    assert probe.what_differs(base, dict(base)) == "closeness"
    assert probe.what_differs(base, {**base, "correct": 0.0, "extra": True}) == "mixed"


def test_a_labeler_module_in_the_working_folder_loads(tmp_path, monkeypatch):
    """`--set reward.labeler=my_module:fn` with my_module.py where the user runs scalelab:
    the `scalelab` console script does not put the working folder on sys.path."""
    import sys

    from scalelab.train.labelers import get_labeler
    (tmp_path / "hp_labeler_cwd.py").write_text("def short(e, r, s):\n    return -len(r)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "hp_labeler_cwd", raising=False)
    assert get_labeler("hp_labeler_cwd:short")(None, "abc", True) == -3


def test_a_labeler_that_returns_no_number_is_named(tmp_path, monkeypatch):
    """A user's labeler returning None (or NaN) was a TypeError traceback deep in reward/ppo."""
    from scalelab.config import UserError
    from scalelab.train.labelers import get_labeler
    (tmp_path / "hp_labeler_bad.py").write_text(
        "def none(e, r, s):\n    return None\n\ndef nan(e, r, s):\n    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for fn in ("none", "nan"):
        with pytest.raises(UserError, match=f"hp_labeler_bad:{fn}.*returned"):
            get_labeler(f"hp_labeler_bad:{fn}")(None, "abc", True)
    assert get_labeler("builtin:gold") is not None


@pytest.mark.parametrize("new", [64, 5000])  # = and > the model's 64-token context
def test_reward_max_new_tokens_beyond_the_context_is_named(tokenizer, new):
    """reward.max_new_tokens >= seq_len left no room for the prompt: a ValueError traceback
    from generate (at seq_len exactly, the prompt kept whole and overran the context)."""
    from scalelab.config import Config, UserError
    from scalelab.model import ModelConfig, Transformer
    from scalelab.train.reward import generate_preferences
    cfg = Config()
    cfg.reward.n_prompts, cfg.reward.max_new_tokens = 2, new
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, seq_len=64, n_layer=1,
                                    n_head=2, d_model=16))
    with pytest.raises(UserError, match="reward.max_new_tokens"):
        generate_preferences(model, tokenizer, cfg)


def test_reward_pairs_longer_than_the_context_are_left_out(tokenizer):
    """A preference pair whose prompt filled the context was cut to the same prefix for both
    answers: the reward model was asked to rank two identical sequences (and a held-out one
    gave val_accuracy 0). Such answers are now left out, like DPO's too-long pairs."""
    from scalelab.train.reward import encode_rows
    long = "word " * 100
    rows = [{"prompt": long, "responses": ["yes", "no"], "scores": [1.0, 0.0]},
            {"prompt": "hi", "responses": ["yes", "no " * 100, "maybe"],
             "scores": [1.0, 0.5, 0.0]}]
    items = encode_rows(rows, tokenizer, 64)
    assert len(items) == 1
    seqs, pairs = items[0]
    assert [tokenizer.decode(s[len(tokenizer.chat_prompt("hi")):]) for s in seqs] == \
        ["yes", "maybe"]  # (each ends with EOS, which decode leaves out)
    assert pairs == [(0, 1)] and all(len(s) <= 64 for s in seqs)
