"""The one training loop: ``train(cfg, report=None) -> dict``, run once per rank.

The CLI (``avi-train``), every launcher in ``launch/`` and Ray Tune trials call :func:`train`.  The
:class:`Trainer` builds the run from its components (``avi_scale/engine/components/``), resumes it, loops
and finishes:

* ``model``: the AttentiveVAE under DeepSpeed, its guarded optimizer and EMA;
* ``streams``: this rank's training data slots (and the ``train.batch_log`` audit);
* ``state``: the step and skip counters, RNG capture and the posterior-noise seeds;
* ``checkpointer``: client state, saves and ``train.resume``;
* ``validator``: the validation pass and the image grids of the EMA weights;
* ``metrics``: the named loss sums and the ``train`` rows of ``metrics.jsonl``.

One optimizer step consumes one micro-batch from each of this rank's ``gradient_accumulation_steps`` data
slots; a step's global batch is made of ``world_size * gradient_accumulation_steps`` slots, and the
posterior noise of every micro-batch is seeded from (seed, step, slot).  What a step computes therefore
depends only on the global batch layout: 2 ranks x 1 micro-batch equals 1 rank x 2 accumulated
micro-batches, and a resumed run replays exactly.  Per step: learning rate and KL weight from the
schedules, forward/backward through the DeepSpeed engine, ``engine.step()`` (the step guard may discard
it; see :mod:`avi_scale.engine.optim`), EMA update for applied steps; a discarded step also gets its
BatchNorm statistics restored.  Every ``log_every`` steps rank 0 writes averaged metrics; every
``checkpoint_every`` steps all ranks save; every ``eval_every`` steps the EMA weights are evaluated, image
grids written and ``report(metrics)`` called on every rank.  At the end: a last checkpoint, evaluation,
sample/reconstruction PNGs and a consolidated fp32 export.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from avi_scale.config import ExperimentConfig, save_config, to_dict
from avi_scale.engine import distributed as D
from avi_scale.engine.components.checkpointer import TrainCheckpointer, check_outputs
from avi_scale.engine.components.metrics import LogWindow, Sums, TrainLog
from avi_scale.engine.components.model import build_model, param_fingerprint
from avi_scale.engine.components.state import TrainState, noise_seed
from avi_scale.engine.components.streams import BatchLog, TrainStreams
from avi_scale.engine.components.validator import Validator
from avi_scale.engine.distributed import World
from avi_scale.engine.metrics import MetricsWriter, peak_tflops
from avi_scale.engine.optim import grad_norm, set_lr
from avi_scale.engine.schedule import kl_beta, learning_rate

Report = Callable[[dict], None]


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps were skipped; a checkpoint of the last good state was saved."""


def train(cfg: ExperimentConfig, report: Optional[Report] = None) -> dict:
    """Train ``cfg`` on this rank and return the final metrics (the same dict on every rank).

    ``report``, if given, is called on every rank at each evaluation with that evaluation's
    metrics (identical on all ranks, as Ray Train wants) including ``step``, ``epoch`` and
    ``checkpoint`` (the checkpoint saved at that step, or None).  Works under the deepspeed
    launcher, torchrun, srun, inside a process group someone else created (Ray Train), and alone.
    """
    with D.process_group(cfg.train.device) as world:
        deterministic_before = torch.are_deterministic_algorithms_enabled()
        try:
            trainer = Trainer(cfg, world, report)
            try:
                return trainer.run()
            finally:
                trainer.close()
        finally:
            torch.use_deterministic_algorithms(deterministic_before)


