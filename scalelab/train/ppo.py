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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scalelab.config import Config, PPOConfig, UserError
from scalelab.data.batches import EpochSampler, pack_spans, run_packed
from scalelab.data.formats import is_builtin_tasks, read_prompts
from scalelab.generate import generate, padded_attention, stopped
from scalelab.hardware import autocast, compute_dtype, use_compile
from scalelab.model import ScalarModel, Transformer
from scalelab.parallel.apply import clip_grads, parallelize
from scalelab.parallel.rules import check_divisible
from scalelab.tokenizer import Tokenizer
from scalelab.train.checkpoint import save_full_model
from scalelab.train.labelers import get_labeler, refuse_unused
from scalelab.train.loop import Step, fit, start_stage
from scalelab.train.losses import token_logprobs
from scalelab.train.reward import load_reward_model, reward_scores

# ---- the math, as small pure functions (unit-tested against hand calculations) --------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count=None) -> torch.Tensor:
    """Mean over the valid entries; count: divide by that instead (the valid entries of the
    whole minibatch over every data rank, so that the ranks' shares add up to its mean)."""
    return (x * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           total: Callable[[torch.Tensor], torch.Tensor] = _local) -> torch.Tensor:
    """(x - mean) / std over the valid entries (population std, as in lm-human-preferences).
    total(t): t summed over the data ranks, so mean and std are the global batch's."""
    sums = total(torch.stack([(x * mask).sum(), mask.sum()]))
    count = sums[1].clamp(min=1)
    mean = sums[0] / count
    var = total(((x - mean) ** 2 * mask).sum()) / count
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
                mask: torch.Tensor, clip: float, count=None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate: mean over tokens of max(-A*r, -A*clip(r, 1-e, 1+e)).
    count: the minibatch's tokens over every data rank (see masked_mean)."""
    ratio = torch.exp(logp - old_logp)
    losses = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    with torch.no_grad():  # tensors, not floats: reading them would wait for the GPU
        stats = {"policy/approxkl": 0.5 * masked_mean((logp - old_logp) ** 2, mask, count),
                 "policy/clipfrac": masked_mean(((ratio - 1).abs() > clip).float(), mask,
                                                count),
                 "val/ratio": masked_mean(ratio, mask, count)}
    return masked_mean(losses, mask, count), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip: float, count=None) -> torch.Tensor:
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped within old_v +- clip."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask,
                             count)


# ---- rollouts --------------------------------------------------------------------------------


@dataclass
class Rollout:
    tokens: torch.Tensor  # (B, P+R): left-padded prompts, then right-padded responses
    positions: torch.Tensor
    mask: torch.Tensor  # (B, 1, T, T) attention mask
    resp_mask: torch.Tensor  # (B, R) float: 1 on response tokens (EOS included)
    prompt_len: int
    responses: list[list[int]]
    vocab_limit: int | None = None  # the ids sampling draws from: the log-probs' vocabulary
    valid: torch.Tensor | None = None  # (B, P+R) bool: prompt and response tokens
    pack: bool = False  # the models read the rows packed (see `run`)
    _packing: tuple | None = field(default=None, repr=False)  # pack_spans(valid), made once

    def rows(self, idx: torch.Tensor) -> Rollout:
        """These rows only (a minibatch)."""
        return Rollout(self.tokens[idx], self.positions[idx], self.mask[idx],
                       self.resp_mask[idx], self.prompt_len, [], self.vocab_limit,
                       self.valid[idx], self.pack)

    def run(self, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        """fn(tokens, positions, mask) -> (B, P+R, ...) over these rows. With `pack` the
        rows go in packed (first-fit, each sequence seeing only itself: the built-in
        prompts and answers are about half padding) and come back in the padded layout."""
        if self.pack and self._packing is None:
            self._packing = pack_spans(self.valid)  # () where it would save nothing
        if self._packing:
            return run_packed(fn, self.tokens, self._packing)
        return fn(self.tokens, self.positions, self.mask)


def make_rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                 device, min_response_len: int = 1, vocab_limit: int | None = None,
                 pack: bool = False) -> Rollout:
    """min_response_len pads every rollout to one shape (what a compiled step wants).
    vocab_limit: the tokenizer's vocabulary when the model's is padded past it (generate's).
    pack: run the models over packed rows (Rollout.run)."""
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
                   valid[:, P:].float().to(device), P, responses, vocab_limit,
                   valid.to(device), pack)


