"""Loading a trained model for evaluation: the engine's one reader, :func:`avi_scale.engine.export.load_model`.

It accepts a run directory (the newer of ``final/model.pt`` and the latest complete DeepSpeed checkpoint),
a DeepSpeed checkpoint directory or tag (consolidated to fp32; EMA from the client state), the consolidated
export file, or a bare state dict with its ``config.yaml``; every file is read with
``torch.load(weights_only=True)`` and whatever cannot be loaded raises :class:`CheckpointError` naming it.
The EMA weights are used when present (``eval.use_ema``); :class:`LoadedModel` says which were used.
"""

from __future__ import annotations

from avi_scale.engine.export import EXPORT_NAME, CheckpointError, LoadedModel, load_model

__all__ = ["EXPORT_NAME", "FIXED_BY_CHECKPOINT", "CheckpointError", "LoadedModel", "load_model"]


# what an evaluation may not change in a checkpoint's config (config.apply_overrides(..., fixed=...))
FIXED_BY_CHECKPOINT = {"model": "the model is fixed by the checkpoint"}
