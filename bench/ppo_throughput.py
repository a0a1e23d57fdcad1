"""PPO step throughput (episodes/s): scalelab's `ppo_step` vs TRL's PPOTrainer, same shapes.

One PPO step = sample a response per prompt, score them with a reward model, log-probs under
the policy and the reference, values, GAE, then `epochs` passes of clipped policy and value
updates (one minibatch each). Both systems use four same-shape models with random weights:
a policy, a frozen reference, a value model and a frozen reward model (a learned-reward-model
shape: transformer trunk + scalar head, so the reward pass costs what a real one costs).
No stop token: every response is `response_len` tokens long in both systems.

    python bench/ppo_throughput.py --device cuda   # GPT-2 124M shape, 64 x (64 + 128), bf16
    python bench/ppo_throughput.py --device cpu    # 4 x 256, vocab 4096, 16 x (16 + 32), fp32
    python bench/ppo_throughput.py --smoke --json /tmp/ppo.json

scalelab runs `scalelab.train.ppo.ppo_step`, the function `scalelab ppo` runs each step, under
the same autocast (`train.dtype` auto: bf16 on CUDA, fp32 on CPU). TRL (1.10:
`trl.experimental.ppo.PPOTrainer`) runs its own loop; its step time is taken between its
`on_step_end` callbacks. The peer runs after scalelab, in the same process.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

import scalelab.train.ppo as ppo_module
from scalelab.config import ModelConfig, PPOConfig, TrainConfig
from scalelab.hardware import autocast, pick_device, use_compile
from scalelab.model import ScalarModel, Transformer
from scalelab.train.loop import make_optimizer
from scalelab.train.ppo import make_rollout, make_sampling_copy, minibatch_loss, ppo_step

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, force_chunked_losses, hf_peer, write_json  # noqa: E402

SHAPES = {  # model, prompts, prompt tokens, response tokens, ppo epochs
    "cuda": (dict(n_layer=12, n_head=12, d_model=768, d_mlp=2048, vocab_size=50304), 64, 64,
             128, 4),
    "cpu": (dict(n_layer=4, n_head=4, d_model=256, vocab_size=4096), 16, 16, 32, 4),
    "smoke": (dict(n_layer=2, n_head=2, d_model=64, vocab_size=512), 4, 8, 8, 2),
}
PAD = 0


def scalelab_steps(mc: ModelConfig, prompts: list[list[int]], response_len: int, epochs: int,
                   device: torch.device, n_steps: int, compile: bool
                   ) -> tuple[list[float], list[float]]:
    """Seconds per `ppo_step`, and of it in sampling the responses, for n_steps steps (the
    caller drops the warm-up ones)."""
    torch.manual_seed(0)
    policy = Transformer(mc).to(device)
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    value = ScalarModel(Transformer(mc), zero_head=True).to(device)
    reward = ScalarModel(Transformer(mc)).to(device).eval().requires_grad_(False)
    tc = TrainConfig(lr=1e-6)
    optimizer = make_optimizer(torch.nn.ModuleDict({"policy": policy, "value": value}), tc,
                               device)
    pc = PPOConfig(max_new_tokens=response_len, ppo_epochs=epochs, minibatches=1,
                   samples_per_prompt=1, temperature=1.0)
    # no stop token, as for TRL; every id of the model's vocabulary may be sampled
    tok = types.SimpleNamespace(pad_id=PAD, eos_id=None, vocab_size=mc.vocab_size)
    ctx = autocast(device, tc.dtype)

    def reward_fn(idx, responses):  # the reward model's scalar at each last token
        ro = make_rollout(prompts, responses, PAD, device)
        out = reward(ro.tokens, ro.positions, ro.mask)
        return out[torch.arange(len(prompts), device=device),
                   ro.prompt_len + ro.resp_mask.sum(1).long() - 1]

    loss_fn = torch.compile(minibatch_loss) if compile else minibatch_loss
    sampling_copy = make_sampling_copy(policy, None, device, tc.dtype)  # as `scalelab ppo`
    gen = torch.Generator(device=device)
    times, sampling = [], []
    plain = ppo_module.sample_responses

    def timed_sampling(*args, **kw):  # synchronises at its ends only: the step's own order
        sync(device)
        t0 = time.perf_counter()
        out = plain(*args, **kw)
        sync(device)
        sampling.append(time.perf_counter() - t0)
        return out
    ppo_module.sample_responses = timed_sampling
    for step in range(n_steps):
        gen.manual_seed(step)
        sync(device)
        t0 = time.perf_counter()
        ppo_step(policy, ref, value, optimizer, reward_fn, list(range(len(prompts))), prompts,
                 tok, pc, 0.05, gen, ctx=ctx, loss_fn=loss_fn, compiled=compile,
                 sampling_copy=sampling_copy)
        sync(device)
        times.append(time.perf_counter() - t0)
    ppo_module.sample_responses = plain
    return times, sampling


def trl_steps(mc: ModelConfig, prompts: list[list[int]], response_len: int, epochs: int,
              device: torch.device, n_steps: int) -> list[float]:
    """Seconds per TRL PPOTrainer step (between on_step_end callbacks; the first one is from
    the start of training)."""
    import datasets
    from tokenizers import Tokenizer, models
    from transformers import (
        LlamaForSequenceClassification,
        PreTrainedTokenizerFast,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig as TRLConfig
    from trl.experimental.ppo import PPOTrainer

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(mc.vocab_size)},
                                       unk_token="t2"))
    tok = PreTrainedTokenizerFast(tokenizer_object=words, pad_token=f"t{PAD}", eos_token="t1",
                                  unk_token="t2")
    tok.padding_side = "left"
    torch.manual_seed(0)
    policy, ref = hf_peer(mc), hf_peer(mc)

    def scalar_model():
        cfg = copy.deepcopy(policy.config)
        cfg.num_labels, cfg.pad_token_id = 1, PAD
        return LlamaForSequenceClassification._from_config(cfg, attn_implementation="sdpa")

    value, reward = scalar_model(), scalar_model()
    for m in (policy, ref):
        m.generation_config.pad_token_id = PAD
    ds = datasets.Dataset.from_dict({"input_ids": prompts})
    B = len(prompts)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            sync(device)
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = TRLConfig(output_dir=out, per_device_train_batch_size=B,
                         per_device_eval_batch_size=B, gradient_accumulation_steps=1,
                         num_ppo_epochs=epochs, num_mini_batches=1,
                         local_rollout_forward_batch_size=B, response_length=response_len,
                         total_episodes=B * n_steps, stop_token=None, temperature=1.0,
                         learning_rate=1e-6, num_sample_generations=0, report_to="none",
                         save_strategy="no", logging_steps=1000, disable_tqdm=True,
                         bf16=device.type == "cuda", use_cpu=device.type == "cpu",
                         seed=0, dataloader_num_workers=0)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref,
                             reward_model=reward, value_model=value, train_dataset=ds,
                             eval_dataset=ds, callbacks=[Clock()])
        trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes: checks that it all runs")
    p.add_argument("--steps", type=int, help="timed steps per system (default 5; smoke 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per system")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="scalelab: compile the minibatch loss and the decode step (default: "
                        "train.compile = auto, as `scalelab ppo`: on for CUDA)")
    p.add_argument("--peers", default="scalelab,trl", help="comma list of: scalelab, trl")
    p.add_argument("--logprobs", default="auto", choices=["auto", "chunked"],
                   help="experiment: chunked = the chunked token log-probs under compile too "
                        "(auto: plain log-softmax under compile, chunked eagerly)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.logprobs == "chunked":
        force_chunked_losses()
    device = pick_device(args.device)
    args.compile = use_compile("auto" if args.compile is None else args.compile, device)
    peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    if unknown := set(peers) - {"scalelab", "trl"}:
        p.error(f"--peers: unknown {sorted(unknown)} (choose from scalelab, trl)")
    shape = "smoke" if args.smoke else device.type
    model_kw, n_prompts, prompt_len, response_len, epochs = SHAPES[shape]
    mc = Transformer(ModelConfig(seq_len=prompt_len + response_len, tie_embeddings=True,
                                 **model_kw)).cfg  # resolved d_mlp and n_kv_head
    steps = args.steps or (2 if args.smoke else 5)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, mc.vocab_size, (n_prompts, prompt_len), generator=g).tolist()
    print(f"device {device_name(device)} | torch {torch.__version__} | "
          f"dtype {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
    print(f"shape: L={mc.n_layer} d={mc.d_model} H={mc.n_head} mlp={mc.d_mlp} "
          f"vocab={mc.vocab_size} | {n_prompts} prompts x {prompt_len} tokens, {response_len}-"
          f"token responses, {epochs} epochs, 1 minibatch | 4 models | reward: random-weight "
          "scalar model")

    results: dict[str, dict] = {}
    unavailable = {}
    for name in peers:
        try:
            if name == "scalelab":
                times, sampling = scalelab_steps(mc, prompts, response_len, epochs, device,
                                                 args.warmup + steps, args.compile)
            else:
                import trl
                times = trl_steps(mc, prompts, response_len, epochs, device,
                                  args.warmup + steps)
        except ImportError as e:
            unavailable[name] = f"not installed ({e})"
            print(f"{name}: peer unavailable: {unavailable[name]}")
            continue
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            if name == "scalelab":
                raise
            unavailable[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: peer unavailable: {unavailable[name]}")
            continue
        timed = times[args.warmup:]
        sec = statistics.median(timed)
        results[name] = {"s_per_step": sec, "episodes_per_s": n_prompts / sec,
                         "s_min": min(timed), "s_max": max(timed), "steps": len(timed),
                         "warmup_s": times[:args.warmup]}
        if name == "trl":
            results[name]["version"] = trl.__version__
        print(f"{name:<10} {sec:8.3f} s/step ({min(timed):.3f}..{max(timed):.3f})  "
              f"{n_prompts / sec:8.2f} episodes/s")
        if name == "scalelab":
            results[name]["sampling_s"] = statistics.median(sampling[args.warmup:])
            print(f"{'':<10} of which sampling the responses: "
                  f"{results[name]['sampling_s']:.3f} s")
    ratio = None
    if "scalelab" in results and "trl" in results:
        ratio = results["scalelab"]["episodes_per_s"] / results["trl"]["episodes_per_s"]
        print(f"\nscalelab / trl episodes/s: {ratio:.3f}")
    else:
        print("\nscalelab / trl episodes/s: n/a" +
              (f" (peer unavailable: {unavailable['trl']})" if "trl" in unavailable else ""))
    write_json(args.json, device,
               shape={"model": vars(mc), "prompts": n_prompts, "prompt_len": prompt_len,
                      "response_len": response_len, "ppo_epochs": epochs, "minibatches": 1,
                      "reward": "random-weight scalar model (learned-RM shape)",
                      "dtype": "bf16 autocast" if device.type == "cuda" else "float32",
                      "scalelab_compile": args.compile, "logprobs": args.logprobs},
               results=results, unavailable=unavailable, ratio_scalelab_over_trl=ratio)


if __name__ == "__main__":
    main()
