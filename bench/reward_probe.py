"""What does a reward model know? Its pair accuracy on fresh samples, split by what
separates the two answers.

Samples K answers to new prompts of the held-in task families (none that a stage of the
demo trained on at its preset seeds: SFT, the reward model, PPO; none twice) from a policy,
scores each with the reward model and with the gold labeler, and for every pair of
distinct answers whose gold scores differ by more than the tie margin checks whether the
reward model prefers the better one. A pair is credited to a property only when that
property alone separates the two answers (the reward model is known to judge filler and
stopping, so a pair that differs in correctness and filler says nothing about correctness):

  correctness  one answer is correct, the other is not; same filler, same stop
  filler       one says more than the answer, the other does not; otherwise alike
  stop         one ended with EOS, the other did not; otherwise alike
  closeness    none of the three differ: one is closer to the reference
  mixed        two or more differ (counted in "all" only)

    python bench/reward_probe.py --policy runs/demo/sft/model --reward runs/demo/reward/model
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import torch

from scalelab.config import RewardConfig
from scalelab.demo import trained_prompts
from scalelab.evaluate import respond_ids
from scalelab.tasks import TASKS, TRAIN_TASKS, unseen_examples
from scalelab.train.checkpoint import load_model
from scalelab.train.labelers import gold
from scalelab.train.reward import load_reward_model, reward_scores

KINDS = ("correctness", "filler", "stop", "closeness", "mixed")


def what_differs(a: dict, b: dict) -> str:
    differ = [kind for kind, key in zip(KINDS, ("correct", "extra", "stopped"))
              if a[key] != b[key]]
    if len(differ) > 1:
        return "mixed"
    return differ[0] if differ else "closeness"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True, help="model folder that writes the answers")
    ap.add_argument("--reward", required=True, help="reward model folder")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--samples", type=int, default=4, help="answers per prompt")
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    policy, tok = load_model(Path(args.policy))
    rm, _, stats = load_reward_model(Path(args.reward))
    examples = unseen_examples(TRAIN_TASKS, args.prompts, args.seed, trained_prompts())
    prompts = [e.prompt for e in examples for _ in range(args.samples)]
    ids = respond_ids(policy, tok, prompts, temperature=1.0,
                      generator=torch.Generator().manual_seed(args.seed))
    rewards = reward_scores(rm, tok, stats, prompts, ids).tolist()
    margin = RewardConfig().min_margin
    right = {k: 0 for k in KINDS}
    total = {k: 0 for k in KINDS}
    for p, e in enumerate(examples):
        answers = {}
        for i in range(p * args.samples, (p + 1) * args.samples):
            text, stopped = tok.decode(ids[i]), bool(ids[i]) and ids[i][-1] == tok.eos_id
            answers[(text, stopped)] = {
                "gold": gold(e, text, stopped), "reward": rewards[i], "stopped": stopped,
                "correct": TASKS[e.family].score(e, text),
                "extra": len(text.split()) > len(e.answer.split())}
        for a, b in combinations(answers.values(), 2):
            if abs(a["gold"] - b["gold"]) <= margin:
                continue
            kind = what_differs(a, b)
            better, worse = (a, b) if a["gold"] > b["gold"] else (b, a)
            total[kind] += 1
            right[kind] += better["reward"] > worse["reward"]
    rows = {k: {"pairs": total[k], "accuracy": right[k] / total[k] if total[k] else None}
            for k in KINDS}
    all_pairs = sum(total.values())
    rows["all"] = {"pairs": all_pairs, "accuracy": sum(right.values()) / max(all_pairs, 1)}
    print(f"reward model {args.reward} on {args.samples} answers x {args.prompts} fresh "
          f"prompts from {args.policy}")
    print(f"{'pairs told apart by':<22}{'pairs':>7}{'RM accuracy':>13}")
    for k, r in rows.items():
        acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{k:<22}{r['pairs']:>7}{acc:>13}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
