"""The training engine: DeepSpeed, the one training loop, checkpoints, EMA, metrics.

``train(cfg, report=None) -> dict`` is the entry point used by ``avi-train``, the cluster
launchers and Ray Tune; see :mod:`avi_scale.engine.loop` and ``docs/engine.md``.
"""

from avi_scale.engine.checkpoint import (CheckpointSaveError, OutputDirError, UnsafeCheckpointError,
                                        export_consolidated, load_exported)
from avi_scale.engine.loop import TrainingDiverged, train

__all__ = ["CheckpointSaveError", "OutputDirError", "TrainingDiverged", "UnsafeCheckpointError",
           "export_consolidated", "load_exported", "train"]
