"""The demo's evaluation for any policies: greedy task accuracy (held-in, held-out) and the
gold reward of answers sampled at temperature 1 to 1024 held-in prompts, with what it is
made of; every prompt one that no stage of the demo (SFT, reward, PPO, at their preset seeds
and counts) trained on. Compare your own PPO/DPO runs with the demo's models:

    python bench/policy_eval.py SFT=runs/demo/sft/model PPO=runs/demo/ppo/model
"""

from __future__ import annotations

import sys
from pathlib import Path

from scalelab.demo import evaluate_policies


def main() -> None:
    if len(sys.argv) < 2 or any("=" not in a for a in sys.argv[1:]):
        sys.exit(__doc__)
    models = {a.split("=", 1)[0]: Path(a.split("=", 1)[1]) for a in sys.argv[1:]}
    print("| model | greedy held-in | held-out | gold reward | correct | says more | stopped |")
    print("|---|---|---|---|---|---|---|")
    for name, r in evaluate_policies(models).items():
        print(f"| {name} | {r['held_in']['mean']:.3f} | {r['held_out']['mean']:.3f} | "
              f"{r['gold_reward']:.3f} ± {r['gold_reward_se']:.3f} | {r['sampled_correct']:.3f} "
              f"| {r['sampled_extra_words']:.3f} | {r['sampled_stopped']:.3f} |")


if __name__ == "__main__":
    main()
