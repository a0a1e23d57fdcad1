"""The `scalelab` command. Bad input -> one line on stderr and exit 2; a bug -> exit 1."""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from pathlib import Path

from scalelab.config import (
    Config,
    RunFailed,
    UserError,
    check_seed,
    load_config,
    resolve_config_path,
)


def resume_after_restart(args: argparse.Namespace) -> None:
    """A worker that `torchrun --max-restarts=N` started again (TORCHELASTIC_RESTART_COUNT
    > 0) goes on from its run's last checkpoint, as if --resume had been given."""
    from scalelab.train.progress import is_rank0
    from scalelab.train.rundir import list_checkpoints, restart_count
    restart = restart_count()
    if args.resume or restart == 0:
        return
    if list_checkpoints(Path(args.out)):
        args.resume = True
        if is_rank0():
            print(f"scalelab: restart {restart} by torchrun: resuming {args.out}",
                  file=sys.stderr)

STAGES = ("pretrain", "sft", "reward", "ppo", "dpo")


def stage_config(args: argparse.Namespace, preset: str | None = None) -> Config:
    """--config (else, on --resume, the run's own config.toml, else the stage's preset),
    then --set, then --max-steps. First of all, --out must be a folder this stage may write:
    new, empty, or its own earlier run (exit 2 before any work otherwise)."""
    resume_after_restart(args)
    from scalelab.train.rundir import check_out
    check_out(Path(args.out), args.command, args.resume)
    path = resolve_config_path(args.config)
    saved = Path(args.out) / "config.toml"
    if path is None and args.resume and saved.is_file():
        path = saved
    if path is None:
        path = resolve_config_path(preset)
    cfg = load_config(path, args.set, stage=args.command, own_run=path == saved)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UserError("--max-steps must be at least 1")
        cfg.train.max_steps = args.max_steps
    return cfg


def nothing_to_do(args: argparse.Namespace, cfg: Config) -> bool:
    """--resume on a run that already reached train.max_steps: say so instead of silence."""
    from scalelab.train.rundir import finished_step
    step = finished_step(Path(args.out), cfg.train.max_steps) if args.resume else None
    if step is not None:
        from scalelab.train.progress import say  # rank 0 only under torchrun
        say(f"{args.out}: nothing to do: the run already reached step {step} "
            f"(train.max_steps {cfg.train.max_steps}); pass a larger --max-steps to train "
            f"on. Its model is {Path(args.out) / 'model'}")
    return step is not None


