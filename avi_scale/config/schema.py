"""The one config schema of avi-scale: typed dataclasses, one per section, each checking its own keys.

Every run is described by a single :class:`ExperimentConfig`, built by :mod:`avi_scale.config.loading`
from the defaults below, a YAML file (with its ``base:`` chain) and dotlist overrides.  Each section's
``check()`` rejects impossible values naming the key (``"model.num_layers: must be >= 1"``);
:meth:`ExperimentConfig.check` runs them all plus the checks that span sections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

NONLOCAL_PLACES = ("preprocess", "encoder", "decoder", "merge", "postprocess")
LIKELIHOODS = ("bernoulli", "logistic_mixture")
LOGGING_BACKENDS = ("tensorboard", "csv", "wandb", "mlflow")
# what the engine reports at each evaluation (and so what a search can optimise)
TUNE_METRICS = ("val_nll", "val_bpd", "val_neg_elbo", "val_recon_nll", "val_kl",
                "loss", "neg_elbo", "bpd", "recon_nll", "kl")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ConfigError(ValueError):
    """A config that cannot be run, with the offending key named in the message."""


def require(cond: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` ``"<key>: <msg>"`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _has_userinfo(url: Optional[str]) -> bool:
    """True for ``scheme://user[:password]@host/...`` URLs."""
    if not url or "://" not in url:
        return False
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    return "@" in netloc


@dataclass
class AttentionConfig:
    """Depth-wise (inter-layer) attention of one side: the prior or the posterior."""

    enabled: bool = True
    key_dim: int = 20  # d: per-pixel key/query width
    layer_norm: bool = True

    def check(self, key: str) -> None:
        require(self.key_dim >= 1, f"{key}.key_dim", "must be >= 1")


@dataclass
class ModelConfig:
    """The attentive hierarchical VAE (and, with attention off, the local NVAE-style baseline)."""

    image_channels: int = 1
    image_size: int = 28  # size of the images in the data
    padded_size: int = 32  # the network runs at this size; the pad is cropped in the likelihood
    likelihood: str = "bernoulli"  # bernoulli | logistic_mixture
    num_mixtures: int = 5  # logistic mixture components
    num_bits: int = 8  # bits per pixel the logistic mixture models, 1..8 (NVAE's CelebA-HQ 256: 5); = data.num_bits
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

    def check(self) -> None:
        require(self.likelihood in LIKELIHOODS, "model.likelihood", f"{self.likelihood!r} is not one of {LIKELIHOODS}")
        require(self.num_layers >= 1, "model.num_layers", "must be >= 1")
        require(self.num_filters >= 1 and self.latent_channels >= 1, "model.num_filters", "widths must be >= 1")
        require(self.num_blocks >= 1, "model.num_blocks", "must be >= 1")
        require(self.num_preprocess_blocks >= 1, "model.num_preprocess_blocks",
                "must be >= 1 (it holds the down-sampling block)")
        require(self.num_postprocess_blocks >= 1, "model.num_postprocess_blocks",
                "must be >= 1 (it holds the up-sampling block)")
        require(self.image_channels in (1, 3), "model.image_channels", "must be 1 or 3")
        require(self.padded_size >= self.image_size, "model.padded_size", "must be >= model.image_size")
        require(self.padded_size % 2 == 0, "model.padded_size", "must be even (the network down-samples by 2)")
        require((self.padded_size - self.image_size) % 2 == 0, "model.padded_size",
                "padding must be symmetric (even difference)")
        require(self.likelihood != "bernoulli" or self.image_channels == 1, "model.likelihood",
                "bernoulli needs image_channels=1")
        require(self.num_mixtures >= 1, "model.num_mixtures", "must be >= 1")
        require(isinstance(self.num_bits, int) and 1 <= self.num_bits <= 8, "model.num_bits",
                f"must be an integer in 1..8 (bits per pixel of the data), got {self.num_bits!r}")
        require(self.likelihood != "bernoulli" or self.num_bits == 8, "model.num_bits",
                "must stay 8 with likelihood=bernoulli: binary pixels have no bins (data.binarize draws them "
                "from the 8-bit grey levels); n-bit data need likelihood=logistic_mixture")
        self.prior_attention.check("model.prior_attention")
        self.posterior_attention.check("model.posterior_attention")
        if self.prior_attention.enabled or self.posterior_attention.enabled:
            # the posterior query is sliced off the top-down state and prior keys off decoder outputs;
            # both sides share the key width in the official design
            require(self.prior_attention.key_dim == self.posterior_attention.key_dim,
                    "model.posterior_attention.key_dim", "must equal model.prior_attention.key_dim")
        if self.posterior_attention.enabled:
            require(self.posterior_attention.key_dim % 2 == 0, "model.posterior_attention.key_dim",
                    "must be even (the stem carries half of it before the down-sampling block doubles it)")
        bad = [p for p in self.nonlocal_places if p not in NONLOCAL_PLACES]
        require(not bad, "model.nonlocal_places", f"unknown places {bad}; allowed: {list(NONLOCAL_PLACES)}")
        for side in ("posterior_log_sigma_bounds", "prior_log_sigma_bounds"):
            b = getattr(self, side)
            require(len(b) == 2 and b[0] < b[1], f"model.{side}", "must be [low, high] with low < high")


