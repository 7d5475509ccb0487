"""avi-scale: the attentive VAE of "Deep Attentive Variational Inference" (ICLR 2022) at cluster scale.

Rooms (docs/architecture.md): ``config`` (schema + loader), ``data`` (shards -> batches), ``model`` (pure
torch), ``engine`` (the DeepSpeed training loop, checkpoints, export), ``evaluate``, ``tune`` (Ray Tune),
``plots``; the command-line entry points are ``cli`` (avi-train), ``evaluate.cli``, ``tune.cli`` and
``data_tools.cli``.
"""


def version() -> str:
    """The installed distribution's version (``avi-train --version``)."""
    from importlib.metadata import version as _version

    return _version("avi-scale")
