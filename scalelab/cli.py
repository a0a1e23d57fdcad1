"""The `scalelab` command. Bad input -> one line on stderr and exit 2; a bug -> exit 1."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from scalelab.config import Config, RunFailed, UserError, load_config, resolve_config_path


def resume_after_restart(args: argparse.Namespace) -> None:
    """A worker that `torchrun --max-restarts=N` started again (TORCHELASTIC_RESTART_COUNT
    > 0) goes on from its run's last checkpoint, as if --resume had been given."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if args.resume or restart == 0:
        return
    from scalelab.train.checkpoint import list_checkpoints
    if list_checkpoints(Path(args.out)):
        args.resume = True
        if os.environ.get("RANK", "0") == "0":
            print(f"scalelab: restart {restart} by torchrun: resuming {args.out}",
                  file=sys.stderr)


def stage_config(args: argparse.Namespace, preset: str | None = None) -> Config:
    """--config (else, on --resume, the run's own config.toml, else the stage's preset),
    then --set, then --max-steps."""
    resume_after_restart(args)
    path = resolve_config_path(args.config)
    saved = Path(args.out) / "config.toml"
    if path is None and args.resume and saved.is_file():
        path = saved
    if path is None:
        path = resolve_config_path(preset)
    cfg = load_config(path, args.set)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UserError("--max-steps must be at least 1")
        cfg.train.max_steps = args.max_steps
    return cfg


def register_output(args: argparse.Namespace, out: Path, lineage: str,
                    parent: str | None = None) -> None:
    if args.register:  # --register: add the stage's model to the experiment registry
        from scalelab.track.commands import register_output
        register_output(args, out, lineage, parent)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from scalelab.train.pretrain import pretrain
    model_dir = pretrain(stage_config(args), Path(args.out), resume=args.resume)
    import torch.distributed as dist
    if dist.is_initialized():  # under torchrun: only rank 0 reports, then all leave together
        if dist.get_rank() != 0:
            model_dir = None
        dist.destroy_process_group()
    if model_dir is not None:
        print(f"model written to {model_dir}")
        register_output(args, model_dir, "base")


def cmd_sft(args: argparse.Namespace) -> None:
    from scalelab.train.sft import sft
    out = sft(stage_config(args, "sft"), Path(args.base), args.data, Path(args.out),
              args.resume)
    print(f"model written to {out}")
    register_output(args, out, "sft", args.base)


def cmd_reward(args: argparse.Namespace) -> None:
    from scalelab.train.reward import train_reward
    if args.register:
        raise UserError("--register: a reward model is not a language model to run "
                        "experiments on; register the policy (sft/ppo/dpo) instead")
    out = train_reward(stage_config(args, "reward"), Path(args.base), args.data,
                       Path(args.out), args.resume)
    print(f"reward model written to {out}")


def cmd_ppo(args: argparse.Namespace) -> None:
    from scalelab.train.ppo import ppo
    out = ppo(stage_config(args, "ppo"), Path(args.policy), Path(args.reward), args.prompts,
              Path(args.out), args.resume)
    print(f"policy written to {out}")
    register_output(args, out, "rlhf", args.policy)


def cmd_dpo(args: argparse.Namespace) -> None:
    from scalelab.train.dpo import dpo
    out = dpo(stage_config(args, "dpo"), Path(args.policy), args.data, Path(args.out),
              args.resume)
    print(f"policy written to {out}")
    register_output(args, out, "rlhf", args.policy)


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from scalelab.generate import generate
    from scalelab.train.checkpoint import load_model
    from scalelab.train.loop import pick_device

    model, tok = load_model(args.model, pick_device(args.device))
    prompt = tok.encode(args.prompt, bos=True)
    if len(prompt) >= model.cfg.seq_len:
        raise UserError(f"--prompt is {len(prompt)} tokens; the model's context is "
                        f"{model.cfg.seq_len}")
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    outs = generate(model, [prompt] * args.num_samples, args.max_new_tokens, tok.pad_id,
                    tok.eos_id, args.temperature, args.top_k, args.top_p, generator=g)
    for i, new in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tok.decode(new))


