"""Model folders and resumable checkpoints, always written atomically.

DIR/model/                model.safetensors, config.json, tokenizer.json  (the latest model)
DIR/checkpoints/step_N/   model.safetensors, state.safetensors (optimizer + RNG tensors),
                          state.json (step, optimizer hyperparameters, data position, ...)

Everything is written into a hidden temporary folder and renamed into place, so a crash
leaves either the old folder or the new one, never half of one. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scalelab.config import RunFailed, UserError
from scalelab.model import Transformer
from scalelab.tokenizer import Tokenizer


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place (rename is atomic; the old one goes after)."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def tied_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that are another parameter under a second name (a tied lm_head)."""
    first: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied.add(name)
        first.setdefault(id(p), name)
    return tied


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage, and a tied weight is stored once anyway.
    skip = tied_names(model)
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
            if k not in skip}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model(model: torch.nn.Module, tok: Tokenizer, final: Path,
               tensors: dict[str, torch.Tensor] | None = None,
               extra_json: dict[str, dict] | None = None) -> None:
    """tensors: the consolidated weights when the model is sharded (see parallel.checkpoint);
    extra_json: more files for the folder, e.g. {"reward.json": stats} for a reward model."""
    tmp = fresh_tmp(final)
    with disk_errors(final, tmp):
        save_file(model_tensors(model) if tensors is None else tensors,
                  str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2))
        tok.save(tmp / "tokenizer.json")
    replace_dir(tmp, final)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: corrupt or unreadable safetensors file ({e})") from None


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt JSON ({e})") from None


def load_weights(model: torch.nn.Module, path: Path,
                 tensors: dict[str, torch.Tensor] | None = None) -> None:
    tensors = read_tensors(path) if tensors is None else tensors
    want = model.state_dict()
    for k, t in tensors.items():
        if k in want and tuple(t.shape) != tuple(want[k].shape):
            raise UserError(f"{path}: tensor {k} has shape {tuple(t.shape)} but the folder's "
                            f"config.json makes it {tuple(want[k].shape)}")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if k not in tied_names(model)]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               wrap: Callable[[Transformer], torch.nn.Module] | None = None
               ) -> tuple[torch.nn.Module, Tokenizer]:
    """A model folder written by save_model (DIR/model or a checkpoint's step folder), or a
    Hugging Face folder of a supported architecture (scalelab.hf).
    wrap builds what the weights belong to around the Transformer (a reward model's head)."""
    from scalelab import hf
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: model folder not found")
    if not (d / "config.json").exists() and (d / "model" / "config.json").is_file():
        raise UserError(f"{d}: is a run folder, not a model folder; did you mean {d / 'model'}?")
    if wrap is None and (d / "reward.json").is_file():
        raise UserError(f"{d}: this is a reward model (it scores answers and cannot generate "
                        "or be trained as a policy); give a language model folder, e.g. the "
                        "SFT run's model/ (a reward model goes to `ppo --reward`)")
    if hf.is_hf_folder(d):
        if wrap is not None:
            raise UserError(f"{d}: a Hugging Face folder holds a language model, not a "
                            "scalelab reward model")
        model, tok = hf.load_hf(d)
        return model.to(device).eval(), tok
    from scalelab.train.model_folder import checked_model_config
    cfg_dict = read_json(d / "config.json")
    tensors = read_tensors(d / "model.safetensors")
    cfg = checked_model_config(d, cfg_dict, {k: tuple(t.shape) for k, t in tensors.items()})
    tok = hf.load_tokenizer(d)
    try:
        model = Transformer(cfg) if wrap is None else wrap(Transformer(cfg))
    except ValueError as e:
        raise UserError(f"{d / 'config.json'}: {e}") from None
    load_weights(model, d / "model.safetensors", tensors)
    return model.to(device).eval(), tok


# ---- resumable checkpoints -------------------------------------------------------------

@contextlib.contextmanager
def disk_errors(final: Path, tmp: Path):
    """A full disk (or any write error) while writing `final`: remove the partial temporary
    folder and say that the previous one is intact (the rename never happened)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        before = [p.name for p in list_checkpoints(final.parent.parent)] \
            if final.parent.name == "checkpoints" else []
        kept = f"the previous checkpoint {before[-1]} is intact" if before else \
            f"{final} is as it was"
        why = getattr(e, "strerror", None) or e
        raise RunFailed(f"could not write {final} ({why}); nothing was "
                        f"replaced: {kept}") from None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict, keep: int) -> Path:
    """Model, optimizer, RNG and the caller's state (data position, ...) at `step`."""
    final = run_dir / "checkpoints" / f"step_{step}"
    tmp = fresh_tmp(final)
    with disk_errors(final, tmp):
        _write_checkpoint(tmp, model, optimizer, {"step": step, **state})
    replace_dir(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      state: dict) -> None:
    save_file(model_tensors(model), str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    scalars: dict[str, dict] = {}
    for idx, pstate in opt["state"].items():
        for name, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"opt.{idx}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"param_groups": opt["param_groups"], "opt_scalars": scalars, **state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders start with '.', never match)."""
    ck = run_dir / "checkpoints"
    found = [p for p in ck.glob("step_*") if re.fullmatch(r"step_\d+", p.name)] \
        if ck.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def load_checkpoint(ckpt: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG in place; return state.json (step, data position)."""
    meta = read_json(ckpt / "state.json")
    load_weights(model, ckpt / "model.safetensors")
    tensors = read_tensors(ckpt / "state.safetensors")
    opt_state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    for idx, extra in meta.get("opt_scalars", {}).items():
        opt_state.setdefault(int(idx), {}).update(extra)
    try:
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError) as e:
        raise UserError(f"{ckpt}: optimizer state does not match this model ({e})") from None
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
