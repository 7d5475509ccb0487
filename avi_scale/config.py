"""The one config schema of avi-scale.

Every run is described by a single :class:`ExperimentConfig`: typed dataclasses merged by OmegaConf
from (1) the defaults below, (2) a YAML file under ``configs/`` and (3) command-line dotlist overrides
such as ``model.num_layers=8``.  Unknown keys and values of the wrong type are rejected with the key
named; impossible combinations are rejected by :func:`validate`.  The resolved config is printed and
saved with every run, so everything a run did can be recovered from it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

NONLOCAL_PLACES = ("preprocess", "encoder", "decoder", "merge", "postprocess")
LIKELIHOODS = ("bernoulli", "logistic_mixture")


class ConfigError(ValueError):
    """A config that cannot be run, with the offending key named in the message."""


@dataclass
class AttentionConfig:
    """Depth-wise (inter-layer) attention of one side: the prior or the posterior."""

    enabled: bool = True
    key_dim: int = 20  # d: per-pixel key/query width
    layer_norm: bool = True


@dataclass
class ModelConfig:
    """The attentive hierarchical VAE (and, with attention off, the local NVAE-style baseline)."""

    image_channels: int = 1
    image_size: int = 28  # size of the images in the data
    padded_size: int = 32  # the network runs at this size; the pad is cropped in the likelihood
    likelihood: str = "bernoulli"  # bernoulli | logistic_mixture
    num_mixtures: int = 5  # logistic mixture components
    num_layers: int = 4  # variational layers L
    num_filters: int = 32  # F: the top-down context carries 2F channels
    latent_channels: int = 20  # C_z
    num_blocks: int = 2  # residual blocks per cell (each block has 2 nodes)
    num_preprocess_blocks: int = 2  # residual blocks in the preprocessing ResNet (incl. the down-sampling one)
    num_postprocess_blocks: int = 2  # residual blocks in the post-processing ResNet (incl. the up-sampling one)
    prior_attention: AttentionConfig = field(default_factory=AttentionConfig)
    posterior_attention: AttentionConfig = field(default_factory=AttentionConfig)
    # where non-local (spatial self-attention) blocks sit: any of NONLOCAL_PLACES
    nonlocal_places: list[str] = field(default_factory=lambda: ["preprocess", "encoder", "decoder"])
    nonlocal_key_dim: int = 32
    posterior_log_sigma_bounds: list[float] = field(default_factory=lambda: [-5.0, 5.0])
    prior_log_sigma_bounds: list[float] = field(default_factory=lambda: [-1.0, 5.0])
    log_sigma_noise: float = 0.0  # std of Gaussian noise on raw log-sigmas in training (CIFAR: 1e-3)
    batch_norm_momentum: float = 0.1  # PyTorch convention (TF momentum 0.9)
    activation_checkpointing: bool = False  # recompute each residual cell in backward


@dataclass
class DataConfig:
    """Where batches come from: WebDataset shard URLs (local paths, brace patterns, http(s)://, s3://)."""

    train_urls: Optional[str] = None  # e.g. "data/mnist/train-{000000..000009}.tar" or s3://bucket/prefix/...
    val_urls: Optional[str] = None
    test_urls: Optional[str] = None
    binarize: bool = True  # dynamic binarisation (binary sets)
    random_flips: bool = False  # horizontal + vertical flips (natural images)
    shuffle_buffer: int = 1000
    num_workers: int = 0
    seed: int = 0
    s3_endpoint_url: Optional[str] = None  # S3-compatible stores; credentials come from the environment


@dataclass
class OptimConfig:
    optimizer: str = "adamax"  # adamax | adamw
    lr: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-3
    weight_decay: float = 1.5e-4
    warmup_steps: int = 200  # linear warm-up from min_lr to lr
    min_lr: float = 1e-4  # cosine decays to this
    cosine_restarts: bool = False
    restart_period_steps: int = 0  # first decay period when cosine_restarts (0: the whole run)
    restart_mult: float = 2.0
    gradient_clipping: float = 0.0  # 0 disables; always written explicitly into the DeepSpeed JSON


@dataclass
class TrainConfig:
    steps: int = 300
    micro_batch_size: int = 32  # per rank
    gradient_accumulation_steps: int = 1
    kl_warmup_steps: int = 100  # beta goes linearly from kl_beta_min to 1
    kl_beta_min: float = 0.1
    ema_decay: float = 0.999
    log_every: int = 25
    eval_every: int = 100
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    skip_threshold: float = 0.0  # skip steps whose grad norm exceeds this (0: only non-finite are skipped)
    max_consecutive_skips: int = 10
    seed: int = 0
    deterministic: bool = False
    output_dir: str = "runs/default"
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16
    checkpoint_dir: str = ""  # "" -> <output_dir>/checkpoints
    resume: str = "auto"  # auto (latest complete checkpoint in checkpoint_dir, if any) | never | <checkpoint dir or tag dir>
    stop_after: int = 0  # stop (with a checkpoint) after this step; schedules still span train.steps (0: run to the end)
    eval_batches: int = 0  # validation batches per rank per evaluation (0: the whole split)
    progress_bar: bool = True
    peak_tflops: float = 0.0  # per-device peak for the MFU estimate (0: known GPUs only; MFU is omitted on CPU)
    batch_log: bool = False  # append a hash of every training image per rank to <output_dir>/batches/ (data-order audit)
    debug_nan_steps: list[int] = field(default_factory=list)  # fault injection: make the loss NaN at these steps


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    fp16_initial_scale_power: int = 16
    fp16_loss_scale_window: int = 1000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    pin_memory: bool = False  # pinned host buffers for offloaded optimizer/parameters (GPU runs)


@dataclass
class EvalConfig:
    iw_samples: int = 100  # K for importance-weighted log p(x)
    iw_chunk: int = 25  # samples evaluated at once (bounds memory)
    temperatures: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.6])
    num_samples: int = 64