def cmd_plan(args: argparse.Namespace) -> None:
    from scalelab.hardware import HARDWARE
    from scalelab.parallel import plan
    from scalelab.parallel.rules import make_rules

    path = resolve_config_path(args.config)
    cfg = load_config(path, args.set)
    rules = make_rules(cfg.parallel.rules)
    hw = HARDWARE[args.hardware]
    if args.explain:
        sizes = plan.parse_mapping(args.explain, args.world_size)
        print(plan.explain(cfg, sizes, rules, hw))
        return
    ests = plan.plan(cfg, args.world_size, rules, hw)
    print(plan.format_plan(cfg, args.world_size, hw, ests, limit=args.top))


def cmd_demo(args: argparse.Namespace) -> None:
    from scalelab.demo import run_demo
    run_demo(Path(args.out), quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scalelab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def stage(name: str, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("--config", help="TOML file or preset name (tiny, small, gpt2-124m)")
        s.add_argument("--out", required=True, help="run directory to write")
        s.add_argument("--max-steps", type=int, help="override train.max_steps")
        s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable)")
        s.add_argument("--register", action="store_true",
                       help="add the result to the experiment registry (see --registry)")
        s.add_argument("--registry", help="registry file for --register")
        return s

    stage("pretrain", "pretrain a model from scratch").set_defaults(func=cmd_pretrain)
    s = stage("sft", "instruction fine-tuning (loss on assistant tokens only)")
    s.add_argument("--base", required=True, help="model folder to start from")
    s.add_argument("--data", required=True, help="builtin:tasks or a JSONL file")
    s.set_defaults(func=cmd_sft)
    s = stage("reward", "train a reward model on preference pairs")
    s.add_argument("--base", required=True, help="model folder (the SFT model) to start from")
    s.add_argument("--data", required=True,
                   help="builtin:tasks (sample and rank with the gold labeler) or a JSONL file")
    s.set_defaults(func=cmd_reward)
    s = stage("ppo", "RLHF: optimise the policy against a reward model with PPO")
    s.add_argument("--policy", required=True, help="model folder (the SFT model)")
    s.add_argument("--reward", required=True,
                   help="reward model folder, or builtin:gold to optimise the gold labeler "
                        "itself (a perfect reward model: the ceiling for a learned one)")
    s.add_argument("--prompts", required=True, help="builtin:tasks or a JSONL file of prompts")
    s.set_defaults(func=cmd_ppo)
    s = stage("dpo", "direct preference optimisation on preference pairs")
    s.add_argument("--policy", required=True, help="model folder (the SFT model)")
    s.add_argument("--data", required=True, help="preference JSONL file")
    s.set_defaults(func=cmd_dpo)

    g = sub.add_parser("generate", help="sample text from a trained model")
    g.add_argument("--model", required=True, help="model folder (RUN/model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=cmd_generate)

    pl = sub.add_parser("plan", help="cost of every dp x fsdp x tp mapping on N devices")
    pl.add_argument("--config", required=True, help="TOML file or preset name")
    pl.add_argument("--world-size", type=int, required=True, help="number of devices")
    pl.add_argument("--hardware", default="h100", choices=["h100", "h200", "a100", "cpu"])
    pl.add_argument("--explain", metavar="DP,FSDP,TP",
                    help="show one mapping: each weight's shard and each collective")
    pl.add_argument("--top", type=int, default=20, help="mappings to list")
    pl.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="run the whole pipeline on built-in data and report")
    d.add_argument("--out", required=True)
    d.add_argument("--quick", action="store_true", help="fewer steps (a couple of minutes)")
    d.set_defaults(func=cmd_demo)

    from scalelab.track.commands import register
    register(sub)  # `track ...` and `sweep`
    from scalelab import runs
    runs.register(sub)  # `runs list|show|watch`
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike
            print(f"scalelab: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # the run monitor stopped it (policy "stop", too many rewinds)
        if os.environ.get("RANK", "0") == "0":
            print(f"scalelab: run stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scalelab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
