"""Hugging Face model folders in and out, with no `transformers` at run time.

scalelab's Transformer is Llama-shaped (RMSNorm, RoPE with the half-split rotation, SwiGLU,
GQA), so a Llama, Qwen2 (q/k/v biases) or Mistral (no sliding window) checkpoint maps onto it
tensor for tensor. Anything in config.json that would change the math and that scalelab does
not implement is an error naming the field, never an approximation. Weights are read with
safetensors only (single file or sharded with model.safetensors.index.json); a folder with
only pickle checkpoints (.bin, .pt) is refused, never unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from scalelab.config import ModelConfig, UserError
from scalelab.hf_tokenizer import HFStyleTokenizer
from scalelab.io import read_json, read_json_if_any, reading_safetensors
from scalelab.model import Transformer, rope_tables

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "MistralForCausalLM": "mistral"}

# scalelab name (block index as {}) -> Hugging Face name
HF_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "blocks.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blocks.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blocks.{}.attn.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blocks.{}.attn.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blocks.{}.attn.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blocks.{}.attn.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blocks.{}.attn.wq.bias": "model.layers.{}.self_attn.q_proj.bias",
    "blocks.{}.attn.wk.bias": "model.layers.{}.self_attn.k_proj.bias",
    "blocks.{}.attn.wv.bias": "model.layers.{}.self_attn.v_proj.bias",
    "blocks.{}.mlp.w_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blocks.{}.mlp.w_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blocks.{}.mlp.w_down.weight": "model.layers.{}.mlp.down_proj.weight",
}
FROM_HF = {re.escape(hf).replace(r"\{\}", r"(\d+)"): ours for ours, hf in HF_NAMES.items()}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings")


def hf_name(name: str) -> str:
    """'blocks.3.attn.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    return HF_NAMES[f"blocks.{{}}.{m.group(2)}"].format(m.group(1)) if m else HF_NAMES[name]


def scalelab_name(name: str) -> str | None:
    for pattern, ours in FROM_HF.items():
        m = re.fullmatch(pattern, name)
        if m:
            return ours.format(*m.groups())
    return None


def is_hf_folder(d: Path) -> bool:
    """A config.json written by Hugging Face (scalelab's own has d_model instead)."""
    cfg = read_json_if_any(d / "config.json")
    return "model_type" in cfg or "architectures" in cfg


# ---- config ---------------------------------------------------------------------------------

def number(v: object, key: str, where: str, least: float = 0.0) -> float:
    """A config.json number (rope_theta, rms_norm_eps): finite and > least, else a UserError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not least < v < float("inf"):
        raise UserError(f"{where}: '{key}' must be a number above {least:g}, got {v!r}")
    return float(v)


def rope_settings(cfg: dict, where: str) -> tuple[float, dict[str, float]]:
    """rope_theta and Llama-3 scaling from either spelling: transformers 4 (rope_theta +
    rope_scaling) or 5 (rope_parameters)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise UserError(f"{where}: rope_scaling must be an object")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = number(theta, "rope_theta", where)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, {}
    if kind != "llama3":
        raise UserError(f"{where}: RoPE scaling type {kind!r} is not supported "
                        "(only the default and 'llama3')")
    missing = [k for k in LLAMA3_KEYS if not isinstance(params.get(k), (int, float))]
    if missing:
        raise UserError(f"{where}: llama3 RoPE scaling lacks {missing}")
    if params.get("attention_factor", 1.0) != 1.0:
        raise UserError(f"{where}: rope attention_factor != 1 is not supported")
    return theta, {k: params[k] for k in LLAMA3_KEYS}


