"""``avi-tune``: run a Ray Tune search (hyperparameters, depth) whose trials are engine training runs.

Heavy modules (Ray, torch, DeepSpeed) are imported after argument parsing, so ``--help`` is instant.

Exit status: 0 every trial finished or was stopped by the scheduler; 1 some trials failed (after their
retries); 2 bad config or arguments; 130 interrupted (continue with ``--resume``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from avi_scale import version

EPILOG = """examples:
  avi-tune configs/search/tiny_mnist5k_depth_lr.yaml
  avi-tune configs/search/tiny_mnist5k_depth_lr.yaml tune.num_samples=4 tune.storage=/scratch/tune
  avi-tune configs/search/tiny_mnist5k_depth_lr.yaml --resume          # after Ctrl+C or a crash
  avi-tune configs/search/cifar10_depth_study.yaml --address auto      # on a running Ray cluster
  avi-tune configs/search/tiny_mnist5k_depth_lr.yaml --print-config    # check the search, start nothing

The search YAML is an experiment config (optionally `base: <config>` relative to it) with a `tune:`
section: metric, mode, scheduler (asha|pbt|fifo), search_alg, num_samples, resources and the
search_space (config key -> [values] | {grid_search|choice: [...]} | {loguniform|uniform: [lo, hi]} |
{randint|lograndint: [lo, hi]} | {quniform|qloguniform: [lo, hi, q]}).  See docs/tune.md."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avi-tune", description="Ray Tune search over avi-scale configs; each trial is an engine training run.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("search", help="search YAML, or a packaged search's name (e.g. tiny_mnist5k_depth_lr; see configs/search/)")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotlist overrides applied after the YAML, e.g. tune.num_samples=8 train.steps=2000")
    p.add_argument("--resume", action="store_true",
                   help="continue the search stored at tune.storage/tune.name: unfinished trials go on from their "
                        "latest checkpoints, finished ones are kept")
    p.add_argument("--retry-errored", action="store_true",
                   help="with --resume: also continue failed trials from their latest checkpoints")
    p.add_argument("--restart-errored", action="store_true",
                   help="with --resume: also rerun failed trials from scratch")
    p.add_argument("--address", help="Ray cluster to use (auto, HOST:PORT or ray://HOST:PORT); "
                                     "default: start a local Ray for this search")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs of the local Ray (default: all visible)")
    p.add_argument("--ray-temp-dir", help="temporary directory of the local Ray (default: Ray's)")
    p.add_argument("--verbose", type=int, choices=(0, 1, 2, 3), default=1, help="Ray Tune's progress output (default 1)")
    p.add_argument("--print-config", action="store_true",
                   help="check the search, print its resolved config and search space, start nothing")
    return p


def _describe(plan) -> str:
    lines = [f"search {plan.name!r}: {plan.num_trials()} trial(s) at {plan.experiment_path}",
             f"  metric {plan.cfg.tune.metric} ({plan.cfg.tune.mode}), scheduler {plan.cfg.tune.scheduler}, "
             f"search algorithm {plan.cfg.tune.search_alg}, training to step {plan.end_step}",
             f"  results in {plan.results_dir}"]
    for d in plan.dims:
        lines.append(f"  {d.name}: {d.kind} {list(d.args)}")
    if not plan.dims:
        lines.append("  (empty search space: num_samples copies of the base config)")
    return "\n".join(lines)


def tune_main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_intermixed_args(argv)

    from avi_scale.config import ConfigError, load_config, to_yaml
    from avi_scale.tune.search import plan_search

    try:
        cfg = load_config(args.search, args.overrides, kind="search")
        plan = plan_search(cfg)
    except ConfigError as exc:
        print(f"avi-tune: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(plan.cfg), end="")
        print(_describe(plan))
        return 0

    from avi_scale.tune.search import run_search

    resume_command = shlex.join(["avi-tune", args.search, *args.overrides, "--resume"])
    try:
        outcome = run_search(cfg, resume=args.resume, retry_errored=args.retry_errored,
                             restart_errored=args.restart_errored, address=args.address, num_cpus=args.num_cpus,
                             num_gpus=args.num_gpus, ray_temp_dir=args.ray_temp_dir, verbose=args.verbose,
                             log=lambda msg: print(msg, flush=True))
    except ConfigError as exc:
        print(f"avi-tune: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl+C: Ray skipped its last state snapshot
        print(f"avi-tune: interrupted; continue with: {resume_command}", file=sys.stderr)
        return 130
    print((outcome.files["markdown"]).read_text())
    for kind, path in outcome.files.items():
        print(f"avi-tune: {kind}: {path}")
    if outcome.interrupted:
        print(f"avi-tune: interrupted with unfinished trials; continue with: {resume_command}", file=sys.stderr)
        return 130
    if outcome.num_errors:
        print(f"avi-tune: {outcome.num_errors} trial(s) failed (see the error column and the trial logs); "
              "rerun them with --resume --retry-errored or --restart-errored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(tune_main())
