"""Console entry points.  Heavy modules (torch, deepspeed, the data stack) are imported inside the
verbs, after argument parsing, so ``--help`` answers at once.

``avi-train CONFIG [key=value ...] [--print-config] [--dry-run]`` runs the one training loop
(:func:`avi_scale.engine.train`) on this rank.  Start it alone (``python -m avi_scale.cli`` or
``avi-train``) for one process, or under a launcher (``deepspeed --no_local_rank``, ``torchrun``,
``srun``): the rank comes from ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``; a ``--local_rank`` argument
from a launcher is accepted and ignored.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avi-train",
        description="Train an attentive hierarchical VAE with DeepSpeed (one process per rank).",
        epilog="Example: avi-train configs/tiny_mnist5k.yaml train.steps=50 deepspeed.zero_stage=2",
    )
    p.add_argument("config", help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotlist overrides applied after the YAML, e.g. model.num_layers=8")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config and the data URLs, build the model, report parameters, FLOPs "
                        "and the DeepSpeed config; start no process group and train nothing")
    # launchers without --no_local_rank append --local_rank=N; the rank comes from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _dry_run(cfg) -> int:
    """What the run would be, without starting it.  Raises on unreadable data or a shape mismatch."""
    from avi_scale.data import read_manifest, split_urls
    from avi_scale.data.manifest import resolve_split
    from avi_scale.engine.deepspeed_config import build_ds_config
    from avi_scale.engine.metrics import count_flops
    from avi_scale.model import AttentiveVAE

    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    t, m = cfg.train, cfg.model
    lines = [f"config: {cfg.name} (valid)"]
    slots = world * t.gradient_accumulation_steps
    for split in ("train", "val", "test"):
        try:
            urls = split_urls(cfg.data, split)
        except ValueError:
            if split == "train":
                raise
            lines.append(f"data[{split}]: none")
            continue
        shards = resolve_split(urls, split)
        h, w, c = shards.image_shape
        if (h, w, c) != (m.image_size, m.image_size, m.image_channels):
            raise ValueError(f"data[{split}] images are {h}x{w}x{c} but model.image_size/image_channels "
                             f"expect {m.image_size}x{m.image_size}x{m.image_channels}")
        read_manifest(urls)
        lines.append(f"data[{split}]: {len(shards.urls)} shard(s), {shards.num_samples} images, {h}x{w}x{c} ({urls})")
        if split == "train":
            per_epoch = shards.num_samples // (slots * t.micro_batch_size)
            if per_epoch < 1:
                raise ValueError(f"the training split has {shards.num_samples} images, fewer than one global "
                                 f"batch of {slots * t.micro_batch_size}")
            lines.append(f"steps: {t.steps} ({t.steps / per_epoch:.2f} epochs of {per_epoch} steps; global batch "
                         f"{slots * t.micro_batch_size} = {world} rank(s) x {t.gradient_accumulation_steps} "
                         f"micro-batch(es) x {t.micro_batch_size})")
    model = AttentiveVAE(m)
    n_params = sum(p.numel() for p in model.parameters())
    flops = count_flops(m)
    lines.append(f"model: {n_params / 1e6:.3f}M parameters, {m.num_layers} latent layers, "
                 f"activation checkpointing {'on' if m.activation_checkpointing else 'off'}")
    lines.append(f"FLOPs per image: forward {flops['forward_per_image'] / 1e9:.3f} GFLOP, "
                 f"train step {flops['train_per_image'] / 1e9:.3f} GFLOP")
    import json

    lines.append(f"deepspeed config (world size {world}):")
    lines.append(json.dumps(build_ds_config(cfg, world), indent=2))
    print("\n".join(lines))
    return 0


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """``avi-train``: returns the process exit status (0 ok, 2 bad config/data, 3 training diverged)."""
    args = _train_parser().parse_intermixed_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    from avi_scale.config import ConfigError, load_config, to_yaml

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"avi-train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        if _is_rank0():
            print(to_yaml(cfg), end="")
        return 0
    if args.dry_run:
        from avi_scale.data import DataError

        try:
            return _dry_run(cfg) if _is_rank0() else 0
        except (DataError, ValueError) as exc:
            print(f"avi-train --dry-run: {exc}", file=sys.stderr)
            return 2

    from avi_scale.engine import TrainingDiverged, train

    try:
        metrics = train(cfg)
    except TrainingDiverged as exc:
        print(f"avi-train: training diverged: {exc}", file=sys.stderr)
        return 3
    if _is_rank0():
        keys = ("step", "val_neg_elbo", "val_bpd", "skipped_steps", "checkpoint", "export")
        print("avi-train: done: " + ", ".join(f"{k}={metrics[k]}" for k in keys if k in metrics))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
