"""Images beyond 32 px: the downsampled-ImageNet and CelebA converters (through the real ``avi-shards``),
n-bit likelihoods and data (``model.num_bits``/``data.num_bits``), and the ImageNet-32 and CelebA-64
configs, trained for two steps by the real ``avi-train`` on data converted from files in the official
formats, built here."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers modules beside this file

from data_fixtures import FAST_IO, read_split  # noqa: E402
from helpers import REPO, VENV_BIN, launch_env, metric_rows  # noqa: E402

from avi_scale.config import ConfigError, DataConfig, load_config
from avi_scale.data import build_loader, read_manifest
from avi_scale.data.transforms import Transform
from avi_scale.model import AttentiveVAE, count_parameters
from avi_scale.model.distributions import DiscretizedLogisticMixture
from data_tools.cli import main as avi_shards
from data_tools.imagenet import npz_array

pytestmark = pytest.mark.usefixtures("quiet_exit")

# what makes the full configs tiny for a 2-step CPU run (the data format and image size stay the configs')
TINY = ["model.num_layers=2", "model.num_filters=8", "model.latent_channels=4", "model.num_blocks=1",
        "model.num_preprocess_blocks=1", "model.num_postprocess_blocks=1", "model.prior_attention.key_dim=4",
        "model.posterior_attention.key_dim=4", "model.nonlocal_places=[]", "train.micro_batch_size=4",
        "train.device=cpu", "train.precision=fp32", "train.progress_bar=false", "train.eval_every=2",
        "train.eval_batches=1", "train.steps=2", "data.shuffle_buffer=8"]


def shards_cli(*argv: str) -> subprocess.CompletedProcess:
    """The installed ``avi-shards`` command."""
    return subprocess.run([str(VENV_BIN / "avi-shards"), *argv, "--no-progress"], capture_output=True, text=True,
                          env=launch_env(), timeout=300)


def convert(*argv: str) -> int:
    """``avi-shards`` in this process (same code; for the many bad-input cases)."""
    return avi_shards([*argv, "--no-progress"])


def train_two_steps(config: str, data: Path, out: Path, *extra: str) -> list[dict]:
    proc = subprocess.run([str(VENV_BIN / "avi-train"), str(REPO / "configs" / config), f"data.train_urls={data}",
                           f"train.output_dir={out}", *TINY, *extra], capture_output=True, text=True, cwd=REPO,
                          env=launch_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metric_rows(out, "final")


# ------------------------------------------------------------------------------------ downsampled ImageNet


def write_imagenet_npz(root: Path, side: int = 32, per_batch: int = 3, val: int = 5, seed: int = 0) -> dict:
    """The official npz layout: train_data_batch_1..10.npz (in a train folder) and val_data.npz (in a val
    folder), ``data`` uint8 [N, 3*S*S] channel-major, ``labels`` 1-based, ``mean``; odd batches stored
    uncompressed (np.savez), even ones compressed.  Returns {"train"/"test": (rows, 1-based labels)}."""
    rng = np.random.default_rng(seed)
    (root / f"Imagenet{side}_train_npz").mkdir(parents=True)
    (root / f"Imagenet{side}_val_npz").mkdir()
    rows, labels = [], []
    for i in range(1, 11):
        data = rng.integers(0, 256, size=(per_batch, 3 * side * side), dtype=np.uint8)
        lab = rng.integers(1, 1001, size=per_batch)
        lab[0] = 1 if i == 1 else lab[0]
        lab[-1] = 1000 if i == 10 else lab[-1]
        save = np.savez if i % 2 else np.savez_compressed
        save(root / f"Imagenet{side}_train_npz" / f"train_data_batch_{i}.npz", data=data, labels=lab.tolist(),
             mean=data.mean(axis=0))
        rows.append(data)
        labels.append(lab)
    vdata = rng.integers(0, 256, size=(val, 3 * side * side), dtype=np.uint8)
    vlab = rng.integers(1, 1001, size=val)
    np.savez(root / f"Imagenet{side}_val_npz" / "val_data.npz", data=vdata, labels=vlab)
    return {"train": (np.concatenate(rows), np.concatenate(labels)), "test": (vdata, vlab)}


def pixel(row: np.ndarray, side: int, y: int, x: int) -> tuple[int, int, int]:
    """(R, G, B) at (y, x) of one channel-major row: the red plane row by row, then green, then blue."""
    plane = side * side
    return int(row[y * side + x]), int(row[plane + y * side + x]), int(row[2 * plane + y * side + x])


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("imagenet")
    truth = write_imagenet_npz(root / "src")
    proc = shards_cli("imagenet", "--src", str(root / "src"), "--out", str(root / "shards"), "--val-fraction", "0.1",
                      "--shard-samples", "8")
    assert proc.returncode == 0, proc.stderr
    return root, truth


def test_imagenet_npz_batches_convert_pixel_for_pixel(imagenet):
    root, truth = imagenet
    out = str(root / "shards")
    manifest = read_manifest(out)
    assert manifest["name"] == "imagenet32" and manifest["image"]["shape"] == [32, 32, 3]
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 27, "val": 3, "test": 5}
    assert manifest["source"]["official_splits"] == ["train", "test"]
    seen = 0
    for split in ("train", "val", "test"):
        rows, labels = truth["test" if split == "test" else "train"]
        for key, image, label in read_split(out, split):
            origin, index = key.split("_")
            assert origin == ("test" if split == "test" else "train")
            row = rows[int(index)]
            for y, x in ((0, 0), (0, 31), (5, 17), (31, 0), (31, 31)):  # the layout, read by hand
                assert tuple(int(v) for v in image[y, x]) == pixel(row, 32, y, x)
            assert np.array_equal(image, row.reshape(3, 32, 32).transpose(1, 2, 0))
            assert label == labels[int(index)] - 1  # 1-based in the files, 0-based in the shards
            seen += 1
    assert seen == 35
    # stored arrays are memory-mapped, compressed ones read; both the same numbers
    stored = root / "src" / "Imagenet32_train_npz" / "train_data_batch_1.npz"
    packed = root / "src" / "Imagenet32_train_npz" / "train_data_batch_2.npz"
    assert isinstance(npz_array(stored, "data"), np.memmap)
    assert not isinstance(npz_array(packed, "data"), np.memmap)
    assert np.array_equal(npz_array(packed, "data"), truth["train"][0][3:6])
    assert subprocess.run([str(VENV_BIN / "avi-shards"), "verify", out], capture_output=True).returncode == 0


def test_imagenet_bad_input_names_the_file_and_the_problem(tmp_path, capsys):
    def fails(src: Path, needle: str, *extra: str) -> None:
        capsys.readouterr()
        assert convert("imagenet", "--src", str(src), "--out", str(tmp_path / "out"), *extra) == 2
        err = capsys.readouterr().err
        assert needle in err, err

    write_imagenet_npz(tmp_path / "ok", per_batch=2, val=2)
    fails(tmp_path / "ok", "images are 32x32, but --size 64", "--size", "64")
    fails(tmp_path / "nowhere", "is not a directory")

    missing = tmp_path / "missing"
    write_imagenet_npz(missing, per_batch=2, val=2)
    (missing / "Imagenet32_train_npz" / "train_data_batch_7.npz").unlink()
    fails(missing, "missing train_data_batch_7.npz")

    def broken(name: str, **arrays) -> Path:
        src = tmp_path / name
        write_imagenet_npz(src, per_batch=2, val=2)
        np.savez(src / "Imagenet32_val_npz" / "val_data.npz", **arrays)
        return src

    fails(broken("zero_based", data=np.zeros((2, 3072), np.uint8), labels=np.array([0, 5])), "1-based")
    fails(broken("not_square", data=np.zeros((2, 3000), np.uint8), labels=np.array([1, 5])), "not 3*S*S")
    fails(broken("floats", data=np.zeros((2, 3072), np.float32), labels=np.array([1, 5])), "must be uint8")
    fails(broken("no_data", images=np.zeros((2, 3072), np.uint8), labels=np.array([1, 5])), "no array 'data'")
    fails(broken("count", data=np.zeros((2, 3072), np.uint8), labels=np.array([1, 5, 7])), "2 images but 3 labels")
    fails(broken("sizes", data=np.zeros((2, 3 * 64 * 64), np.uint8), labels=np.array([1, 5])),
          "images are 64x64, the training batches 32x32")
    objects = np.empty(2, dtype=object)
    objects[:] = [np.zeros(3072, np.uint8), np.zeros(3072, np.uint8)]
    fails(broken("pickled", data=objects, labels=np.array([1, 5])), "holds Python objects")


def test_imagenet32_config_trains_two_steps_on_converted_batches(imagenet, tmp_path):
    root, _ = imagenet
    final = train_two_steps("imagenet32_attentive.yaml", root / "shards", tmp_path / "run")
    assert final and final[0]["finished"] and final[0]["step"] == 2 and math.isfinite(final[0]["val_neg_elbo"])
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.model.image_size, saved.model.image_channels, saved.model.num_bits) == (32, 3, 8)


# ------------------------------------------------------------------------------------------------ CelebA


def face(rng: np.random.Generator, width: int = 178, height: int = 218) -> np.ndarray:
    """A smooth RGB picture with some texture (so resampling filters give different results)."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 25, size=base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def celeba(tmp_path_factory) -> tuple[Path, dict]:
    """The CelebA download's layout: img_align_celeba/*.jpg (178x218) and Eval/list_eval_partition.txt;
    14 images, 8 train / 3 val / 3 test, the splits interleaved."""
    from PIL import Image

    root = tmp_path_factory.mktemp("celeba")
    src = root / "src"
    (src / "img_align_celeba").mkdir(parents=True)
    (src / "Eval").mkdir()
    rng = np.random.default_rng(5)
    parts = [0, 0, 1, 0, 2, 0, 0, 1, 2, 0, 0, 1, 2, 0]
    lines = []
    for i, part in enumerate(parts, 1):
        Image.fromarray(face(rng)).save(src / "img_align_celeba" / f"{i:06d}.jpg", quality=92)
        lines.append(f"{i:06d}.jpg {part}")
    (src / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    proc = shards_cli("celeba", "--src", str(src), "--size", "64", "--out", str(root / "shards"))
    assert proc.returncode == 0, proc.stderr
    split_files = {s: [src / "img_align_celeba" / f"{i:06d}.jpg" for i, p in enumerate(parts, 1) if p == n]
                   for n, s in enumerate(("train", "val", "test"))}
    return root, split_files


def nvae_crop(path: Path, size: int, resample: str = "BILINEAR") -> np.ndarray:
    """NVAE's CelebA-64 input, computed here with PIL: box (15, 40, 178 - 15, 218 - 30), then the resize."""
    from PIL import Image

    image = Image.open(path).convert("RGB").crop((15, 40, 163, 188))
    assert image.size == (148, 148)
    return np.asarray(image.resize((size, size), getattr(Image.Resampling, resample)))


def test_celeba_nvae_crop_bilinear_resize_and_official_splits(celeba):
    root, split_files = celeba
    out = str(root / "shards")
    manifest = read_manifest(out)
    assert manifest["name"] == "celeba64" and manifest["image"]["shape"] == [64, 64, 3]
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 8, "val": 3, "test": 3}
    assert manifest["val_fraction"] == 0.0 and manifest["num_classes"] == 0
    assert manifest["source"]["crop"] == "nvae" and manifest["source"]["interpolation"] == "bilinear"
    for split, files in split_files.items():
        samples = read_split(out, split)
        assert sorted(int(k.split("_")[1]) for k, _, _ in samples) == list(range(len(files)))
        for key, image, label in samples:
            assert key.startswith(split + "_") and label == -1
            assert np.array_equal(image, nvae_crop(files[int(key.split("_")[1])], 64))


