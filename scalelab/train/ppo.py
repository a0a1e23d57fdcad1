"""RLHF with PPO against a learned reward model.

Four models: the policy (trained), a frozen reference copy of it, a value model initialised
from the reward model's trunk with a zero head (trained), and the frozen reward model.
One PPO step: sample responses with the KV-cache generator -> score them -> per-token reward
-kl_coef * KL(policy || reference) plus the reward-model score on the last token -> GAE ->
several epochs of clipped policy and value updates over minibatches.

The details that matter (see ANCHORS.md): log-probs at the sampling temperature, left-padded
prompts with position ids from the mask, whitened advantages, clipped value loss, a penalty
for responses that never emit EOS, optional adaptive KL, learning rate annealed to zero.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from scalelab.config import Config, PPOConfig, UserError
from scalelab.data.batches import EpochSampler
from scalelab.data.formats import is_builtin_tasks, read_prompts
from scalelab.generate import generate, padded_attention, stopped
from scalelab.hardware import autocast, pick_device, use_compile
from scalelab.model import ScalarModel, Transformer
from scalelab.tokenizer import Tokenizer
from scalelab.train.checkpoint import Checkpointer, save_model
from scalelab.train.loop import make_optimizer, start_or_resume, start_stage
from scalelab.train.losses import token_logprobs
from scalelab.train.monitor import Monitor
from scalelab.train.progress import Progress
from scalelab.train.reward import load_reward_model

# ---- the math, as small pure functions (unit-tested against hand calculations) --------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the valid entries (population std, as in lm-human-preferences)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(policy || ref) estimate from the sampled tokens' log-probs.
    k1 = log(p/q): unbiased, can go negative per token. k3 = (q/p - 1) - log(q/p): unbiased
    and always >= 0, lower variance (Schulman's "Approximating KL divergence")."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise UserError(f"ppo.kl_estimator: expected k1 or k3, got {kind!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) right-padded response tokens.
    Returns (advantages, returns); the value after the last valid token is 0."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros(rewards.size(0), device=rewards.device)
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.size(1) else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: mean over tokens of max(-A*r, -A*clip(r, 1-e, 1+e))."""
    ratio = torch.exp(logp - old_logp)
    losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():  # tensors, not floats: reading them would wait for the GPU
        stats = {"policy/approxkl": 0.5 * masked_mean((logp - old_logp) ** 2, mask),
                 "policy/clipfrac": masked_mean(((ratio - 1).abs() > clip).float(), mask),
                 "val/ratio": masked_mean(ratio, mask)}
    return masked_mean(losses, mask), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float) -> torch.Tensor:
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within old_v +- clip."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


# ---- rollouts --------------------------------------------------------------------------------


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, P+R): left-padded prompts, then right-padded responses
    positions: torch.Tensor
    mask: torch.Tensor  # (B, 1, T, T) attention mask
    resp_mask: torch.Tensor  # (B, R) float: 1 on response tokens (EOS included)
    prompt_len: int
    responses: list[list[int]]


def make_rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                 device, min_response_len: int = 1) -> Rollout:
    """min_response_len pads every rollout to one shape (what a compiled step wants)."""
    B, P = len(prompts), max(len(p) for p in prompts)
    R = max(1, min_response_len, max(len(r) for r in responses))
    tokens = torch.full((B, P + R), pad_id, dtype=torch.long)
    valid = torch.zeros((B, P + R), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, P - len(p): P] = torch.tensor(p)
        tokens[i, P: P + len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, P - len(p): P + len(r)] = True
    positions, mask = padded_attention(valid)
    return Rollout(tokens.to(device), positions.to(device), mask.to(device),
                   valid[:, P:].float().to(device), P, responses)


def response_logprobs(model: Transformer, ro: Rollout, temperature: float,
                      with_entropy: bool = False):
    """Log-probs (B, R) of the response tokens at the sampling temperature (and the entropy
    of each token's distribution), in chunks: no (B, R, vocab) fp32 tensor is held whole."""
    h = model.hidden(ro.tokens, ro.positions, ro.mask)[:, ro.prompt_len - 1: -1]
    return token_logprobs(h, model.lm_head.weight, ro.tokens[:, ro.prompt_len:], temperature,
                          with_entropy)


