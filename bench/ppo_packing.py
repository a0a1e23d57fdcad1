"""PPO with its rollouts packed (ppo.pack, the default off compile) vs padded (the peer), on
the same ragged rollouts, in alternating turns in one run.

One timed step is `scalelab.train.ppo.ppo_step` (log-probs under the policy and the
reference, values, GAE, `epochs` x `minibatches` clipped updates) on a fixed set of
responses: sampling is replaced by handing back those responses, because it does not
depend on the layout (the decode engine never packs) and random weights would not stop at
EOS; the reward is a fixed score per response. Prompt lengths are uniform over a range;
response lengths are geometric (mean 4 tokens at the CPU shape) and capped, as in the demo,
whose answers are mostly a few tokens while some run to the cap of 24. Both layouts start
each step from the same weights and optimizer state, and the first step's logged stats must
agree before anything is timed.

    python bench/ppo_packing.py                        # the demo's PPO shape on CPU
    python bench/ppo_packing.py --device cuda          # gpt2-124m shape, eager (no compile)
    python bench/ppo_packing.py --smoke --json x.json  # a few seconds: does it all run?
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from pathlib import Path

import torch

import scalelab.train.ppo as ppo_module
from scalelab.config import ModelConfig, PPOConfig, TrainConfig
from scalelab.hardware import autocast, pick_device
from scalelab.model import ScalarModel, Transformer
from scalelab.train.loop import make_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, write_json  # noqa: E402

SHAPES = {  # model, rollout rows, prompt lengths (min, max), response lengths (mean, max)
    "cpu": (dict(n_layer=4, n_head=4, d_model=128, vocab_size=1024, seq_len=128), 32, (12, 48),
            (4, 24)),
    "cuda": (dict(n_layer=12, n_head=12, d_model=768, d_mlp=2048, vocab_size=50304,
                  seq_len=256), 64, (16, 64), (16, 128)),
    "smoke": (dict(n_layer=2, n_head=2, d_model=32, vocab_size=128, seq_len=48), 8, (4, 16),
              (3, 8)),
}
PAD, EOS = 0, 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--steps", type=int, default=6, help="timed steps per layout")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per layout")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 1 timed step")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    device = pick_device(args.device)
    shape = "smoke" if args.smoke else device.type
    model_kw, B, (p_lo, p_hi), (r_mean, r_hi) = SHAPES[shape]
    if args.smoke:
        args.steps = 1
    g = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(2, model_kw["vocab_size"], (n,), generator=g).tolist()
    prompts = [ids(int(torch.randint(p_lo, p_hi + 1, (), generator=g))) for _ in range(B)]
    lengths = torch.empty(B).geometric_(1 / r_mean, generator=g).clamp(max=r_hi - 1).long()
    responses = [ids(int(n)) + [EOS] for n in lengths]  # 2 to r_hi tokens with the EOS
    scores = torch.randn(B, generator=g)
    real = sum(len(a) + len(b) for a, b in zip(prompts, responses))
    padded = B * (max(map(len, prompts)) + max(map(len, responses)))

    torch.manual_seed(0)
    mc = ModelConfig(**model_kw)
    policy = Transformer(mc).to(device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value = ScalarModel(Transformer(mc), zero_head=True).to(device)
    tc = TrainConfig(lr=1e-5)
    tok = types.SimpleNamespace(pad_id=PAD, eos_id=EOS, vocab_size=mc.vocab_size)
    ppo_module.sample_responses = lambda *a, **k: responses  # see the docstring
    ctx = autocast(device, tc.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = copy.deepcopy({"policy": policy.state_dict(), "value": value.state_dict()})

    def step(pack: bool) -> tuple[float, dict]:
        policy.load_state_dict(start["policy"])
        value.load_state_dict(start["value"])
        opt = make_optimizer(torch.nn.ModuleDict({"policy": policy, "value": value}), tc,
                             device)
        pc = PPOConfig(max_new_tokens=r_hi, samples_per_prompt=1, pack=pack)
        torch.manual_seed(1)  # the minibatches' shuffle
        sync()
        t0 = time.perf_counter()
        row, _ = ppo_module.ppo_step(policy, ref, value, opt, lambda idx, r: scores,
                                     list(range(B)), prompts, tok, pc, 0.05, ctx=ctx)
        sync()
        return time.perf_counter() - t0, row

    print(f"device {device_name(device)} | torch {torch.__version__} | {mc.n_layer} x "
          f"{mc.d_model}, vocab {mc.vocab_size} | {B} rollouts: prompts {p_lo}-{p_hi} tokens, "
          f"responses {min(map(len, responses))}-{max(map(len, responses))} (mean "
          f"{sum(map(len, responses)) / B:.1f}) | real tokens {real / padded:.2f} of the padded "
          "batch")
    (_, packed_row), (_, padded_row) = step(True), step(False)
    for k in ("loss/policy", "loss/value", "objective/entropy", "policy/approxkl"):
        if abs(packed_row[k] - padded_row[k]) > 1e-4 * max(1.0, abs(padded_row[k])):
            raise SystemExit(f"{k}: packed {packed_row[k]} != padded {padded_row[k]}")
    print("first step's stats agree: " + ", ".join(f"{k} {padded_row[k]:.5f}" for k in
                                                    ("loss/policy", "loss/value")))
    times: dict[str, list[float]] = {"packed": [], "padded": []}
    for i in range(args.warmup + args.steps):  # alternate turns: background load hits both
        for name in times:
            t = step(name == "packed")[0]
            if i >= args.warmup:
                times[name].append(t)
    results = {k: {"s_per_step": statistics.median(v), "episodes_per_s": B / statistics.median(v),
                   "s_min": min(v), "s_max": max(v)} for k, v in times.items()}
    for k, r in results.items():
        print(f"{k:<8} {r['s_per_step']:8.3f} s/step ({r['s_min']:.3f}..{r['s_max']:.3f})  "
              f"{r['episodes_per_s']:8.2f} episodes/s")
    ratio = results["packed"]["episodes_per_s"] / results["padded"]["episodes_per_s"]
    print(f"\npacked / padded episodes/s: {ratio:.3f}")
    write_json(args.json, device, rows=B, real_share_padded=real / padded, results=results,
               ratio=ratio)


if __name__ == "__main__":
    main()
