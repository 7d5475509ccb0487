"""Ray Tune searches whose trials are runs of the engine's one training loop.

* :mod:`avi_scale.tune.space`: ``tune.search_space`` (config key -> values/distribution) -> Ray param space.
* :mod:`avi_scale.tune.trainable`: the trial (``train(cfg, report=...)`` in one process, or a Ray Train
  ``TorchTrainer`` whose workers call it), reporting each evaluation with its DeepSpeed checkpoint.
* :mod:`avi_scale.tune.search`: check a search config, build the Tuner (ASHA/PBT/FIFO, optional
  Optuna/HyperOpt), run or resume it.
* :mod:`avi_scale.tune.results`: results table (CSV + Markdown), best config YAML, depth plot.
* :mod:`avi_scale.tune.cli`: the ``avi-tune`` command.

Ray is imported only when a search runs.  See docs/tune.md.
"""

from avi_scale.tune.search import SearchOutcome, SearchPlan, plan_search, run_search

__all__ = ["SearchOutcome", "SearchPlan", "plan_search", "run_search"]