@dataclass
class DataConfig:
    """Where batches come from: WebDataset shard URLs (local paths, brace patterns, http(s)://, s3://)."""

    # a dataset directory/prefix holding manifest.json (e.g. "data/mnist5k", "s3://bucket/cifar10"), or a
    # shard pattern (e.g. "data/mnist/train-{000000..000009}.tar"); local, http(s):// or s3://
    train_urls: Optional[str] = None
    val_urls: Optional[str] = None  # None: the manifest's split of train_urls when that is a directory
    test_urls: Optional[str] = None
    binarize: bool = True  # dynamic binarisation (binary sets)
    random_flips: bool = False  # random horizontal flips (natural images)
    num_bits: int = 8  # quantise images to n bits: k -> floor(k / 2^(8-n)) / (2^n - 1); = model.num_bits
    shuffle_buffer: int = 1000  # samples in each worker's seeded shuffle buffer (0: shard order only)
    num_workers: int = 0  # DataLoader workers per rank (0: read in the training process)
    seed: int = 0  # >= 0; shard order, shuffling, binarisation and flips derive from it
    mode: str = "exact"  # exact: each sample at most once per epoch, resumable | resampled: shards drawn with replacement
    epoch_batches: int = 0  # resampled mode: batches per rank per epoch (0: samples // (world_size * batch))
    skip_corrupt: bool = False  # skip (count, log) undecodable samples and truncated shard tails instead of failing
    s3_endpoint_url: Optional[str] = None  # S3-compatible stores (else AWS_ENDPOINT_URL); credentials: boto3 chain
    io_retries: int = 4  # attempts per failure streak on s3:// and http(s):// reads
    io_timeout_s: float = 30.0  # connect/read timeout of each request
    io_backoff_s: float = 0.5  # first retry delay, doubled per attempt
    batch_timeout_s: float = 300.0  # error when a DataLoader worker delivers no batch for this long (0: never)

    def check(self) -> None:
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        require(self.seed >= 0, "data.seed", "must be >= 0")
        require(isinstance(self.num_bits, int) and 1 <= self.num_bits <= 8, "data.num_bits",
                f"must be an integer in 1..8 (the shards hold 8-bit images), got {self.num_bits!r}")
        require(self.num_bits == 8 or not self.binarize, "data.num_bits",
                "must stay 8 with data.binarize=true (binarisation draws from the 8-bit grey levels)")
        require(self.mode in ("exact", "resampled"), "data.mode", f"{self.mode!r} is not 'exact' or 'resampled'")
        require(self.epoch_batches >= 0, "data.epoch_batches", "must be >= 0 (0: derived from the split size)")
        require(self.epoch_batches == 0 or self.mode == "resampled", "data.epoch_batches", "needs data.mode=resampled")
        require(self.io_retries >= 1, "data.io_retries", "must be >= 1")
        require(self.io_timeout_s > 0, "data.io_timeout_s", "must be > 0")
        require(self.io_backoff_s >= 0, "data.io_backoff_s", "must be >= 0")
        require(self.batch_timeout_s >= 0, "data.batch_timeout_s", "must be >= 0 (0: no limit)")
        for name in ("train_urls", "val_urls", "test_urls", "s3_endpoint_url"):
            require(not _has_userinfo(getattr(self, name)), f"data.{name}",
                    "must not carry credentials (user:password@host): they would be saved with the run's config "
                    "and checkpoints; S3 credentials come from the AWS chain (AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)")


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

    def check(self) -> None:
        require(self.optimizer in ("adamax", "adamw"), "optim.optimizer", "must be 'adamax' or 'adamw'")
        require(self.lr > 0 and self.min_lr >= 0, "optim.lr", "learning rates must be positive")
        require(len(self.betas) == 2, "optim.betas", "must be two numbers")
        require(self.gradient_clipping >= 0, "optim.gradient_clipping", "must be >= 0 (0 disables)")
        require(self.warmup_steps >= 0 and self.restart_period_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.restart_mult >= 1.0, "optim.restart_mult", "must be >= 1")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")


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

    def check(self) -> None:
        require(self.steps >= 1, "train.steps", "must be >= 1")
        require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        require(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
        require(self.precision in ("fp32", "bf16", "fp16"), "train.precision", "must be fp32, bf16 or fp16")
        require(self.device in ("auto", "cpu", "cuda"), "train.device", "must be auto, cpu or cuda")
        require(0.0 < self.kl_beta_min <= 1.0, "train.kl_beta_min", "must be in (0, 1]")
        require(self.kl_warmup_steps >= 0, "train.kl_warmup_steps", "must be >= 0")
        require(self.log_every >= 1 and self.eval_every >= 0, "train.log_every",
                "log_every must be >= 1, eval_every >= 0")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0 (0: only at the end)")
        require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        require(self.skip_threshold >= 0, "train.skip_threshold", "must be >= 0 (0: only non-finite steps are skipped)")
        require(self.max_consecutive_skips >= 1, "train.max_consecutive_skips", "must be >= 1")
        require(0 <= self.stop_after <= self.steps, "train.stop_after", "must be in [0, train.steps]")
        require(self.eval_batches >= 0 and self.peak_tflops >= 0, "train.eval_batches", "must be >= 0")
        require(self.resume != "", "train.resume", "must be auto, never or a checkpoint path")
        require(self.precision != "fp16" or self.device != "cpu", "train.precision",
                "fp16 needs a GPU (use bf16 or fp32 on CPU)")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_max_live_parameters: int = 1_000_000_000
    pin_memory: bool = False  # pinned host buffers for offloaded optimizer/parameters (GPU runs)
    load_universal: bool = False  # resume from a universal checkpoint (ds_to_universal.py) at another world size
    # DeepSpeed JSON sections of your own (flops_profiler, comms_logger, monitor, aio, ...), merged into the
    # derived JSON; a key the config derives is an error naming both (avi_scale/engine/deepspeed_config.py)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        require(not (self.offload_param and self.zero_stage != 3), "deepspeed.offload_param",
                "needs deepspeed.zero_stage=3")
        require(not (self.offload_optimizer and self.zero_stage == 0), "deepspeed.offload_optimizer",
                "needs deepspeed.zero_stage >= 1")
        bad = [k for k in self.extra if not isinstance(k, str) or not k]
        require(not bad, "deepspeed.extra", f"keys must be DeepSpeed JSON section names, got {bad}")


