"""The one training loop: ``train(cfg, report=None) -> dict``.

The CLI (``avi-train``), every launcher in ``launch/`` and Ray Tune trials call this function; it
runs once per rank.  One optimizer step consumes one micro-batch from each of this rank's
``gradient_accumulation_steps`` data *slots*.  A step's global batch is made of
``world_size * gradient_accumulation_steps`` slots, slot ``rank * G + micro`` reading the
training split as shard-loader rank ``slot`` of that many, with the posterior noise of every
micro-batch seeded from (seed, step, slot).  What a step computes therefore depends only on the
global batch layout, not on how it is spread over processes: 2 ranks x 1 micro-batch equals
1 rank x 2 accumulated micro-batches (the tests rely on this), and a resumed run replays exactly.

Per step: learning rate and KL weight from the schedules, forward/backward through the DeepSpeed
engine, ``engine.step()`` (the step guard may discard it; see :mod:`avi_scale.engine.optim`), EMA
update for applied steps; a discarded step also gets its BatchNorm statistics restored.  Every
``log_every`` steps rank 0 writes averaged metrics; every ``checkpoint_every`` steps all ranks save;
every ``eval_every`` steps the EMA weights are evaluated on the validation split, image grids are
written and ``report(metrics)`` is called on every rank.  At the end: a last checkpoint, evaluation,
sample/reconstruction PNGs and a consolidated fp32 export.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from avi_scale.config import ExperimentConfig, save_config, to_dict
from avi_scale.engine import distributed as D
from avi_scale.engine.checkpoint import (Checkpointer, OutputDirError, ensure_writable, export_consolidated,
                                        has_model_states, resolve)
from avi_scale.engine.deepspeed_config import build_ds_config
from avi_scale.engine.ema import EMA
from avi_scale.engine.metrics import (MetricsWriter, count_flops, current_memory_mb, model_state_mb, peak_memory_mb,
                                      peak_tflops)
from avi_scale.plots import image_grid, save_png
from avi_scale.engine.optim import StepGuard, build_optimizer, grad_norm, set_lr
from avi_scale.engine.schedule import kl_beta, learning_rate

Report = Callable[[dict], None]
CLIENT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps were skipped; a checkpoint of the last good state was saved."""


def train(cfg: ExperimentConfig, report: Optional[Report] = None) -> dict:
    """Train ``cfg`` on this rank and return the final metrics (the same dict on every rank).

    ``report``, if given, is called on every rank at each evaluation with that evaluation's
    metrics (identical on all ranks, as Ray Train wants) including ``step``, ``epoch`` and
    ``checkpoint`` (the checkpoint saved at that step, or None).  Works under the deepspeed
    launcher, torchrun, srun, inside a process group someone else created (Ray Train), and alone.
    """
    device = D.resolve_device(cfg.train.device)
    D.select_accelerator(device)
    with D.launch_environment():
        created = not torch.distributed.is_initialized()
        world = D.init_process_group(device)
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        try:
            result = _Run(cfg, world, report).run()
        except BaseException:
            if created:
                D.shutdown(barrier_first=False)
            raise
        finally:
            torch.use_deterministic_algorithms(deterministic_before)
        if created:
            D.shutdown()
        return result


def noise_seed(*parts: Any) -> int:
    """A 63-bit seed from a tuple (stable across processes and runs, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _rng_state() -> dict:
    # numpy's state as plain numbers (not an ndarray): checkpoints then load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, keys.tolist(), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _json_or_none(line: str) -> Optional[dict]:
    """A JSON line, or None for a torn one (a process killed, or a disk filled, in the middle of a write)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _image_ids(x: torch.Tensor) -> list[str]:
    """Short content hashes of the images of a batch (the data-order audit of ``train.batch_log``)."""
    arr = (x.detach().float().cpu().numpy() * 255.0).round().astype(np.uint8)
    return [hashlib.blake2b(a.tobytes(), digest_size=8).hexdigest() for a in arr]


