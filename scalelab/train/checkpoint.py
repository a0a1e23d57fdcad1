"""Model folders and resumable checkpoints, always written atomically.

DIR/model/                model.safetensors, config.json, tokenizer.json  (the latest model)
DIR/checkpoints/step_N/   state.json (step, optimizer hyperparameters, data position, the
                          stage's own state such as PPO's KL coefficient); rng/rank_R.
                          safetensors (each rank's CPU, CUDA, MPS generators); and whole
                          tensors (model.safetensors, state.safetensors: optimizer) from one
                          process, or dcp/ shards from a mesh (see parallel.checkpoint)

`Checkpointer` is the one place that writes, prunes, finds and restores them. Everything is
built in a hidden temporary folder and renamed into place, so a crash leaves the old folder
or the new one, never half of one. Nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from scalelab import hf
from scalelab.config import RunFailed, UserError
from scalelab.io import atomic_write_json, fresh_tmp, read_json, read_tensors, replace_dir
from scalelab.model import Transformer
from scalelab.tokenizer import Tokenizer
from scalelab.train.model_folder import checked_model_config
from scalelab.train.rundir import list_checkpoints


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameters that are another parameter under a second name (a tied lm_head):
    {second name: first name}."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        first.setdefault(id(p), name)
    return tied


def model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """The model's state dict (or `tensors`, gathered from a mesh) as whole CPU tensors.
    safetensors refuses shared storage, and a tied weight is stored once anyway."""
    skip = tied_names(model)
    tensors = model.state_dict() if tensors is None else tensors
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items() if k not in skip}


def save_model(model: torch.nn.Module, tok: Tokenizer, final: Path,
               tensors: dict[str, torch.Tensor] | None = None,
               extra_json: dict[str, dict] | None = None) -> None:
    """tensors: the consolidated weights when the model is sharded (see parallel.checkpoint);
    extra_json: more files for the folder, e.g. {"reward.json": stats} for a reward model."""
    tmp = fresh_tmp(final)
    with disk_errors(final, tmp):
        save_file(model_tensors(model, tensors), str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2))
        for name, data in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(data, indent=2))
        tok.save(tmp / "tokenizer.json")
    replace_dir(tmp, final)


def save_full_model(model: torch.nn.Module, tok: Tokenizer, final: Path, par,
                    extra_json: dict[str, dict] | None = None) -> None:
    """DIR/model as one safetensors file, from one process or from a mesh (par: a
    parallel.mesh.Parallel; collective: every rank calls, rank 0 gathers and writes)."""
    if par.single:
        return save_model(model, tok, final, extra_json=extra_json)
    from scalelab.parallel.checkpoint import full_model_tensors
    tensors = full_model_tensors(model, par)
    if par.is_main:
        save_model(model, tok, final, tensors, extra_json=extra_json)
    par.barrier()


def with_tied(model: torch.nn.Module, tensors: dict[str, torch.Tensor]
              ) -> dict[str, torch.Tensor]:
    """A model.safetensors' tensors as `model`'s state dict (a tied weight is stored once)."""
    for second, first in tied_names(model).items():
        if first in tensors:
            tensors[second] = tensors[first]
    return tensors


def load_weights(model: torch.nn.Module, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """tensors: the contents of `path` (the file named in errors)."""
    tensors = with_tied(model, tensors)
    want = model.state_dict()
    for k, t in tensors.items():
        if k in want and tuple(t.shape) != tuple(want[k].shape):
            raise UserError(f"{path}: tensor {k} has shape {tuple(t.shape)} but the folder's "
                            f"config.json makes it {tuple(want[k].shape)}")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # missing or unexpected: another model
        raise UserError(f"{path}: weights do not match the model ({str(e)[:300]})") from None


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               wrap: Callable[[Transformer], torch.nn.Module] | None = None
               ) -> tuple[torch.nn.Module, Tokenizer]:
    """A model folder written by save_model (DIR/model), or a Hugging Face folder of a
    supported architecture (scalelab.hf).
    wrap builds what the weights belong to around the Transformer (a reward model's head)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"{d}: model folder not found")
    if not (d / "config.json").exists() and (d / "model" / "config.json").is_file():
        raise UserError(f"{d}: is a run folder, not a model folder; did you mean {d / 'model'}?")
    if not (d / "config.json").exists() and (d / "state.json").is_file():
        raise UserError(f"{d}: is a training checkpoint (weights and optimizer state, no config "
                        f"or tokenizer), not a model folder; give the run's model folder "
                        f"{d.parent.parent / 'model'}, or resume the run with --resume")
    if wrap is None and (d / "reward.json").is_file():
        raise UserError(f"{d}: this is a reward model (it scores answers and cannot generate "
                        "or be trained as a policy); give a language model folder, e.g. the "
                        "SFT run's model/ (a reward model goes to `ppo --reward`)")
    if hf.is_hf_folder(d):
        if wrap is not None:
            raise UserError(f"{d}: a Hugging Face folder holds a language model, not a "
                            "scalelab reward model")
        model, tok = hf.load_hf(d)
        check_vocab(d, tok, model.cfg.vocab_size)
        return model.to(device).eval(), tok
    cfg_dict = read_json(d / "config.json")
    tensors = read_tensors(d / "model.safetensors")
    cfg = checked_model_config(d, cfg_dict, {k: tuple(t.shape) for k, t in tensors.items()})
    tok = hf.load_tokenizer(d)
    check_vocab(d, tok, cfg.vocab_size)
    try:
        model = Transformer(cfg) if wrap is None else wrap(Transformer(cfg))
    except ValueError as e:
        raise UserError(f"{d / 'config.json'}: {e}") from None
    load_weights(model, d / "model.safetensors", tensors)
    return model.to(device).eval(), tok


def check_vocab(d: Path, tok, rows: int) -> None:
    """A tokenizer with more tokens than the model has embedding rows (tokenizer.json copied
    from another run) would hand the model ids past its table: refused, naming the file."""
    if tok.vocab_size > rows:
        raise UserError(f"{d / 'tokenizer.json'}: {tok.vocab_size} tokens, but the model has "
                        f"{rows} embedding rows ('vocab_size' in {d / 'config.json'}): the "
                        "tokenizer belongs to another model; put this model's own back")


# ---- resumable checkpoints -------------------------------------------------------------

@contextlib.contextmanager
def disk_errors(final: Path, tmp: Path | None):
    """A full disk (or any write error) while writing `final`: remove the partial temporary
    folder (tmp None: the caller does) and say that the previous one is intact (the rename
    never happened)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        before = [p.name for p in list_checkpoints(final.parent.parent)] \
            if final.parent.name == "checkpoints" else []
        kept = f"the previous checkpoint {before[-1]} is intact" if before else \
            f"{final} is as it was"
        why = getattr(e, "strerror", None) or e
        raise RunFailed(f"could not write {final} ({why}); nothing was "
                        f"replaced: {kept}") from None


def rng_tensors() -> dict[str, torch.Tensor]:
    """Every generator this process draws from (CUDA: its current device's)."""
    found = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        found["cuda"] = torch.cuda.get_rng_state()
    if torch.backends.mps.is_available():
        found["mps"] = torch.mps.get_rng_state()
    return found


def set_rng(saved: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(saved["cpu"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
    if "mps" in saved and torch.backends.mps.is_available():
        torch.mps.set_rng_state(saved["mps"])


class Checkpointer:
    """Writes, prunes, finds and restores the checkpoints of the run in `run_dir`.
    parallel: the mesh (scalelab.parallel.mesh.Parallel) when the model is spread over one:
    every rank then calls save and load, and model and optimizer are saved as DCP shards;
    None: one process, whole tensors in safetensors. Either kind loads under either."""

    def __init__(self, run_dir: Path, keep: int = 0, parallel=None):
        self.run_dir, self.keep, self.par = run_dir, keep, parallel
        self.rank = 0 if parallel is None else parallel.rank

    def latest(self) -> Path | None:
        found = list_checkpoints(self.run_dir)
        return found[-1] if found else None

    def drop_unfinished(self) -> None:
        """Remove the temporary folders (.step_N.tmp) of checkpoints a killed run was writing
        (rank 0, once the run folder is this run's). save() reuses its own step's, but one of
        a step this run never saves again (train.checkpoint_every changed) would linger.
        Only that exact name: nothing else in the folder is touched."""
        folder = self.run_dir / "checkpoints"
        if self.rank != 0 or not folder.is_dir():
            return
        for p in folder.iterdir():
            if re.fullmatch(r"\.step_\d+\.tmp", p.name) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    def _barrier(self) -> None:
        if self.par is not None:
            self.par.barrier()

    def _together(self):
        """Parallel.together (an error of some ranks is every rank's; it waits for all)."""
        return self.par.together() if self.par is not None else contextlib.nullcontext()

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             state: dict) -> Path:
        """Model, optimizer, RNG and the stage's state (data position, ...) at `step`;
        then only the newest `keep` checkpoints stay (keep 0: all)."""
        final = self.run_dir / "checkpoints" / f"step_{step}"
        tmp = final.with_name(f".{final.name}.tmp")
        if self.rank == 0:
            fresh_tmp(final)
        self._barrier()
        try:  # a write error of one rank alone (its rng file) is every rank's, said by rank 0
            with self._together(), disk_errors(final, None):
                meta = {"step": step, **state}
                if self.par is None:
                    meta.update(_write_whole(tmp, model, optimizer))
                else:
                    from scalelab.parallel.checkpoint import write_sharded
                    write_sharded(tmp, model, optimizer)
                    meta["mapping"] = self.par.sizes
                (tmp / "rng").mkdir(exist_ok=True)
                save_file(rng_tensors(), str(tmp / "rng" / f"rank_{self.rank}.safetensors"))
                if self.rank == 0:
                    (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        except RunFailed:
            if self.rank == 0:  # every rank has stopped writing into it: together() waited
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.rank == 0:
            replace_dir(tmp, final)
            for old in list_checkpoints(self.run_dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def restate(self, step: int, state: dict) -> None:
        """After a rewind to checkpoint `step`: its state.json takes the run's state now (the
        data position past the skipped batches, the monitor's), so that a run killed before
        its next checkpoint resumes as the rewound run goes on, not into the same batches
        again. Its model, optimizer and RNG are the run's now already."""
        if self.rank == 0:
            path = self.run_dir / "checkpoints" / f"step_{step}" / "state.json"
            atomic_write_json(path, {**read_json(path), **state})
        self._barrier()

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model, optimizer and this rank's RNG in place from the newest checkpoint;
        return its state.json (step, data position, the stage's own state). One that does
        not fit the model is a UserError, raised before the run writes anything."""
        ckpt = self.latest()
        if ckpt is None:
            raise UserError(f"{self.run_dir}: --resume given but no checkpoint in "
                            f"{self.run_dir / 'checkpoints'}")
        with self._older_one(ckpt):
            meta = read_json(ckpt / "state.json")
            if (ckpt / "dcp").is_dir():
                from scalelab.parallel.checkpoint import read_sharded
                read_sharded(ckpt, model, optimizer)
            else:
                _read_whole(ckpt, model, optimizer, meta)
        # A file only this rank reads: its error is every rank's (Parallel.together).
        with self._together(), self._older_one(ckpt):
            self._restore_rng(ckpt)
        return meta

    @contextlib.contextmanager
    def _older_one(self, ckpt: Path):
        """A checkpoint that cannot be loaded (damaged, half copied): the error says which
        older one the run can go back to, and how (--resume reads the newest step_N)."""
        try:
            yield
        except UserError as e:
            older = [p for p in list_checkpoints(self.run_dir) if p != ckpt]
            aside = self.run_dir / f"damaged_{ckpt.name}"
            if older:
                fix = (f"the run can go on from the checkpoint before it, {older[-1]}: move "
                       f"this one out of the way (mv {ckpt} {aside}) and --resume again")
            else:
                fix = ("the run keeps no older checkpoint to go back to: start it again "
                       "in a new --out")
            raise UserError(f"{e}; {fix}") from None

    def _restore_rng(self, ckpt: Path) -> None:
        """This rank's generators; a rank the saving mapping did not have takes rank 0's."""
        mine, first = (ckpt / "rng" / f"rank_{r}.safetensors" for r in (self.rank, 0))
        if mine.is_file() or first.is_file():
            set_rng(read_tensors(mine if mine.is_file() else first))
        elif (ckpt / "state.safetensors").is_file():  # written before rng/ existed
            old = read_tensors(ckpt / "state.safetensors")
            saved = {k[4:]: v for k, v in old.items() if k.startswith("rng.")}
            if "cpu" not in saved:  # neither kind: rng/ was lost, the resume would not be exact
                raise UserError(f"{ckpt / 'rng'}: missing (each rank's random generators); "
                                "this checkpoint is incomplete")
            set_rng(saved)


def _write_whole(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """model.safetensors, and the optimizer's tensors keyed by parameter name (so they load
    into any mapping); returns the rest of its state, for state.json."""
    save_file(model_tensors(model), str(folder / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for p, pstate in optimizer.state.items():
        for key, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"opt.{names[id(p)]}.{key}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(names[id(p)], {})[key] = v
    save_file(tensors, str(folder / "state.safetensors"))
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [names[id(p)] for p in g["params"]]} for g in optimizer.param_groups]
    return {"param_groups": groups, "opt_scalars": scalars}


def _read_whole(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                meta: dict) -> None:
    """Whole tensors into the model as it is now: in one process, or sharded over a mesh
    (every rank reads the files and keeps its slices). Checkpoints from before optimizer
    state was keyed by name key it by position in the param groups: those load too."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    weights = with_tied(model, read_tensors(ckpt / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    name_of = lambda k: order[int(k)] if str(k).isdigit() else k  # noqa: E731
    state: dict[str, dict] = {}
    for key, v in read_tensors(ckpt / "state.safetensors").items():
        if key.startswith("opt."):
            where, name = key[4:].rsplit(".", 1)
            state.setdefault(name_of(where), {})[name] = v
    for where, extra in meta.get("opt_scalars", {}).items():
        state.setdefault(name_of(where), {}).update(extra)
    full = StateDictOptions(full_state_dict=True)
    try:
        groups = [{**g, "params": [name_of(p) for p in g["params"]]}
                  for g in meta["param_groups"]]
        set_model_state_dict(model, weights, options=full)
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                                 options=full)
    except (RuntimeError, KeyError, ValueError, IndexError) as e:
        raise UserError(f"{ckpt}: weights do not match the model ({str(e)[:300]})") from None
