"""The export users share: a folder with ``model.safetensors`` (the weights, no pickle) and ``config.yaml``
(the run's resolved config), as Hugging Face-style model folders are.

The training engine writes it beside ``final/model.pt`` at the end of a run (the EMA weights, with the
BatchNorm statistics); :meth:`AttentiveVAE.from_pretrained` and ``avi-eval`` read it.  This is the model
package's one piece of file I/O; it reads and writes nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.yaml"


class PretrainedError(ValueError):
    """A folder that is not an avi-scale export, naming what is missing or does not fit."""


def save_pretrained(state: Mapping[str, torch.Tensor], config_yaml: str, out_dir: str | Path,
                    metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``state`` (fp32 CPU copies) as ``model.safetensors`` and ``config_yaml`` as ``config.yaml``
    into ``out_dir`` (each written to a temporary name first, then renamed); returns ``out_dir``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
               for k, v in state.items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
    tmp.replace(out / WEIGHTS_NAME)
    tmp = out / (CONFIG_NAME + ".tmp")
    tmp.write_text(config_yaml)
    tmp.replace(out / CONFIG_NAME)
    return out


def is_pretrained_dir(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS_NAME).is_file()


def load_pretrained(path: str | Path) -> tuple[dict[str, torch.Tensor], Any, dict[str, str]]:
    """(state dict, ExperimentConfig, metadata) of an export folder; :class:`PretrainedError` naming the file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from avi_scale.config import ConfigError, load_config

    folder = Path(path)
    weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    for needed in (weights, config):
        if not needed.is_file():
            raise PretrainedError(f"{folder} is not an avi-scale export: {needed.name} is missing "
                                  f"(an export holds {WEIGHTS_NAME} and {CONFIG_NAME})")
    try:
        state = load_file(str(weights))
        with safe_open(str(weights), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise PretrainedError(f"{weights} is not a readable safetensors file: {exc}") from None
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise PretrainedError(f"{config}: {exc}") from None
    return state, cfg, metadata


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> torch.nn.Module:
    """Load ``state`` strictly into ``model``; :class:`PretrainedError` naming ``source`` and the keys or
    shapes that do not fit."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PretrainedError(f"{source}: the weights do not fit the model of its config (model.*): "
                              f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:3]})")
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise PretrainedError(f"{source}: the weights do not fit: {len(wrong)} tensors have other shapes than the "
                              f"model of its config (file vs model): {'; '.join(wrong[:3])}")
    model.load_state_dict(dict(state))
    return model