@dataclass
class LoggingConfig:
    """Where rank 0's metrics go besides ``metrics.jsonl`` (avi_scale/engine/tracking.py).  Secrets (W&B API
    key, MLflow token or password) come from the environment only, never from here."""

    backends: list[str] = field(default_factory=lambda: ["tensorboard"])  # any of LOGGING_BACKENDS
    run_name: str = ""  # "" : the config's name (a Tune trial: <search>_<trial id>)
    group: str = ""  # W&B group / MLflow experiment ("" : W&B none, MLflow the run name); avi-tune: the search
    wandb_project: str = "avi-scale"
    wandb_entity: str = ""  # "" : the API key's default entity
    wandb_mode: str = ""  # online | offline | disabled ("" : WANDB_MODE, else online)
    mlflow_tracking_uri: str = ""  # "" : MLFLOW_TRACKING_URI, else ./mlruns

    def check(self) -> None:
        bad = [b for b in self.backends if b not in LOGGING_BACKENDS]
        require(not bad, "logging.backends", f"unknown backends {bad}; allowed: {list(LOGGING_BACKENDS)}")
        require(len(set(self.backends)) == len(self.backends), "logging.backends", "names a backend twice")
        require(self.wandb_mode in ("", "online", "offline", "disabled"), "logging.wandb_mode",
                "must be online, offline or disabled")
        require(not _has_userinfo(self.mlflow_tracking_uri), "logging.mlflow_tracking_uri",
                "must not carry credentials (user:password@host): they would be saved with the run's config; "
                "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN instead")


