"""The consolidated fp32 export of a checkpoint, and the one reader of a trained model.

Writing: :func:`export_consolidated` turns a DeepSpeed checkpoint tag (any ZeRO stage) into one
``final/model.pt`` file, ``{"state_dict", "ema_state_dict", "config", "step"}`` (fp32, CPU; what resume
paths and the tests use), and beside it the export users share: ``model.safetensors`` (the EMA weights
with the BatchNorm statistics, no pickle) and ``config.yaml`` (:mod:`avi_scale.model.pretrained`).

Reading: :func:`load_model` is the one reader, for the engine, ``avi-eval`` and Ray Tune alike.  It takes

* a **run directory** (``train.output_dir``: ``config.yaml``, ``checkpoints/``, ``final/model.pt``): the
  newer of the export and the latest complete DeepSpeed checkpoint (in ``train.checkpoint_dir`` or
  ``checkpoints/``);
* a **DeepSpeed checkpoint directory** (``latest``, ``stepNNNNNNNN/`` tags) or one **tag directory**:
  consolidated by :func:`consolidated_state_dict` (``zero_to_fp32`` for ZeRO 1-3); the EMA weights come
  from our client state;
* an **export folder** (``model.safetensors`` + ``config.yaml``, e.g. ``final/``);
* an **export file**, or a bare state dict (its config then comes from ``config_path`` or a
  ``config.yaml`` beside the file or one folder up).

One set of unpickling rules: every file is read by :func:`~avi_scale.engine.checkpoint.safe_load`
(``torch.load(weights_only=True)``), and the files of a DeepSpeed tag are all checked that way before
DeepSpeed's own loader opens them.  Whatever cannot be loaded raises :class:`CheckpointError` naming the
file or directory.  The EMA weights are used when asked for and present; :class:`LoadedModel` says which.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from avi_scale.engine.checkpoint import CLIENT_KEY, UnsafeCheckpointError, resolve, safe_load, tag_step, \
    verify_checkpoint_files
from avi_scale.model.pretrained import is_pretrained_dir

EXPORT_NAME = Path("final") / "model.pt"
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class CheckpointError(ValueError):
    """A path that holds no loadable model, with what was looked for."""


class UnreadableCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A file that ``torch.load(weights_only=True)`` refuses: not a model file, or one holding pickled
    objects other than tensors and plain data (which is never unpickled)."""


# -- writing ---------------------------------------------------------------------------------------
def has_model_states(tag_dir: str | Path) -> bool:
    """True for a DeepSpeed checkpoint tag directory (complete or not, universal or not)."""
    return any((Path(tag_dir) / name).is_file() for name in _MODEL_STATES)


def _model_states_file(tag_dir: Path) -> Path:
    for name in _MODEL_STATES:
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(f"no DeepSpeed model-states file in {tag_dir}")


def consolidated_state_dict(tag_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state dict of the model, client state) from a DeepSpeed checkpoint of any ZeRO stage.

    ZeRO 1-3 checkpoints (and bf16 ones, whose fp32 master weights live in the optimizer files)
    go through ``deepspeed.utils.zero_to_fp32``; ZeRO-0 fp32 checkpoints hold the full module.
    Runs on one process, without a process group.
    """
    tag_dir = Path(tag_dir)
    verify_checkpoint_files(tag_dir)  # before DeepSpeed's zero_to_fp32 unpickles the optimizer files
    states = safe_load(_model_states_file(tag_dir))
    client = states[CLIENT_KEY]
    has_optim_shards = any(p.name.endswith("optim_states.pt") for p in tag_dir.iterdir())
    if has_optim_shards:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    else:
        sd = states["module"]
    sd = {k: (v.float() if v.is_floating_point() else v).clone() for k, v in sd.items()}
    return sd, client


def _with_ema(state: dict[str, torch.Tensor], ema_params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with its parameters replaced by their EMA (fp32); buffers such as BatchNorm statistics stay."""
    return {k: (ema_params[k].float() if k in ema_params else v) for k, v in state.items()}


