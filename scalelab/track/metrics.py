"""Per-item scores and their means: all-or-nothing and continuous metrics side by side.

Schaeffer et al. (2023): exact match is roughly p_token ** length, so smooth progress per token
can look like a sudden jump. Every experiment therefore records both kinds:

  all-or-nothing   exact_match (generation), mc_accuracy (multiple choice)
  continuous       token_logprob (mean log-likelihood per target token, higher is better),
                   edit_distance (token Levenshtein / target length, lower is better),
                   brier (multiple choice, lower is better)
"""

from __future__ import annotations

import math

ALL_OR_NOTHING = ("exact_match", "mc_accuracy")
CONTINUOUS = ("token_logprob", "edit_distance", "brier")
HIGHER_IS_BETTER = {"exact_match": True, "mc_accuracy": True, "token_logprob": True,
                    "edit_distance": False, "brier": False}
# lm-eval's own aggregates, recorded under its names by lm_eval: experiments (lmeval_task.py)
LM_EVAL_DISCRETE = ("acc", "acc_norm")
LM_EVAL_CONTINUOUS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
CONTINUOUS += LM_EVAL_CONTINUOUS
HIGHER_IS_BETTER |= {**dict.fromkeys(LM_EVAL_DISCRETE, True),
                     **dict.fromkeys(LM_EVAL_CONTINUOUS, False)}
GENERATION_METRICS = ("exact_match", "token_logprob", "edit_distance")
CHOICE_METRICS = ("mc_accuracy", "brier", "token_logprob")


def levenshtein(a: list, b: list) -> int:
    """Edit distance (insert, delete, substitute each cost 1) between two sequences."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def exact_match(output: str, target: str) -> float:
    """1 if the continuation starts with the target and the target is not merely the start of a
    longer word or number (target ' 5' does not match output ' 51')."""
    if not output.startswith(target):
        return 0.0
    rest = output[len(target):]
    return 0.0 if rest[:1].isalnum() else 1.0


def edit_distance(output_ids: list[int], target_ids: list[int]) -> float:
    """Token edit distance between the first len(target) output tokens and the target,
    divided by the target length: 0 = perfect, 1 = nothing right."""
    n = len(target_ids)
    return levenshtein(output_ids[:n], target_ids) / max(1, n)


def token_logprob(logprobs: list[float]) -> float:
    """Mean log-likelihood per target token (teacher forced)."""
    return sum(logprobs) / max(1, len(logprobs))


def choice_scores(choice_logprobs: list[float], answer: int | list[int]) -> dict[str, float]:
    """Multiple choice from each choice's total log-likelihood: accuracy of the argmax, Brier
    score of the choice distribution (softmax over choices) and the margin of the answer over
    the best other choice (the item's continuous score, > 0 where it is right).

    answer: the right choice, or several (lm-eval documents with more than one gold answer,
    scored as lm-eval's acc does: the argmax is right if it is any of them). The right choices
    then count as one outcome: Brier adds their probabilities, the margin is the best right
    choice's over the best wrong one."""
    gold = {answer} if isinstance(answer, int) else set(answer)
    top = max(choice_logprobs)
    weights = [math.exp(x - top) for x in choice_logprobs]
    probs = [w / sum(weights) for w in weights]
    best = max(range(len(probs)), key=lambda i: (choice_logprobs[i], -i))  # ties: first
    right = sum(probs[i] for i in gold)
    brier = (1 - right) ** 2 + sum(p ** 2 for i, p in enumerate(probs) if i not in gold)
    margin = (max(choice_logprobs[i] for i in gold)
              - max(x for i, x in enumerate(choice_logprobs) if i not in gold))
    return {"mc_accuracy": float(best in gold), "brier": brier, "margin": margin}


def brier_pass_level(accuracy: float, n_choices: int) -> float:
    """Brier score of a model that puts `accuracy` on the right answer and spreads the rest
    evenly: the continuous level that goes with an accuracy threshold."""
    return (1 - accuracy) ** 2 * n_choices / max(1, n_choices - 1)


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def comparison(metric: str) -> str:
    """How a value of this metric meets its pass threshold: '>=' or '<='."""
    return ">=" if HIGHER_IS_BETTER[metric] else "<="


def passes(value: float, threshold: float, metric: str) -> bool:
    if value is None or math.isnan(value):
        return False
    return value >= threshold if HIGHER_IS_BETTER[metric] else value <= threshold