@dataclass
class EvalConfig:
    iw_samples: int = 100  # K for importance-weighted log p(x)
    iw_chunk: int = 25  # samples evaluated at once (bounds memory)
    temperatures: list[float] = field(default_factory=lambda: [1.0, 0.8, 0.6])
    num_samples: int = 64
    split: str = "test"  # data split avi-eval measures (val | test)
    batch_size: int = 100  # images read per loader batch (results do not depend on it)
    seed: int = 0  # posterior noise (seeded per image from (seed, image bytes)) and sample grids; binarisation: data.seed
    use_ema: bool = True  # evaluate the EMA weights when the checkpoint has them
    attention_layer: int = -1  # layer whose depth-wise attention is drawn (-1: the last)
    num_reconstructions: int = 32  # originals shown beside their reconstructions
    active_unit_threshold: float = 0.01  # unit active if Cov_x(E_q[z_u]) exceeds this (Burda et al. 2016)
    active_layer_kl: float = 0.1  # layer active if its mean KL (nats per image) exceeds this

    def check(self, num_layers: int) -> None:
        require(self.split in ("val", "test"), "eval.split", f"{self.split!r} is not 'val' or 'test'")
        require(self.iw_samples >= 1, "eval.iw_samples", "must be >= 1")
        require(self.iw_chunk >= 1, "eval.iw_chunk", "must be >= 1")
        require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        require(self.num_samples >= 1, "eval.num_samples", "must be >= 1")
        require(self.num_reconstructions >= 1, "eval.num_reconstructions", "must be >= 1")
        require(len(self.temperatures) >= 1 and all(t > 0 for t in self.temperatures), "eval.temperatures",
                "must be a non-empty list of positive numbers")
        require(self.active_unit_threshold >= 0, "eval.active_unit_threshold", "must be >= 0")
        require(self.active_layer_kl >= 0, "eval.active_layer_kl", "must be >= 0")
        L = num_layers
        require(-L <= self.attention_layer < L, "eval.attention_layer", f"must be in [-{L}, {L - 1}] for {L} layers")