def main_rank_only(out: Path) -> Path | None:
    """Under torchrun only rank 0 reports (prints, registers); then all leave together."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return out
    rank = dist.get_rank()
    dist.destroy_process_group()
    return out if rank == 0 else None


def run_stage(args: argparse.Namespace, train, preset: str | None, what: str = "model",
              lineage: str | None = None, parent: str | None = None) -> None:
    """A training command: its config, then train(cfg) -> the model folder, which rank 0
    reports (and with --register adds to the experiment registry as `lineage`)."""
    if args.registry and not args.register:  # an option of --register, not one by itself
        raise UserError("--registry needs --register (it names the registry file that "
                        "--register adds the result to)")
    if args.register and lineage:  # a bad registry path or a taken name is said now, not
        from scalelab.track.commands import check_register_name  # after training
        check_register_name(args)
    cfg = stage_config(args, preset)
    if nothing_to_do(args, cfg):
        return
    out = main_rank_only(train(cfg))
    if out is not None:
        print(f"{what} written to {out}")
        if args.register and lineage:
            from scalelab.track.commands import register_output
            register_output(args, out, lineage, parent)


def cmd_pretrain(args: argparse.Namespace) -> None:
    from scalelab.train.pretrain import pretrain
    run_stage(args, lambda cfg: pretrain(cfg, Path(args.out), resume=args.resume), None,
              lineage="base")


def cmd_sft(args: argparse.Namespace) -> None:
    from scalelab.train.sft import sft
    run_stage(args, lambda cfg: sft(cfg, Path(args.base), args.data, Path(args.out),
                                    args.resume), "sft", lineage="sft", parent=args.base)


def cmd_reward(args: argparse.Namespace) -> None:
    from scalelab.train.reward import train_reward
    if args.register:
        raise UserError("--register: a reward model is no language model to run experiments "
                        "on; register the policy (sft/ppo/dpo) instead")
    run_stage(args, lambda cfg: train_reward(cfg, Path(args.base), args.data, Path(args.out),
                                             args.resume), "reward", "reward model")


def cmd_ppo(args: argparse.Namespace) -> None:
    from scalelab.train.ppo import ppo
    run_stage(args, lambda cfg: ppo(cfg, Path(args.policy), Path(args.reward), args.prompts,
                                    Path(args.out), args.resume), "ppo", "policy", "rlhf",
              args.policy)


def cmd_dpo(args: argparse.Namespace) -> None:
    from scalelab.train.dpo import dpo
    run_stage(args, lambda cfg: dpo(cfg, Path(args.policy), args.data, Path(args.out),
                                    args.resume), "dpo", "policy", "rlhf", args.policy)


DEFAULT_NEW_TOKENS = 64  # generate/chat without --max-new-tokens (less in a small context)


def check_sampling(args: argparse.Namespace) -> None:
    """Sampling options shared by generate and chat: each wrong value named with its fix."""
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not 0 <= args.temperature < math.inf:  # inf sampled uniformly, ignoring the model
        raise UserError(f"--temperature {args.temperature}: must be a finite number >= 0 "
                        "(0 = greedy)")
    if args.top_k < 0:
        raise UserError(f"--top-k {args.top_k}: must be >= 0 (0 = off)")
    if not 0 <= args.top_p <= 1:
        raise UserError(f"--top-p {args.top_p}: must be in [0, 1] (1 = off, 0 = only the most "
                        "likely token)")
    check_seed(f"--seed {args.seed}", args.seed)


def load_for_sampling(args: argparse.Namespace):
    import torch

    from scalelab.hardware import pick_device
    from scalelab.train.checkpoint import load_model
    model, tok = load_model(args.model, pick_device(args.device, "--device"))
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    return model, tok, g


def cmd_generate(args: argparse.Namespace) -> None:
    from scalelab.generate import generate
    check_sampling(args)
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples}: must be at least 1")
    if args.temperature == 0 and args.num_samples > 1:
        raise UserError(f"--temperature 0 is greedy: all {args.num_samples} samples would be "
                        "the same; use --temperature > 0 or --num-samples 1")
    from scalelab.chat import is_utf8
    if not is_utf8(args.prompt):
        raise UserError("--prompt is not valid UTF-8 text (your terminal or file uses another "
                        "encoding); convert it to UTF-8")
    model, tok, g = load_for_sampling(args)
    prompt = tok.chat_prompt(args.prompt) if args.chat else tok.encode_prompt(args.prompt)
    if not prompt:  # an empty prompt, and a tokenizer that starts prompts with nothing
        raise UserError("--prompt is empty and this model's tokenizer starts a prompt with no "
                        "BOS token: give some text")
    room = model.cfg.seq_len - len(prompt)
    if room < 1:
        raise UserError(f"--prompt is {len(prompt)} tokens; the context of {args.model} is "
                        f"{model.cfg.seq_len}: shorten the prompt")
    if args.max_new_tokens is None:  # the default: as much of DEFAULT_NEW_TOKENS as fits
        args.max_new_tokens = min(DEFAULT_NEW_TOKENS, room)
    if args.max_new_tokens > room:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: the prompt is {len(prompt)} "
                        f"tokens and the context of {args.model} {model.cfg.seq_len}, so at most "
                        f"{room} new tokens fit; lower --max-new-tokens")
    outs = generate(model, [prompt] * args.num_samples, args.max_new_tokens, tok.pad_id,
                    tok.stop_ids, args.temperature, args.top_k, args.top_p, generator=g,
                    vocab_limit=tok.vocab_size)
    for i, new in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tok.decode(new) if args.chat else args.prompt + tok.decode(new))


def cmd_chat(args: argparse.Namespace) -> None:
    from scalelab.chat import HELP, chat_loop
    check_sampling(args)
    model, tok, g = load_for_sampling(args)
    if args.max_new_tokens is None:  # the default: leave the conversation half the context
        args.max_new_tokens = min(DEFAULT_NEW_TOKENS, max(1, model.cfg.seq_len // 2))
    if args.max_new_tokens >= model.cfg.seq_len:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: the context of {args.model} "
                        f"is {model.cfg.seq_len} tokens and the conversation needs room too; "
                        "lower --max-new-tokens")
    from scalelab.chat import is_utf8
    if args.system and not is_utf8(args.system):
        raise UserError("--system is not valid UTF-8 text (your terminal or file uses another "
                        "encoding); convert it to UTF-8")
    if args.system:  # with an empty user line it must leave room, or every line is refused
        opening = tok.encode_chat([{"role": "system", "content": args.system},
                                   {"role": "user", "content": ""}], generation_prompt=True)[0]
        room = model.cfg.seq_len - args.max_new_tokens
        if len(opening) > room:
            raise UserError(f"--system is {len(opening)} tokens with the chat markers; the "
                            f"model's context of {model.cfg.seq_len} tokens less "
                            f"--max-new-tokens {args.max_new_tokens} leaves {room}: shorten "
                            "--system or lower --max-new-tokens")
    from scalelab.io import read_json_if_any
    run = Path(args.model).resolve().parent  # RUN/model; other folders carry no stage record
    if read_json_if_any(run / "run.json").get("stage") == "pretrain":
        print("note: this model was not instruction-tuned (its run is a pretraining run): it "
              "will continue text rather than answer; chat with an sft, dpo or ppo model",
              file=sys.stderr)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model} {HELP}")
    chat_loop(model, tok, sys.stdin, sys.stdout, args.max_new_tokens, args.temperature,
              args.top_k, args.top_p, g, system=args.system, interactive=interactive)


def cmd_export(args: argparse.Namespace) -> None:
    from scalelab.hf_export import export
    export(Path(args.model), Path(args.out), args.dtype)


def cmd_plan(args: argparse.Namespace) -> None:
    from scalelab.hardware import HARDWARE
    from scalelab.parallel import plan
    from scalelab.parallel.rules import make_rules

    if args.top < 1:
        raise UserError(f"--top {args.top}: must be at least 1 (mappings to list)")
    from scalelab.model import check_shape
    cfg = load_config(resolve_config_path(args.config), args.set)
    try:  # costing a model that cannot be built would recommend a mapping for nothing
        check_shape(cfg.model)
    except ValueError as e:
        raise UserError(f"[model] config: {e}") from None
    rules = make_rules(cfg.parallel.rules)
    hw = plan.assume(HARDWARE[args.hardware], args.assume)
    if args.explain:
        sizes = plan.parse_mapping(args.explain, args.world_size)
        print(plan.explain(cfg, sizes, rules, hw))
        return
    ests = plan.plan(cfg, args.world_size, rules, hw)
    print(plan.format_plan(cfg, args.world_size, hw, ests, limit=args.top))


def cmd_demo(args: argparse.Namespace) -> None:
    from scalelab.demo import run_demo
    run_demo(Path(args.out), quick=args.quick)


def cmd_serve(args: argparse.Namespace) -> None:
    from scalelab.serve.app import ServeOptions, parse_models, serve
    serve(ServeOptions(models=parse_models(args.model), host=args.host, port=args.port,
                       api_key=args.api_key, labels=args.labels,
                       label_prompts=args.label_prompts, registry=args.registry,
                       cors_origins=args.cors_origin, device=args.device,
                       context=args.context))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scalelab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def stage(name: str, help: str, register_help: str = "add the result to the experiment "
              "registry (see --registry)") -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        presets = ("preset name (tiny, small, gpt2-124m)" if name == "pretrain" else
                   f"preset name (default: the {name} preset, configs/{name}.toml)")
        s.add_argument("--config", help=f"TOML file or {presets}")
        s.add_argument("--out", required=True, help="run directory to write")
        s.add_argument("--max-steps", type=int, help="override train.max_steps")
        s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        s.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable)")
        s.add_argument("--register", action="store_true", help=register_help)
        s.add_argument("--registry", help="registry file for --register")
        return s

    stage("pretrain", "pretrain a model from scratch").set_defaults(func=cmd_pretrain)
    s = stage("sft", "instruction fine-tuning (loss on assistant tokens only)")
    s.add_argument("--base", required=True, help="model folder to start from")
    s.add_argument("--data", required=True, help="builtin:tasks or a JSONL file")
    s.set_defaults(func=cmd_sft)
    s = stage("reward", "train a reward model on preference pairs", register_help="refused: a "
              "reward model is no language model to run experiments on (register the policy)")
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

    def sampling(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--model", required=True,
                         help="model folder (RUN/model, or a Hugging Face Llama/Qwen2/Mistral "
                              "folder)")
        cmd.add_argument("--max-new-tokens", type=int, default=None,
                         help=f"default {DEFAULT_NEW_TOKENS}, or less when the model's "
                              "context leaves less room")
        cmd.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        cmd.add_argument("--top-k", type=int, default=50, help="0 = off")
        cmd.add_argument("--top-p", type=float, default=1.0, help="1 = off, 0 = the top token")
        cmd.add_argument("--seed", type=int, default=0)
        cmd.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")

    g = sub.add_parser("generate", help="sample text from a trained model")
    sampling(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message in the chat template; print the answer")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a chat model (sft/dpo/ppo), turn after turn")
    sampling(c)
    c.add_argument("--system", help="a system message that opens the conversation")
    c.set_defaults(func=cmd_chat)

    e = sub.add_parser("export", help="write a model as a Hugging Face folder (transformers)")
    e.add_argument("--model", required=True, help="model folder (RUN/model or an HF folder)")
    e.add_argument("--out", required=True, help="folder to write")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    e.set_defaults(func=cmd_export)

    pl = sub.add_parser("plan", help="cost of every dp x fsdp x tp mapping on N devices")
    pl.add_argument("--config", required=True, help="TOML file or preset name")
    pl.add_argument("--world-size", type=int, required=True, help="number of devices")
    pl.add_argument("--hardware", default="h100",
                    choices=["h100", "h100-pcie", "h200", "h100-500w", "a100", "cpu"])
    pl.add_argument("--explain", metavar="DP,FSDP,TP",
                    help="show one mapping: each weight's shard and each collective")
    pl.add_argument("--top", type=int, default=20, help="mappings to list")
    pl.add_argument("--assume", action="append", default=[], metavar="KEY=VALUE",
                    help="override a hardware-table figure, e.g. matmul_efficiency=0.7")
    pl.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="run the whole pipeline on built-in data and report")
    d.add_argument("--out", required=True)
    d.add_argument("--quick", action="store_true",
                   help="fewer steps (about 7 minutes on 2 CPU cores; docs/demo/report.md)")
    d.set_defaults(func=cmd_demo)

    sv = sub.add_parser("serve", help="OpenAI-compatible API and a web app (chat, compare, "
                        "label preferences, tracker)")
    sv.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                    help="model folder to serve (repeatable)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to bind; a non-loopback one needs --api-key")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="required on every request (default: $SCALELAB_API_KEY)")
    sv.add_argument("--labels", default="labels.jsonl",
                    help="preference JSONL the Label view appends to")
    sv.add_argument("--label-prompts", help="prompts JSONL offered by the Label view")
    sv.add_argument("--registry", help="experiment registry for the Tracker view")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="allow cross-origin requests from ORIGIN (repeatable; default none)")
    sv.add_argument("--device", default="auto")
    sv.add_argument("--context", type=int, metavar="N",
                    help="tokens of context served per row (default: the model's, at most "
                         "8192: the KV cache holds that many for every row)")
    sv.set_defaults(func=cmd_serve)

    from scalelab.track.commands import register
    register(sub)  # `track ...` and `sweep`
    from scalelab import study
    study.register(sub)  # `study instruct`
    from scalelab import runs
    runs.register(sub)  # `runs list|show|watch`
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from scalelab.train.progress import is_rank0
    from scalelab.train.rundir import RunBusy, forget_unstarted, is_fresh, release
    stage_out = Path(args.out) if args.command in STAGES else None
    fresh = stage_out is not None and is_fresh(stage_out)
    existed = stage_out is not None and stage_out.exists()
    rank0 = is_rank0()  # under torchrun every rank fails alike: rank 0 says it
    try:
        try:
            args.func(args)
        except RunBusy:  # the folder is another live command's: not ours to clean
            raise
        except UserError:  # bad input before training: leave no half-made run behind
            if fresh and rank0:
                forget_unstarted(stage_out, existed)
            raise
        finally:
            release()  # every run folder this command locked
        sys.stdout.flush()  # a closed pipe shows here, inside the try
    except BrokenPipeError:  # `scalelab ... | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet
        return 0
    except UserError as e:
        if rank0:
            print(f"scalelab: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:  # the run monitor stopped it (policy "stop", too many rewinds)
        if rank0:
            print(f"scalelab: run stopped: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if rank0:  # metrics, progress, events, token files: a full disk is one line too
            print(f"scalelab: run stopped: {disk_full(e, getattr(args, 'out', None))}",
                  file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("scalelab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not interrupted(e):
            raise
        print("scalelab: interrupted", file=sys.stderr)
        return 130
    return 0


def disk_full(e: OSError, out: str | None) -> str:
    """What a full disk (or quota) stopped, and what of the run is intact."""
    from scalelab.train.rundir import last_step
    what = e.filename or (f"into {out}" if out else "a file")
    msg = f"could not write {what} ({e.strerror})"
    if out is None or not Path(out).is_dir():
        return msg
    step = last_step(Path(out))
    if step is None:
        return f"{msg}; free some space, then start the run again"
    return (f"{msg}; its checkpoint {Path(out) / 'checkpoints' / f'step_{step}'} is intact: "
            "free some space, then continue with --resume")


def interrupted(e: BaseException | None) -> bool:
    """Ctrl-C that Python re-raised as another error: during an import (torch loads
    torch._dynamo lazily, at the first optimizer), a dataclass turns it into a RuntimeError
    "Error calling __set_name__", caused by the KeyboardInterrupt."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, KeyboardInterrupt):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


if __name__ == "__main__":
    sys.exit(main())
