"""Process-group plumbing for the engine: launcher environment, accelerator choice, collectives.

Every launcher we support (the ``deepspeed`` launcher with ``--no_local_rank``, ``torchrun``,
DeepSpeed's slurm runner / plain ``srun``, or none at all) is reduced to the same environment:
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.  A bare
``python -m avi_scale.cli`` run gets single-process defaults (and a free port) so that DeepSpeed does
not go looking for MPI.  :func:`process_group` is the whole set-up and tear-down (launch environment,
device, group, shutdown) for the engine and ``avi-eval`` alike; a launch that cannot work raises
:class:`LaunchError`.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The launcher's environment or the requested device cannot work (names what is missing)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env() -> dict[str, str]:
    """Launcher variables derived from SLURM's, for tasks started by ``srun`` without a launcher
    of their own (DeepSpeed's slurm runner starts the script directly under ``srun``)."""
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"],
           "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    if int(out["WORLD_SIZE"]) > 1 and "MASTER_ADDR" not in env:
        raise LaunchError("running under srun with several tasks but MASTER_ADDR is not set; "
                           "export MASTER_ADDR (the first host of the allocation) and MASTER_PORT")
    return out


@contextlib.contextmanager
def launch_environment() -> Iterator[None]:
    """Fill in missing launcher variables for the duration of a run and restore them afterwards.

    An existing process group (made by the caller) decides RANK/WORLD_SIZE; else ``RANK`` present means a launcher
    (deepspeed, torchrun) set everything; else SLURM variables are translated; otherwise the
    process is alone: rank 0 of 1 on 127.0.0.1 with a free port.
    """
    saved = {k: os.environ.get(k) for k in _LAUNCH_VARS}
    if dist.is_initialized():  # a group made by the caller (e.g. a Ray Train worker): it knows best
        os.environ["RANK"] = str(dist.get_rank())
        os.environ["WORLD_SIZE"] = str(dist.get_world_size())
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "0")
    elif "RANK" not in os.environ:
        filled = _slurm_env()
        if not filled:
            filled = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        filled.setdefault("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))
        filled.setdefault("MASTER_PORT", os.environ.get("MASTER_PORT") or str(free_port()))
        os.environ.update(filled)
    else:
        os.environ.setdefault("LOCAL_RANK", "0")
        missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise LaunchError(f"RANK is set but {missing} are not: start the job through a launcher "
                               "(deepspeed, torchrun, srun) or unset RANK for a single-process run")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def resolve_device(requested: str, hint: str = "") -> str:
    """'auto' becomes 'cuda' when a GPU is visible, else 'cpu'; ``hint`` ends the error message."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise LaunchError("train.device=cuda but no CUDA device is visible" + hint)
    return requested


def select_accelerator(device: str) -> None:
    """Tell DeepSpeed which accelerator to use before it is imported (it caches its detection)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(device: str, group_when_alone: bool = True) -> World:
    """Bind this rank's device and initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on
    CUDA), unless a group exists.  ``group_when_alone=False``: a lone process (``WORLD_SIZE`` 1) makes no
    group and does not import DeepSpeed (``avi-eval``); its World is rank 0 of 1."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized() and (group_when_alone or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        select_accelerator(device)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   auto_mpi_discovery=False, verbose=False)
    rank, world_size = rank_and_world_size()
    return World(rank, world_size, local_rank, dev)


@contextlib.contextmanager
def process_group(requested_device: str, group_when_alone: bool = True, device_hint: str = "") -> Iterator[World]:
    """The whole set-up for one run on this rank: the device (:func:`resolve_device`), the launch
    environment, the process group (:func:`init_process_group`); on leaving, the group this call made is
    shut down (after a barrier on a normal exit) and the environment restored.  A group made by the
    caller (Ray Train) is used and left alone."""
    device = resolve_device(requested_device, device_hint)
    select_accelerator(device)
    with launch_environment():
        created = not dist.is_initialized()
        world = init_process_group(device, group_when_alone)
        try:
            yield world
        except BaseException:
            if created:
                shutdown(barrier_first=False)
            raise
        if created:
            shutdown()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shutdown(barrier_first: bool = True) -> None:
    """Tear the process group down, after a barrier on a normal exit (a rank that leaves early can
    make another one abort).  DeepSpeed's own destroy also drops the groups it cached, so a later
    run in the same process (tests, reused Ray workers) starts clean."""
    if not dist.is_initialized():
        return
    if barrier_first:
        dist.barrier()
    import deepspeed.comm

    deepspeed.comm.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum or max) when there is more than one rank; returns ``t``."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


def all_gather_object(obj: Any) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