class _TrainStreams:
    """This rank's training batches: one shard loader per data slot, positions kept by the loaders."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int, pin_memory: bool):
        from avi_scale.data import build_loader

        g = cfg.train.gradient_accumulation_steps
        self.num_slots = world_size * g
        self.slots = [rank * g + m for m in range(g)]
        self.loaders = [build_loader(cfg.data, "train", cfg.train.micro_batch_size, slot, self.num_slots,
                                     pin_memory=pin_memory) for slot in self.slots]
        self.iters: list = []

    def start(self, states: Optional[dict] = None) -> None:
        """Begin at the loaders' saved positions (``{slot: state}`` from a checkpoint) or at the start."""
        if states is not None:
            for slot, loader in zip(self.slots, self.loaders):
                loader.load_state_dict(states[slot])
        self.iters = [loader.forever() for loader in self.loaders]

    @property
    def num_batches(self) -> int:
        return self.loaders[0].num_batches

    def next(self, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.iters[micro])

    def state(self) -> dict:
        return {slot: loader.state_dict() for slot, loader in zip(self.slots, self.loaders)}

    @property
    def skipped(self) -> int:
        """Corrupt samples skipped so far by this rank's loaders (``data.skip_corrupt``; kept across resumes)."""
        return sum(loader.skipped for loader in self.loaders)

    def close(self) -> None:
        for it in self.iters:  # stops DataLoader worker processes of an unfinished epoch
            it.close()
        self.iters = []


