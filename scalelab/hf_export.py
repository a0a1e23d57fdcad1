"""`scalelab export`: a model folder (scalelab's own, or an imported one) as a Hugging Face
folder that `transformers` loads with AutoModelForCausalLM / AutoTokenizer: config.json,
model.safetensors with HF tensor names, tokenizer.json, tokenizer_config.json (special tokens
and the chat template) and generation_config.json. Only what maps exactly is exported.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from scalelab.config import ModelConfig, UserError
from scalelab.hf import hf_name, is_hf_folder
from scalelab.hf_tokenizer import HFStyleTokenizer
from scalelab.io import fresh_tmp, replace_dir
from scalelab.model import Transformer
from scalelab.train.checkpoint import load_model
from scalelab.train.rundir import check_writable

SCALELAB_TEMPLATE = (  # scalelab.tokenizer's conversation format, as a Jinja chat template
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")  # what an export writes, nothing else


def check_out(out: Path) -> None:
    """--out must be new, empty, or an earlier export (export's files only, its
    generation_config.json among them, and an HF config.json: a scalelab model folder of an
    imported model may hold the same names), so that no other file or model folder is
    replaced."""
    if out.name in ("", ".", ".."):
        raise UserError(f"--out {str(out)!r}: name a new folder to write (not . or ..)")
    check_writable(out)
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and (set(names) - set(FILES) or "generation_config.json" not in names
                  or not is_hf_folder(out)):
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(f"--out {out}: folder is not empty ({shown}) and is not an earlier "
                        "export; choose a new or empty --out so that no file of yours is "
                        "touched")


def hf_config(cfg: ModelConfig, tok, dtype: str) -> dict:
    """config.json for transformers: LlamaForCausalLM, or Qwen2ForCausalLM when the model
    has q/k/v biases (Llama's attention_bias would add an o_proj bias as well)."""
    arch, kind = ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama")
    out = {"architectures": [arch], "model_type": kind, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.d_model, "intermediate_size": cfg.d_mlp,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.d_model // cfg.n_head,
           "hidden_act": "silu", "max_position_embeddings": cfg.seq_len,
           "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
           "rope_scaling": {"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling
           else None, "tie_word_embeddings": cfg.tie_embeddings,
           "bos_token_id": tok.bos_id, "eos_token_id": tok.doc_eos_id, "pad_token_id": tok.pad_id,
           "torch_dtype": dtype, "use_cache": True}
    if kind == "llama":
        out |= {"attention_bias": False, "mlp_bias": False}
    else:
        out |= {"use_sliding_window": False, "sliding_window": None}
    return out


def export_tensors(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    skip = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    return {hf_name(k): v.detach().to("cpu", dtype).contiguous()
            for k, v in model.state_dict().items() if k not in skip}


def tokenizer_config(tok, seq_len: int) -> dict:
    """tokenizer_config.json for an exported folder: special tokens and the chat template."""
    template = SCALELAB_TEMPLATE
    if isinstance(tok, HFStyleTokenizer):
        template = tok.chat_template or (SCALELAB_TEMPLATE if tok.has_chat_format else None)
    name = lambda i: tok.hf.id_to_token(i) if i is not None else None  # noqa: E731
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos_id),
              "eos_token": name(tok.doc_eos_id), "pad_token": name(tok.pad_id),
              "model_max_length": seq_len, "clean_up_tokenization_spaces": False}
    if template:
        config["chat_template"] = template
    return config


def export(model_dir: Path, out: Path, dtype: str = "bfloat16", log=print) -> Path:
    """Write a Hugging Face folder (config, weights, tokenizer, generation config)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.resolve() == Path(model_dir).resolve():
        raise UserError(f"--out {out}: must differ from --model")
    check_out(out)
    model, tok = load_model(model_dir)
    if not isinstance(model, Transformer):
        raise UserError(f"{model_dir}: only language models export (not a reward model)")
    cfg = model.cfg
    if cfg.mlp != "swiglu":
        raise UserError(f"{model_dir / 'config.json'}: mlp={cfg.mlp!r} has no Hugging Face "
                        "Llama equivalent (only swiglu exports)")
    tmp = fresh_tmp(out)
    save_file(export_tensors(model, DTYPES[dtype]), str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    config = hf_config(cfg, tok, dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tok.hf.save(str(tmp / "tokenizer.json"))
    tok_config = tokenizer_config(tok, cfg.seq_len)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    stops = tok.stop_ids  # transformers' generate stops at any of them, as scalelab's does
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
           "pad_token_id": tok.pad_id}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    replace_dir(tmp, out)
    log(f"exported {model_dir} to {out} ({config['architectures'][0]}, {dtype})")
    return out
