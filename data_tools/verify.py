"""``avi-shards verify``: re-read every shard against its manifest and list what is wrong.

Checks per shard: it can be opened and read to the end as a tar, its sha256 and size match, it holds the
manifest's number of samples, every sample has exactly a ``png`` and a ``cls`` member under a dot-free
key, and (unless ``decode=False``) every image decodes to the manifest's shape and every label is an
integer.  Where the manifest names `wids` indexes (``<split>.wids.json``), each must list the split's
shards with their sample counts, in order.  Works on local directories, ``s3://`` and ``http(s)://``
prefixes.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO, Iterable, Optional

MAX_SAMPLE_PROBLEMS = 5  # per shard, then a count


class _Hashing:
    """Wraps a stream, hashing and counting every byte read through it."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.sha = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def verify_shard(url: str, entry: dict, shape: tuple[int, int, int], decode: bool) -> list[str]:
    from avi_scale.data.errors import DataError, ShardError
    from avi_scale.data.openers import open_url
    from avi_scale.data.shards import IMAGE_KEY, LABEL_KEY, decode_sample, iter_tar_samples

    problems: list[str] = []
    bad_samples = 0

    def sample_problem(message: str) -> None:
        nonlocal bad_samples
        bad_samples += 1
        if bad_samples <= MAX_SAMPLE_PROBLEMS:
            problems.append(message)

    count = 0
    try:
        with open_url(url) as raw:
            stream = _Hashing(raw)
            for key, members in iter_tar_samples(url, stream):  # type: ignore[arg-type]
                count += 1
                if "." in key.rpartition("/")[2]:
                    sample_problem(f"shard {url}, sample {key!r}: the key contains a dot")
                extra = sorted(set(members) - {IMAGE_KEY, LABEL_KEY})
                if extra:
                    sample_problem(f"shard {url}, sample {key!r}: unexpected member(s) {', '.join(extra)}")
                if decode:
                    try:
                        decode_sample(url, key, members, shape)
                    except ShardError as exc:
                        sample_problem(str(exc))
                else:
                    for needed in (IMAGE_KEY, LABEL_KEY):
                        if needed not in members:
                            sample_problem(f"shard {url}, sample {key!r}: no '{needed}' member")
            stream.drain()
    except DataError as exc:
        return problems + [str(exc)]
    if bad_samples > MAX_SAMPLE_PROBLEMS:
        problems.append(f"shard {url}: {bad_samples - MAX_SAMPLE_PROBLEMS} more bad samples not listed")
    if count != entry["count"]:
        problems.append(f"shard {url}: holds {count} samples, the manifest says {entry['count']}")
    if stream.bytes != entry.get("bytes", stream.bytes):
        problems.append(f"shard {url}: {stream.bytes} bytes, the manifest says {entry['bytes']}")
    if stream.sha.hexdigest() != entry["sha256"]:
        problems.append(f"shard {url}: sha256 {stream.sha.hexdigest()} differs from the manifest's {entry['sha256']}")
    return problems


def verify_wids_index(url: str, split: str, entries: list[dict]) -> list[str]:
    """Problems of the `wids` index at ``url`` against the manifest's shard ``entries`` of ``split``."""
    import json

    from avi_scale.data.errors import DataError
    from avi_scale.data.openers import open_url

    try:
        with open_url(url) as stream:
            index = json.loads(stream.read())
    except DataError as exc:
        return [f"wids index of split {split!r}: {exc}"]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"wids index {url} is not valid JSON: {exc}"]
    if not isinstance(index, dict) or index.get("wids_version") != 1 or not isinstance(index.get("shardlist"), list):
        return [f"wids index {url}: not a wids_version 1 description with a 'shardlist'"]
    listed = [(s.get("url"), s.get("nsamples")) if isinstance(s, dict) else (None, None) for s in index["shardlist"]]
    expected = [(e["name"], e["count"]) for e in entries]
    if listed != expected:
        return [f"wids index {url}: its shardlist {listed[:3]}{'...' if len(listed) > 3 else ''} differs from the "
                f"manifest's {split!r} shards {expected[:3]}{'...' if len(expected) > 3 else ''}"]
    return []


def verify(location: str, splits: Optional[Iterable[str]] = None, decode: bool = True) -> tuple[list[str], str]:
    """Problems found (empty when all is well) and a one-line summary."""
    from avi_scale.data.errors import DataError
    from avi_scale.data.manifest import dataset_root, join_url, read_manifest

    try:
        manifest = read_manifest(location)
    except DataError as exc:
        return [str(exc)], "manifest unreadable"
    root = dataset_root(location)
    wanted = list(splits) if splits else list(manifest["splits"])
    missing = [s for s in wanted if s not in manifest["splits"]]
    if missing:
        have = ", ".join(manifest["splits"])
        return [f"the manifest has no split(s) {', '.join(missing)} (it has: {have})"], "bad request"
    shape = tuple(manifest["image"]["shape"])
    problems: list[str] = []
    shards = samples = 0
    for split in wanted:
        index = manifest.get("wids", {}).get(split)
        if index:
            problems += verify_wids_index(join_url(root, index), split, manifest["splits"][split]["shards"])
        for entry in manifest["splits"][split]["shards"]:
            problems += verify_shard(join_url(root, entry["name"]), entry, shape, decode)  # type: ignore[arg-type]
            shards += 1
            samples += entry["count"]
    summary = (f"{len(wanted)} split(s), {shards} shard(s), {samples} samples of {'x'.join(map(str, shape))} "
               f"images in {root}")
    return problems, summary