def response_logprobs(model: Transformer, ro: Rollout, temperature: float,
                      with_entropy: bool = False):
    """Log-probs (B, R) of the response tokens at the sampling temperature (and the entropy
    of each token's distribution), in chunks: no (B, R, vocab) fp32 tensor is held whole.
    Over the ids the responses were sampled from (ro.vocab_limit), so the ratio of new to
    old log-probs is the one of the distributions PPO samples."""
    h = ro.run(model.hidden)[:, ro.prompt_len - 1: -1]
    return token_logprobs(h, model.lm_head.weight[:ro.vocab_limit],
                          ro.tokens[:, ro.prompt_len:], temperature, with_entropy)


def response_values(value_model: ScalarModel, ro: Rollout) -> torch.Tensor:
    """V(state before each response token): read at the position that predicts it."""
    return ro.run(value_model)[:, ro.prompt_len - 1: -1]


# ---- one PPO step --------------------------------------------------------------------------


def minibatch_loss(policy: Transformer, value: ScalarModel, sub: Rollout, old_logp, old_values,
                   adv, returns, pc: PPOConfig, count=None) -> tuple[torch.Tensor, dict]:
    """The clipped policy + value loss of one minibatch, and its stats as tensors.
    count: the minibatch's response tokens over every data rank (None: this one's), so on a
    mesh each rank returns its share of the global token mean."""
    m = sub.resp_mask
    logp, entropy = response_logprobs(policy, sub, pc.temperature, with_entropy=True)
    pg, stats = policy_loss(logp, old_logp, adv, m, pc.clip, count)
    vf = value_loss(response_values(value, sub), old_values, returns, m, pc.value_clip, count)
    stats.update({"loss/policy": pg.detach(), "loss/value": vf.detach(),
                  "objective/entropy": masked_mean(entropy, m, count)})
    return pg + pc.vf_coef * vf, stats


RewardFn = Callable[[list[int], list[list[int]]], torch.Tensor]


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The sampling seed of chunk `chunk` of step `step`'s rollout batch (chunk 0: the seed
    of the whole batch before there were chunks)."""
    return seed * 100_003 + step + chunk * 1_000_000_007


@dataclass
class Chunks:
    """This process's part of a step's rollout batch (ppo.rollout_shards): chunks first ..
    first + len(seeds) - 1 of `total` equal chunks, each sampled from its own seed (None:
    from the generator as given), each shuffled into minibatches on its own."""
    seeds: list[int | None]
    first: int = 0
    total: int = 1


class DataRanks:
    """The data-parallel side of a PPO step on a mesh (parallel.mesh.Parallel); with None,
    one process, every method is the identity."""

    def __init__(self, par=None):
        self.par = None if par is None or par.single else par
        self.world = 1 if self.par is None else self.par.data_world

    def total(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the data ranks (tp ranks hold equal copies)."""
        if self.par is None:
            return x
        return self.par.mean_over_data(x) * self.world

    def generates(self) -> bool:
        """Whether this rank samples: the first tp rank of each data group (the others get
        its tokens, so the tp ranks of a group hold identical rollouts by construction)."""
        return self.par is None or self.par.mesh.get_local_rank("tp") == 0

    def share_over_tp(self, responses: list[list[int]], rows: int, width: int
                      ) -> list[list[int]]:
        if self.par is None or self.par.sizes["tp"] == 1:
            return responses
        import torch.distributed as dist
        group = self.par.mesh.get_group("tp")
        ids = torch.full((rows, width), -1, dtype=torch.long)
        for i, r in enumerate(responses):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        ids = ids.to(self.par.device)
        dist.broadcast(ids, src=dist.get_global_rank(group, 0), group=group)
        return [[t for t in row if t >= 0] for row in ids.tolist()]