def hf_model_config(cfg: dict, where: str) -> ModelConfig:
    """scalelab's ModelConfig for a supported HF config.json, or a UserError naming the field
    that scalelab cannot reproduce exactly."""
    archs = cfg.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    kind = cfg.get("model_type")
    if archs:
        unknown = [a for a in archs if a not in ARCHITECTURES]
        if unknown:
            raise UserError(f"{where}: architecture {unknown[0]} is not supported "
                            f"(supported: {', '.join(ARCHITECTURES)})")
        kind = ARCHITECTURES[archs[0]]
    if kind not in ARCHITECTURES.values():
        raise UserError(f"{where}: model_type {kind!r} is not supported "
                        f"(supported: {', '.join(ARCHITECTURES.values())})")

    def need(key: str) -> int:
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"{where}: '{key}' must be a positive integer, got {v!r}")
        return v

    d, heads = need("hidden_size"), need("num_attention_heads")
    refuse = {  # field: (value that changes the math, why)
        "hidden_act": (lambda v: v not in ("silu", "swish"), "only silu (SwiGLU) is supported"),
        "hidden_activation": (lambda v: v not in (None, "silu"), "only silu is supported"),
        "head_dim": (lambda v: v not in (None, d // heads), "must equal hidden_size / heads"),
        "attention_bias": (lambda v: bool(v), "biases on q/k/v/o are not supported"),
        "mlp_bias": (lambda v: bool(v), "MLP biases are not supported"),
        "partial_rotary_factor": (lambda v: v not in (None, 1, 1.0), "partial RoPE"),
        "quantization_config": (lambda v: v is not None, "quantized weights"),
        "use_sliding_window": (lambda v: bool(v), "sliding-window attention"),
        "layer_types": (lambda v: any(t != "full_attention" for t in v or []),
                        "sliding-window attention"),
    }
    for key, (bad, why) in refuse.items():
        if key in cfg and bad(cfg[key]):
            raise UserError(f"{where}: {key}={cfg[key]!r} is not supported ({why})")
    seq_len = need("max_position_embeddings")
    window = cfg.get("sliding_window")
    if kind == "mistral" and window is not None and window < seq_len:
        raise UserError(f"{where}: sliding_window={window} is not supported (Mistral without "
                        "a sliding window only)")
    theta, scaling = rope_settings(cfg, where)
    kv = cfg.get("num_key_value_heads") or heads
    if d % heads or not isinstance(kv, int) or heads % kv:
        raise UserError(f"{where}: hidden_size {d} must divide by num_attention_heads {heads}, "
                        f"and that by num_key_value_heads {kv}")
    if (d // heads) % 2:
        raise UserError(f"{where}: hidden_size / num_attention_heads = {d // heads} must be "
                        "even (RoPE rotates pairs of channels)")
    return ModelConfig(
        vocab_size=need("vocab_size"), seq_len=seq_len, n_layer=need("num_hidden_layers"),
        n_head=heads, n_kv_head=kv, d_model=d,
        d_mlp=need("intermediate_size"), mlp="swiglu",
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=number(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
        qkv_bias=kind == "qwen2")


# ---- weights --------------------------------------------------------------------------------

def weight_files(d: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it."""
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    if index.is_file():
        wmap = read_json(index).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise UserError(f"{index}: no weight_map")
        return {name: d / str(file) for name, file in wmap.items()}
    if single.is_file():
        with reading_safetensors(single), safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise UserError(f"{d / pickles[0]}: pickle checkpoints are never loaded (unpickling "
                        "can run code); convert the folder to safetensors first")
    raise UserError(f"{single}: file not found (nor model.safetensors.index.json)")


def read_hf_weights(d: Path, model: Transformer) -> None:
    """Copy every tensor of the folder into `model` (converted to its dtype), checking names
    and shapes; HF keeps no tensor scalelab lacks, except RoPE tables it can recompute."""
    files = weight_files(d)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    tied_copy = None  # a tied checkpoint may store lm_head.weight as well: must be the same
    for path, names in by_file.items():
        with reading_safetensors(path), safe_open(str(path), "pt") as f:
            for name in names:
                if name.endswith("rotary_emb.inv_freq"):
                    continue  # old checkpoints store the RoPE table; it is recomputed
                if name == "lm_head.weight" and model.cfg.tie_embeddings:
                    tied_copy = path, f.get_tensor(name)
                    continue
                ours = scalelab_name(name)
                if ours is None or ours not in params:
                    raise UserError(f"{path}: unexpected tensor {name!r} for this config")
                t, p = f.get_tensor(name), params[ours]
                if not t.is_floating_point():
                    raise UserError(f"{path}: {name} holds {t.dtype}, not floats: quantized "
                                    "checkpoints are not read; give the float16, bfloat16 "
                                    "or float32 weights")
                if tuple(t.shape) != tuple(p.shape):
                    raise UserError(f"{path}: {name} has shape {tuple(t.shape)}, config.json "
                                    f"implies {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t.to(p.dtype))
                seen.add(ours)
    if tied_copy is not None and "embed.weight" in seen:
        path, t = tied_copy
        if not torch.equal(t.to(model.embed.weight.dtype), model.embed.weight.detach()):
            raise UserError(f"{path}: lm_head.weight differs from the embedding, but "
                            "config.json says tie_word_embeddings=true; set it to false")
    tied = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    missing = sorted(set(params) - seen - tied)
    if missing:
        where = next(iter(by_file))
        raise UserError(f"{where}: missing tensor {hf_name(missing[0])}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def load_hf(d: Path) -> tuple[Transformer, HFStyleTokenizer]:
    """A model and tokenizer from a Hugging Face folder, weights in float32 on the CPU."""
    where = d / "config.json"
    raw = read_json(where)
    cfg = hf_model_config(raw, str(where))
    tok = HFStyleTokenizer.from_folder(d, raw)
    with torch.device("meta"):  # no time spent drawing random weights about to be replaced
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    if cfg.tie_embeddings:  # to_empty gives each name its own storage: tie again
        model.lm_head.weight = model.embed.weight
    cos, sin = rope_tables(cfg.d_model // cfg.n_head, cfg.seq_len, cfg.rope_theta,
                           cfg.rope_scaling)
    model.rope_cos.copy_(cos)
    model.rope_sin.copy_(sin)
    read_hf_weights(d, model)  # fills every parameter, or fails naming the missing one
    return model, tok


def load_tokenizer(d: Path):
    """A scalelab folder's tokenizer: plain scalelab, or one that came from Hugging Face."""
    from scalelab.tokenizer import Tokenizer
    if (d / "tokenizer_config.json").is_file():
        return HFStyleTokenizer.from_folder(d)
    return Tokenizer.load(d / "tokenizer.json")


def add_chat_tokens(model: Transformer, tok, log=print) -> None:
    """A folder without a chat template gets scalelab's role tokens; the embedding (and an
    untied lm_head) grow to fit them, new rows set to the mean of the old ones."""
    if not isinstance(tok, HFStyleTokenizer) or tok.has_chat_format:
        return
    old = model.cfg.vocab_size
    tok.add_role_tokens()
    new = max(old, tok.vocab_size)
    new_ids = sorted(tok.special_ids.values())
    tied = model.cfg.tie_embeddings
    with torch.no_grad():
        for layer in [model.embed] if tied else [model.embed, model.lm_head]:
            w = layer.weight
            grown = torch.cat([w, w.new_zeros(new - old, w.size(1))])
            grown[new_ids] = w.mean(0)
            layer.weight = torch.nn.Parameter(grown)
    model.embed.num_embeddings = new
    if tied:
        model.lm_head.weight = model.embed.weight
    else:
        model.lm_head.out_features = new
    model.cfg.vocab_size = new
    log(f"no chat template in the tokenizer: added scalelab's role tokens "
        f"{', '.join(tok.special_ids)} (vocabulary {old} -> {new})")
