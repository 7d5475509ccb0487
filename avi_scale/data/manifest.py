"""``manifest.json``: what a shard directory holds, written last by ``avi-shards`` and read by the loaders.

Format (version 1)::

    {
      "format": "avi-scale-shards", "version": 1,
      "name": "mnist5k",                       # dataset name
      "created": "2025-01-01T00:00:00+00:00", "command": "avi-shards mnist5k --out data/mnist5k",
      "source": {...},                         # what was converted (paths, official splits, notes)
      "image": {"shape": [28, 28, 1], "dtype": "uint8", "encoding": "png"},   # (H, W, C)
      "keys": {"image": "png", "label": "cls"},
      "num_classes": 10, "class_names": ["0", ..., "9"],   # 0 and null for unlabelled data (cls = -1)
      "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1,
      "shard_limits": {"max_mb": 64.0, "max_samples": 1000},
      "splits": {
        "train": {"count": 4000, "pattern": "train-{000000..000003}.tar",
                  "shards": [{"name": "train-000000.tar", "count": 1000, "bytes": 1034240,
                              "sha256": "..."}, ...],
                  "mean": [0.1307], "std": [0.3081]},        # per channel, of pixel/255
        "val": {...}, "test": {...}
      }
    }

Shard names are ``<split>-<6 digits>.tar`` beside the manifest; ``pattern`` is relative to the manifest's
directory and brace-expands to exactly the listed shards, in order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import braceexpand

from avi_scale.data.errors import ManifestError, NotFoundError
from avi_scale.data.openers import configure_for, open_url

MANIFEST_NAME = "manifest.json"
FORMAT = "avi-scale-shards"
VERSION = 1
SPLITS = ("train", "val", "test")


def join_url(base: str, name: str) -> str:
    """``base`` (a directory, prefix or URL) joined with a relative ``name``."""
    if base in ("", "."):
        return name
    return base.rstrip("/") + "/" + name


def url_dir(url: str) -> str:
    head, sep, _ = url.rstrip("/").rpartition("/")
    if not sep:
        return "."
    if head.endswith(":/") or head.endswith("://"):  # s3://bucket, http://host
        return url.rstrip("/")
    return head


def _basename(url: str) -> str:
    return url.rstrip("/").rpartition("/")[2]


def is_shard_pattern(url: str) -> bool:
    """True for shard URLs/patterns (``.../train-{000000..000003}.tar``), false for a dataset directory."""
    last = _basename(url)
    return ".tar" in last or "{" in last


def dataset_root(url_or_dir: str) -> str:
    """The directory/prefix holding ``manifest.json`` for a dataset dir, a manifest URL or a shard pattern."""
    if _basename(url_or_dir).endswith(".json") or is_shard_pattern(url_or_dir):
        return url_dir(url_or_dir)
    return url_or_dir.rstrip("/") or "."


def manifest_url(url_or_dir: str) -> str:
    if _basename(url_or_dir).endswith(".json"):
        return url_or_dir
    return join_url(dataset_root(url_or_dir), MANIFEST_NAME)


def read_manifest(url_or_dir: str) -> dict:
    """Read and check the manifest of a dataset (local dir, ``s3://`` or ``http(s)://`` prefix, shard
    pattern, or the manifest's own URL).  Raises :class:`ManifestError` naming the URL when it is missing
    or malformed."""
    url = manifest_url(url_or_dir)
    try:
        with open_url(url) as stream:
            text = stream.read()
    except NotFoundError:
        raise ManifestError(f"no {MANIFEST_NAME} at {url}: shards must sit beside the manifest written by "
                            f"avi-shards (an interrupted conversion has none; re-run it)") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{url} is not valid JSON: {exc}") from None
    check_manifest(manifest, url)
    return manifest


def check_manifest(manifest: Any, url: str) -> None:
    """Raise :class:`ManifestError` naming the field when ``manifest`` is not a version-1 manifest."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ManifestError(f"{url}: {what}")

    need(isinstance(manifest, dict), "not a JSON object")
    need(manifest.get("format") == FORMAT, f"'format' is {manifest.get('format')!r}, expected {FORMAT!r}")
    need(manifest.get("version") == VERSION, f"'version' is {manifest.get('version')!r}, expected {VERSION}")
    image = manifest.get("image")
    need(isinstance(image, dict) and isinstance(image.get("shape"), list) and len(image["shape"]) == 3
         and all(isinstance(v, int) and v > 0 for v in image["shape"]), "'image.shape' must be [H, W, C]")
    need(image["shape"][2] in (1, 3), f"'image.shape' has {image['shape'][2]} channels; 1 or 3 supported")
    need(image.get("dtype") == "uint8" and image.get("encoding") == "png", "images must be uint8 PNG")
    splits = manifest.get("splits")
    need(isinstance(splits, dict) and splits, "'splits' is missing or empty")
    for name, split in splits.items():
        need(isinstance(split, dict) and isinstance(split.get("shards"), list) and split["shards"],
             f"split {name!r} has no 'shards' list")
        for shard in split["shards"]:
            need(isinstance(shard, dict) and isinstance(shard.get("name"), str) and "/" not in shard["name"]
                 and isinstance(shard.get("count"), int) and shard["count"] > 0,
                 f"split {name!r}: bad shard entry {shard!r}")
        need(sum(s["count"] for s in split["shards"]) == split.get("count"),
             f"split {name!r}: 'count' differs from the sum of its shard counts")
        expanded = list(braceexpand.braceexpand(split.get("pattern", "")))
        need(expanded == [s["name"] for s in split["shards"]],
             f"split {name!r}: 'pattern' {split.get('pattern')!r} does not expand to its shard names")


@dataclass(frozen=True)
class SplitShards:
    """The shards one loader reads, in order, with their sample counts from the manifest."""

    manifest: dict
    manifest_url: str
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    location: str  # the configured URL(s) they were resolved from

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        h, w, c = self.manifest["image"]["shape"]
        return h, w, c


_TRAIN_URLS_HELP = ("a dataset directory holding manifest.json (e.g. data/mnist5k, s3://bucket/cifar10) or a "
                    "shard pattern (e.g. data/mnist/train-{000000..000009}.tar)")


class SplitNotConfigured(ValueError):
    """The ``data`` config names no URLs for a split (a ``ValueError``: the config is what is wrong)."""


def split_urls(data_cfg: Any, split: str) -> str:
    """The URL(s) for ``split``: ``data.<split>_urls``, else ``data.train_urls`` when it names a dataset
    directory/prefix (then the manifest gives each split's shards).  :class:`SplitNotConfigured` when
    there are none."""
    urls = getattr(data_cfg, f"{split}_urls", None)
    if urls:
        return urls
    if data_cfg.train_urls and not is_shard_pattern(data_cfg.train_urls):
        return data_cfg.train_urls
    if split == "train":
        raise SplitNotConfigured(f"data.train_urls: required for training: {_TRAIN_URLS_HELP}")
    raise SplitNotConfigured(f"data.{split}_urls is not set (and data.train_urls is not a dataset directory whose "
                     f"manifest could name the {split!r} shards)")


def split_shards(data_cfg: Any, split: str) -> SplitShards:
    """The shards of ``split`` ("train", "val" or "test") of a ``data`` config section, with their counts.

    The one place where URLs are resolved (loaders, ``avi-train --check``): the URLs come from
    :func:`split_urls` (:class:`SplitNotConfigured` when the config names none for ``split``); a dataset
    directory/prefix gives the manifest's pattern for ``split``, a brace pattern names shards that its
    directory's manifest must list.  Sets the run's I/O policy first (endpoint, retries, timeouts:
    :func:`~avi_scale.data.openers.configure_for`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    configure_for(data_cfg)
    urls = split_urls(data_cfg, split)
    root = dataset_root(urls)
    manifest = read_manifest(root)
    murl = manifest_url(root)
    if is_shard_pattern(urls):
        shard_urls = list(braceexpand.braceexpand(urls))
    else:
        if split not in manifest["splits"]:
            raise ManifestError(f"{murl} has no {split!r} split (it has: {', '.join(manifest['splits'])})")
        shard_urls = [join_url(root, name) for name in braceexpand.braceexpand(manifest["splits"][split]["pattern"])]
    counts = _listed_counts(shard_urls, root, manifest, murl)
    if len(set(shard_urls)) != len(shard_urls):
        raise ManifestError(f"{urls!r} names some shards more than once")
    return SplitShards(manifest, murl, tuple(shard_urls), counts, urls)


def _listed_counts(shard_urls: list[str], root: str, manifest: dict, murl: str) -> tuple[int, ...]:
    """The manifest's sample count of each shard; every shard must sit in ``root`` and be listed."""
    known = {s["name"]: s["count"] for part in manifest["splits"].values() for s in part["shards"]}
    counts = []
    for url in shard_urls:
        if url_dir(url) != root:
            raise ManifestError(f"shard {url} is not in {root}: one pattern must name shards of one directory")
        if _basename(url) not in known:
            raise ManifestError(f"shard {url} is not listed in {murl}")
        counts.append(known[_basename(url)])
    return tuple(counts)
