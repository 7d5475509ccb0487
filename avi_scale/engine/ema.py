"""Exponential moving average of the weights, kept in fp32, correct under every ZeRO stage.

Each rank averages exactly the weights it owns: the full parameters under ZeRO 0-2 (replicated on
every rank), its own partition (``param.ds_tensor``) under ZeRO-3.  So the EMA costs no
communication per step and, under ZeRO-3, 1/world of the fp32 model per rank.  Evaluation swaps the
averages into the live weights (into the partitions under ZeRO-3, which the forward hooks then
gather as usual) and swaps the trained weights back afterwards.  ``full_state_dict`` assembles the
whole fp32 average on rank 0 for sampling and, in ``state_dict``, for checkpoints; ``load_state_dict``
cuts it back into this rank's share, so a checkpoint's EMA does not depend on the world size.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def _owned(p: torch.Tensor) -> torch.Tensor:
    """The part of ``p`` this rank holds: its ZeRO-3 partition, else the parameter itself."""
    return p.ds_tensor.data if _is_partitioned(p) else p.data


class EMA:
    def __init__(self, module: nn.Module, decay: float, release: Optional[Callable[[], None]] = None):
        """``release``: drops gathered full copies of partitioned weights (ZeRO-3:
        ``engine.empty_partition_cache``); called around every swap."""
        self.decay = decay
        self.release = release
        self.num_updates = 0
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.partitioned = any(_is_partitioned(p) for _, p in self.params)
        with torch.no_grad():
            self.shadow = [_owned(p).detach().float().clone() for _, p in self.params]

    def current_decay(self) -> float:
        """The decay is warmed up, min(decay, (1 + n) / (10 + n)), so that short runs (and the
        first steps of long ones) are not dominated by the initial weights."""
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current weights in; call after every applied optimizer step."""
        weight = 1.0 - self.current_decay()
        sources = [_owned(p).float() for _, p in self.params]
        torch._foreach_lerp_(self.shadow, sources, weight)
        self.num_updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the module computes with the averaged weights (every rank must enter)."""
        backup = []
        if self.release is not None:
            self.release()
        with torch.no_grad():
            for (_, p), s in zip(self.params, self.shadow):
                t = _owned(p)
                backup.append(t.clone())
                t.copy_(s)
        try:
            yield
        finally:
            if self.release is not None:
                self.release()
            with torch.no_grad():
                for (_, p), b in zip(self.params, backup):
                    _owned(p).copy_(b)

    # -- whole-model views (collective under ZeRO-3) -------------------------------------------
    def full_state_dict(self) -> Optional[dict[str, torch.Tensor]]:
        """The fp32 averages of all parameters on CPU, on rank 0 (None elsewhere under ZeRO-3).

        Every rank must call it: under ZeRO-3 it gathers the partitions to rank 0.
        """
        if not self.partitioned:
            return {n: s.detach().cpu().clone() for (n, _), s in zip(self.params, self.shadow)}
        flat = torch.cat([s.view(-1) for s in self.shadow])
        world = dist.get_world_size()
        rank = dist.get_rank()
        if world == 1:
            parts = [flat]
        else:
            parts = [torch.empty_like(flat) for _ in range(world)] if rank == 0 else None
            dist.gather(flat, parts, dst=0)
        if rank != 0:
            return None
        out, offset = {}, 0
        for (name, p), s in zip(self.params, self.shadow):
            k = s.numel()
            whole = torch.cat([part[offset:offset + k] for part in parts])[:p.ds_numel]
            out[name] = whole.view(p.ds_shape).cpu().clone()
            offset += k
        return out

    def state_dict(self) -> dict:
        """``{"state_dict": full fp32 averages, "num_updates", "decay"}`` for the checkpoint's client state
        (the averages on rank 0 only under ZeRO-3; every rank must call it)."""
        return {"state_dict": self.full_state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        """Take this rank's share of the full averages of a :meth:`state_dict` (from any world size)."""
        averages = state["state_dict"]
        missing = [n for n, _ in self.params if n not in averages]
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        rank = dist.get_rank() if self.partitioned else 0
        with torch.no_grad():
            for (name, p), s in zip(self.params, self.shadow):
                full = averages[name].to(device=s.device, dtype=torch.float32).reshape(-1)
                if self.partitioned:
                    k = s.numel()
                    padded = torch.zeros(k * dist.get_world_size(), dtype=full.dtype, device=full.device)
                    padded[:full.numel()] = full
                    s.copy_(padded[rank * k:(rank + 1) * k])
                else:
                    s.copy_(full.view_as(s))
        self.num_updates = state["num_updates"]