class _Run:
    def __init__(self, cfg: ExperimentConfig, world: D.World, report: Optional[Report]):
        self.cfg, self.world, self.report = cfg, world, report
        t = cfg.train
        self.run_dir = Path(t.output_dir)
        self.ckpt_dir = Path(t.checkpoint_dir) if t.checkpoint_dir else self.run_dir / "checkpoints"
        self.main = world.is_main
        self.G = t.gradient_accumulation_steps
        self.end_step = t.stop_after or t.steps
        self.images_per_step = t.micro_batch_size * self.G * world.world_size
        self.nan_steps = set(t.debug_nan_steps)
        self.step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.last_train: dict = {}
        self.last_ckpt: Optional[Path] = None
        self.last_ckpt_step = -1
        self._plain = None
        self._recon_batch: Optional[torch.Tensor] = None
        self._batch_log = None
        self.log: Optional[MetricsWriter] = None
        self.skipped_samples = 0  # corrupt training samples skipped over all ranks (data.skip_corrupt)

    # -- set-up ---------------------------------------------------------------------------------
    def _build(self) -> None:
        import deepspeed

        from avi_scale.model import AttentiveVAE

        cfg, t = self.cfg, self.cfg.train
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        # identical initial weights on every rank (ZeRO-3 partitions each rank's own copy)
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        model = AttentiveVAE(cfg.model)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops = count_flops(cfg.model) if self.main else {"train_per_image": 0.0}
        self.guard = StepGuard(cfg.train.skip_threshold)
        optimizer = build_optimizer(model, cfg.optim, self.guard)
        self.ds_config = build_ds_config(cfg, self.world.world_size)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.optimizer = optimizer
        self.wrapped = self.engine.optimizer is not optimizer
        if self.wrapped:  # DeepSpeed's ZeRO/bf16/fp16 optimizer computes the global norm before our step
            wrapper = self.engine.optimizer
            self.guard.norm_source = lambda: wrapper._global_grad_norm
        self.zero3 = self.engine.zero_optimization_stage() == 3
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]
        # under ZeRO-3, gathered weights outlive a no-grad forward: drop them whenever the EMA
        # swaps values into (and out of) the partitions, so that the next forward gathers those
        release = self.engine.empty_partition_cache if self.zero3 else None
        self.ema = EMA(self.engine.module, t.ema_decay, release)
        self.ckpt = Checkpointer(self.ckpt_dir, t.keep_checkpoints, self.world.rank, self.world.world_size)
        pin = self.world.device.type == "cuda"
        self.streams = _TrainStreams(cfg, self.world.rank, self.world.world_size, pin)
        self.val_loader = self._val_loader(pin)
        self.peak = peak_tflops(self.world.device, t.precision, t.peak_tflops)

    def _resume(self) -> Optional[Path]:
        """Load the checkpoint ``train.resume`` points at; returns its path (None: fresh start)."""
        t = self.cfg.train
        if t.resume == "never":
            return None
        source = self.ckpt_dir if t.resume == "auto" else Path(t.resume)
        if t.resume != "auto" and has_model_states(source):
            tag_dir = source  # named explicitly, e.g. the output of ds_to_universal.py
        else:
            tag_dir = resolve(source) if source.exists() else None
        if tag_dir is None:
            if t.resume != "auto":
                raise FileNotFoundError(f"train.resume={t.resume!r}: no complete checkpoint there")
            return None
        state = self.ckpt.load(self.engine, tag_dir)
        slots = self.streams.num_slots
        if state["data_slots"] != slots or state["micro_batch_size"] != t.micro_batch_size:
            raise RuntimeError(
                f"{tag_dir} was written with {state['data_slots']} data slots of {state['micro_batch_size']} "
                f"images (world_size x gradient_accumulation_steps x micro_batch_size); this run has "
                f"{slots} of {t.micro_batch_size}. Keep world_size * gradient_accumulation_steps and "
                "micro_batch_size when resuming, so that every step sees the same global batch.")
        self.step = state["step"]
        self.skipped_total = state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]
        self.ema.load_full_state_dict(state["ema"]["state_dict"], state["ema"]["num_updates"])
        rng = state["rng"].get(self.world.rank)
        if rng is not None and state["world_size"] == self.world.world_size:
            _set_rng_state(rng)
        self.streams.start(state["loaders"])
        self.last_ckpt, self.last_ckpt_step = tag_dir, self.step
        return tag_dir

    def _check_outputs(self) -> None:
        """Before anything is built: every rank can write the checkpoint directory, rank 0 the run
        directory; otherwise all ranks raise the same :class:`OutputDirError` naming the key."""
        problems = []
        if self.main:
            problems.append(ensure_writable(self.run_dir, "train.output_dir"))
        key = "train.checkpoint_dir" if self.cfg.train.checkpoint_dir else "train.output_dir (its checkpoints/)"
        problems.append(ensure_writable(self.ckpt_dir, key, probe=f".avi-write-probe-rank{self.world.rank}"))
        found = sorted({p for part in D.all_gather_object([p for p in problems if p]) for p in part})
        if found:
            raise OutputDirError("; ".join(found) + ". Nothing was trained: choose another directory or make it "
                                 "writable, then rerun.")

    def _prepare_run_dir(self) -> None:
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        D.barrier()

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict:
        self._check_outputs()
        self._build()
        self._prepare_run_dir()
        self.steps_per_epoch = self.streams.num_batches
        try:
            resumed_from = self._resume()
            if not self.streams.iters:
                self.streams.start()
            self.log = MetricsWriter(self.run_dir, self.main, self.cfg.train.steps, self.step,
                                     self.cfg.train.progress_bar)
            if resumed_from is not None:
                self.log.write(f"resumed from {resumed_from} at step {self.step}")
            self._batch_log = self._open_batch_log()
            self._train_until(self.end_step)
            return self._finish()
        finally:
            self.streams.close()
            if self.log is not None:
                self.log.close()
            if self._batch_log is not None:
                self._batch_log.close()

    def _open_batch_log(self):
        if not self.cfg.train.batch_log:
            return None
        path = self.run_dir / "batches" / f"rank{self.world.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():  # drop what a crashed run logged after its last checkpoint (and a torn last line)
            kept = [ln for ln in path.read_text().splitlines()
                    if (row := _json_or_none(ln)) is not None and row["step"] < self.step]
        path.write_text("".join(ln + "\n" for ln in kept))
        return open(path, "a", buffering=1)

    def _train_until(self, end: int) -> None:
        t = self.cfg.train
        window = _Window(self.cfg.model.num_layers, self.world.device)
        while self.step < end:
            self._one_step(window)
            self.step += 1
            self.log.advance(1, {"neg_elbo": f"{window.last_neg_elbo:.2f}"})
            final = self.step == end
            if self.step % t.log_every == 0 or final:
                self.last_train = self._log_window(window)
                window = _Window(self.cfg.model.num_layers, self.world.device)
            saved = None
            if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or final:
                saved = self._save()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:  # the end evaluates in _finish
                self._evaluate_and_report(saved)

    def _one_step(self, window: "_Window") -> None:
        t, engine = self.cfg.train, self.engine
        lr = learning_rate(self.step, self.cfg.optim, t.steps)
        beta = kl_beta(self.step, t)
        set_lr(self.optimizer, lr)
        started = time.perf_counter()
        waited = 0.0
        local = torch.zeros(4 + self.cfg.model.num_layers, dtype=torch.float64, device=self.world.device)
        bad_loss = torch.zeros(1, device=self.world.device)
        # a skipped step must not change the BatchNorm statistics either (a NaN batch would poison them)
        buffers = list(self.engine.module.buffers())
        saved_buffers = [b.detach().clone() for b in buffers]
        for m in range(self.G):
            t0 = time.perf_counter()
            x, _ = self.streams.next(m)
            waited += time.perf_counter() - t0
            if self._batch_log is not None:
                self._batch_log.write(json.dumps({"step": self.step, "slot": self.streams.slots[m],
                                                  "ids": _image_ids(x)}) + "\n")
            torch.manual_seed(noise_seed(t.seed, "train", self.step, self.streams.slots[m]))
            x = x.to(self.world.device, non_blocking=True)
            out = engine(x, beta=beta)
            loss = out.loss
            if self.step in self.nan_steps:
                loss = loss * float("nan")
            bad_loss = torch.maximum(bad_loss, (~torch.isfinite(loss.detach())).float())
            if m == self.G - 1:
                D.all_reduce(bad_loss, "max")
            engine.backward(loss)
            if m == self.G - 1:
                pending = None if self.wrapped else grad_norm(self.params)
                self.guard.begin(force_skip=bool(bad_loss.item()), pending_norm=pending)
            engine.step()
            n = x.shape[0]
            local[0] += loss.detach().double() * n
            local[1] += out.neg_elbo.double().sum()
            local[2] += out.recon_nll.double().sum()
            local[3] += n
            local[4:] += out.kl.double().sum(0)
        applied = engine.was_step_applied() and self.guard.called and not self.guard.skipped
        if self.guard.called:
            norm = self.guard.norm
        else:  # DeepSpeed discarded the step itself (non-finite gradients)
            ds_norm = engine.get_global_grad_norm()
            norm = float("nan") if ds_norm is None else float(ds_norm)
        step_time = time.perf_counter() - started
        if applied:
            self.ema.update()
            self.consecutive_skips = 0
            window.add(local, norm, step_time, waited)
        else:
            with torch.no_grad():
                for b, saved in zip(buffers, saved_buffers):
                    b.copy_(saved)
            self.skipped_total += 1
            self.consecutive_skips += 1
            window.skip(step_time, waited)
            if self.main:  # steps are numbered from 1 in messages, as in metrics.jsonl and checkpoint tags
                self.log.write(f"step {self.step + 1}: skipped (loss finite: {not bad_loss.item()}, "
                               f"grad norm {norm:.4g}); {self.consecutive_skips} in a row, {self.skipped_total} "
                               f"in all")
            if self.consecutive_skips >= t.max_consecutive_skips:
                self.step += 1
                path = self._save()
                raise TrainingDiverged(
                    f"{self.consecutive_skips} consecutive steps skipped (last: step {self.step}, grad norm "
                    f"{norm:.4g}, loss finite: {not bad_loss.item()}); checkpoint of the last good weights saved "
                    f"at {path}. Lower optim.lr, set optim.gradient_clipping, or raise train.skip_threshold "
                    f"(now {t.skip_threshold}) / train.max_consecutive_skips (now {t.max_consecutive_skips}).")
        window.lr, window.beta = lr, beta

    def _log_window(self, window: "_Window") -> dict:
        sums = D.all_reduce(window.sums.clone())
        memory = D.all_reduce(torch.tensor([current_memory_mb(self.world.device), peak_memory_mb(self.world.device),
                                            model_state_mb(self.engine.module, self.optimizer)],
                                           dtype=torch.float64, device=self.world.device), "max")
        n = sums[3].item()
        elapsed = window.time or float("nan")
        m: dict[str, Any] = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        if n > 0:
            kl_layers = (sums[4:] / n).tolist()
            neg_elbo = sums[1].item() / n
            m.update(loss=sums[0].item() / n, neg_elbo=neg_elbo, bpd=neg_elbo / (self._num_dims * math.log(2.0)),
                     recon_nll=sums[2].item() / n, kl=sum(kl_layers), kl_per_layer=kl_layers)
        skipped = D.all_reduce(torch.tensor([float(self.streams.skipped)], dtype=torch.float64,
                                            device=self.world.device))
        images_per_s = self.images_per_step * window.steps / elapsed
        tflops = self.flops["train_per_image"] * images_per_s / self.world.world_size / 1e12
        m.update(
            grad_norm=(sum(window.norms) / len(window.norms)) if window.norms else float("nan"),
            lr=window.lr, beta=window.beta, skipped_steps=self.skipped_total, skipped_samples=int(skipped.item()),
            images_per_s=images_per_s, step_time_s=elapsed / max(window.steps, 1),
            data_wait_frac=window.waited / elapsed, mem_mb=memory[0].item(), peak_mem_mb=memory[1].item(),
            model_state_mb=memory[2].item(), tflops=tflops,
        )
        if self.peak:
            m["mfu"] = tflops / self.peak
        if m["skipped_samples"] > self.skipped_samples:
            self.log.write(f"step {self.step}: {m['skipped_samples']} corrupt training sample(s) skipped so far "
                           f"(data.skip_corrupt; the loaders log which)")
        self.skipped_samples = m["skipped_samples"]
        self.log.record("train", m)
        return m

    @property
    def _num_dims(self) -> int:
        c = self.cfg.model
        return c.image_channels * c.image_size * c.image_size

    # -- checkpoints ----------------------------------------------------------------------------
    def _client_state(self) -> Optional[dict]:
        ema_sd = self.ema.full_state_dict()  # collective under ZeRO-3
        loaders: dict = {}
        for part in D.all_gather_object(self.streams.state()):
            loaders.update(part)
        rngs = dict(enumerate(D.all_gather_object(_rng_state())))
        if not self.main:
            return None
        epoch, pos = divmod(self.step, self.steps_per_epoch)
        return {
            "format": CLIENT_FORMAT, "step": self.step, "epoch": epoch, "batch_in_epoch": pos,
            "steps_per_epoch": self.steps_per_epoch, "world_size": self.world.world_size,
            "gradient_accumulation_steps": self.G, "data_slots": self.streams.num_slots,
            "micro_batch_size": self.cfg.train.micro_batch_size, "loaders": loaders, "rng": rngs,
            "ema": {"state_dict": ema_sd, "num_updates": self.ema.num_updates, "decay": self.ema.decay},
            "skipped_steps": self.skipped_total, "consecutive_skips": self.consecutive_skips,
            "skipped_samples": sum(state.get("skipped", 0) for state in loaders.values()),
            "config": to_dict(self.cfg), "ds_config": self.ds_config,
        }

    def _sync_buffers(self) -> None:
        """Average BatchNorm running statistics over ranks (each rank saw its own batches)."""
        if self.world.world_size == 1:
            return
        for b in self.engine.module.buffers():
            if b.is_floating_point():
                D.all_reduce(b.data)
                b.data /= self.world.world_size

    def _save(self) -> Path:
        if self.last_ckpt_step == self.step and self.last_ckpt is not None:
            return self.last_ckpt
        self._sync_buffers()
        path = self.ckpt.save(self.engine, self.step, self._client_state())
        self.last_ckpt, self.last_ckpt_step = path, self.step
        return path

    # -- evaluation -----------------------------------------------------------------------------
    def _val_loader(self, pin_memory: bool):
        """This rank's validation loader, or None when the data names no validation split."""
        from avi_scale.data import build_loader, split_urls

        try:
            split_urls(self.cfg.data, "val")
        except ValueError:
            return None
        return build_loader(self.cfg.data, "val", self.cfg.train.micro_batch_size, self.world.rank,
                            self.world.world_size, pin_memory=pin_memory)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Negative ELBO, bits/dim, reconstruction and per-layer KL of the EMA weights on the
        validation split (each sample once over all ranks; noise seeded per rank and batch)."""
        t, mcfg = self.cfg.train, self.cfg.model
        module = self.engine.module
        self._sync_buffers()
        sums = torch.zeros(4 + mcfg.num_layers, dtype=torch.float64, device=self.world.device)
        skipped_before = self.val_loader.skipped
        it = iter(self.val_loader)
        i = 0
        with self.ema.swapped():
            module.eval()
            try:
                while True:
                    batch = next(it, None) if (t.eval_batches == 0 or i < t.eval_batches) else None
                    if self.zero3:  # ZeRO-3 gathers weights collectively: every rank runs every forward
                        more = D.all_reduce(torch.tensor([float(batch is not None)], device=self.world.device), "max")
                        if more.item() == 0:
                            break
                        if batch is None:
                            shape = (1, mcfg.image_channels, mcfg.image_size, mcfg.image_size)
                            module(torch.zeros(shape, device=self.world.device), beta=1.0)
                            i += 1
                            continue
                    elif batch is None:
                        break
                    x = batch[0]
                    if self._recon_batch is None and self.main:
                        self._recon_batch = x[:16].clone()
                    torch.manual_seed(noise_seed(t.seed, "eval", self.world.rank, i))
                    out = module(x.to(self.world.device), beta=1.0)
                    sums[0] += out.neg_elbo.double().sum()
                    sums[1] += out.recon_nll.double().sum()
                    sums[3] += x.shape[0]
                    sums[4:] += out.kl.double().sum(0)
                    i += 1
            finally:
                it.close()  # an unfinished pass (train.eval_batches) stops its loader workers
                module.train()
        sums[2] = float(self.val_loader.skipped - skipped_before)  # (slot 2 is otherwise unused)
        D.all_reduce(sums)
        n = sums[3].item()
        if n == 0:
            raise RuntimeError("the validation split is empty" + (" (every sample was skipped as corrupt)"
                                                                   if sums[2].item() else ""))
        kl_layers = (sums[4:] / n).tolist()
        neg_elbo = sums[0].item() / n
        return {
            "val_neg_elbo": neg_elbo, "val_nll": neg_elbo,
            "val_bpd": neg_elbo / (self._num_dims * math.log(2.0)),
            "val_recon_nll": sums[1].item() / n, "val_kl": sum(kl_layers), "val_kl_per_layer": kl_layers,
            "val_images": int(n), "val_skipped_samples": int(sums[2].item()),
        }

    def _plain_model(self):
        """Rank 0: a plain AttentiveVAE holding the EMA weights and the (rank-averaged) buffers."""
        from avi_scale.model import AttentiveVAE

        ema_sd = self.ema.full_state_dict()  # collective under ZeRO-3
        buffers = {n: b.detach() for n, b in self.engine.module.named_buffers()}
        if not self.main:
            return None
        if self._plain is None:
            self._plain = AttentiveVAE(self.cfg.model).to(self.world.device)
        reference = self._plain.state_dict()
        state = {k: (ema_sd[k] if k in ema_sd else buffers[k]) for k in reference}
        self._plain.load_state_dict(state)
        return self._plain.eval()

    def _images(self, step: int, out_dir: Path) -> dict[str, str]:
        """Sample and reconstruction grids from the EMA weights (PNG + TensorBoard, rank 0)."""
        plain = self._plain_model()
        if plain is None:
            return {}
        e = self.cfg.eval
        torch.manual_seed(noise_seed(self.cfg.train.seed, "images", step))
        paths = {}
        samples = plain.sample(e.num_samples, temperature=e.temperatures[0] if e.temperatures else 1.0)
        nrow = max(1, int(math.sqrt(e.num_samples)))
        grid = image_grid(samples, nrow)
        paths["samples"] = str(save_png(grid, out_dir / "samples.png", scale=2))
        self.log.image("samples", grid, step)
        if self._recon_batch is not None:
            x = self._recon_batch.to(self.world.device)
            recon = plain.reconstruct(x)
            pairs = torch.stack([x.float(), recon.float()], dim=1).flatten(0, 1)  # original, recon, ...
            grid = image_grid(pairs, 8)
            paths["reconstructions"] = str(save_png(grid, out_dir / "reconstructions.png", scale=2))
            self.log.image("reconstructions", grid, step)
        return paths

    def _evaluate_and_report(self, checkpoint: Optional[Path], out_dir: Optional[Path] = None) -> dict:
        m: dict[str, Any] = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        if self.val_loader is not None:
            m.update(self.evaluate())
            m["images"] = self._images(self.step, out_dir or self.run_dir / "images" / f"step{self.step:08d}")
        m["checkpoint"] = str(checkpoint) if checkpoint is not None else None
        self.log.record("eval", m)
        if self.report is not None:
            self.report({**self.last_train, **m})
        return m

    # -- the end ---------------------------------------------------------------------------------
    def _param_fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.engine.module.parameters():
            if self.zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p]):
                    h.update(p.detach().float().cpu().numpy().tobytes())
            else:
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def _finish(self) -> dict:
        finished = self.step >= self.cfg.train.steps
        checkpoint = self._save()
        result: dict[str, Any] = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                  "finished": finished, "skipped_steps": self.skipped_total,
                                  "skipped_samples": self.skipped_samples,
                                  "num_parameters": self.num_params, "run_dir": str(self.run_dir),
                                  "checkpoint": str(checkpoint)}
        result.update({k: v for k, v in self.last_train.items() if k not in ("step", "epoch")})
        if finished:
            result.update({k: v for k, v in self._evaluate_and_report(checkpoint, self.run_dir / "final").items()
                           if k not in ("step", "epoch", "checkpoint")})
            export = self.run_dir / "final" / "model.pt"
            if self.main:
                export_consolidated(checkpoint, export)
            result["export"] = str(export)
        hashes = D.all_gather_object(self._param_fingerprint())
        result["param_sha256"] = hashes
        result["params_consistent"] = len(set(hashes)) == 1
        if not result["params_consistent"] and self.main:
            self.log.write(f"WARNING: parameters differ between ranks: {hashes}")
        self.log.record("final", result)
        D.barrier()
        return result


class _Window:
    """Sums over the steps since the last log line (local to this rank until logged)."""

    def __init__(self, num_layers: int, device: torch.device):
        self.sums = torch.zeros(4 + num_layers, dtype=torch.float64, device=device)
        self.norms: list[float] = []
        self.steps = 0
        self.time = 0.0
        self.waited = 0.0
        self.lr = float("nan")
        self.beta = float("nan")
        self.last_neg_elbo = float("nan")

    def add(self, local: torch.Tensor, norm: float, step_time: float, waited: float) -> None:
        self.sums += local
        self.norms.append(norm)
        self.last_neg_elbo = (local[1] / local[3]).item()
        self.skip(step_time, waited)

    def skip(self, step_time: float, waited: float) -> None:
        self.steps += 1
        self.time += step_time
        self.waited += waited
