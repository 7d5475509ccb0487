"""``avi-eval``: likelihood, pictures and a report page for a trained model.

    avi-eval nll     CHECKPOINT [--data URLS] [-K 1000] [--iw-chunk 100] [--out DIR] [key=value ...]
    avi-eval figures CHECKPOINT --out DIR [--data URLS] [--run RUN_DIR] [key=value ...]
    avi-eval report  CHECKPOINT --out DIR [--data URLS] [-K 1000] [--skip-nll] [key=value ...]
    avi-eval compare RUN_DIR... --out DIR      (seeds pooled; attentive vs local side by side)

CHECKPOINT is a run directory, a DeepSpeed checkpoint directory or tag, or a consolidated ``.pt`` file
(see :mod:`avi_scale.evaluate.loading`).  The config is the one saved with the checkpoint; ``key=value``
overrides (``eval.*``, ``data.*``, ``train.device``) apply on top, model keys are fixed.  Several ranks:
``torchrun --nproc_per_node=N -m avi_scale.evaluate.cli nll ...`` (or the ``deepspeed`` launcher); each
test image is evaluated once over all ranks and the sums are reduced; pictures are drawn by rank 0.
Heavy modules are imported only after the arguments are parsed, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from avi_scale import version


def _common_args(sp: argparse.ArgumentParser, out_required: bool) -> None:
    sp.add_argument("checkpoint", help="run directory, export folder (model.safetensors + config.yaml), "
                                       "DeepSpeed checkpoint directory/tag, or consolidated .pt file")
    sp.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides on top of the checkpoint's config (eval.*, data.*, train.device)")
    sp.add_argument("--out", type=Path, required=out_required,
                    help="output directory" + ("" if out_required else " (writes nll.json there)"))
    sp.add_argument("--config", type=Path, help="config YAML to use instead of the one saved with the weights "
                                                "(needed for a bare state dict without config.yaml beside it)")
    sp.add_argument("--data", metavar="URLS", help="shards of the evaluation split: a dataset directory/prefix "
                                                   "with manifest.json or a shard pattern (sets data.<split>_urls)")
    sp.add_argument("--split", choices=("val", "test"), help="evaluation split (eval.split; default test)")
    sp.add_argument("--seed", type=int, help="eval.seed: posterior noise and sampling")
    sp.add_argument("--raw-weights", action="store_true", help="use the trained weights, not the EMA (eval.use_ema=false)")
    sp.add_argument("--device", choices=("auto", "cpu", "cuda"), help="train.device for evaluation")

def _likelihood_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("-K", "--iw-samples", type=int, help="importance samples per image (eval.iw_samples)")
    sp.add_argument("--iw-chunk", type=int, help="importance samples evaluated at once (eval.iw_chunk; memory)")
    sp.add_argument("--batch-size", type=int, help="images per loader batch (eval.batch_size; no effect on results)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")

def _picture_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--run", type=Path, help="run directory with metrics.jsonl (default: the checkpoint's run)")
    sp.add_argument("--attention-layer", type=int, help="layer whose attention is drawn, 0-based, -1 = last "
                                                         "(eval.attention_layer)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avi-eval",
        description="Evaluate an attentive VAE: negative ELBO and importance-weighted -log p(x) (nats/image, "
                    "bits/dim, standard errors), sample/reconstruction/attention/KL pictures, a report page.",
        epilog="Examples: avi-eval nll runs/mnist -K 1000 --iw-chunk 250;  "
               "torchrun --nproc_per_node=4 -m avi_scale.evaluate.cli nll runs/mnist/final/model.pt --data data/mnist;  "
               "avi-eval report runs/mnist --out runs/mnist/report")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{nll,figures,report,compare}")

    nll = sub.add_parser("nll", help="negative ELBO and IW -log p(x) on the evaluation split",
                         description="Negative ELBO and importance-weighted -log p(x) on the evaluation split.")
    _common_args(nll, out_required=False)
    _likelihood_args(nll)
    fig = sub.add_parser("figures", help="sample grids, reconstructions, attention, KL heat map",
                         description="Sample grids per temperature, reconstructions, depth-wise attention, "
                                     "KL per layer over training and training curves, as PNG files.")
    _common_args(fig, out_required=True)
    _picture_args(fig)
    rep = sub.add_parser("report", help="likelihood + figures + one report page (Markdown and HTML)",
                         description="Everything: likelihood table, figures and report.md / report.html.")
    _common_args(rep, out_required=True)
    _likelihood_args(rep)
    _picture_args(rep)
    rep.add_argument("--skip-nll", action="store_true", help="leave the likelihood out of the report")
    cmp = sub.add_parser("compare", help="finished runs side by side: seed statistics, KL heat maps",
                         description="Compare finished runs (each evaluated with `avi-eval nll RUN --out RUN/test`): "
                                     "runs with the same config name are seeds of one experiment; writes "
                                     "compare.md/json, kl_heatmaps.png and kl_per_layer.png.")
    cmp.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    cmp.add_argument("--out", type=Path, required=True, help="output directory")
    cmp.add_argument("--nll-file", default="test/nll.json", help="each run's likelihood file, relative to the run")
    return p


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Dotlist overrides from the flags (applied after the positional ones, so flags win)."""
    out = []
    for flag, key in (("split", "eval.split"), ("seed", "eval.seed"), ("device", "train.device"),
                      ("iw_samples", "eval.iw_samples"), ("iw_chunk", "eval.iw_chunk"),
                      ("batch_size", "eval.batch_size"), ("attention_layer", "eval.attention_layer")):
        value = getattr(args, flag, None)
        if value is not None:
            out.append(f"{key}={value}")
    if args.raw_weights:
        out.append("eval.use_ema=false")
    return out


