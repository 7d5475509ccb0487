"""Helpers of tests/test_faults.py: launching real jobs with injected faults, killing them, read-only and
full filesystems, and an S3 server that can be stopped and restarted on the same port.

* :func:`job_env`: the environment of a launched job (``helpers.launch_env``: venv tools first, CPU
  DeepSpeed, one thread per rank) with ``tests/fault_inject`` on ``PYTHONPATH`` and the faults to inject
  (see its ``sitecustomize.py``);
* :class:`Job`: a launch script or ``avi-train`` started in the background (output to a log file), its
  process tree, :meth:`Job.wait_paused` for a rank that reached its injected pause point;
* :func:`readonly_dir_command` / :func:`full_disk_command`: run a command with a directory made
  read-only, or on a small tmpfs that fills up, through a user + mount namespace (``unshare``), which
  also works as root (where ``chmod`` does not stop writes);
* :class:`RestartableMotoServer`: moto's S3 server whose ``stop()`` really stops it (listener closed and
  every open connection reset) and whose ``start()`` brings it back on the same port with the same
  buckets (moto keeps its state in the process).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from helpers import REPO, launch_env

INJECT = Path(__file__).resolve().parent / "fault_inject"


def job_env(faults: Sequence[dict] = (), fault_dir: Optional[Path] = None, **extra: str) -> dict:
    env = launch_env()
    if faults:
        env["AVI_FAULT"] = json.dumps(list(faults))
        env["AVI_FAULT_DIR"] = str(fault_dir)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(INJECT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


class Job:
    """A command in the background, its output in ``log``; ``pids()`` is its process tree."""

    def __init__(self, cmd: Sequence[str], log: Path, env: dict, cwd: Path = REPO):
        self.cmd, self.log = list(cmd), log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log.read_text()

    def pids(self) -> list[int]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [p.pid for p in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def tree(self) -> dict[int, str]:
        """pid -> command line of the job's processes."""
        import psutil

        out = {}
        for pid in self.pids():
            try:
                out[pid] = " ".join(psutil.Process(pid).cmdline())
            except psutil.Error:
                pass
        return out

    def wait_for(self, what: str, ready, timeout: float = 300.0, poll: float = 0.05):
        """Poll ``ready()`` until it returns something truthy; fail if the job ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = ready()
            if got:
                return got
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended (rc {self.proc.returncode}) before {what}:\n{self.output()[-4000:]}")
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()[-4000:]}")

    def wait_paused(self, fault_dir: Path, fault: dict, timeout: float = 300.0) -> int:
        """Wait until the rank of ``fault`` reached its pause point; returns that rank's pid."""
        name = fault.get("name") or f"{fault['kind']}-rank{fault['rank']}-step{fault['step']}"
        path = fault_dir / f"{name}.json"
        self.wait_for(f"rank {fault['rank']} pausing at step {fault['step']} ({fault['kind']})",
                      path.is_file, timeout)
        return json.loads(path.read_text())["pid"]

    def wait(self, timeout: float = 400.0) -> int:
        """The exit status; a job still running after ``timeout`` is killed (whole tree) and fails the test."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise AssertionError(f"{self.cmd} still ran after {timeout} s:\n{self.output()[-4000:]}") from None
        finally:
            self._log.close()

    def kill_tree(self) -> None:
        """Clean-up after a failed test: SIGKILL whatever of this job still runs."""
        import psutil

        for pid in self.pids():
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()


def wait_gone(pids: Sequence[int], timeout: float = 60.0) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); returns those still alive at the deadline."""
    import psutil

    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if alive:
            time.sleep(0.1)
    return [p.pid for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


# -- filesystems through a user + mount namespace ------------------------------------------------------------
def namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


def _in_namespace(script: str, *args: str) -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args]


def readonly_dir_command(directory: Path, cmd: Sequence[str]) -> list[str]:
    """``cmd`` with ``directory`` bind-mounted read-only over itself (EROFS for every user, root included)."""
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" "$1" && shift && exec "$@"'
    return _in_namespace(script, str(directory), *cmd)


def full_disk_command(mount_dir: Path, size_kb: int, seed_from: Optional[Path], copy_back_to: Path,
                      cmd: Sequence[str]) -> list[str]:
    """``cmd`` with a ``size_kb`` tmpfs over ``mount_dir`` (filled first with a copy of ``seed_from``); when
    ``cmd`` ends, the tmpfs's content is copied to ``copy_back_to`` (it vanishes with the namespace) and
    ``cmd``'s exit status is returned.  Writes past the size fail with ENOSPC, as on a full disk."""
    script = ('mount -t tmpfs -o size="$2"k avi-full "$1" || exit 90\n'
              'if [ -n "$3" ]; then cp -a "$3"/. "$1"/ || exit 91; fi\n'
              'dir=$1; back=$4; shift 4\n'
              '"$@"; rc=$?\n'
              'cp -a "$dir"/. "$back"/ || exit 92\n'
              'exit $rc')
    return _in_namespace(script, str(mount_dir), str(size_kb), str(seed_from or ""), str(copy_back_to), *cmd)


# -- an S3 server that stops for real and comes back --------------------------------------------------------
class RestartableMotoServer:
    """moto's S3 server on 127.0.0.1; ``stop()`` closes the listener and resets every open connection,
    ``start()`` serves the same (in-process) buckets again on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._server = None
        self._thread: Optional[threading.Thread] = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import logging

        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        app = DomainDispatcherApplication(create_backend_app)
        server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        real_process = server.process_request

        def process_request(request, client_address):
            with self._lock:
                self._conns.append(request)
            real_process(request, client_address)

        server.process_request = process_request
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        self.starts += 1

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            conns, self._conns = self._conns, []
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=10)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
