"""Typed configs: dataclasses, TOML presets and `--set section.key=value` overrides.

One `Config` drives a run. A TOML file may set any subset of keys; everything else keeps
the dataclass default. Unknown sections or keys are errors (a typo must not be ignored).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


PRESETS = Path(__file__).parent / "configs"


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


class RunFailed(Exception):
    """The run monitor stopped a run (a NaN under policy "stop", too many rewinds): one
    line on stderr, exit code 1."""


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = take it from the tokenizer (rounded up to a multiple of 64)
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0  # 0 = n_head (plain multi-head); fewer = grouped-query attention
    d_model: int = 256
    d_mlp: int = 0  # 0 = about 8/3 * d_model for swiglu, 4 * d_model for relu2
    mlp: str = "swiglu"  # "swiglu" or "relu2"
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    # Llama-3 RoPE scaling as HF writes it ({} = none): factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings (see model.rope_frequencies)
    rope_scaling: dict[str, float] = field(default_factory=dict)
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)


TXT_SPLITS = ("blank_lines", "lines", "file")


@dataclass
class DataConfig:
    source: str = "builtin:world"  # "builtin:world", a .txt/.jsonl file, or a folder of them
    n_docs: int = 20000  # documents generated for builtin:world
    seed: int = 0
    val_fraction: float = 0.02  # validation: a seeded random sample of whole documents
    val_source: str = ""  # or a separate .txt/.jsonl file or folder of validation documents
    txt_split: str = "blank_lines"  # .txt documents: "blank_lines", "lines" or "file" (whole)
    tokenizer_vocab: int = 1024  # BPE vocabulary size when training a tokenizer


@dataclass
class TrainConfig:
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 500
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine decay)
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    seed: int = 1337
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    sample_every: int = 0  # 0 = sample at every eval
    sample_prompt: str = "Mia has"
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    dtype: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU), "float32", "bfloat16"
    compile: bool | str = "auto"  # "auto" = on for CUDA, off on CPU/MPS; or true / false
    activation_checkpointing: bool | str = "none"  # "none", "full", "selective" (every
    # second block), or true (= full) / false: recompute activations in backward to save memory


@dataclass
class SFTConfig:
    n_examples: int = 20000  # examples drawn from the training task families (builtin:tasks)
    chatty_fraction: float = 0.3  # builtin:tasks responses that end with a pleasantry line,
    # as some human demonstrators write (the gold labeler prefers the bare answer)
    pack: bool = True  # pack each batch's conversations into rows no wider than its longest
    # (same loss, less padding); false = one right-padded row each (attention without a mask)
    seed: int = 0


@dataclass
class RewardConfig:
    n_prompts: int = 600  # prompts for generated preference data (builtin:tasks)
    samples_per_prompt: int = 4  # K completions ranked per prompt -> C(K,2) pairs
    temperature: float = 1.0
    max_new_tokens: int = 24
    min_margin: float = 0.3  # answers whose gold scores differ less are a tie: not compared
    labeler: str = "builtin:gold"  # or "module:function" returning a float per response
    seed: int = 0
    pack: bool = True  # the model reads each batch's answers packed into fewer rows (sft.pack)


@dataclass
class PPOConfig:
    n_prompts: int = 2000
    rollout_batch: int = 32  # responses per PPO step
    samples_per_prompt: int = 4  # responses per prompt; >1 centres each prompt's scores on
    # the mean of its other responses (a leave-one-out baseline), so easy and hard prompts
    # don't masquerade as good and bad answers while the value model is still learning
    minibatches: int = 2
    ppo_epochs: int = 4
    max_new_tokens: int = 24
    pack: bool = True  # the forward passes read each minibatch's sequences packed into
    # fewer rows (as sft.pack); not under train.compile, which wants one padded shape
    temperature: float = 1.0
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.05
    kl_estimator: str = "k1"  # "k1" (logp - ref) or "k3" (unbiased, always >= 0)
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    missing_eos_penalty: float = 1.0
    seed: int = 0
    rollout_shards: int = 0  # the rollout batch is drawn in this many equal chunks, chunk i
    # sampled from its own seed (seed, step, i); under torchrun each data rank draws its own
    # chunks. 0 = one per data rank (1 in one process: as before). A one-process run with
    # rollout_shards = N samples exactly what N data ranks sample.


@dataclass
class DPOConfig:
    beta: float = 0.1
    min_margin: float = 0.3  # a reward run's ranked answers: pair the best with each one
    # scored more than this lower (as reward.min_margin does for the reward model)
    pack: bool = True  # the model reads each batch's answers packed into fewer rows (sft.pack)


@dataclass
class ParallelConfig:
    """Mesh shape (dp x fsdp x tp = world size; one may be -1 = infer) and axis-rule overrides.

    rules: logical axis -> mesh axes, comma separated ("" = replicated), e.g. in TOML
    `[parallel.rules]` / `mlp = ""`; see scalelab/parallel/rules.py for the defaults."""
    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    rules: dict[str, str] = field(default_factory=dict)


@dataclass
class MonitorConfig:
    """Health checks, goodput accounting and the stall watchdog (scalelab/train/monitor.py)."""
    enabled: bool = True  # checks cost one host sync per step (two scalars)
    policy: str = "rewind"  # on a NaN, spike or grad explosion: "stop", "skip" (drop the
    # update) or "rewind" (back to the last checkpoint, past the data that led there)
    spike_k: float = 6.0  # a spike: loss > running median + spike_k robust deviations ...
    spike_min_rise: float = 0.1  # ... and more than this fraction above the median
    spike_window: int = 20  # recent healthy steps in the running median
    min_history: int = 10  # healthy steps seen before spikes and explosions are judged
    grad_factor: float = 20.0  # an explosion: grad norm > grad_factor x its median (0 = off)
    max_rewinds: int = 3  # rewinds in a row (no new checkpoint between) before giving up
    rewind_lr_factor: float = 1.0  # after a rewind, lr x this ...
    rewind_lr_steps: int = 0  # ... for this many steps
    stall_factor: float = 2.5  # stall: no step for this x the median step time (0 = off) ...
    stall_min_s: float = 120.0  # ... and at least this many seconds
    on_event: str = ""  # shell command run with each event's JSON on stdin
    tensorboard: bool = False  # mirror metrics to DIR/tensorboard (needs tensorboard)
    wandb: bool = False  # mirror metrics to W&B (needs wandb; WANDB_MODE=offline works)
    wandb_project: str = "scalelab"
    inject: str = ""  # TESTING ONLY: faults to inject, e.g. "nan@12,spike@20,stall@30"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


# What each stage reads (sections, or single "section.key"s): `--set` on anything else would
# be silently ignored, so it is an error. Post-training takes [model] from its parent model.
STAGE_READS = {
    "pretrain": {"model", "data", "train", "parallel", "monitor"},
    "sft": {"train", "sft", "parallel", "monitor"},
    "reward": {"train", "reward", "parallel", "monitor"},
    "ppo": {"train", "ppo", "parallel", "monitor", "reward.labeler"},
    "dpo": {"train", "dpo", "parallel", "monitor"},
}


def check_stage_override(stage: str, section: str, key: str, where: str) -> None:
    reads = STAGE_READS[stage]
    if section in reads or f"{section}.{key}" in reads:
        return
    why = ("takes [model] from the model it starts from: fine-tuning cannot change its "
           "architecture" if section == "model" else
           f"does not read [{section}] (it reads {', '.join(sorted(reads))})")
    raise UserError(f"{where}: `scalelab {stage}` {why}")


STAGE_INPUT = {"sft": "--data", "reward": "--data", "dpo": "--data", "ppo": "--prompts"}


def check_stage_file(stage: str, data: dict[str, Any], where: str) -> None:
    """A config file's [model] and [data] keys, which no post-training stage reads, are
    refused as their --set forms are (check_stage_override), all named in one message.
    Other stages' sections may stay: one file can serve a pipeline's stages in turn."""
    unread = [s for s in ("model", "data") if s not in STAGE_READS[stage]
              and isinstance(data.get(s), dict) and data[s]]
    if not unread:
        return
    keys = ", ".join(f"{s}.{k}" for s in unread for k in data[s])
    why = []
    if "model" in unread:
        why.append("the model's shape comes from the base model folder it starts from")
    if "data" in unread:
        why.append(f"its examples come from {STAGE_INPUT[stage]} and its tokenizer from the "
                   "base model folder")
    raise UserError(f"{where}: {keys}: `scalelab {stage}` does not read "
                    f"{' or '.join(f'[{s}]' for s in unread)} ({'; '.join(why)}); delete "
                    f"{'those sections' if len(unread) > 1 else 'that section'}")


# Range rules for every number in a Config: BOUNDS (least, most, why) per key, fractions in
# [0, 1]; every other int must be >= 0 and every float finite and >= 0.
MIN_TOKENIZER_VOCAB = 263  # byte-level BPE: the 256 bytes + scalelab's 7 special tokens
MAX_TOKENIZER_VOCAB = 1 << 20  # 4x the largest real ones (~256k); the BPE trainer allocates
# a table of this size up front (1e9 aborted the process asking for 70 GB)
BOUNDS: dict[tuple[str, str], tuple[int, float, str]] = {
    **{(section, key): (1, math.inf, "") for section, keys in {
        "model": ("seq_len", "n_layer", "n_head", "d_model"), "data": ("n_docs",),
        "train": ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches",
                  "log_every", "checkpoint_every"),
        "sft": ("n_examples",), "reward": ("n_prompts", "max_new_tokens"),
        "ppo": ("n_prompts", "rollout_batch", "samples_per_prompt", "minibatches",
                "ppo_epochs", "max_new_tokens", "kl_horizon")}.items() for key in keys},
    ("data", "tokenizer_vocab"): (MIN_TOKENIZER_VOCAB, MAX_TOKENIZER_VOCAB, "a byte-level BPE "
                                  "tokenizer holds the 256 bytes and 7 special tokens"),
    ("reward", "samples_per_prompt"): (2, math.inf, "ranking needs at least 2 answers per "
                                       "prompt"),
    ("monitor", "spike_window"): (2, math.inf, "a median and its spread need 2 steps"),
}
FRACTIONS = {("data", "val_fraction"), ("train", "min_lr_ratio"), ("train", "beta1"),
             ("train", "beta2"), ("sft", "chatty_fraction"),
             ("ppo", "gamma"), ("ppo", "lam")}
POSITIVE = {("model", "rope_theta"), ("model", "norm_eps"), ("train", "lr"), ("ppo", "target_kl")}
SIGNED = {("parallel", "dp"), ("parallel", "fsdp"), ("parallel", "tp"), ("ppo", "seed"),
          ("data", "seed"), ("train", "seed"), ("sft", "seed"), ("reward", "seed")}


CHOICES = {("model", "mlp"): ("swiglu", "relu2"), ("train", "dtype"): ("auto", "bfloat16",
                                                                          "float32"),
           ("ppo", "kl_estimator"): ("k1", "k3"), ("monitor", "policy"): ("stop", "skip",
                                                                          "rewind"),
           ("data", "txt_split"): TXT_SPLITS, ("train", "compile"): ("auto", True, False),
           ("train", "activation_checkpointing"): ("none", "full", "selective", True, False)}
INJECT = re.compile(r"\s*((nan|spike|stall)@\d+\s*(,\s*|$))*")


def is_choice(section: str, key: str, v: Any) -> bool:
    """v is one of the allowed values (True is not taken for 1, nor 1 for True)."""
    return any(v == c and type(v) is type(c) for c in CHOICES.get((section, key), ()))


def check_range(section: str, key: str, v: Any, where: str) -> None:
    """A value out of range is bad input (exit 2), not a crash deep inside training."""
    name = f"{section}.{key}"
    if (section, key) in CHOICES and not is_choice(section, key, v):
        words = (_toml_value(c) if isinstance(c, bool) else c for c in CHOICES[section, key])
        raise UserError(f"{where}: '{name}' must be one of {', '.join(words)}, got {v!r}")
    if (section, key) == ("monitor", "inject") and not INJECT.fullmatch(v):
        raise UserError(f"{where}: '{name}' must look like 'nan@12,spike@20,stall@30', "
                        f"got {v!r}")
    if section == "monitor" and key in ("tensorboard", "wandb") and v:
        import importlib.util
        if importlib.util.find_spec(key) is None:
            raise UserError(f"{where}: 'monitor.{key}' needs the {key} package "
                            f"(pip install {key})")
    if key == "seed" and isinstance(v, int):
        check_seed(f"{where}: {name} = {v}", v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (section, key) in SIGNED:
        return
    if not math.isfinite(v):
        raise UserError(f"{where}: '{name}' must be a finite number, got {v}")
    low, high, why = BOUNDS.get((section, key), (0, math.inf, ""))
    if not low <= v <= high:
        bound = f">= {low}" if v < low else f"<= {high}"
        raise UserError(f"{where}: {name} = {v} must be {bound}" + (f" ({why})" if why else ""))
    if (section, key) in POSITIVE and v <= 0:
        raise UserError(f"{where}: '{name}' must be > 0, got {v}")
    if (section, key) in FRACTIONS and v > 1:
        raise UserError(f"{where}: '{name}' must be between 0 and 1, got {v}")
    if (section, key) in {("data", "val_fraction"), ("train", "beta1"), ("train", "beta2")} \
            and v >= 1:  # (Adam's betas must be below 1 too)
        raise UserError(f"{where}: {name} = {v} must be in [0, 1)")


def check_seed(said: str, seed: int) -> None:
    """Every seed, --seed and the config's: torch.manual_seed takes 64 bits, and the
    samplers derive seed * 1_000_003 + epoch from a config seed, which must fit too."""
    if not -2**32 < seed < 2**32:
        raise UserError(f"{said} must be between -2^32 and 2^32 (exclusive)")


def _set_key(cfg: Config, section: str, key: str, value: Any, where: str) -> None:
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section not in sections:
        raise UserError(f"{where}: unknown config section [{section}] "
                        f"(known: {', '.join(sorted(sections))})")
    sub = getattr(cfg, section)
    types = {f.name: f.type for f in dataclasses.fields(sub)}
    head, dot, item = key.partition(".")
    if dot and isinstance(getattr(sub, head, None), dict):  # e.g. parallel.rules.mlp=tp
        key, value = head, {**getattr(sub, head), item: value}
    if key not in types:
        raise UserError(f"{where}: unknown config key '{section}.{key}' "
                        f"(known in [{section}]: {', '.join(sorted(types))})")
    want = type(getattr(sub, key))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    wrong_type = not isinstance(value, want) or (want is int and isinstance(value, bool))
    if wrong_type and (section, key) not in CHOICES:  # check_range names the allowed choices
        raise UserError(f"{where}: '{section}.{key}' must be {want.__name__}, "
                        f"got {type(value).__name__} {value!r}")
    check_range(section, key, value, where)
    setattr(sub, key, value)


RETIRED = {("reward", "heldout_fraction")}  # in every config.toml saved before issue 10


def apply_dict(cfg: Config, data: dict[str, Any], where: str) -> Config:
    for section, values in data.items():
        if not isinstance(values, dict):
            raise UserError(f"{where}: '{section}' must be a [section] table of keys")
        for key, value in values.items():
            if (section, key) not in RETIRED:
                _set_key(cfg, section, key, value, where)
    return cfg


def resolve_config_path(name: str | None) -> Path | None:
    """A path, or a preset name such as 'tiny' (scalelab/configs/tiny.toml). A folder of
    that name (a run made with `--out tiny`) is no config, so the preset is meant."""
    if name is None:
        return None
    path = Path(name)
    if not path.is_file() and (PRESETS / f"{name}.toml").is_file():
        return PRESETS / f"{name}.toml"
    if not path.is_file():
        what = "is a folder, not a config file" if path.is_dir() else "config file not found"
        presets = sorted(p.stem for p in PRESETS.glob("*.toml"))
        raise UserError(f"{name}: {what}, and not a preset name (presets: {', '.join(presets)})")
    return path


def read_toml(path: Path, what: str = "config file") -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of line 1
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: malformed TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                stage: str | None = None, own_run: bool = False) -> Config:
    """Defaults, then the TOML file, then each `section.key=value` override, in that order.
    stage: the stage the config is for; an override it would ignore is an error, and so is
    a file's [model] or [data] key, unless own_run: the file is the run's own config.toml
    (saved with every section, read back on --resume)."""
    cfg = Config()
    if path is not None:
        data = read_toml(Path(path))
        if stage in STAGE_INPUT and not own_run:
            check_stage_file(stage, data, str(path))
        apply_dict(cfg, data, str(path))
    for item in overrides or []:
        name, sep, raw = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise UserError(f"--set {item!r}: expected section.key=value")
        where, key = f"--set {name.strip()}", key.strip()
        if stage is not None and hasattr(cfg, section.strip()):
            check_stage_override(stage, section.strip(), key.partition(".")[0], where)
        try:  # TOML syntax for the value (numbers, true/false, "strings"); bare words are strings
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        _set_key(cfg, section, key, value, where)
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):  # JSON's escapes (\n, \t, \uXXXX for control characters) are
        # TOML's too; TOML also forbids a raw DEL
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, dict):  # an inline table (keys are plain names such as "mlp")
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


def dump_toml(cfg: Config) -> str:
    """The fully resolved config as TOML (saved as DIR/config.toml)."""
    out = []
    for section, values in cfg.to_dict().items():
        out.append(f"[{section}]")
        out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        out.append("")
    return "\n".join(out)