def export_consolidated(tag_dir: str | Path, out_path: str | Path) -> Path:
    """Write ``{"state_dict", "ema_state_dict", "config", "step"}`` (fp32, CPU) to ``out_path``.

    ``ema_state_dict`` holds the EMA parameters with the model's buffers (BatchNorm statistics),
    so both dicts load strictly into a plain model.  ``model.safetensors`` and ``config.yaml`` (the
    shared export) are written into the same folder.
    """
    sd, client = consolidated_state_dict(tag_dir)
    ema_sd = _with_ema(sd, client["ema"]["state_dict"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save({"state_dict": sd, "ema_state_dict": ema_sd, "config": client["config"], "step": client["step"]}, tmp)
    os.replace(tmp, out_path)
    from avi_scale.config import from_dict, to_yaml
    from avi_scale.model.pretrained import save_pretrained

    save_pretrained(ema_sd, to_yaml(from_dict(client["config"])), out_path.parent,
                    {"format": "avi-scale", "weights": "ema", "step": client["step"]})
    return out_path


# -- reading ---------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    model: torch.nn.Module  # AttentiveVAE in eval mode, on CPU
    cfg: Any  # the ExperimentConfig the weights were trained with (or config_path's)
    source: Path  # the file or tag directory the weights came from
    kind: str  # "export" | "safetensors" | "deepspeed" | "state_dict"
    weights: str  # "ema" | "raw"
    step: Optional[int]
    run_dir: Optional[Path]  # where config.yaml / metrics.jsonl live, when known

    def describe(self) -> str:
        step = f"step {self.step}" if self.step is not None else "step unknown"
        return f"{self.source} ({self.kind}, {self.weights} weights, {step})"


def read_model_file(path: Path) -> Any:
    """The content of one of our ``.pt`` files, read with :func:`safe_load`; :class:`UnreadableCheckpointError`
    (a :class:`CheckpointError` and a ``pickle.UnpicklingError``) naming the file if it cannot be."""
    try:
        return safe_load(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableCheckpointError(f"{path} is not a consolidated model file that torch.load(weights_only=True) "
                                        f"can read: {first}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _config(config_path: Optional[Path], stored: Any, source: Path, hint: str):
    from avi_scale.config import from_dict, load_config

    if config_path is not None:
        return load_config(config_path)
    if isinstance(stored, dict):
        return from_dict(stored)
    raise CheckpointError(f"{source} holds no config: {hint}")


def _build(cfg: Any, state: dict, source: Path) -> torch.nn.Module:
    """The model of ``cfg`` holding ``state`` (strict, as the export folder is read), in eval mode."""
    from avi_scale.model import AttentiveVAE
    from avi_scale.model.pretrained import PretrainedError, load_into

    try:
        return load_into(AttentiveVAE(cfg.model), state, source).eval()
    except PretrainedError as exc:
        raise CheckpointError(str(exc)) from None


def _find_config_yaml(path: Path) -> Optional[Path]:
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def _from_file(path: Path, use_ema: bool, config_path: Optional[Path]) -> LoadedModel:
    blob = read_model_file(path)
    run_dir = path.parent.parent if path.parent.name == "final" else path.parent
    if isinstance(blob, dict) and "state_dict" in blob:
        cfg = _config(config_path, blob.get("config"), path, "pass --config with the run's config.yaml")
        ema = blob.get("ema_state_dict")
        weights = "ema" if use_ema and _is_state_dict(ema) else "raw"
        state = ema if weights == "ema" else blob["state_dict"]
        if not _is_state_dict(state):
            raise CheckpointError(f"{path}: 'state_dict' is not a mapping of parameter names to tensors")
        step = blob.get("step")
        return LoadedModel(_build(cfg, state, path), cfg, path, "export", weights,
                           int(step) if isinstance(step, int) else None, run_dir)
    if _is_state_dict(blob):
        yaml = config_path or _find_config_yaml(path)
        if yaml is None:
            raise CheckpointError(f"{path} is a bare state dict without a config: pass --config (the run's "
                                  "config.yaml), or keep config.yaml beside the file")
        cfg = _config(yaml, None, path, "")
        return LoadedModel(_build(cfg, blob, path), cfg, path, "state_dict", "raw", None, run_dir)
    raise CheckpointError(f"{path} is neither a consolidated export ({{'state_dict', 'ema_state_dict', 'config', "
                          f"'step'}}) nor a state dict of tensors (found {type(blob).__name__})")


def _from_deepspeed(tag_dir: Path, use_ema: bool, config_path: Optional[Path]) -> LoadedModel:
    try:
        state, client = consolidated_state_dict(tag_dir)
    except (FileNotFoundError, KeyError) as exc:
        raise CheckpointError(f"{tag_dir} is not a readable avi-scale DeepSpeed checkpoint: {exc}") from None
    except UnsafeCheckpointError as exc:  # a file holding more than tensors and plain data: not loaded
        raise CheckpointError(str(exc)) from None
    cfg = _config(config_path, client.get("config"), tag_dir, "the checkpoint's client state has none; pass --config")
    ema = (client.get("ema") or {}).get("state_dict")
    weights = "raw"
    if use_ema and isinstance(ema, dict) and ema:
        unknown = sorted(set(ema) - set(state))
        if unknown:
            raise CheckpointError(f"{tag_dir}: EMA entries {unknown[:3]} are not parameters of the model")
        state, weights = _with_ema(state, ema), "ema"
    step = client.get("step")
    run_dir = tag_dir.parent.parent if (tag_dir.parent.parent / "config.yaml").is_file() else None
    return LoadedModel(_build(cfg, state, tag_dir), cfg, tag_dir, "deepspeed", weights,
                       int(step) if isinstance(step, int) else None, run_dir)


def _from_pretrained(folder: Path, use_ema: bool, config_path: Optional[Path]) -> LoadedModel:
    """An export folder: its weights are the EMA ones the run was evaluated with (``raw`` weights are only
    in ``model.pt`` and the DeepSpeed checkpoints)."""
    from avi_scale.model.pretrained import PretrainedError, load_pretrained

    try:
        state, cfg, meta = load_pretrained(folder)
    except PretrainedError as exc:
        raise CheckpointError(str(exc)) from None
    if config_path is not None:
        cfg = _config(config_path, None, folder, "")
    model = _build(cfg, state, folder)
    weights = meta.get("weights", "ema")
    if not use_ema and weights == "ema":
        raise CheckpointError(f"{folder} holds the EMA weights only (model.safetensors); the raw weights are in "
                              f"{folder / 'model.pt'} or the run's DeepSpeed checkpoints")
    step = meta.get("step", "")
    run_dir = folder.parent if (folder.parent / "config.yaml").is_file() and folder.name == "final" else None
    return LoadedModel(model, cfg, folder, "safetensors", weights, int(step) if step.isdigit() else None, run_dir)


def _from_run_dir(run: Path, use_ema: bool, config_path: Optional[Path]) -> LoadedModel:
    """The newer of ``final/model.pt`` and the latest complete DeepSpeed checkpoint of a run directory."""
    from avi_scale.config import load_config

    run_cfg = load_config(run / "config.yaml")
    ckpt_dirs = [run / "checkpoints"]
    if run_cfg.train.checkpoint_dir:
        ckpt_dirs.insert(0, Path(run_cfg.train.checkpoint_dir))
    tag = next((t for t in (resolve(d) for d in ckpt_dirs if d.is_dir()) if t is not None), None)
    loaded = None
    if (run / EXPORT_NAME).is_file():
        loaded = _from_file(run / EXPORT_NAME, use_ema, config_path)
        if tag is not None and (loaded.step is None or loaded.step < tag_step(tag)):
            loaded = None  # the checkpoint is newer than the export
    if loaded is None and tag is not None:
        loaded = _from_deepspeed(tag, use_ema, config_path)
    if loaded is None:
        raise CheckpointError(f"run directory {run} has no complete checkpoint (looked in "
                              f"{', '.join(str(d) for d in ckpt_dirs)}) and no {EXPORT_NAME}")
    loaded.run_dir = run
    return loaded


def load_model(path: str | Path, use_ema: bool = True, config_path: str | Path | None = None) -> LoadedModel:
    """Load a trained model (on CPU, eval mode) from a run directory, a DeepSpeed checkpoint (directory
    or tag) or a file; see the module docstring.  Raises :class:`CheckpointError` naming the path."""
    path = Path(path)
    config_path = Path(config_path) if config_path is not None else None
    if config_path is not None and not config_path.is_file():
        raise CheckpointError(f"config file not found: {config_path}")
    if path.is_file():
        return _from_file(path, use_ema, config_path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} (give a run directory, a DeepSpeed checkpoint "
                              "directory or tag, or a consolidated .pt file)")
    if is_pretrained_dir(path):
        return _from_pretrained(path, use_ema, config_path)
    if (path / "config.yaml").is_file():
        return _from_run_dir(path, use_ema, config_path)
    tag = resolve(path)
    if tag is None:
        raise CheckpointError(f"{path} holds no complete DeepSpeed checkpoint (no 'latest' or stepNNNNNNNN/ tag "
                              "with a COMPLETE marker) and is not a run directory (no config.yaml)")
    return _from_deepspeed(tag, use_ema, config_path)


def load_exported(path: str | Path, use_ema: bool = True):
    """(plain AttentiveVAE in eval mode, ExperimentConfig) from what :func:`load_model` accepts, typically
    the file :func:`export_consolidated` wrote."""
    loaded = load_model(path, use_ema=use_ema)
    return loaded.model, loaded.cfg
