"""The model under DeepSpeed: built identically on every rank, with its optimizer, step guard and EMA;
and what the engine does to the whole model (BatchNorm statistics averaged over ranks, a weight hash).

The optimizer is a torch ``Adamax``/``AdamW`` handed to ``deepspeed.initialize``; its step guard
(:mod:`avi_scale.engine.optim`) gets the global gradient norm from DeepSpeed's ZeRO/bf16/fp16 wrapper when
there is one, else from the engine (:attr:`ModelParts.wrapped`).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from avi_scale.config import ExperimentConfig
from avi_scale.engine import distributed as D
from avi_scale.engine.deepspeed_config import build_ds_config
from avi_scale.engine.distributed import World
from avi_scale.engine.ema import EMA
from avi_scale.engine.optim import StepGuard, build_optimizer


@dataclass
class ModelParts:
    engine: "torch.nn.Module"  # the DeepSpeed engine; ``engine.module`` is the AttentiveVAE
    optimizer: torch.optim.Optimizer  # the guarded torch optimizer handed to DeepSpeed
    guard: StepGuard
    ema: EMA
    ds_config: dict
    params: list[torch.Tensor]  # trained parameters (their gradients' norm without a DeepSpeed wrapper)
    num_parameters: int
    train_flops_per_image: float  # counted on rank 0 (0 elsewhere)
    wrapped: bool  # DeepSpeed wraps the optimizer (ZeRO 1-3, bf16, fp16) and computes the gradient norm
    zero3: bool


def build_model(cfg: ExperimentConfig, world: World) -> ModelParts:
    """Seed, build the AttentiveVAE (identical initial weights on every rank: ZeRO-3 partitions each
    rank's own copy), its optimizer and the DeepSpeed engine, and the EMA of its weights."""
    import deepspeed

    from avi_scale.model import AttentiveVAE, count_parameters
    from avi_scale.model.flops import count_flops

    t = cfg.train
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    model = AttentiveVAE(cfg.model)
    num_parameters = count_parameters(model)
    flops = count_flops(cfg.model)["train_per_image"] if world.is_main else 0.0
    guard = StepGuard(t.skip_threshold)
    optimizer = build_optimizer(model, cfg.optim, guard)
    ds_config = build_ds_config(cfg, world.world_size)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    wrapped = engine.optimizer is not optimizer
    if wrapped:  # DeepSpeed's ZeRO/bf16/fp16 optimizer computes the global norm before our step
        wrapper = engine.optimizer
        guard.norm_source = lambda: wrapper._global_grad_norm
    zero3 = engine.zero_optimization_stage() == 3
    params = [p for p in engine.module.parameters() if p.requires_grad]
    # under ZeRO-3, gathered weights outlive a no-grad forward: drop them whenever the EMA
    # swaps values into (and out of) the partitions, so that the next forward gathers those
    ema = EMA(engine.module, t.ema_decay, engine.empty_partition_cache if zero3 else None)
    return ModelParts(engine, optimizer, guard, ema, ds_config, params, num_parameters, flops, wrapped, zero3)


def average_buffers(module: torch.nn.Module, world_size: int) -> None:
    """Average BatchNorm running statistics over ranks (each rank saw its own batches; collective)."""
    if world_size == 1:
        return
    for b in module.buffers():
        if b.is_floating_point():
            D.all_reduce(b.data)
            b.data /= world_size


def param_fingerprint(module: torch.nn.Module, zero3: bool) -> str:
    """SHA-256 of the full fp32 weights (gathered under ZeRO-3: collective)."""
    h = hashlib.sha256()
    for p in module.parameters():
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                h.update(p.detach().float().cpu().numpy().tobytes())
        else:
            h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()
