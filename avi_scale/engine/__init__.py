"""The training engine: DeepSpeed, the one training loop, checkpoints, EMA, metrics.

``train(cfg, report=None) -> dict`` is the entry point used by ``avi-train``, the cluster
launchers and Ray Tune; see :mod:`avi_scale.engine.trainer` and ``docs/engine.md``.
"""

from avi_scale.engine.checkpoint import CheckpointSaveError, OutputDirError, UnsafeCheckpointError
from avi_scale.engine.components.state import noise_seed
from avi_scale.engine.export import export_consolidated, load_exported
from avi_scale.engine.trainer import TrainingDiverged, train

__all__ = ["CheckpointSaveError", "OutputDirError", "TrainingDiverged", "UnsafeCheckpointError",
           "export_consolidated", "load_exported", "noise_seed", "train"]
