"""The DeepSpeed JSON, derived from the experiment config (never "auto" values).

Every number DeepSpeed would otherwise default is written out, ``gradient_clipping`` above all
(DeepSpeed 0.19 defaults it to 1.0 and clips silently).  The optimizer is not in the JSON: the
engine passes a torch optimizer (Adamax / AdamW) to ``deepspeed.initialize``, which avoids
compiling FusedAdam and keeps the same optimizer on CPU and GPU.

``deepspeed.extra`` carries DeepSpeed sections of the user's own (``flops_profiler``, ``comms_logger``,
``monitor``, ``aio``, ...): merged in key by key; setting a key the config derives to another value is a
:class:`ConfigError` naming the extra key and the config key it comes from.  The merged JSON is what the
engine passes to DeepSpeed and saves as ``<output_dir>/ds_config.json``.
"""

from __future__ import annotations

from typing import Any

from avi_scale.config import ConfigError, ExperimentConfig

# where the derived values come from, for the message of a conflicting deepspeed.extra key
_SOURCES = {
    "train_batch_size": "train.micro_batch_size x train.gradient_accumulation_steps x the world size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "optim.gradient_clipping",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.overlap_comm": "deepspeed.overlap_comm",
    "zero_optimization.contiguous_gradients": "deepspeed.contiguous_gradients",
    "zero_optimization.reduce_bucket_size": "deepspeed.reduce_bucket_size",
    "zero_optimization.allgather_bucket_size": "deepspeed.allgather_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size": "deepspeed.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_max_live_parameters": "deepspeed.stage3_max_live_parameters",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_param",
    "torch_autocast": "train.precision",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "checkpoint.load_universal": "deepspeed.load_universal",
}


def _source(path: str) -> str:
    for key in sorted(_SOURCES, key=len, reverse=True):
        if path == key or path.startswith(key + "."):
            return f"which the config derives from {_SOURCES[key]}: set that instead, or drop the extra key"
    return "which the engine sets itself (avi_scale/engine/deepspeed_config.py says why): drop the extra key"


def merge_extra(derived: dict, extra: dict[str, Any], prefix: str = "") -> dict:
    """``derived`` with ``extra`` merged in key by key; a leaf that ``derived`` sets differently raises."""
    out = dict(derived)
    for key, value in extra.items():
        path = f"{prefix}{key}"
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge_extra(out[key], value, path + ".")
        elif out[key] != value:
            raise ConfigError(f"deepspeed.extra.{path}={value!r} conflicts with {out[key]!r}, {_source(path)}")
    return out


def build_ds_config(cfg: ExperimentConfig, world_size: int) -> dict:
    """The DeepSpeed config for ``world_size`` data-parallel ranks."""
    t, o, ds = cfg.train, cfg.optim, cfg.deepspeed
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_scatter": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_partitions": True,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.zero_stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size,
            "stage3_max_live_parameters": ds.stage3_max_live_parameters,
            # No parameter stays gathered outside the module using it: the EMA swaps weights into
            # the ZeRO-3 partitions for evaluation, and a persistent full copy would bypass the swap.
            "stage3_max_reuse_distance": 0,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": False,
        })
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": ds.pin_memory}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": ds.pin_memory}

    derived = {
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "gradient_clipping": float(o.gradient_clipping),
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "zero_optimization": zero,
        # torch optimizers under ZeRO, also when the optimizer state is offloaded to the CPU
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # Mixed precision through torch autocast (DeepSpeed's torch_autocast section): weights,
        # gradients and optimizer state stay fp32, convolutions and matmuls run in bf16/fp16, fp16
        # with DeepSpeed's dynamic GradScaler.  DeepSpeed's bf16/fp16 modes cast the weights but
        # not the buffers, and BatchNorm kernels reject low-precision weights with fp32 statistics.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": t.precision != "fp32",
                           "dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(t.precision, "float32")},
        "checkpoint": {"load_universal": ds.load_universal},
        "steps_per_print": None,  # the engine logs; DeepSpeed's own progress lines are off
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    return merge_extra(derived, ds.extra)
