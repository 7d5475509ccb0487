"""Real servers and data builders for tests/test_data.py and tests/test_faults.py (imported there; their
fixtures ``s3_endpoint`` and ``aws_env`` are in tests/conftest.py).

* ``AWS_ENV``: fake AWS credentials; :func:`moto_auth`, :func:`make_bucket` for the moto S3 server;
  ``FAST_IO``: the loaders' I/O retry and timeout settings, short for tests.
* :class:`HTTPServer`: serves a directory; can cut one file mid-body and then go away.
* :class:`CuttingProxy`: a TCP proxy in front of the S3 server that drops every connection after N bytes
  (and optionally stops accepting after the first drop: the server "goes away").
* dataset builders (sklearn digits, unique-id arrays, CIFAR pickles, IDX files, chardata.mat, folders)
  and :func:`read_split`, which reads a split's shards back sample by sample.
"""

from __future__ import annotations

import http.server
import io
import pickle
import socket
import tarfile
import threading
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import numpy as np

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
           "AWS_DEFAULT_REGION": "us-east-1"}
FAST_IO = {"io_retries": 3, "io_timeout_s": 3.0, "io_backoff_s": 0.05, "batch_timeout_s": 60.0}


def moto_auth(endpoint: str, enforce: bool) -> None:
    """Make the moto server check credentials (then unknown access keys are refused) or stop checking."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0" if enforce else b"inf",
                                     method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=60).read()


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)


class HTTPServer:
    """A threaded static file server on 127.0.0.1; ``cut`` = (file name, bytes) sends only that many bytes
    of the file (announcing its full length), then closes the connection and shuts the server down."""

    def __init__(self, root: Path, cut: Optional[tuple[str, int]] = None):
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                if cut is not None and self.path.endswith("/" + cut[0]):
                    data = (root / cut[0]).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: cut[1]])
                    self.wfile.flush()
                    self.close_connection = True
                    threading.Thread(target=outer.stop, daemon=True).start()
                    return
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False  # server_close() then waits for the request threads
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.server.shutdown()
            self.server.server_close()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)


class CuttingProxy:
    """TCP proxy to ``127.0.0.1:upstream_port`` that closes each connection after ``cut_after`` bytes sent to
    the client; with ``die_after_cut`` it also stops listening at the first cut."""

    def __init__(self, upstream_port: int, cut_after: int, die_after_cut: bool = False):
        self.upstream_port, self.cut_after, self.die_after_cut = upstream_port, cut_after, die_after_cut
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._lock = threading.Lock()
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            pumps = [threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True),
                     threading.Thread(target=self._pump, args=(upstream, client, self.cut_after), daemon=True)]
            with self._lock:
                self._sockets += [client, upstream]
                self._threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, source: socket.socket, target: socket.socket, limit: Optional[int]) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    target.sendall(data[: limit - sent])
                    self.cuts += 1
                    if self.die_after_cut:
                        self.stop()
                    break
                target.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def stop(self) -> None:
        """Close everything; from the test thread also wait for the proxy's threads to end."""
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        except OSError:
            pass
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
        if threading.current_thread() not in threads:
            for thread in threads:
                thread.join(timeout=5)


# ------------------------------------------------------------------------------------------ data


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits (grey levels 0..16) as uint8 0..255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images)
    assert images.min() == 0 and images.max() == 16 and np.all(images == np.round(images))
    return (images * 255 / 16).round().astype(np.uint8), data.target.astype(np.int64)


def unique_id_arrays(n: int, side: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random images whose label is their index: every sample is identified by its label."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, side, side), dtype=np.uint8), np.arange(n, dtype=np.int64)


def write_cifar10_dir(root: Path, per_batch: int = 4, test: int = 6, seed: int = 0) -> dict:
    """Official-format CIFAR-10 python pickles (bytes keys); returns {split: (images HWC, labels)}."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out: dict = {"train": ([], [])}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        (folder / name).write_bytes(pickle.dumps({b"batch_label": name.encode(), b"data": data, b"labels": labels}))
        hwc = data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
        if name == "test_batch":
            out["test"] = (hwc, np.array(labels))
        else:
            out["train"][0].append(hwc)
            out["train"][1].extend(labels)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"class{i}".encode() for i in range(10)]}))
    out["train"] = (np.concatenate(out["train"][0]), np.array(out["train"][1]))
    return out


def write_cifar100_dir(root: Path, train: int = 10, test: int = 5, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, n in (("train", train), ("test", test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, size=n).tolist(), rng.integers(0, 20, size=n).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"fine_labels": fine, b"coarse_labels": coarse}))
        out[name] = (data.reshape(n, 3, 32, 32).transpose(0, 2, 3, 1), np.array(fine), np.array(coarse))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                                b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}))
    return out


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    import gzip
    import struct

    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as archive:
        return [(m.name, archive.extractfile(m).read()) for m in archive.getmembers() if m.isfile()]


def rewrite_shard(path: Path, change: Callable[[str, bytes], Optional[tuple[str, bytes]]]) -> None:
    """Rewrite a shard member by member (``change`` returns the new (name, data), or None to drop it)."""
    members = [changed for name, data in tar_members(path) if (changed := change(name, data)) is not None]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def read_split(root: str, split: str) -> list[tuple[str, np.ndarray, int]]:
    """(key, image HWC uint8, label) of every sample of ``split``, in shard order."""
    from avi_scale.data.manifest import join_url, read_manifest
    from avi_scale.data.openers import open_url
    from avi_scale.data.shards import decode_sample, iter_tar_samples

    manifest = read_manifest(root)
    shape = tuple(manifest["image"]["shape"])
    out = []
    for shard in manifest["splits"][split]["shards"]:
        url = join_url(root, shard["name"])
        with open_url(url) as stream:
            for key, members in iter_tar_samples(url, stream, shard["count"]):
                image, label = decode_sample(url, key, members, shape)
                out.append((key, image, label))
    return out
