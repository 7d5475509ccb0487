"""Shared test settings (CPU DeepSpeed, a reused extension cache, small thread counts) and shared fixtures.

Module-scoped fixtures, each built once per test module that uses it:

* ``one_thread``: one intra-op torch thread in this process (test_engine, test_evaluate, test_faults use
  it through ``pytestmark = pytest.mark.usefixtures(...)``);
* ``quiet_exit``: no thread left running and no garbage behind at the module's end (test_data, test_faults);
* ``shards``: real MNIST digits sharded by ``avi-shards mnist5k`` (test_engine, test_faults, test_tune);
* ``config_file``: the tiny config on ``shards``, in the variant named by the module's ``TINY_CONFIG``
  (a key of ``helpers.TINY_CONFIGS``);
* ``s3_endpoint``: a moto S3 server on 127.0.0.1; and per test ``aws_env``, fake AWS credentials.

Non-fixture helpers are in tests/helpers.py (paths, launch environment, tiny config, metrics),
tests/data_fixtures.py (data builders, servers) and tests/fault_helpers.py (fault injection).
"""

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import REPO, VENV_BIN, launch_env, tiny_yaml

from data_fixtures import AWS_ENV

# the venv's tools first on PATH (deepspeed, torchrun, avi-*, and its ninja: DeepSpeed's op cache is
# keyed by the ninja version, so mixing the system's and the venv's rebuilds it again and again)
if os.environ.get("PATH", "").split(os.pathsep)[0] != str(VENV_BIN):
    os.environ["PATH"] = str(VENV_BIN) + os.pathsep + os.environ.get("PATH", "")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """In-process runs use one intra-op thread, like each rank of the launched runs (OMP_NUM_THREADS=1):
    on a shared 2-core machine spinning OpenMP threads stall each other, and per-image evaluation of a
    micro model is latency-bound, so one thread is fastest."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quiet_exit():
    """Leave no thread running and no garbage behind: if a daemon thread (a server's request thread, a
    queue feeder, tqdm's monitor) still runs Python while the interpreter shuts down and happens to
    garbage-collect tensors (e.g. held by exception tracebacks), torch's deallocator aborts the process."""
    import gc

    before = set(threading.enumerate())
    yield
    from tqdm import tqdm

    if tqdm.monitor is not None:  # the progress bars' monitor thread (in-process runs) wakes every 10 s
        tqdm.monitor.exit()
        tqdm.monitor = None
    deadline = time.monotonic() + 10
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    gc.collect()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """``avi-shards mnist5k --out DIR --no-progress`` (the venv's command, default splits)."""
    out = tmp_path_factory.mktemp("data") / "mnist5k"
    subprocess.run([str(VENV_BIN / "avi-shards"), "mnist5k", "--out", str(out), "--no-progress"],
                   check=True, capture_output=True, env=launch_env())
    return out


@pytest.fixture(scope="module")
def config_file(request, shards, tmp_path_factory) -> Path:
    """``tiny.yaml``: the tiny config on ``shards``, variant ``TINY_CONFIG`` of the requesting module."""
    variant = getattr(request.module, "TINY_CONFIG", None)
    if variant is None:
        raise pytest.UsageError(f"{request.module.__name__} uses config_file but sets no TINY_CONFIG")
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(tiny_yaml(shards, variant))
    return path


@pytest.fixture
def aws_env(monkeypatch):
    """Fake AWS credentials (``data_fixtures.AWS_ENV``) and no profile, endpoint or session token."""
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    return AWS_ENV


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (free port), started once per module and stopped; its URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