class Trainer:
    """One run on this rank: built, resumed and with its output files open once constructed."""

    def __init__(self, cfg: ExperimentConfig, world: World, report: Optional[Report] = None):
        t = cfg.train
        self.cfg, self.world, self.report = cfg, world, report
        self.run_dir = Path(t.output_dir)
        self.end_step = t.stop_after or t.steps
        self.nan_steps = set(t.debug_nan_steps)
        check_outputs(t, world)
        self.parts = build_model(cfg, world)
        self.engine, self.optimizer, self.ema = self.parts.engine, self.parts.optimizer, self.parts.ema
        pin = world.device.type == "cuda"
        self.streams = TrainStreams(cfg.data, t.micro_batch_size, t.gradient_accumulation_steps, world, pin)
        self.validator = Validator(cfg.data, cfg.model, cfg.eval, t, world, self.parts.zero3, pin)
        self.steps_per_epoch = self.streams.num_batches
        self.state = TrainState()
        self.checkpointer = TrainCheckpointer(t, world, self.engine, self.state, self.streams, self.ema,
                                              self.steps_per_epoch, to_dict(cfg), self.parts.ds_config)
        self._prepare_run_dir()
        self.writer: Optional[MetricsWriter] = None
        self.batch_log: Optional[BatchLog] = None
        try:
            resumed_from = self.checkpointer.resume()
            self.streams.start()
            self.writer = MetricsWriter(self.run_dir, world.is_main, t.steps, self.step, t.progress_bar,
                                        cfg.logging, cfg.name, to_dict(cfg))
            if resumed_from is not None:
                self.writer.write(f"resumed from {resumed_from} at step {self.step}")
            self.batch_log = BatchLog(self.run_dir, world.rank, self.step, t.batch_log)
            images_per_step = t.micro_batch_size * t.gradient_accumulation_steps * world.world_size
            self.metrics = TrainLog(self.writer, world, cfg.model, images_per_step,
                                    self.parts.train_flops_per_image,
                                    peak_tflops(world.device, t.precision, t.peak_tflops), self.engine.module,
                                    self.optimizer)
        except BaseException:
            self.close()
            raise

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (the 0-based index of the next one)."""
        return self.state.step

    @property
    def epoch(self) -> float:
        return self.state.step / self.steps_per_epoch

    def _prepare_run_dir(self) -> None:
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.parts.ds_config, indent=2) + "\n")
        D.barrier()

    def close(self) -> None:
        """Stop the data iterators and close the output files (also after a failure)."""
        self.streams.close()
        if self.writer is not None:
            self.writer.close()
        if self.batch_log is not None:
            self.batch_log.close()

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train up to ``train.stop_after`` (or ``train.steps``), then finish; returns the final metrics."""
        t = self.cfg.train
        while self.step < self.end_step:
            self.train_step(self.metrics.window)
            self.state.step += 1
            self.writer.advance(1, {"neg_elbo": f"{self.metrics.window.last_neg_elbo:.2f}"})
            final = self.step == self.end_step
            if self.step % t.log_every == 0 or final:
                self.metrics.log(self.step, self.epoch, self.state.skipped_steps, self.streams.skipped)
            saved = None
            if (t.checkpoint_every and self.step % t.checkpoint_every == 0) or final:
                saved = self.checkpointer.save()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:  # the end evaluates in _finish
                self._evaluate_and_report(saved)
        return self._finish()

    def train_step(self, window: LogWindow) -> None:
        """One optimizer step over this rank's slots, applied or skipped (a skip changes nothing: weights,
        optimizer, EMA and BatchNorm statistics, which a NaN batch would otherwise poison, stay)."""
        t = self.cfg.train
        lr, beta = learning_rate(self.step, self.cfg.optim, t.steps), kl_beta(self.step, t)
        set_lr(self.optimizer, lr)
        started = time.perf_counter()
        buffers = list(self.engine.module.buffers())
        saved_buffers = [b.detach().clone() for b in buffers]
        sums = Sums.zeros(self.cfg.model.num_layers, self.world.device)
        bad_loss, waited = self._forward_backward(beta, sums)
        guard = self.parts.guard
        applied = self.engine.was_step_applied() and guard.called and not guard.skipped
        norm = self._last_grad_norm()
        step_time = time.perf_counter() - started
        if applied:
            self.ema.update()
            self.state.applied()
            window.add(sums, norm, step_time, waited)
        else:
            with torch.no_grad():
                for b, kept in zip(buffers, saved_buffers):
                    b.copy_(kept)
            self.state.skipped()
            window.skip(step_time, waited)
            self._after_skip(norm, loss_finite=not bad_loss.item())
        window.lr, window.beta = lr, beta

    def _forward_backward(self, beta: float, sums: Sums) -> tuple[torch.Tensor, float]:
        """Forward, backward and ``engine.step()`` per micro-batch (DeepSpeed steps at the last one, once
        the guard knows whether any rank's loss is non-finite); returns (that flag, seconds waited for data)."""
        engine, guard, seed = self.engine, self.parts.guard, self.cfg.train.seed
        last = len(self.streams.slots) - 1
        waited = 0.0
        bad_loss = torch.zeros(1, device=self.world.device)
        for m, slot in enumerate(self.streams.slots):
            t0 = time.perf_counter()
            x, _ = self.streams.next(m)
            waited += time.perf_counter() - t0
            self.batch_log.write(self.step, slot, x)
            torch.manual_seed(noise_seed(seed, "train", self.step, slot))
            out = engine(x.to(self.world.device, non_blocking=True), beta=beta)
            loss = out.loss * float("nan") if self.step in self.nan_steps else out.loss
            bad_loss = torch.maximum(bad_loss, (~torch.isfinite(loss.detach())).float())
            if m == last:
                D.all_reduce(bad_loss, "max")
            engine.backward(loss)
            if m == last:
                pending = None if self.parts.wrapped else grad_norm(self.parts.params)
                guard.begin(force_skip=bool(bad_loss.item()), pending_norm=pending)
            engine.step()
            sums.add(out, loss)
        return bad_loss, waited

    def _last_grad_norm(self) -> float:
        """The global gradient norm of the step just taken (before clipping; NaN when unknown)."""
        if self.parts.guard.called:
            return self.parts.guard.norm
        ds_norm = self.engine.get_global_grad_norm()  # DeepSpeed discarded the step itself (non-finite)
        return float("nan") if ds_norm is None else float(ds_norm)

    def _after_skip(self, norm: float, loss_finite: bool) -> None:
        """Announce a skipped step; after ``train.max_consecutive_skips`` in a row save and stop."""
        t, s = self.cfg.train, self.state
        if self.world.is_main:  # steps are numbered from 1 in messages, as in metrics.jsonl and checkpoint tags
            self.writer.write(f"step {self.step + 1}: skipped (loss finite: {loss_finite}, grad norm {norm:.4g}); "
                              f"{s.consecutive_skips} in a row, {s.skipped_steps} in all")
        if s.consecutive_skips >= t.max_consecutive_skips:
            s.step += 1
            path = self.checkpointer.save()
            raise TrainingDiverged(
                f"{s.consecutive_skips} consecutive steps skipped (last: step {self.step}, grad norm "
                f"{norm:.4g}, loss finite: {loss_finite}); checkpoint of the last good weights saved "
                f"at {path}. Lower optim.lr, set optim.gradient_clipping, or raise train.skip_threshold "
                f"(now {t.skip_threshold}) / train.max_consecutive_skips (now {t.max_consecutive_skips}).")

    # -- evaluation and the end ----------------------------------------------------------------------
    def _evaluate_and_report(self, checkpoint: Optional[Path], out_dir: Optional[Path] = None) -> dict:
        """Validate the EMA weights, draw the grids, write the ``eval`` row and call ``report``."""
        m: dict[str, Any] = {"step": self.step, "epoch": self.epoch}
        if self.validator.enabled:
            module = self.engine.module
            m.update(self.validator.evaluate(module, self.ema))
            out_dir = out_dir or self.run_dir / "images" / f"step{self.step:08d}"
            m["images"] = self.validator.images(module, self.ema, self.step, out_dir, self.writer)
        m["checkpoint"] = str(checkpoint) if checkpoint is not None else None
        self.writer.record("eval", m)
        if self.report is not None:
            self.report({**self.metrics.last, **m})
        return m

    def _finish(self) -> dict:
        """The last checkpoint; when ``train.steps`` are done also the final evaluation and the export."""
        from avi_scale.engine.export import export_consolidated

        finished = self.step >= self.cfg.train.steps
        checkpoint = self.checkpointer.save()
        result: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "finished": finished,
                                  "skipped_steps": self.state.skipped_steps,
                                  "skipped_samples": self.metrics.skipped_samples,
                                  "num_parameters": self.parts.num_parameters, "run_dir": str(self.run_dir),
                                  "checkpoint": str(checkpoint)}
        result.update({k: v for k, v in self.metrics.last.items() if k not in ("step", "epoch")})
        if finished:
            final = self._evaluate_and_report(checkpoint, self.run_dir / "final")
            result.update({k: v for k, v in final.items() if k not in ("step", "epoch", "checkpoint")})
            export = self.run_dir / "final" / "model.pt"
            if self.world.is_main:
                export_consolidated(checkpoint, export)
            result["export"] = str(export)
        hashes = D.all_gather_object(param_fingerprint(self.engine.module, self.parts.zero3))
        result["param_sha256"] = hashes
        result["params_consistent"] = len(set(hashes)) == 1
        if not result["params_consistent"] and self.world.is_main:
            self.writer.write(f"WARNING: parameters differ between ranks: {hashes}")
        self.writer.record("final", result)
        D.barrier()
        return result