@dataclass
class TuneConfig:
    """A Ray Tune search (``avi-tune``); every trial runs the engine's training loop.  See docs/tune.md."""

    name: str = ""  # experiment name under tune.storage ("": the config's name)
    metric: str = "val_nll"  # a reported metric: val_nll (nats), val_bpd, val_recon_nll, val_kl, ...
    mode: str = "min"
    scheduler: str = "asha"  # asha | pbt | fifo
    search_alg: str = "random"  # random (grid_search expanded, the rest sampled) | optuna | hyperopt
    num_samples: int = 1  # samples of the space (each grid_search point is repeated this many times)
    max_concurrent: int = 2  # trials running at once (0: as many as the resources allow)
    seed: int = 0  # seeds the sampling of the search space
    cpus_per_trial: float = 1.0  # the trial process (with workers_per_trial > 1: the process that starts the workers)
    gpus_per_trial: float = 0.0  # single-process trials only
    workers_per_trial: int = 1  # > 1: a Ray Train TorchTrainer with this many DeepSpeed ranks per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 0  # retries of a crashed trial, from its latest checkpoint (-1: without limit)
    grace_period: int = 0  # ASHA: training steps before a trial can be stopped (0: train.eval_every)
    reduction_factor: float = 2.0  # ASHA: keep the best 1/reduction_factor at each rung
    perturbation_interval: int = 0  # PBT: training steps between exploit/explore decisions (0: train.eval_every)
    quantile_fraction: float = 0.25  # PBT: bottom fraction that clones the top fraction
    resample_probability: float = 0.25  # PBT: chance that a mutated value is drawn afresh instead of perturbed
    pbt_synch: bool = False  # PBT: every trial waits at each interval and all are ranked together
    keep_checkpoints: int = 2  # checkpoints Tune keeps per trial, the latest ones (PBT keeps all: clones need them)
    storage: str = "runs/tune"  # local directory or s3://bucket/prefix holding the experiment
    trial_output_root: str = ""  # engine run directories of the trials ("": <storage>/<name>/runs for local storage)
    results_dir: str = ""  # results table, best config and plots ("": the experiment directory when local)
    search_space: dict[str, Any] = field(default_factory=dict)  # config key -> values or distribution

    def check(self) -> None:
        require(self.metric in TUNE_METRICS, "tune.metric",
                f"{self.metric!r} is not reported by the engine; use one of {list(TUNE_METRICS)}")
        require(self.mode in ("min", "max"), "tune.mode", "must be 'min' or 'max'")
        require(self.scheduler in ("asha", "pbt", "fifo"), "tune.scheduler", "must be asha, pbt or fifo")
        require(self.search_alg in ("random", "optuna", "hyperopt"), "tune.search_alg",
                "must be random, optuna or hyperopt")
        require(self.num_samples >= 1, "tune.num_samples", "must be >= 1")
        require(self.max_concurrent >= 0, "tune.max_concurrent", "must be >= 0 (0: no limit)")
        require(self.cpus_per_trial >= 0 and self.gpus_per_trial >= 0, "tune.cpus_per_trial", "resources must be >= 0")
        require(self.workers_per_trial >= 1, "tune.workers_per_trial", "must be >= 1")
        require(self.cpus_per_worker > 0 and self.gpus_per_worker >= 0, "tune.cpus_per_worker",
                "cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        require(self.workers_per_trial == 1 or self.gpus_per_trial == 0, "tune.gpus_per_trial",
                "with workers_per_trial > 1 the GPUs belong to the workers: set tune.gpus_per_worker instead")
        require(self.max_failures >= -1, "tune.max_failures", "must be >= 0, or -1 for unlimited retries")
        require(self.grace_period >= 0 and self.perturbation_interval >= 0, "tune.grace_period",
                "grace_period and perturbation_interval must be >= 0 (0: train.eval_every)")
        require(self.reduction_factor > 1, "tune.reduction_factor", "must be > 1")
        require(0 < self.quantile_fraction <= 0.5, "tune.quantile_fraction", "must be in (0, 0.5]")
        require(0 <= self.resample_probability <= 1, "tune.resample_probability", "must be in [0, 1]")
        require(self.keep_checkpoints >= 1, "tune.keep_checkpoints", "must be >= 1")
        require(self.storage != "", "tune.storage", "must be a directory or an s3:// URI")
        name = self.name
        require(not name or _NAME.match(name) is not None, "tune.name",
                f"{name!r} must be letters, digits, '_', '-' or '.' (it names a directory)")


@dataclass
class ExperimentConfig:
    name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def check(self) -> None:
        """Reject impossible values and combinations, naming the key and what is allowed.

        Each section checks its own keys (``ModelConfig.check`` ...); what spans sections is checked here.
        """
        self.model.check()
        self.data.check()
        require(self.data.num_bits == self.model.num_bits, "data.num_bits",
                f"is {self.data.num_bits} but model.num_bits is {self.model.num_bits}: the loader must quantise the "
                f"images to the bits the likelihood models; set both (e.g. model.num_bits=5 data.num_bits=5)")
        self.optim.check()
        self.train.check()
        self.deepspeed.check()
        self.logging.check()
        self.eval.check(self.model.num_layers)
        self.tune.check()


