"""Loading a trained model for evaluation from whatever a run left behind.

Accepted, in this order of preference within a run directory:

* a **run directory** (``train.output_dir``: ``config.yaml``, ``checkpoints/``, ``final/model.pt``): the
  newer of the consolidated export ``final/model.pt`` and the latest complete DeepSpeed checkpoint;
* a **DeepSpeed checkpoint directory** (holding ``latest`` and ``stepNNNNNNNN/`` tags) or one **tag
  directory**: consolidated to fp32 with :func:`avi_scale.engine.checkpoint.consolidated_state_dict`
  (DeepSpeed's ``zero_to_fp32`` for ZeRO 1-3); the EMA weights come from our client state;
* a **consolidated file** written by :func:`avi_scale.engine.checkpoint.export_consolidated`
  (``{"state_dict", "ema_state_dict", "config", "step"}``), or a plain state dict (then the config
  comes from ``--config`` or a ``config.yaml`` beside the file or one folder up).  Our own files are
  read with ``torch.load(..., weights_only=True)``.

The EMA weights are used when present (``eval.use_ema``); :class:`LoadedModel` says which were used.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from avi_scale.config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict

EXPORT_NAME = Path("final") / "model.pt"
_TAG = re.compile(r"^step(\d{8,})$")


class CheckpointError(ValueError):
    """A path that holds no loadable model, with what was looked for."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # AttentiveVAE in eval mode, on CPU
    cfg: ExperimentConfig
    source: Path  # the file or tag directory the weights came from
    kind: str  # "export" | "deepspeed" | "state_dict"
    weights: str  # "ema" | "raw"
    step: Optional[int]
    run_dir: Optional[Path]  # where config.yaml / metrics.jsonl live, when known

    def describe(self) -> str:
        step = f"step {self.step}" if self.step is not None else "step unknown"
        return f"{self.source} ({self.kind}, {self.weights} weights, {step})"


def _load_own_file(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a consolidated model file that torch.load(weights_only=True) can "
                              f"read: {first}") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items())


def _find_config_yaml(path: Path) -> Optional[Path]:
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    return None


def _build(cfg: ExperimentConfig, state: dict, source: Path) -> torch.nn.Module:
    from avi_scale.model import AttentiveVAE

    model = AttentiveVAE(cfg.model)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the weights do not fit the model of its config (model.*): "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = "; ".join(line.strip() for line in str(exc).splitlines()[:3] if line.strip())
        raise CheckpointError(f"{source}: the weights do not fit the model of its config: {detail}") from None
    return model.eval()


def _from_file(path: Path, use_ema: bool, config_path: Optional[Path]) -> LoadedModel:
    blob = _load_own_file(path)
    run_dir = path.parent.parent if path.parent.name == "final" else path.parent
    if isinstance(blob, dict) and "state_dict" in blob:
        if config_path is not None:
            cfg = load_config(config_path)
        elif isinstance(blob.get("config"), dict):
            cfg = from_dict(blob["config"])
        else:
            raise CheckpointError(f"{path} holds no config: pass --config with the run's config.yaml")
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
        cfg = load_config(yaml)
        return LoadedModel(_build(cfg, blob, path), cfg, path, "state_dict", "raw", None, run_dir)
    raise CheckpointError(f"{path} is neither a consolidated export ({{'state_dict', 'ema_state_dict', 'config', "
                          f"'step'}}) nor a state dict of tensors (found {type(blob).__name__})")


def _from_deepspeed(tag_dir: Path, use_ema: bool, config_path: Optional[Path]) -> LoadedModel:
    from avi_scale.engine.checkpoint import UnsafeCheckpointError, consolidated_state_dict

    try:
        state, client = consolidated_state_dict(tag_dir)
    except (FileNotFoundError, KeyError) as exc:
        raise CheckpointError(f"{tag_dir} is not a readable avi-scale DeepSpeed checkpoint: {exc}") from None
    except UnsafeCheckpointError as exc:  # a file holding more than tensors and plain data: not loaded
        raise CheckpointError(str(exc)) from None
    if config_path is not None:
        cfg = load_config(config_path)
    elif isinstance(client.get("config"), dict):
        cfg = from_dict(client["config"])
    else:
        raise CheckpointError(f"{tag_dir}: the checkpoint's client state holds no config; pass --config")
    ema = (client.get("ema") or {}).get("state_dict")
    weights = "raw"
    if use_ema and isinstance(ema, dict) and ema:
        unknown = sorted(set(ema) - set(state))
        if unknown:
            raise CheckpointError(f"{tag_dir}: EMA entries {unknown[:3]} are not parameters of the model")
        state = {k: (ema[k].float() if k in ema else v) for k, v in state.items()}
        weights = "ema"
    step = client.get("step")
    run_dir = tag_dir.parent.parent if (tag_dir.parent.parent / "config.yaml").is_file() else None
    return LoadedModel(_build(cfg, state, tag_dir), cfg, tag_dir, "deepspeed", weights,
                       int(step) if isinstance(step, int) else None, run_dir)


def _tag_step(tag_dir: Path) -> int:
    m = _TAG.match(tag_dir.name)
    return int(m.group(1)) if m else -1


def load_model(path: str | Path, use_ema: bool = True, config_path: str | Path | None = None) -> LoadedModel:
    """Load a model for evaluation from a run directory, a DeepSpeed checkpoint (directory or tag) or
    a consolidated file; see the module docstring.  Raises :class:`CheckpointError` naming the path."""
    from avi_scale.engine.checkpoint import resolve

    path = Path(path)
    config_path = Path(config_path) if config_path is not None else None
    if config_path is not None and not config_path.is_file():
        raise CheckpointError(f"config file not found: {config_path}")
    if path.is_file():
        return _from_file(path, use_ema, config_path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} (give a run directory, a DeepSpeed checkpoint "
                              "directory or tag, or a consolidated .pt file)")
    if (path / "config.yaml").is_file():  # a run directory
        run_cfg = load_config(path / "config.yaml")
        ckpt_dirs = [path / "checkpoints"]
        if run_cfg.train.checkpoint_dir:
            ckpt_dirs.insert(0, Path(run_cfg.train.checkpoint_dir))
        tag = next((t for t in (resolve(d) for d in ckpt_dirs if d.is_dir()) if t is not None), None)
        export = path / EXPORT_NAME
        if export.is_file():
            loaded = _from_file(export, use_ema, config_path)
            if tag is None or (loaded.step is not None and loaded.step >= _tag_step(tag)):
                loaded.run_dir = path
                return loaded
        if tag is not None:
            loaded = _from_deepspeed(tag, use_ema, config_path)
            loaded.run_dir = path
            return loaded
        raise CheckpointError(f"run directory {path} has no complete checkpoint (looked in "
                              f"{', '.join(str(d) for d in ckpt_dirs)}) and no {EXPORT_NAME}")
    tag = resolve(path)
    if tag is None:
        raise CheckpointError(f"{path} holds no complete DeepSpeed checkpoint (no 'latest' or stepNNNNNNNN/ tag "
                              "with a COMPLETE marker) and is not a run directory (no config.yaml)")
    return _from_deepspeed(tag, use_ema, config_path)


# what an evaluation may not change in a checkpoint's config (config.apply_overrides(..., fixed=...))
FIXED_BY_CHECKPOINT = {"model": "the model is fixed by the checkpoint"}
