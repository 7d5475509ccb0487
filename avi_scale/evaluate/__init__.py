"""Evaluation of trained attentive VAEs: likelihood, pictures, report (``docs/evaluate.md``).

* :mod:`~avi_scale.evaluate.nll`: negative ELBO and importance-weighted -log p(x) (nats/image,
  bits/dim, standard errors), active units and layers, on one process or across ranks;
* :mod:`~avi_scale.evaluate.figures`: sample grids, reconstructions, depth-wise attention, KL heat map,
  curves (PNG);
* :mod:`~avi_scale.evaluate.report`: one Markdown + self-contained HTML page;
* :mod:`~avi_scale.evaluate.loading`: run directories, DeepSpeed checkpoints, consolidated files (the
  engine's one reader, :func:`avi_scale.engine.export.load_model`);
* :mod:`~avi_scale.evaluate.cli`: the ``avi-eval`` console script (:func:`eval_main`).
"""

from __future__ import annotations

import importlib
from typing import Any

# exported lazily, so that ``avi-eval --help`` (which imports this package) does not import torch
_EXPORTS = {
    "CheckpointError": "avi_scale.evaluate.loading", "LoadedModel": "avi_scale.evaluate.loading",
    "load_model": "avi_scale.evaluate.loading", "NLLResult": "avi_scale.evaluate.nll",
    "evaluate_nll": "avi_scale.evaluate.nll",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'avi_scale.evaluate' has no attribute {name!r}")