def response_values(value_model: ScalarModel, ro: Rollout) -> torch.Tensor:
    """V(state before each response token): read at the position that predicts it."""
    return value_model(ro.tokens, ro.positions, ro.mask)[:, ro.prompt_len - 1: -1]


# ---- one PPO step --------------------------------------------------------------------------


def minibatch_loss(policy: Transformer, value: ScalarModel, sub: Rollout, old_logp, old_values,
                   adv, returns, pc: PPOConfig) -> tuple[torch.Tensor, dict]:
    """The clipped policy + value loss of one minibatch, and its stats as tensors."""
    m = sub.resp_mask
    logp, entropy = response_logprobs(policy, sub, pc.temperature, with_entropy=True)
    pg, stats = policy_loss(logp, old_logp, adv, m, pc.clip)
    vf = value_loss(response_values(value, sub), old_values, returns, m, pc.value_clip)
    stats.update({"loss/policy": pg.detach(), "loss/value": vf.detach(),
                  "objective/entropy": masked_mean(entropy, m)})
    return pg + pc.vf_coef * vf, stats


RewardFn = Callable[[list[int], list[list[int]]], torch.Tensor]


def ppo_step(policy: Transformer, ref: Transformer, value: ScalarModel,
             optimizer: torch.optim.Optimizer, reward_fn: RewardFn, prompt_idx: list[int],
             prompts: list[list[int]], tok: Tokenizer, pc: PPOConfig, kl_coef: float,
             generator: torch.Generator | None = None, ctx=None, grad_clip: float = 1.0,
             loss_fn: Callable | None = None, fixed_shape: bool = False,
             corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None
             ) -> tuple[dict, Rollout]:
    """Roll out, score, and update. reward_fn(prompt_idx, responses) -> (B,) scores.
    ctx: the autocast context of every forward pass (train.dtype); loss_fn: minibatch_loss,
    or a compiled copy of it (then fixed_shape pads every rollout to max_new_tokens).
    The stats stay tensors until the end of the step. A minibatch whose loss or gradient
    norm is not finite is not applied (counted in row["skipped_updates"]): a fused optimizer
    (AdamW on CUDA) skips it on the device, so the loop never waits for the GPU; others
    read the flag on the host. corrupt(loss) is the run monitor's test-only fault
    injection."""
    device = next(policy.parameters()).device
    ctx = ctx if ctx is not None else contextlib.nullcontext()
    loss_fn = loss_fn or minibatch_loss
    policy.eval()
    with ctx:
        responses = generate(policy, prompts, pc.max_new_tokens, tok.pad_id, tok.eos_id,
                             temperature=pc.temperature, generator=generator)
    ro = make_rollout(prompts, responses, tok.pad_id, device,
                      pc.max_new_tokens if fixed_shape else 1)
    with torch.no_grad(), ctx:
        old_logp = response_logprobs(policy, ro, pc.temperature)
        ref_logp = response_logprobs(ref, ro, pc.temperature)
        old_values = response_values(value, ro)
        scores = reward_fn(prompt_idx, responses).to(device).float()
        ended = torch.tensor([stopped(r, tok.eos_id) for r in responses], device=device)
        scores_penalised = scores - pc.missing_eos_penalty * (~ended).float()
        if pc.samples_per_prompt > 1:  # leave-one-out baseline within each prompt's group
            g = scores_penalised.view(-1, pc.samples_per_prompt)
            baseline = (g.sum(1, keepdim=True) - g) / (pc.samples_per_prompt - 1)
            scores_penalised = (g - baseline).view(-1)
        kl = kl_penalty(old_logp, ref_logp, pc.kl_estimator) * ro.resp_mask
        rewards = -kl_coef * kl
        last = (ro.resp_mask.sum(1).long() - 1).clamp(min=0)
        rewards[torch.arange(len(responses), device=device), last] += scores_penalised
        adv, returns = gae(rewards, old_values, ro.resp_mask, pc.gamma, pc.lam)
        adv = whiten(adv, ro.resp_mask)

    policy.train()
    value.train()
    B, sums, n, skipped = len(responses), {}, 0, torch.zeros((), device=device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(pc.ppo_epochs):
        # global CPU RNG: saved in checkpoints, so resume is exact; one copy to the device
        order = torch.randperm(B).to(device)
        for mb in order.chunk(pc.minibatches):
            sub = Rollout(ro.tokens[mb], ro.positions[mb], ro.mask[mb], ro.resp_mask[mb],
                          ro.prompt_len, [])
            with ctx:
                loss, s = loss_fn(policy, value, sub, old_logp[mb], old_values[mb], adv[mb],
                                  returns[mb], pc)
            if corrupt is not None:
                loss = corrupt(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
            bad = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
            skipped += bad
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                optimizer.found_inf = bad  # what GradScaler hands a fused step: skip if 1
                optimizer.step()
                del optimizer.found_inf
            elif not bad.item():
                optimizer.step()
            sums = {k: sums.get(k, 0.0) + v.detach() for k, v in s.items()}
            n += 1
    keys = list(sums)  # one host sync for all the stats of the step
    row = dict(zip(keys, (torch.stack([sums[k] for k in keys]) / n).tolist()))
    kl_seq = kl.sum(1)
    row.update({
        "objective/kl": kl_seq.mean().item(),
        "objective/kl_k3": (kl_penalty(old_logp, ref_logp, "k3") * ro.resp_mask).sum(1)
        .mean().item(),
        "objective/scores": scores.mean().item(),
        "objective/rlhf_reward": (scores - kl_coef * kl_seq).mean().item(),
        "val/num_eos_tokens": int(ended.sum()),
        "val/response_len": ro.resp_mask.sum(1).mean().item(),
        "kl_coef": kl_coef,
        "skipped_updates": int(skipped.item()),
    })
    return row, ro


def update_kl_coef(kl_coef: float, kl: float, pc: PPOConfig, n: int) -> float:
    """Adaptive KL controller (Ziegler et al.): nudge the coefficient toward target_kl."""
    if not pc.adaptive_kl:
        return kl_coef
    error = max(-0.2, min(0.2, kl / pc.target_kl - 1))
    return kl_coef * (1 + error * n / pc.kl_horizon)


# ---- the stage -------------------------------------------------------------------------------


def load_prompts(spec: str, n: int, seed: int) -> tuple[list[str], list | None]:
    """Prompt texts, and the task examples behind them when they come from the task suite
    (so the gold labeler can score responses beside the learned reward)."""
    if is_builtin_tasks(spec, "--prompts"):
        from scalelab.tasks import TRAIN_TASKS, make_examples
        examples = make_examples(TRAIN_TASKS, n, seed + 11)
        return [e.prompt for e in examples], examples
    return read_prompts(spec), None


def ppo(cfg: Config, policy_dir: Path, reward_dir: Path | str, prompts_spec: str, out: Path,
        resume: bool = False) -> Path:
    """PPO from the policy in policy_dir against the reward model in reward_dir, or against
    the gold labeler itself when reward_dir is "builtin:gold"."""
    from scalelab.train.labelers import get_labeler
    pc, tc = cfg.ppo, cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # N processes would each train a copy into the same folder
        raise UserError(f"ppo runs in one process (WORLD_SIZE is {world}): sft, reward and dpo "
                        "spread over a device mesh, ppo not yet; run it without torchrun")
    texts, examples = load_prompts(prompts_spec, pc.n_prompts, pc.seed)  # bad input: fail early
    oracle = str(reward_dir) == "builtin:gold"  # the labeler itself as the reward: PPO's ceiling
    if oracle and examples is None:
        raise UserError("--reward builtin:gold scores task examples: use --prompts builtin:tasks")
    if not oracle:
        reward_model, _, stats = load_reward_model(reward_dir, pick_device(tc.device))
        reward_model.requires_grad_(False)
    run, par, policy, tok = start_stage(cfg, out, resume, "ppo", policy_dir,
                                        reward=reward_dir)
    device = par.device
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    trunk = policy if oracle else reward_model.trunk
    value = ScalarModel(copy.deepcopy(trunk), zero_head=True).to(device)
    value.requires_grad_(True)
    ids = [tok.chat_prompt(t) for t in texts]
    keep = [i for i, p in enumerate(ids) if len(p) + pc.max_new_tokens <= policy.cfg.seq_len]
    if pc.rollout_batch % pc.samples_per_prompt:
        raise UserError("ppo.rollout_batch must be a multiple of ppo.samples_per_prompt")
    n_prompts = pc.rollout_batch // pc.samples_per_prompt
    if len(keep) < n_prompts:
        raise UserError(f"{prompts_spec}: only {len(keep)} prompts fit the context with "
                        f"{pc.max_new_tokens} new tokens; need {n_prompts}")
    label = get_labeler(cfg.reward.labeler) if examples is not None else None

    def gold_scores(idx: list[int], responses: list[list[int]]) -> torch.Tensor:
        return torch.tensor([label(examples[i], tok.decode(r), stopped(r, tok.eos_id))
                             for i, r in zip(idx, responses)])

    def reward_fn(idx: list[int], responses: list[list[int]]) -> torch.Tensor:
        if oracle:
            return gold_scores(idx, responses)
        from scalelab.train.reward import reward_scores
        return reward_scores(reward_model, tok, stats, [texts[i] for i in idx], responses)

    ctx = autocast(device, tc.dtype)
    compiled = use_compile(tc.compile, device)
    loss_fn = torch.compile(minibatch_loss) if compiled else minibatch_loss

    both = torch.nn.ModuleDict({"policy": policy, "value": value})
    optimizer = make_optimizer(both, tc, device)
    sampler = EpochSampler(len(keep), n_prompts, seed=pc.seed)
    mon = Monitor(cfg.monitor, out, resume=resume)
    ckpts = Checkpointer(out, tc.keep_checkpoints)
    meta = start_or_resume(run, ckpts, both, optimizer, sampler, mon)
    kl_coef, start = meta.get("kl_coef", pc.kl_coef), meta.get("step", 0)  # PPO's own state
    gen = torch.Generator(device=device)
    bar = Progress(tc.max_steps, start, "ppo")  # plain lines when not on a terminal
    mon.start(tc.max_steps)
    for step in range(start, tc.max_steps):
        gen.manual_seed(pc.seed * 100_003 + step)  # resumable sampling: seed per step
        for group in optimizer.param_groups:  # anneal linearly to zero
            group["lr"] = tc.lr * (1 - step / tc.max_steps)
        t0 = time.perf_counter()
        idx = [keep[i] for i in sampler.next_indices() for _ in range(pc.samples_per_prompt)]
        row, ro = ppo_step(policy, ref, value, optimizer, reward_fn, idx, [ids[i] for i in idx],
                           tok, pc, kl_coef, gen, ctx=ctx, grad_clip=tc.grad_clip,
                           loss_fn=loss_fn, fixed_shape=compiled,
                           corrupt=lambda loss, at=step + 1: mon.corrupt(at, loss))
        mon.step_done(step + 1)
        kl_coef = update_kl_coef(kl_coef, row["objective/kl"], pc, len(idx))
        done = step + 1
        row = {"step": done, "loss": row["loss/policy"] + pc.vf_coef * row["loss/value"],
               "lr": optimizer.param_groups[0]["lr"], **row,
               "episodes_per_s": len(idx) / (time.perf_counter() - t0)}
        if label is not None:
            row["gold_reward"] = gold_scores(idx, ro.responses).mean().item()
        run.log(row)
        bar.update(1)
        bar.set_postfix({"score": f"{row['objective/scores']:.2f}",
                         "kl": f"{row['objective/kl']:.2f}",
                         **({"gold": f"{row['gold_reward']:.2f}"} if label else {})})
        mon.logged(row)
        if row["skipped_updates"] or not math.isfinite(row["loss"]):
            # The bad minibatch updates were not applied; PPO neither rewinds nor judges
            # spikes (its loss is not a descent curve). Policy "stop" stops here.
            seen = {"step": done, "event": "nonfinite", "loss": row["loss"],
                    "grad_norm": float("nan"), "skipped_updates": row["skipped_updates"],
                    "note": "PPO drops non-finite minibatch updates"}
            mon.act(seen, can_rewind=False)  # raises RunFailed under policy "stop"
            run.log(mon.skipped(seen))
        if done % tc.checkpoint_every == 0 or done == tc.max_steps:
            with mon.clock("checkpoint"):
                save_model(policy, tok, out / "model")
                ckpts.save(done, both, optimizer, {"loader": sampler.state_dict(),
                                                   "kl_coef": kl_coef, "monitor": mon.state_dict()})
    bar.close()
    mon.finish()
    return out / "model"