def _say(world, message: str) -> None:
    if world is None or world.is_main:
        print(message, flush=True)


def _run_nll(loaded, cfg, world, progress: bool):
    """The likelihood on this rank's share of the evaluation split, reduced over all ranks."""
    import torch

    from avi_scale.data import build_loader
    from avi_scale.engine import distributed as D
    from avi_scale.evaluate.nll import evaluate_nll

    e = cfg.eval
    loader = build_loader(cfg.data, e.split, e.batch_size, world.rank, world.world_size)
    total = loader.shards.num_samples
    _say(world, f"evaluating {total} images of split {e.split!r} ({loader.shards.manifest_url}) on "
                f"{world.world_size} rank(s), K={e.iw_samples} importance samples in chunks of "
                f"{min(e.iw_chunk, e.iw_samples)}")
    result = evaluate_nll(loaded.model, loader, iw_samples=e.iw_samples, iw_chunk=e.iw_chunk, seed=e.seed,
                          expected_count=None if cfg.data.skip_corrupt else total, progress=progress,
                          progress_total=loader.num_samples, active_unit_threshold=e.active_unit_threshold,
                          active_layer_kl=e.active_layer_kl)
    skipped = int(D.all_reduce(torch.tensor([float(loader.skipped)], dtype=torch.float64, device=world.device)).item())
    if result.count + skipped != total:
        raise RuntimeError(f"evaluated {result.count} images and skipped {skipped} corrupt ones, but the split "
                           f"holds {total}")
    result.extra.update(split=e.split, data=loader.shards.manifest_url, skipped_corrupt=skipped,
                        checkpoint=str(loaded.source), weights=loaded.weights, step=loaded.step)
    return result


def _print_nll(result) -> None:
    rows = result.table_rows()
    w = max(len(r[0]) for r in rows)
    print(f"{'':{w}}  {'nats / image':>22}  {'bits / dim':>20}")
    for name, nats, bpd in rows:
        print(f"{name:{w}}  {nats:>22}  {bpd:>20}")
    print(f"images: {result.count}, active units: {result.active_units}/{result.units_per_layer * len(result.kl_per_layer)}, "
          f"active layers (KL > {result.active_layer_kl:g}): {result.active_layers}/{len(result.kl_per_layer)}, "
          f"{result.seconds:.1f} s", flush=True)


def _first_images(cfg, n: int):
    """The first ``n`` images of the evaluation split (for reconstructions and attention)."""
    from avi_scale.data import build_loader

    loader = build_loader(cfg.data, cfg.eval.split, n, 0, 1)
    for x, _ in loader:
        return x
    raise RuntimeError(f"split {cfg.eval.split!r} holds no images")


def _make_figures(loaded, cfg, out: Path, run_dir: Optional[Path], nll=None, need_data: bool = False):
    """All pictures into ``out``; returns ({name: path}, notes)."""
    from avi_scale.evaluate import figures as F
    from avi_scale.evaluate.nll import check_images

    e = cfg.eval
    model = loaded.model
    figs: dict = {}
    notes: list[str] = []
    figs["samples"] = F.sample_grids(model, e.temperatures, e.num_samples, out, seed=e.seed)
    from avi_scale.data import DataError

    try:
        x = _first_images(cfg, e.num_reconstructions)
    except (ValueError, DataError) as exc:  # no URLs for the split, or none readable from here
        if need_data:
            raise
        x = None
        notes.append(f"No reconstructions or attention picture (pass --data): {exc}.")
    if x is not None:
        x = check_images(x, cfg.model)
        figs["reconstructions"] = F.reconstruction_grid(model, x, out / "reconstructions.png", seed=e.seed)
        summary = F.attention_summary(model, x, seed=e.seed)
        if summary:
            layer = e.attention_layer % cfg.model.num_layers
            figs["attention"] = F.attention_figure(summary, layer, out / f"attention_layer{layer + 1:02d}.png")
            np_path = out / "attention.json"
            np_path.write_text(json.dumps({side: [[None if math.isnan(v) else v for v in row] for row in m.tolist()]
                                           for side, m in summary.items()}, indent=1) + "\n")
        else:
            notes.append("No attention picture: the model has no depth-wise attention (local baseline).")
    metrics = (run_dir / "metrics.jsonl") if run_dir is not None else None
    if metrics is not None and metrics.is_file():
        records = F.read_metrics(metrics)
        try:
            figs["curves"] = F.curves_figure(records, out / "curves.png")
            figs["kl_heatmap"] = F.kl_heatmap(records, out / "kl_heatmap.png", active_layer_kl=e.active_layer_kl)
            steps, active = F.active_layers_over_training(records, e.active_layer_kl)
            notes.append(f"Active layers during training (train KL > {e.active_layer_kl:g} nats): {int(active[-1])} of "
                         f"{cfg.model.num_layers} at step {int(steps[-1])} (most: {int(active.max())}).")
        except ValueError as exc:
            notes.append(f"No training curves / KL heat map from {metrics}: {exc}.")
    else:
        notes.append("No training curves or KL heat map: no metrics.jsonl "
                     + (f"in {run_dir}" if run_dir is not None else "(pass --run RUN_DIR)") + ".")
    if nll is not None:
        figs["latent_usage"] = F.latent_usage_figure(nll.kl_per_layer, nll.active_units_per_layer,
                                                     nll.units_per_layer, out / "latent_usage.png",
                                                     active_layer_kl=e.active_layer_kl)
    return figs, notes