@dataclass
class TuneConfig:
    metric: str = "val_nll"
    mode: str = "min"
    scheduler: str = "asha"  # asha | pbt | fifo
    num_samples: int = 1
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    storage: str = "runs/tune"
    search_space: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)


def _config_error(exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None)
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"invalid config{f' at key {key!r}' if key else ''}: {first}")


def _structured() -> DictConfig:
    return OmegaConf.structured(ExperimentConfig)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Merge defaults <- YAML <- dotlist overrides, validate, and return a typed config object.

    Raises :class:`ConfigError` naming the key on unknown keys, wrong types or impossible values.
    """
    base = _structured()
    try:
        layers = []
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(base, *layers)
        cfg: ExperimentConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from None
    validate(cfg)
    return cfg


def from_dict(d: dict) -> ExperimentConfig:
    """Build a validated config from a plain (possibly partial) nested dict, e.g. a saved run config."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(_structured(), OmegaConf.create(d)))
    except OmegaConfBaseException as exc:
        raise _config_error(exc) from None
    validate(cfg)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: ExperimentConfig) -> None:
    """Reject impossible combinations, naming the key and what is allowed."""
    m, t, o, d, ds = cfg.model, cfg.train, cfg.optim, cfg.data, cfg.deepspeed
    _require(m.likelihood in LIKELIHOODS, "model.likelihood", f"{m.likelihood!r} is not one of {LIKELIHOODS}")
    _require(m.num_layers >= 1, "model.num_layers", "must be >= 1")
    _require(m.num_filters >= 1 and m.latent_channels >= 1, "model.num_filters", "widths must be >= 1")
    _require(m.num_blocks >= 1, "model.num_blocks", "must be >= 1")
    _require(m.num_preprocess_blocks >= 1, "model.num_preprocess_blocks", "must be >= 1 (it holds the down-sampling block)")
    _require(m.num_postprocess_blocks >= 1, "model.num_postprocess_blocks", "must be >= 1 (it holds the up-sampling block)")
    _require(m.image_channels in (1, 3), "model.image_channels", "must be 1 or 3")
    _require(m.padded_size >= m.image_size, "model.padded_size", "must be >= model.image_size")
    _require(m.padded_size % 2 == 0, "model.padded_size", "must be even (the network down-samples by 2)")
    _require((m.padded_size - m.image_size) % 2 == 0, "model.padded_size", "padding must be symmetric (even difference)")
    _require(m.likelihood != "bernoulli" or m.image_channels == 1, "model.likelihood", "bernoulli needs image_channels=1")
    _require(m.num_mixtures >= 1, "model.num_mixtures", "must be >= 1")
    for side in ("prior_attention", "posterior_attention"):
        a = getattr(m, side)
        _require(a.key_dim >= 1, f"model.{side}.key_dim", "must be >= 1")
    if m.prior_attention.enabled or m.posterior_attention.enabled:
        # the posterior query is sliced off the top-down state and prior keys off decoder outputs;
        # both sides share the key width in the official design
        _require(
            m.prior_attention.key_dim == m.posterior_attention.key_dim,
            "model.posterior_attention.key_dim",
            "must equal model.prior_attention.key_dim",
        )
    if m.posterior_attention.enabled:
        _require(m.posterior_attention.key_dim % 2 == 0, "model.posterior_attention.key_dim",
                 "must be even (the stem carries half of it before the down-sampling block doubles it)")
    bad = [p for p in m.nonlocal_places if p not in NONLOCAL_PLACES]
    _require(not bad, "model.nonlocal_places", f"unknown places {bad}; allowed: {list(NONLOCAL_PLACES)}")
    for side in ("posterior_log_sigma_bounds", "prior_log_sigma_bounds"):
        b = getattr(m, side)
        _require(len(b) == 2 and b[0] < b[1], f"model.{side}", "must be [low, high] with low < high")
    _require(d.shuffle_buffer >= 0 and d.num_workers >= 0, "data.shuffle_buffer", "must be >= 0")
    _require(o.optimizer in ("adamax", "adamw"), "optim.optimizer", "must be 'adamax' or 'adamw'")
    _require(o.lr > 0 and o.min_lr >= 0, "optim.lr", "learning rates must be positive")
    _require(len(o.betas) == 2, "optim.betas", "must be two numbers")
    _require(o.gradient_clipping >= 0, "optim.gradient_clipping", "must be >= 0 (0 disables)")
    _require(o.warmup_steps >= 0 and o.restart_period_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(o.restart_mult >= 1.0, "optim.restart_mult", "must be >= 1")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(t.steps >= 1, "train.steps", "must be >= 1")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _require(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    _require(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    _require(t.precision in ("fp32", "bf16", "fp16"), "train.precision", "must be fp32, bf16 or fp16")
    _require(t.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
    _require(0.0 < t.kl_beta_min <= 1.0, "train.kl_beta_min", "must be in (0, 1]")
    _require(t.kl_warmup_steps >= 0, "train.kl_warmup_steps", "must be >= 0")
    _require(t.log_every >= 1 and t.eval_every >= 0, "train.log_every", "log_every must be >= 1, eval_every >= 0")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: only at the end)")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _require(t.skip_threshold >= 0, "train.skip_threshold", "must be >= 0 (0: only non-finite steps are skipped)")
    _require(t.max_consecutive_skips >= 1, "train.max_consecutive_skips", "must be >= 1")
    _require(0 <= t.stop_after <= t.steps, "train.stop_after", "must be in [0, train.steps]")
    _require(t.eval_batches >= 0 and t.peak_tflops >= 0, "train.eval_batches", "must be >= 0")
    _require(t.resume != "", "train.resume", "must be auto, never or a checkpoint path")
    _require(t.precision != "fp16" or t.device != "cpu", "train.precision", "fp16 needs a GPU (use bf16 or fp32 on CPU)")
    _require(ds.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
    _require(not (ds.offload_param and ds.zero_stage != 3), "deepspeed.offload_param", "needs deepspeed.zero_stage=3")
    _require(not (ds.offload_optimizer and ds.zero_stage == 0), "deepspeed.offload_optimizer", "needs deepspeed.zero_stage >= 1")
    _require(cfg.eval.iw_samples >= 1 and cfg.eval.iw_chunk >= 1, "eval.iw_samples", "must be >= 1")
    _require(cfg.tune.mode in ("min", "max"), "tune.mode", "must be 'min' or 'max'")
    _require(cfg.tune.scheduler in ("asha", "pbt", "fifo"), "tune.scheduler", "must be asha, pbt or fifo")