def sample_responses(model: Transformer, prompts: list[list[int]], tok: Tokenizer,
                     pc: PPOConfig, chunks: Chunks, generator: torch.Generator | None,
                     ranks: DataRanks, compile: bool = False) -> list[list[int]]:
    """Generate chunk by chunk, each from its own seed (see Chunks). compile: compile the
    decode step (generate's `compile`: on CUDA, a compiled step replayed as a CUDA graph)."""
    size = len(prompts) // len(chunks.seeds)
    responses: list[list[int]] = []
    if ranks.generates():
        for k, seed in enumerate(chunks.seeds):
            if seed is not None:
                generator.manual_seed(seed)
            responses += generate(model, prompts[k * size:(k + 1) * size], pc.max_new_tokens,
                                  tok.pad_id, tok.eos_id, temperature=pc.temperature,
                                  generator=generator, compile=compile,
                                  vocab_limit=tok.vocab_size)
    return ranks.share_over_tp(responses, len(prompts), pc.max_new_tokens)


def minibatch_rows(chunks: Chunks, rows: int, minibatches: int) -> list[torch.Tensor]:
    """Each chunk shuffled on its own (global CPU RNG: saved in checkpoints, and the same on
    every rank, which draws every chunk's order) and cut into `minibatches`; minibatch j holds
    the j-th piece of each local chunk. One chunk: randperm(rows).chunk(minibatches)."""
    size = rows // len(chunks.seeds)
    orders = [torch.randperm(size) for _ in range(chunks.total)]
    pieces = [order.chunk(minibatches) for order in orders[chunks.first:
                                                         chunks.first + len(chunks.seeds)]]
    return [torch.cat([p[j] + k * size for k, p in enumerate(pieces)])
            for j in range(len(pieces[0]))]


def ppo_step(policy: Transformer, ref: Transformer, value: ScalarModel,
             optimizer: torch.optim.Optimizer, reward_fn: RewardFn, prompt_idx: list[int],
             prompts: list[list[int]], tok: Tokenizer, pc: PPOConfig, kl_coef: float,
             generator: torch.Generator | None = None, ctx=None, grad_clip: float = 1.0,
             loss_fn: Callable | None = None, compiled: bool = False,
             corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None,
             chunks: Chunks | None = None, par=None, sampling_copy: Transformer | None = None
             ) -> tuple[dict, Rollout]:
    """Roll out, score, and update. reward_fn(prompt_idx, responses) -> (B,) scores.
    ctx: the autocast context of every forward pass (train.dtype); loss_fn: minibatch_loss,
    or a compiled copy of it (then `compiled` is set: every rollout is padded to
    max_new_tokens and not packed, one shape for the compiled loss, and the decode step is
    compiled too).
    sampling_copy: a whole copy of the policy to generate with (see `make_sampling_copy`),
    refreshed from the policy here before the rollouts.
    The stats stay tensors until the end of the step. A minibatch whose loss or gradient
    norm is not finite is not applied (counted in row["skipped_updates"]): a fused optimizer
    (AdamW on CUDA) skips it on the device, so the loop never waits for the GPU; others
    read the flag on the host. corrupt(loss) is the run monitor's test-only fault
    injection.
    On a mesh (par): prompts are this data rank's part of the batch (chunks), policy, ref
    and value are sharded; advantages are whitened over the global batch, each minibatch's
    loss is its mean over the global count of its tokens, and the logged stats are the
    global batch's."""
    device = next(policy.parameters()).device
    ctx = ctx if ctx is not None else contextlib.nullcontext()
    loss_fn = loss_fn or minibatch_loss
    ranks, chunks = DataRanks(par), chunks or Chunks([None])
    policy.eval()
    if sampling_copy is not None:
        refresh_sampling_copy(sampling_copy, policy)
    with ctx:
        responses = sample_responses(sampling_copy or policy, prompts, tok, pc, chunks, generator,
                                     ranks, compile=compiled)
    ro = make_rollout(prompts, responses, tok.pad_id, device,
                      pc.max_new_tokens if compiled else 1, tok.vocab_size,
                      pack=pc.pack and not compiled)
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
        adv = whiten(adv, ro.resp_mask, total=ranks.total)

    policy.train()
    value.train()
    B, sums, n, skipped = len(responses), {}, 0, torch.zeros((), device=device)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    both = torch.nn.ModuleDict({"policy": policy, "value": value})
    for _ in range(pc.ppo_epochs):
        for mb in minibatch_rows(chunks, B, pc.minibatches):
            mb = mb.to(device)
            sub = ro.rows(mb)
            count = None if ranks.par is None else ranks.total(sub.resp_mask.sum())
            with ctx:
                loss, s = loss_fn(policy, value, sub, old_logp[mb], old_values[mb], adv[mb],
                                  returns[mb], pc, count)
            if corrupt is not None:
                loss = corrupt(loss)
            optimizer.zero_grad(set_to_none=True)
            # x data ranks: the gradient reduction averages over them, the loss is a share
            (loss * ranks.world if ranks.world > 1 else loss).backward()
            norm = clip_grads(both, grad_clip, ranks.par, params)
            bad = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
            if ranks.par is not None:  # one rank's bad loss skips the update everywhere
                bad = (ranks.total(bad) > 0).float()
            skipped += bad
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                optimizer.found_inf = bad  # what GradScaler hands a fused step: skip if 1
                optimizer.step()
                del optimizer.found_inf
            elif not bad.item():
                optimizer.step()
            sums = {k: sums.get(k, 0.0) + v.detach() for k, v in s.items()}
            n += 1
    kl_seq = kl.sum(1)
    k3_seq = (kl_penalty(old_logp, ref_logp, "k3") * ro.resp_mask).sum(1)
    per_row = {"objective/kl": kl_seq, "objective/kl_k3": k3_seq, "objective/scores": scores,
               "objective/rlhf_reward": scores - kl_coef * kl_seq,
               "val/num_eos_tokens": ended.float(), "val/response_len": ro.resp_mask.sum(1)}
    # One all-reduce (on a mesh) and one host sync for all the stats of the step.
    keys, rows = list(sums), list(per_row)
    local = torch.stack([sums[k] / n for k in keys] + [per_row[k].sum() for k in rows] +
                        [torch.tensor(float(B), device=device)])
    values = ranks.total(local).tolist()
    row = dict(zip(keys, values))
    row.update({k: v / values[-1] for k, v in zip(rows, values[len(keys):])})
    row.update({"val/num_eos_tokens": round(row["val/num_eos_tokens"] * values[-1]),
                "kl_coef": kl_coef, "skipped_updates": int(skipped.item())})
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


