"""Console entry points.  Heavy modules (torch, deepspeed, the data stack) are imported inside the
verbs, after argument parsing, so ``--help`` answers at once.

``avi-train CONFIG [key=value ...] [--print-config] [--check] [--dry-run]`` runs the one training loop
(:func:`avi_scale.engine.train`) on this rank.  Start it alone (``python -m avi_scale.cli`` or
``avi-train``) for one process, or under a launcher (``deepspeed --no_local_rank``, ``torchrun``,
``srun``): the rank comes from ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``; a ``--local_rank`` argument
from a launcher is accepted and ignored.

``--check`` is what the scripts in ``launch/`` run (one process, before they start any rank): the
config, the data (manifests, image shape, a global batch that fits the training split at
``--world-size``) and the output directories (could they be created and written?), creating nothing.

Exit status: 0 ok; 2 rejected (bad config, unreadable or corrupt data, an output directory that cannot be
written, a checkpoint holding more than tensors and plain data); 3 training diverged (a checkpoint was
saved); 4 a checkpoint could not be saved (disk full, unwritable; the previous complete checkpoint is
intact).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from avi_scale import version


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avi-train",
        description="Train an attentive hierarchical VAE with DeepSpeed (one process per rank).",
        epilog="Example: avi-train configs/tiny_mnist5k.yaml train.steps=50 deepspeed.zero_stage=2",
    )
    p.add_argument("config", help="experiment YAML, or a packaged config's name (e.g. cifar10_attentive; see configs/)")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotlist overrides applied after the YAML, e.g. model.num_layers=8")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, the data URLs and the output directories, build the model, report "
                        "parameters, FLOPs and the DeepSpeed config; start no process group and train nothing")
    p.add_argument("--check", action="store_true",
                   help="validate the config, the data and the output directories quietly (what the launch scripts "
                        "run before starting ranks); exit 2 naming the problem, create nothing")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks the run will have, for --check/--dry-run (default: WORLD_SIZE, else 1)")
    # launchers without --no_local_rank append --local_rank=N; the rank comes from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def _world_size(arg: Optional[int]) -> int:
    if arg is not None:
        if arg < 1:
            raise ValueError(f"--world-size must be >= 1, got {arg}")
        return arg
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))


def _output_problems(cfg) -> list[str]:
    """Output directories that could not be created or written (nothing is created)."""
    from avi_scale.engine.checkpoint import output_dir_problem

    t = cfg.train
    problems = [output_dir_problem(t.output_dir, "train.output_dir")]
    if t.checkpoint_dir:
        problems.append(output_dir_problem(t.checkpoint_dir, "train.checkpoint_dir"))
    return [p for p in problems if p]


def _check_data(cfg, world: int) -> list[str]:
    """One line per split; raises on a missing/unreadable manifest, a shape mismatch or a batch that does
    not fit the training split."""
    from avi_scale.data import SplitNotConfigured, split_shards
    from avi_scale.data.manifest import SPLITS

    t, m = cfg.train, cfg.model
    lines = []
    slots = world * t.gradient_accumulation_steps
    for split in SPLITS:
        try:
            shards = split_shards(cfg.data, split)  # also sets the run's I/O policy
        except SplitNotConfigured:
            if split == "train":
                raise
            lines.append(f"data[{split}]: none")
            continue
        h, w, c = shards.image_shape
        if (h, w, c) != (m.image_size, m.image_size, m.image_channels):
            raise ValueError(f"data[{split}] images are {h}x{w}x{c} but model.image_size/image_channels "
                             f"expect {m.image_size}x{m.image_size}x{m.image_channels}")
        lines.append(f"data[{split}]: {len(shards.urls)} shard(s), {shards.num_samples} images, {h}x{w}x{c} "
                     f"({shards.location})")
        if split == "train":
            per_epoch = shards.num_samples // (slots * t.micro_batch_size)
            if per_epoch < 1:
                raise ValueError(f"the training split has {shards.num_samples} images, fewer than one global "
                                 f"batch of {slots * t.micro_batch_size} = {world} rank(s) x "
                                 f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} x "
                                 f"train.micro_batch_size={t.micro_batch_size}: lower train.micro_batch_size")
            lines.append(f"steps: {t.steps} ({t.steps / per_epoch:.2f} epochs of {per_epoch} steps; global batch "
                         f"{slots * t.micro_batch_size} = {world} rank(s) x {t.gradient_accumulation_steps} "
                         f"micro-batch(es) x {t.micro_batch_size})")
    return lines


def _check(cfg, world: int) -> int:
    """``--check``: data, output directories and the DeepSpeed JSON (with ``deepspeed.extra``); quiet on
    success (the launch scripts' stdout stays theirs)."""
    from avi_scale.engine.deepspeed_config import build_ds_config

    build_ds_config(cfg, world)
    _check_data(cfg, world)
    problems = _output_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    print(f"avi-train --check: {cfg.name}: config, data and output directories ok for {world} rank(s)",
          file=sys.stderr)
    return 0


def _dry_run(cfg, world: int) -> int:
    """What the run would be, without starting it.  Raises on unreadable data or a shape mismatch."""
    from avi_scale.engine.deepspeed_config import build_ds_config
    from avi_scale.model.flops import count_flops
    from avi_scale.model import AttentiveVAE, count_parameters

    m = cfg.model
    lines = [f"config: {cfg.name} (valid)"] + _check_data(cfg, world)
    problems = _output_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    lines.append(f"output: {cfg.train.output_dir} (writable; checkpoints in "
                 f"{cfg.train.checkpoint_dir or cfg.train.output_dir + '/checkpoints'})")
    model = AttentiveVAE(m)
    n_params = count_parameters(model)
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
    """``avi-train``: returns the process exit status (0 ok, 2 rejected before training: config, data or output
    directory; 3 training diverged; 4 a checkpoint could not be saved)."""
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
    if args.dry_run or args.check:
        from avi_scale.data import DataError

        verb = "--dry-run" if args.dry_run else "--check"
        try:
            world = _world_size(args.world_size)
            if not _is_rank0():
                return 0
            return _dry_run(cfg, world) if args.dry_run else _check(cfg, world)
        except (DataError, ValueError) as exc:
            print(f"avi-train {verb}: {exc}", file=sys.stderr)
            return 2
    if not cfg.data.train_urls:
        print("avi-train: data.train_urls: required for training: a dataset directory holding manifest.json or a "
              "shard pattern", file=sys.stderr)
        return 2

    from avi_scale.data import DataError
    from avi_scale.engine import CheckpointSaveError, OutputDirError, TrainingDiverged, UnsafeCheckpointError, train

    try:
        metrics = train(cfg)
    except TrainingDiverged as exc:
        print(f"avi-train: training diverged: {exc}", file=sys.stderr)
        return 3
    except (DataError, OutputDirError, UnsafeCheckpointError) as exc:
        print(f"avi-train: {exc}", file=sys.stderr)
        return 2
    except CheckpointSaveError as exc:
        print(f"avi-train: {exc}", file=sys.stderr)
        return 4
    if _is_rank0():
        keys = ("step", "val_neg_elbo", "val_bpd", "skipped_steps", "checkpoint", "export")
        print("avi-train: done: " + ", ".join(f"{k}={metrics[k]}" for k in keys if k in metrics))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
