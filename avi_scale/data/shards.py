"""Reading samples out of tar shards: grouping members by key, decoding PNG/cls, checking them.

Samples are consecutive members ``<key>.png`` and ``<key>.cls`` (the key is the member name up to the
first dot of its base name, as in webdataset).  The loaders, ``avi-shards verify`` and the tests share
these functions, so a corrupt shard reads the same everywhere: a :class:`ShardError` naming the shard,
the sample key and the member.
"""

from __future__ import annotations

import io
from typing import BinaryIO, Iterator, Optional

import numpy as np
from PIL import Image

from avi_scale.data.errors import ShardError

IMAGE_KEY = "png"
LABEL_KEY = "cls"
_MODES = {1: "L", 3: "RGB"}


def split_member_name(name: str) -> tuple[str, str]:
    """``"dir/abc.png"`` -> ``("dir/abc", "png")``; the extension may contain further dots."""
    folder, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return "", ""
    return folder + slash + stem, ext.lower()


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0", b"7")


class TarFormatError(ValueError):
    """The bytes are not (or no longer) a well-formed tar archive."""


def _read_exactly(stream: BinaryIO, size: int, what: str, offset: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarFormatError(f"unexpected end of data in {what} at byte {offset} ({len(data)} of {size} bytes)")
    return data


def _octal(field: bytes, offset: int) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number {field!r} in the tar header at byte {offset}") from None


def _pax_path(records: bytes) -> Optional[str]:
    """The ``path`` of a pax extended header (records ``"<len> key=value\\n"``), if any."""
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        length = int(records[pos:space])
        key, _, value = records[space + 1:pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
        pos += length
    return None


def iter_tar_members(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of a tar stream (ustar, pax and GNU long names).

    A lean reader for the hot path (Python's ``tarfile`` spends more time parsing headers than PIL spends
    decoding a small PNG); it checks every header's checksum and requires the end-of-archive block, so a
    cut anywhere, even at a member boundary, raises :class:`TarFormatError`.
    """
    offset = 0
    long_name: Optional[str] = None
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            raise TarFormatError(f"unexpected end of data at byte {offset + len(header)} (no end-of-archive block)")
        if header == _ZERO_BLOCK:
            return
        stored = _octal(header[148:156], offset)
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32
        if stored != unsigned and stored != unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127):
            raise TarFormatError(f"bad tar header checksum at byte {offset} (not a tar archive, or corrupt)")
        size = _octal(header[124:136], offset)
        kind = header[156:157]
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX prefix (GNU keeps times there)
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        data = _read_exactly(stream, size, f"member {name.decode('utf-8', 'replace')!r}", offset + _BLOCK)
        padding = -size % _BLOCK
        if padding:
            _read_exactly(stream, padding, "padding", offset + _BLOCK + size)
        offset += _BLOCK + size + padding
        if kind in _REGULAR:
            yield long_name or name.decode("utf-8"), data
            long_name = None
        elif kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode("utf-8")
        elif kind == b"x":  # pax extended header of the next member
            long_name = _pax_path(data) or long_name
        elif kind != b"g":  # directories, links, ...: skipped, and so is any name meant for them
            long_name = None


def iter_tar_samples(url: str, stream: BinaryIO, expected: Optional[int] = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(key, {ext: bytes})`` for each sample of a tar stream, in order.

    ``expected``: the manifest's sample count; when the stream is read to its end, fewer or more samples
    raise :class:`ShardError`.
    """
    count = 0
    key: Optional[str] = None
    members: dict[str, bytes] = {}
    try:
        for name, data in iter_tar_members(stream):
            name_key, ext = split_member_name(name)
            if not ext:
                raise ShardError(f"shard {url}: member {name!r} has no '.<ext>' suffix (expected <key>.png, <key>.cls)")
            if name_key != key:
                if key is not None:
                    count += 1
                    yield key, members
                key, members = name_key, {}
            if ext in members:
                raise ShardError(f"shard {url}: sample {key!r} has member {ext!r} twice")
            members[ext] = data
    except (TarFormatError, OSError) as exc:
        where = f"in or after sample {key!r}, number {count + 1}" if key is not None else "before the first sample"
        raise ShardError(f"shard {url} is truncated or corrupt: {exc} ({where}"
                         + (f"; the manifest says {expected} samples)" if expected is not None else ")")) from None
    if key is not None:
        count += 1
        yield key, members
    if expected is not None and count < expected:
        raise ShardError(f"shard {url} is truncated: it holds {count} samples, the manifest says {expected}")
    if expected is not None and count > expected:
        raise ShardError(f"shard {url} holds {count} samples but the manifest says {expected} (stale manifest?)")


def decode_image(url: str, key: str, data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """PNG bytes -> uint8 array (H, W, C), checked against the manifest's ``shape``."""
    height, width, channels = shape
    where = f"shard {url}, sample {key!r}, member '{IMAGE_KEY}'"
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ShardError(f"{where}: not a decodable image ({type(exc).__name__}: {exc})") from None
    if image.format != "PNG":
        raise ShardError(f"{where}: holds a {image.format} image, expected PNG")
    if image.mode != _MODES[channels]:
        raise ShardError(f"{where}: image mode {image.mode!r}, expected {_MODES[channels]!r} ({channels} channel(s))")
    if image.size != (width, height):
        raise ShardError(f"{where}: image is {image.size[1]}x{image.size[0]} (HxW), the manifest says "
                         f"{height}x{width}")
    array = np.asarray(image, dtype=np.uint8)
    return array.reshape(height, width, channels)


def decode_label(url: str, key: str, data: bytes) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"shard {url}, sample {key!r}, member '{LABEL_KEY}': {data[:20]!r} is not an "
                         f"integer") from None


def decode_sample(url: str, key: str, members: dict, shape: tuple[int, int, int]) -> tuple[np.ndarray, int]:
    """Image (H, W, C) uint8 and integer label of one sample; a :class:`ShardError` names what is wrong."""
    for needed in (IMAGE_KEY, LABEL_KEY):
        if needed not in members:
            raise ShardError(f"shard {url}, sample {key!r}: no '{needed}' member "
                             f"(it has: {', '.join(sorted(members))})")
    return decode_image(url, key, members[IMAGE_KEY], shape), decode_label(url, key, members[LABEL_KEY])