def rollout_chunks(pc: PPOConfig, par) -> tuple[int, int, int]:
    """(chunks in all, this data rank's first chunk, chunks per data rank) for
    ppo.rollout_shards on this mesh; bad combinations are a UserError naming the keys."""
    total = pc.rollout_shards or par.data_world
    if total % par.data_world:
        raise UserError(f"ppo.rollout_shards={total} must be a multiple of the data ranks "
                        f"(dp x fsdp = {par.data_world}); 0 = one per data rank")
    if pc.rollout_batch % (total * pc.samples_per_prompt):
        raise UserError(f"ppo.rollout_batch={pc.rollout_batch} must be a multiple of "
                        f"ppo.samples_per_prompt ({pc.samples_per_prompt}) x the rollout "
                        f"chunks ({total}: ppo.rollout_shards, or the data ranks)")
    rows = pc.rollout_batch // total  # torch.chunk would quietly make fewer minibatches
    if -(-rows // -(-rows // pc.minibatches)) != pc.minibatches:
        raise UserError(f"ppo.minibatches={pc.minibatches} cannot cut each rollout chunk "
                        f"({rows} rows: ppo.rollout_batch / the chunks) into that many "
                        f"minibatches; use a divisor of {rows}")
    mine = total // par.data_world
    return total, par.data_rank * mine, mine


def ppo(cfg: Config, policy_dir: Path, reward_dir: Path | str, prompts_spec: str, out: Path,
        resume: bool = False) -> Path:
    """PPO from the policy in policy_dir against the reward model in reward_dir, or against
    the gold labeler itself when reward_dir is "builtin:gold". Under torchrun the four
    models are sharded by [parallel] and each data rank rolls out its own chunks."""
    pc, tc = cfg.ppo, cfg.train
    texts, examples = load_prompts(prompts_spec, pc.n_prompts, pc.seed)  # bad input: fail early
    oracle = str(reward_dir) == "builtin:gold"  # the labeler itself as the reward: PPO's ceiling
    if examples is None:
        refuse_unused(cfg.reward.labeler, f"--prompts {prompts_spec}", "your prompts carry no "
                      "reference answers for it to score (it scores builtin:tasks answers)")
    if oracle and examples is None:
        raise UserError("--reward builtin:gold scores task examples: use --prompts builtin:tasks")
    n_prompts = pc.rollout_batch // pc.samples_per_prompt  # different prompts per step
    if len(texts) < n_prompts:
        more = "raise ppo.n_prompts" if examples is not None else "add prompts"
        raise UserError(f"{prompts_spec}: holds {len(texts)} prompts; each PPO step needs "
                        f"{n_prompts} different ones (ppo.rollout_batch {pc.rollout_batch} / "
                        f"ppo.samples_per_prompt {pc.samples_per_prompt}): {more}, or lower "
                        "ppo.rollout_batch or raise ppo.samples_per_prompt")
    if not oracle:  # before start_stage seeds: building it draws from the global RNG
        reward_model, reward_tok, stats = load_reward_model(reward_dir)  # CPU until the mesh
        reward_model.requires_grad_(False)
    run, par, policy, tok = start_stage(cfg, out, resume, "ppo", policy_dir,
                                        reward=reward_dir, prompts=prompts_spec)
    if not oracle and reward_tok.hf.get_vocab() != tok.hf.get_vocab():
        # it reads the policy's token ids: another vocabulary scores nonsense, or crashes
        raise UserError(f"--reward {reward_dir}: its tokenizer is not the policy's "
                        f"({policy_dir}): a reward model scores the policy's tokens, so train "
                        "it from the policy (or its base) with `scalelab reward --base`")
    if not (oracle or par.single):  # its shape may differ from the policy's (start_stage's)
        check_divisible(reward_model.cfg, par.rules, par.sizes, f"--reward {reward_dir}: ")
    device = par.device
    total_chunks, first_chunk, my_chunks = rollout_chunks(pc, par)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    trunk = policy if oracle else reward_model.trunk
    value = ScalarModel(copy.deepcopy(trunk), zero_head=True).to(device).requires_grad_(True)
    sampling_copy = make_sampling_copy(policy, par, device, tc.dtype)
    for m, entry in ((policy, "hidden"), (ref, "hidden"), (value, "forward")):
        parallelize(m, par, tc.dtype, entry=entry)  # losses read hidden() and lm_head
    if not oracle:
        parallelize(reward_model.to(device), par, tc.dtype)
    ids = [tok.chat_prompt(t) for t in texts]
    keep = [i for i, p in enumerate(ids) if len(p) + pc.max_new_tokens <= policy.cfg.seq_len]
    if len(keep) < n_prompts:
        raise UserError(f"{prompts_spec}: only {len(keep)} of the {len(texts)} prompts fit the "
                        f"model's context of {policy.cfg.seq_len} tokens with room for "
                        f"ppo.max_new_tokens = {pc.max_new_tokens}; each PPO step needs "
                        f"{n_prompts}: shorten prompts or lower ppo.max_new_tokens")
    label = get_labeler(cfg.reward.labeler) if examples is not None else None

    def gold_scores(idx: list[int], responses: list[list[int]]) -> torch.Tensor:
        return torch.tensor([label(examples[i], tok.decode(r), stopped(r, tok.eos_id))
                             for i, r in zip(idx, responses)])

    def reward_fn(idx: list[int], responses: list[list[int]]) -> torch.Tensor:
        if oracle:
            return gold_scores(idx, responses)
        return reward_scores(reward_model, tok, stats, [texts[i] for i in idx], responses)

    ctx = autocast(device, tc.dtype)
    compiled = use_compile(tc.compile, device)
    loss_fn = torch.compile(minibatch_loss) if compiled else minibatch_loss
    sampler = EpochSampler(len(keep), n_prompts, seed=pc.seed)
    gen, ranks = torch.Generator(device=device), DataRanks(par)
    per_chunk = pc.rollout_batch // total_chunks
    mine = slice(first_chunk * per_chunk, (first_chunk + my_chunks) * per_chunk)

    class PPOStep(Step):
        """What fit() runs each step: roll out, score, update (ppo_step). PPO neither rewinds
        nor judges spikes (its loss is not a descent curve); a step that dropped non-finite
        minibatch updates is reported to the monitor (policy "stop" stops there)."""
        desc, can_rewind = "ppo", False

        def lr_at(self, step: int) -> float:
            return tc.lr * (1 - step / tc.max_steps)  # anneal linearly to zero

        def update(self, step: int, optimizer, mon) -> dict | None:
            self.t0 = time.perf_counter()
            mon.stall(step + 1)  # the monitor's test-only stall@N
            self.idx = [keep[i] for i in sampler.next_indices()
                        for _ in range(pc.samples_per_prompt)]
            chunks = Chunks([chunk_seed(pc.seed, step, c)  # resumable sampling: seeds per step
                             for c in range(first_chunk, first_chunk + my_chunks)],
                            first_chunk, total_chunks)
            kl_coef = self.state["kl_coef"]
            self.stats, self.ro = ppo_step(
                policy, ref, value, optimizer, reward_fn, self.idx[mine],
                [ids[i] for i in self.idx[mine]], tok, pc, kl_coef, gen, ctx=ctx,
                grad_clip=tc.grad_clip, loss_fn=loss_fn, compiled=compiled,
                corrupt=lambda loss, at=step + 1: mon.corrupt(at, loss), chunks=chunks,
                par=par, sampling_copy=sampling_copy)
            self.state["kl_coef"] = update_kl_coef(kl_coef, self.stats["objective/kl"], pc,
                                                   len(self.idx))
            self.loss = self.stats["loss/policy"] + pc.vf_coef * self.stats["loss/value"]
            if self.stats["skipped_updates"] or not math.isfinite(self.loss):
                return {"step": step + 1, "event": "nonfinite", "loss": self.loss,
                        "grad_norm": float("nan"), "skipped_updates": self.stats[
                            "skipped_updates"], "note": "PPO drops non-finite minibatch updates"}
            return None

        def row(self, done: int, lr: float, mon) -> dict:
            row = {"step": done, "loss": self.loss, "lr": lr, **self.stats,
                   "episodes_per_s": len(self.idx) / (time.perf_counter() - self.t0)}
            if label is not None:
                gold = gold_scores(self.idx[mine], self.ro.responses).sum().float()
                row["gold_reward"] = ranks.total(gold.to(device)).item() / len(self.idx)
            return row

    fit(run, cfg, torch.nn.ModuleDict({"policy": policy, "value": value}), sampler, device,
        save_model=lambda: save_full_model(policy, tok, out / "model", par),
        parallel=None if par.single else par, step=PPOStep({"kl_coef": pc.kl_coef}))
    return out / "model"


def make_sampling_copy(policy: Transformer, par, device: torch.device, dtype: str
                       ) -> Transformer | None:
    """A whole copy of the policy to sample from, or None to sample from the policy itself.
    Sampling with a KV cache needs whole weights, so on a mesh (where parallelize makes the
    policy's weights DTensors, sharded or not) the copy is needed. On a GPU computing in
    bf16 it is also worth it alone: a bf16 copy, refreshed once per step, spares every
    decode step casting all fp32 weights to bf16 again."""
    sharded = par is not None and not par.single
    bf16 = device.type == "cuda" and compute_dtype(device, dtype) == torch.bfloat16
    if not (sharded or bf16):
        return None
    copy_ = copy.deepcopy(policy).eval().requires_grad_(False)
    return copy_.to(torch.bfloat16) if bf16 else copy_


@torch.no_grad()
def refresh_sampling_copy(copy_: Transformer, policy: Transformer) -> None:
    """Copy the sharded policy's weights into the whole sampling copy, in place (collective:
    every rank gathers every weight). One weight at a time, so the only whole copy held is
    the copy's own; in all one all-gather of the policy per PPO step."""
    from torch.distributed.tensor import DTensor
    mine = dict(copy_.named_parameters())
    for name, p in policy.named_parameters():  # FSDP and TP keep the names
        mine[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)