def test_celeba_interpolations_and_centre_crop(celeba, tmp_path):
    from PIL import Image

    root, split_files = celeba
    src = str(root / "src")
    results = {}
    for interpolation in ("box", "bicubic", "lanczos"):
        out = tmp_path / interpolation
        assert convert("celeba", "--src", src, "--size", "32", "--interpolation", interpolation, "--out", str(out)) == 0
        key, image, _ = read_split(str(out), "test")[0]
        path = split_files["test"][int(key.split("_")[1])]
        assert np.array_equal(image, nvae_crop(path, 32, interpolation.upper()))
        results[interpolation] = image
    assert not np.array_equal(results["box"], results["lanczos"])
    out = tmp_path / "center"
    assert convert("celeba", "--src", src, "--size", "16", "--crop", "center", "--out", str(out)) == 0
    key, image, _ = read_split(str(out), "val")[0]
    path = split_files["val"][int(key.split("_")[1])]
    expected = Image.open(path).convert("RGB").crop((0, 20, 178, 198)).resize((16, 16), Image.Resampling.BILINEAR)
    assert np.array_equal(image, np.asarray(expected))


def test_celeba_bad_input_names_the_problem(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(2)
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(1, 4):
        Image.fromarray(face(rng)).save(src / f"{i:06d}.jpg")

    def fails(needle: str, *extra: str, at: Path = src) -> None:
        capsys.readouterr()
        assert convert("celeba", "--src", str(at), "--out", str(tmp_path / "out"), *extra) == 2
        err = capsys.readouterr().err
        assert needle in err, err

    (src / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 3\n")
    fails("line 2: expected '<image file> <0|1|2>'")
    (src / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n000003.jpg 2\n000009.jpg 0\n")
    fails("lists 1 image(s) that are not in")
    (src / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 1\n")
    fails("holds 1 image(s) that")
    (src / "list_eval_partition.txt").unlink()
    fails("--partition", "--partition", str(tmp_path / "nope.txt"))
    fails("--size must be >= 1", "--size", "0")
    Image.fromarray(face(rng, 200, 200)).save(src / "000004.jpg")
    fails("000004.jpg: image is 200x200 (WxH); --crop nvae")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails("holds no .png/.jpg/.jpeg images", at=empty)
    with pytest.raises(SystemExit):  # argparse: exit 2, naming the allowed choices
        convert("celeba", "--src", str(src), "--interpolation", "nearest", "--out", str(tmp_path / "o"))
    assert "invalid choice: 'nearest'" in capsys.readouterr().err

    # no partition file: all images train, val/test carved, and the user is told
    assert convert("celeba", "--src", str(src), "--crop", "center", "--size", "8", "--val-fraction", "0.25",
                   "--test-fraction", "0.25", "--out", str(tmp_path / "carved")) == 0
    assert "no list_eval_partition.txt found" in capsys.readouterr().err
    assert {k: v["count"] for k, v in read_manifest(str(tmp_path / "carved"))["splits"].items()} == \
        {"train": 2, "val": 1, "test": 1}


def test_folder_converter_takes_an_interpolation(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    src = tmp_path / "flat"
    src.mkdir()
    for i in range(3):
        Image.fromarray(face(rng, 40, 30)).save(src / f"p{i}.png")
    for interpolation in ("lanczos", "box"):
        out = tmp_path / interpolation
        assert convert("folder", "--src", str(src), "--size", "12", "--interpolation", interpolation,
                       "--val-fraction", "0", "--test-fraction", "0", "--out", str(out)) == 0
        for key, image, _ in read_split(str(out), "train"):
            pil = Image.open(src / f"p{int(key.split('_')[1])}.png").convert("RGB")
            resized = pil.resize((16, 12), getattr(Image.Resampling, interpolation.upper()))  # shorter side 30 -> 12
            assert np.array_equal(image, np.asarray(resized.crop((2, 0, 14, 12))))
    assert read_manifest(str(tmp_path / "box"))["source"]["interpolation"] == "box"


def test_celeba64_config_trains_two_steps_on_converted_jpegs(celeba, tmp_path):
    root, _ = celeba
    final = train_two_steps("celeba64_attentive.yaml", root / "shards", tmp_path / "run")
    assert final and final[0]["finished"] and final[0]["step"] == 2 and math.isfinite(final[0]["val_neg_elbo"])
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.model.image_size, saved.model.padded_size, saved.model.num_mixtures) == (64, 64, 10)


def test_full_size_configs_build_with_their_recorded_sizes():
    for name, params in (("imagenet32_attentive", 118.97e6), ("celeba64_attentive", 39.49e6)):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        with torch.device("meta"):
            n = count_parameters(AttentiveVAE(cfg.model))
        assert abs(n - params) / params < 0.001, (name, n)


# ----------------------------------------------------------------------------------------- n-bit data


def test_logistic_mixture_sums_to_one_at_every_bit_depth():
    torch.manual_seed(3)
    for bits in (1, 3, 5, 8):
        n = 2 ** bits
        params = torch.randn(1, DiscretizedLogisticMixture.num_params(1, 4), 1, 1) * 2
        values = torch.arange(n).float().view(n, 1, 1, 1) / (n - 1) * 2 - 1
        d = DiscretizedLogisticMixture(params.expand(n, -1, -1, -1), 1, 4, num_bits=bits)
        assert d.log_prob(values).double().exp().sum().item() == pytest.approx(1.0, abs=1e-4), bits
    # RGB, 5 bits: all 32^3 colours of one pixel
    params = torch.randn(1, DiscretizedLogisticMixture.num_params(3, 3), 1, 1)
    params[:, 3:] *= 0.5
    levels = torch.arange(32).float() / 31 * 2 - 1
    r, g, b = torch.meshgrid(levels, levels, levels, indexing="ij")
    x = torch.stack([r, g, b], dim=-1).view(-1, 3, 1, 1)
    d = DiscretizedLogisticMixture(params.expand(x.shape[0], -1, -1, -1), 3, 3, num_bits=5)
    assert d.log_prob(x).double().exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="num_bits must be in 1..8"):
        DiscretizedLogisticMixture(params, 3, 3, num_bits=9)


def _reference_8bit_log_prob(d: DiscretizedLogisticMixture, x: torch.Tensor) -> torch.Tensor:
    """The 8-bit formula with its literal constants, as it was before n bits (1/255, log 127.5)."""
    import torch.nn.functional as F

    xe = x.float().unsqueeze(1)
    centered = xe - d._conditioned_locs(x.float())
    inv_s = torch.exp(-d.log_scales)
    plus_in = inv_s * (centered + 1.0 / 255.0)
    min_in = inv_s * (centered - 1.0 / 255.0)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - d.log_scales - 2.0 * F.softplus(mid_in)
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp_min(1e-12)), log_pdf_mid - math.log(127.5))
    lp = torch.where(xe < -0.999, plus_in - F.softplus(plus_in), torch.where(xe > 0.999, -F.softplus(min_in), inner))
    lp = lp.sum(2) + torch.log_softmax(d.logits, dim=1)
    return torch.logsumexp(lp, dim=1).flatten(1).sum(1)


def test_eight_bits_is_bit_for_bit_the_old_likelihood():
    torch.manual_seed(4)
    params = torch.randn(3, DiscretizedLogisticMixture.num_params(3, 5), 6, 6) * 3  # some tiny bins too
    x = torch.randint(0, 256, (3, 3, 6, 6)).float() / 255 * 2 - 1
    for d in (DiscretizedLogisticMixture(params, 3, 5), DiscretizedLogisticMixture(params, 3, 5, num_bits=8)):
        assert torch.equal(d.log_prob(x), _reference_8bit_log_prob(d, x))


def test_transform_quantises_to_n_bits_and_leaves_8_bits_alone():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    plain = images.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1.0 / 255.0)
    eight = Transform(seed=1, binarize=False, random_flips=False)
    assert np.array_equal(eight.eval_batch(images, np.arange(4)), plain)
    assert np.array_equal(eight.train_batch(images, 0, 0, 0), plain)
    # NCHW-contiguous (channels-last RGB batches of >= 48 px crash torch's CPU backward of the model)
    assert eight.eval_batch(images, np.arange(4)).flags["C_CONTIGUOUS"]
    five = Transform(seed=1, binarize=False, random_flips=True, num_bits=5)
    x = five.eval_batch(images, np.arange(4))
    assert x.flags["C_CONTIGUOUS"] and x.dtype == np.float32
    assert np.array_equal(x * 31, np.round(x * 31))  # on the 32-level grid
    assert np.array_equal(np.round(x * 31).astype(np.uint8), (images // 8).transpose(0, 3, 1, 2))  # floor(k / 2^3)
    flipped = five.train_batch(images, 0, 0, 0)
    assert np.array_equal(np.sort(flipped.ravel()), np.sort(x.ravel()))
    assert Transform(seed=0, binarize=False, random_flips=False, num_bits=1).eval_batch(images, np.arange(4)).max() == 1
    with pytest.raises(ValueError, match="data.binarize needs data.num_bits=8"):
        Transform(seed=0, binarize=True, random_flips=False, num_bits=5)


def test_num_bits_settings_are_checked_naming_the_key(tmp_path):
    celeba = str(REPO / "configs" / "celeba64_attentive.yaml")
    for overrides, key, text in (
            (["model.num_bits=0", "data.num_bits=0"], "model.num_bits", "integer in 1..8"),
            (["model.num_bits=9", "data.num_bits=9"], "model.num_bits", "integer in 1..8"),
            (["model.num_bits=5"], "data.num_bits", "is 8 but model.num_bits is 5"),
            (["model.num_bits=5", "data.num_bits=5", "data.binarize=true"], "data.num_bits", "data.binarize=true")):
        with pytest.raises(ConfigError, match=key) as info:
            load_config(celeba, overrides)
        assert text in str(info.value)
    with pytest.raises(ConfigError, match="model.num_bits: must stay 8 with likelihood=bernoulli"):
        load_config(REPO / "configs" / "tiny_mnist5k.yaml", ["model.num_bits=5", "data.num_bits=5",
                                                             "data.binarize=false"])
    assert load_config(celeba, ["model.num_bits=5", "data.num_bits=5"]).model.num_bits == 5
    proc = subprocess.run([str(VENV_BIN / "avi-train"), celeba, "model.num_bits=4", "--print-config"],
                          capture_output=True, text=True, env=launch_env(), timeout=120)
    assert proc.returncode == 2 and "data.num_bits" in proc.stderr


def test_five_bit_model_trains_on_loader_batches(celeba, one_thread):
    root, _ = celeba
    cfg = load_config(REPO / "configs" / "celeba64_attentive.yaml",
                      [o for o in TINY if o.startswith("model.")] + ["model.num_bits=5", "data.num_bits=5"])
    data = DataConfig(train_urls=str(root / "shards"), binarize=False, num_bits=5, shuffle_buffer=0, **FAST_IO)
    x, _ = next(iter(build_loader(data, "train", 4, 0, 1)))
    levels = x * 31
    assert torch.equal(levels, levels.round()) and x.shape == (4, 3, 64, 64)
    model = AttentiveVAE(cfg.model)
    out = model(x)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # a 5-bit pixel carries less information than the same picture at 8 bits
    cfg8 = load_config(REPO / "configs" / "celeba64_attentive.yaml", [o for o in TINY if o.startswith("model.")])
    model8 = AttentiveVAE(cfg8.model)
    model8.load_state_dict(model.state_dict())
    model.eval(), model8.eval()
    torch.manual_seed(0)
    nll5 = model(x).recon_nll
    torch.manual_seed(0)
    nll8 = model8(x).recon_nll
    assert (nll5 < nll8).all()


def test_evaluation_input_check_follows_model_num_bits():
    import torch

    from avi_scale.config import load_config
    from avi_scale.evaluate.nll import check_images

    five = load_config(None, ["model.image_channels=3", "model.image_size=32", "model.likelihood=logistic_mixture",
                              "model.num_bits=5", "data.num_bits=5", "data.binarize=false"]).model
    x = torch.randint(0, 32, (2, 3, 32, 32)).float() / 31
    assert torch.equal(check_images(x, five), x)
    eight = load_config(None, ["model.image_channels=3", "model.image_size=32", "model.likelihood=logistic_mixture",
                               "data.binarize=false"]).model
    with pytest.raises(ValueError, match=r"not 8-bit \(k/255\) values"):
        check_images(x, eight)
    with pytest.raises(ValueError, match=r"not 5-bit \(k/31\) values"):
        check_images(torch.randint(0, 256, (2, 3, 32, 32)).float() / 255, five)