def _main(args: argparse.Namespace) -> int:
    from avi_scale.config import apply_overrides
    from avi_scale.engine import distributed as D
    from avi_scale.evaluate.loading import FIXED_BY_CHECKPOINT, load_model

    loaded = load_model(args.checkpoint, use_ema=True, config_path=args.config)
    cfg = apply_overrides(loaded.cfg, list(args.overrides) + _flag_overrides(args), fixed=FIXED_BY_CHECKPOINT)
    if args.data is not None:  # the shards of the (final) evaluation split
        cfg = apply_overrides(cfg, [f"data.{cfg.eval.split}_urls={args.data}"])
    if not cfg.eval.use_ema and loaded.weights == "ema":
        loaded = load_model(args.checkpoint, use_ema=False, config_path=args.config)
    hint = " (from the checkpoint's config): pass --device cpu"
    with D.process_group(cfg.train.device, group_when_alone=False, device_hint=hint) as world:
        _evaluate(args, loaded, cfg, world)
        D.barrier()
    return 0


def _evaluate(args: argparse.Namespace, loaded, cfg, world) -> None:
    """What the command asks for, on this rank (pictures and pages on rank 0)."""
    from avi_scale.config import save_config
    from avi_scale.model import count_parameters

    loaded.model.to(world.device)
    _say(world, f"model: {loaded.describe()}, {count_parameters(loaded.model) / 1e6:.3f}M parameters, "
                f"device {world.device}")
    if args.out is not None and world.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, args.out / "config.yaml")
    result = None
    if args.command == "nll" or (args.command == "report" and not args.skip_nll):
        result = _run_nll(loaded, cfg, world, progress=not args.no_progress)
        if world.is_main:
            _print_nll(result)
            if args.out is not None:
                (args.out / "nll.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
                print(f"wrote {args.out / 'nll.json'}")
    if args.command in ("figures", "report") and world.is_main:
        run_dir = args.run if args.run is not None else loaded.run_dir
        figs, notes = _make_figures(loaded, cfg, args.out, run_dir, nll=result, need_data=args.command == "report")
        count = sum(len(v) if isinstance(v, dict) else 1 for v in figs.values())
        print(f"wrote {count} figures to {args.out}")
        for note in notes:
            print(note)
        if args.command == "report":
            _write_report(loaded, cfg, args.out, result, figs, notes)


def _write_report(loaded, cfg, out: Path, result, figs: dict, notes: list[str]) -> None:
    from avi_scale.config import to_yaml
    from avi_scale.evaluate.report import build_report
    from avi_scale.model import count_parameters

    page = build_report(
        title=f"avi-scale evaluation: {cfg.name}", source=str(loaded.source), weights=loaded.weights,
        step=loaded.step, num_parameters=count_parameters(loaded.model), config_yaml=to_yaml(cfg), nll=result,
        figures=figs, notes=notes)
    md, html = page.write(out)
    print(f"wrote {md} and {html}")


def eval_main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``avi-eval``; returns the exit status (2 for bad input, with the reason on stderr)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "compare":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from avi_scale.evaluate.compare import CompareError, compare

        try:
            files = compare(args.runs, args.out, args.nll_file)
        except CompareError as exc:
            print(f"avi-eval: error: {exc}", file=sys.stderr, flush=True)
            return 2
        print(files["markdown"].read_text())
        print("wrote " + ", ".join(str(f) for f in files.values()))
        return 0
    # overrides may also follow the options: collect every key=value the first pass left over
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + extra
    from avi_scale.config import ConfigError
    from avi_scale.data import DataError
    from avi_scale.engine.distributed import LaunchError
    from avi_scale.evaluate.loading import CheckpointError

    try:
        return _main(args)
    except (CheckpointError, ConfigError, DataError, FileNotFoundError, LaunchError, ValueError) as exc:
        print(f"avi-eval: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(eval_main())
