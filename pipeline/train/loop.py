"""`ColorizerTrainer`: one DDP rank's training state and the recipe's steps, epochs, validation and checkpoints.

Only this module moves models to devices and wraps them (through the `prepare` function
`pipeline.train.worker` passes: Ray's `prepare_model`); it reports through the `report` function
it is given, so it runs without Ray in unit tests. `is_rank_zero` decides who logs and who writes
checkpoints; what a checkpoint holds is `pipeline.checkpoint`'s.

Each step is the recipe's: generate ab from L; one discriminator update on (L, fake ab detached)
as fake and (L, true ab) as real; then one generator update (GAN loss of fakes judged real +
lambda * L1) with the discriminator frozen. A stage without a GAN loss (the ResNet18 recipe's
pretraining) updates the generator on L1 alone.

About 700 lines on purpose: one class whose steps, epochs, validation (FID included) and checkpoints share one
rank's state (networks, optimizers, position, the epoch's worker groups); the few helpers beside it (the
progress bar, the step window, the shard cache's choice, two test hooks) are used only here.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
import zlib
from pathlib import Path

import torch
from torch import nn

from ingest import faults
from ingest.lab import lab8_to_network_torch
from pipeline.checkpoint import (
    Position,
    build_payload,
    epoch_global_batch,
    epoch_interleave,
    epoch_owned,
    epoch_splits,
    restore_networks,
    restore_optimizers,
)
from pipeline.config import StageConfig, TrainConfig
from pipeline.data.batches import LoaderOptions, prefetch, train_batches, validation_batches
from pipeline.data.epochs import rank_batches
from pipeline.data.plan import DataPlan
from pipeline.evaluation.validation import accumulate, finalize
from pipeline.losses import GANLoss, discriminator_loss, generator_loss
from pipeline.models import build_discriminator, build_generator
from pipeline.tracking.charts import SAMPLES_KEY
from pipeline.tracking.loggers import Logger, NullLogger
from pipeline.tracking.plots import sample_grid
from pipeline.train.failures import NonFiniteLoss

log = logging.getLogger(__name__)

TRAINED_LOG = "RECOLOR_TRAINED_LOG"  # test hooks: see ColorizerTrainer._log_trained and _wait_while_paused
TRAIN_PAUSE = "RECOLOR_TRAIN_PAUSE"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (or torch.compile) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def precision(config: TrainConfig, device: torch.device) -> tuple[torch.dtype | None, torch.memory_format]:
    """The autocast dtype (None: fp32) and memory format of the training step: on CUDA `amp` and `channels_last`;
    on CPUs bf16 and channels_last where `cpu_amp` turns them on (`pipeline.train.throughput.cpu_autocast`)."""
    if device.type == "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        return dtype, torch.channels_last if config.channels_last else torch.contiguous_format
    from pipeline.train.throughput import cpu_autocast

    on = cpu_autocast(config.cpu_amp)
    return (torch.bfloat16 if on else None), (torch.channels_last if on else torch.contiguous_format)


def floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss tensors as floats, with one device sync for all of them."""
    if not values:
        return {}
    return dict(zip(values, torch.stack([value.float() for value in values.values()]).tolist(), strict=True))


def host_batch(array, pinned: bool) -> torch.Tensor:
    batch = torch.from_numpy(array)
    return batch.pin_memory() if pinned else batch


def set_requires_grad(model: nn.Module, flag: bool) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(flag)


def step_seed(seed: int, rank: int, global_step: int) -> int:
    """The seed of one step on one rank: dropout masks depend only on (seed, rank, step), so resumes are exact."""
    return zlib.crc32(f"{seed}/{rank}/{global_step}".encode())


def lr_lambda(stage: StageConfig):
    """pix2pix's schedule: constant, then linear decay to zero over the last `decay_epochs` epochs."""
    constant = stage.epochs - stage.decay_epochs

    def factor(epoch: int) -> float:
        if stage.decay_epochs == 0 or epoch < constant:
            return 1.0
        return max(0.0, 1.0 - (epoch - constant + 1) / (stage.decay_epochs + 1))

    return factor


def load_backbone(uri: str) -> dict[str, torch.Tensor]:
    """A torchvision-layout resnet18 state dict from a file or s3:// URI (`{"state_dict": ...}` too).

    Raises:
        ConfigError: the file is not a torch file of tensors (naming it; never torch's advice to unpickle code).
    """
    from ingest.errors import ConfigError
    from ingest.storage import read_uri
    from pipeline.checkpoint import safe_torch_load

    data = read_uri(uri)
    try:
        state = safe_torch_load(io.BytesIO(data))
    except ValueError as e:
        raise ConfigError(f"model.backbone_weights {uri} is not a torch state dict: {e}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.backbone_weights {uri} is not a state dict (a mapping of names to tensors)")
    return state


class ColorizerTrainer:
    """Holds one rank's training state; `run()` trains every stage from the current position."""

    def __init__(
        self,
        config: TrainConfig,
        plan: DataPlan,
        rank: int,
        world_size: int,
        device: torch.device,
        prepare=None,
        logger: Logger | None = None,
        report=None,
        checkpoint_payload: dict | None = None,
    ):
        self.config = config
        self.plan = plan
        self.cache = shard_cache_for(config, plan)
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.is_rank_zero = rank == 0
        self.logger = logger if logger is not None and self.is_rank_zero else NullLogger()
        self.report = report or (lambda metrics, payload: None)
        self.position = Position()
        self.cuda = device.type == "cuda"
        self.autocast_dtype, self.memory_format = precision(config, device)

        model = config.model
        backbone = load_backbone(model.backbone_weights) if model.backbone_weights else None
        generator = build_generator(
            model.arch,
            norm=model.norm,
            base_filters=model.base_filters,
            num_downs=model.num_downs,
            backbone_state_dict=backbone,
            fusion=model.fusion,
            freeze_encoder=model.encoder == "frozen",
        )
        discriminator = build_discriminator(base_filters=model.base_filters, norm=model.norm)
        # The read order of the epoch in progress: the config's, except in an epoch resumed from a checkpoint
        # taken under another one (a changed data.interleave, or a checkpoint older than interleaving).
        self.interleave = config.data.interleave
        self.resumed_interleave: int | None = None
        # The run's samples a step, whatever the number of workers: a resume on another count keeps it (the rate
        # means the same), and each rank takes its share (`rank_batches`). The epoch's worker groups so far.
        self.global_batch = config.global_batch if config.elastic else config.data.batch_size * world_size
        self.splits: list[tuple[int, int]] = [(world_size, 0)]
        self.resumed_splits: list[tuple[int, int]] | None = None
        # Whether ranks read the shards they own (`owns_shards`): an epoch resumed mid-way keeps how it began.
        self.owned = owns_shards(config, plan)
        self.resumed_owned: bool | None = None
        if checkpoint_payload is not None:
            self.position = restore_networks(checkpoint_payload, generator, discriminator)
            self.resumed_interleave = epoch_interleave(checkpoint_payload)
            self.global_batch = epoch_global_batch(checkpoint_payload) or self.global_batch
            self.resumed_splits = epoch_splits(checkpoint_payload)
            self.resumed_owned = bool(epoch_owned(checkpoint_payload))
        if model.norm == "sync_batch" and world_size > 1:
            generator = nn.SyncBatchNorm.convert_sync_batchnorm(generator)
            discriminator = nn.SyncBatchNorm.convert_sync_batchnorm(discriminator)
        prepare = prepare or (lambda module: module.to(device))
        self.generator = prepare(generator.to(memory_format=self.memory_format))
        self.discriminator = prepare(discriminator.to(memory_format=self.memory_format))
        # The plain networks, for the calls that skip DDP: the generator step's frozen discriminator (no gradient
        # sync wanted) and validation. Compiled too with `compile`, so no call runs eager.
        self.plain_generator, self.plain_discriminator = unwrap(self.generator), unwrap(self.discriminator)
        if config.compile:
            self.generator = torch.compile(self.generator)
            self.discriminator = torch.compile(self.discriminator)
            self.plain_generator = torch.compile(self.plain_generator)
            self.plain_discriminator = torch.compile(self.plain_discriminator)
        self._resume_payload = checkpoint_payload
        self._started = time.time_ns()  # tells this worker group's steps from a restarted one's (test hooks)
        self._validations = 0  # validations so far in this worker group (`fid_every` counts them)
        self._fid_reference = None  # the truth's and gray's Inception features of this rank's validation share
        self._fid_unavailable = False
        self._group_started: int | None = None
        from pipeline.train.throughput import peak_flops

        self._peak_flops = peak_flops(device)
        self._step_flops: dict[bool, float] = {}  # model FLOPs of a step per sample, by whether D trains

    # ----------------------------------------------------------------------------------------- steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _mfu(self, samples_per_s: float, gan: bool) -> dict[str, float]:
        """{"train/mfu": ...} where the device's peak is known (`pipeline.train.throughput`), else {}."""
        from pipeline.train.throughput import step_flops_per_sample

        if self._peak_flops is None:
            return {}
        if gan not in self._step_flops:
            self._step_flops[gan] = step_flops_per_sample(
                self.plain_generator, self.plain_discriminator, self.plan.size, gan, self.device
            )
        return {"train/mfu": samples_per_s * self._step_flops[gan] / self._peak_flops}

    def _optimizers(self, stage: StageConfig):
        betas = (self.config.beta1, self.config.beta2)
        fused = self.cuda or None  # one kernel a step on CUDA; torch picks on the CPU
        groups = getattr(unwrap(self.generator), "parameter_groups", None)  # a pretrained encoder: its own lr, or none
        params_g = groups(stage.lr, self.config.model.encoder_lr_scale) if groups else self.generator.parameters()
        opt_g = torch.optim.Adam(params_g, lr=stage.lr, betas=betas, fused=fused)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=stage.lr, betas=betas, fused=fused)
        schedule = lr_lambda(stage)
        return (
            opt_g,
            opt_d,
            torch.optim.lr_scheduler.LambdaLR(opt_g, schedule),
            torch.optim.lr_scheduler.LambdaLR(opt_d, schedule),
        )

    def train_step(self, batch: torch.Tensor, stage: StageConfig, gan_loss: GANLoss | None, opts,
                   weight: float = 1.0) -> dict[str, float]:  # fmt: skip
        """One step on a uint8 Lab batch: D update, then G update with D frozen (or L1 only).

        `weight` scales what is back-propagated (not the losses returned): a rank holding k of a global batch B over
        N ranks weighs N*k/B, so DDP's mean over ranks is the mean over the global batch when shares differ."""
        opt_g, opt_d = opts
        light, real_ab = lab8_to_network_torch(batch.to(self.device, non_blocking=True))
        light, real_ab = (
            light.contiguous(memory_format=self.memory_format),
            real_ab.contiguous(memory_format=self.memory_format),
        )
        with self._autocast():
            fake_ab = self.generator(light)
        losses: dict[str, torch.Tensor] = {}
        if gan_loss is not None:
            # Discriminator: fakes (detached, so G gets no gradient here) judged fake, reals judged real.
            set_requires_grad(self.discriminator, True)
            opt_d.zero_grad(set_to_none=True)
            with self._autocast():
                fake_logits = self.discriminator(torch.cat([light, fake_ab.detach()], dim=1))
                real_logits = self.discriminator(torch.cat([light, real_ab], dim=1))
            d_losses = discriminator_loss(gan_loss, fake_logits.float(), real_logits.float())
            (d_losses["loss_D"] * weight if weight != 1.0 else d_losses["loss_D"]).backward()
            opt_d.step()
            losses.update(d_losses)
            # Generator: the discriminator is frozen and called unwrapped, so DDP syncs no D gradients.
            set_requires_grad(self.discriminator, False)
            opt_g.zero_grad(set_to_none=True)
            with self._autocast():
                logits = self.plain_discriminator(torch.cat([light, fake_ab], dim=1))
            g_losses = generator_loss(gan_loss, logits.float(), fake_ab.float(), real_ab, self.config.l1_lambda)
            (g_losses["loss_G"] * weight if weight != 1.0 else g_losses["loss_G"]).backward()
            opt_g.step()
            losses.update(g_losses)
        else:
            opt_g.zero_grad(set_to_none=True)
            loss_l1 = nn.functional.l1_loss(fake_ab.float(), real_ab) * self.config.l1_lambda
            (loss_l1 * weight if weight != 1.0 else loss_l1).backward()
            opt_g.step()
            losses.update(loss_G_L1=loss_l1, loss_G=loss_l1)
        return {f"train/{name}": value.detach() for name, value in losses.items()}  # tensors: no device sync per step

    @torch.no_grad()
    def validate(self, grid_name: str | None = None, step: int | None = None) -> dict[str, float]:
        """Metrics on this rank's share of the validation split, all-reduced; gray baseline beside them. With several
        datasets, each one's too, as `val/<dataset>/<metric>` (`data.max_val_batches` caps each one).

        Rank 0 also logs a sample grid of its first validation batch (the same images every epoch).
        """
        generator = unwrap(self.generator)
        was_training = generator.training
        generator.eval()  # the plain (maybe compiled) module shares these weights and this mode
        sources = range(len(self.plan.refs)) if len(self.plan.refs) > 1 else [None]
        overall, first, metrics = None, None, {}
        self._validations += 1
        features = self._fid_features()
        for source in sources:
            plan = self.plan if source is None else self.plan.source(source)
            batches = validation_batches(
                plan, self.rank, self.world_size, self.config.data.batch_size, self.config.data.max_val_batches,
                cache=self.cache,
            )  # fmt: skip
            # fp32, as `recolor evaluate` scores: the same checkpoint gets the same metrics in both.
            totals, source_first = accumulate(
                self.plain_generator,
                prefetch(batches, self.config.data.prefetch_batches),
                self.device,
                memory_format=self.memory_format,
                on_batch=features.on_batch if features is not None else None,
            )
            if self.world_size > 1:
                torch.distributed.all_reduce(totals)
            if source is not None:
                metrics |= finalize(totals, prefix=f"val/{self.plan.refs[source].partition('@')[0]}/")
            overall = totals if overall is None else overall + totals
            first = first if first is not None else source_first
        generator.train(was_training)
        if grid_name and first is not None:
            self.logger.log_image(sample_grid(*first), grid_name, key=SAMPLES_KEY, step=step)
        if features is not None:
            metrics |= self._fid_scores(features)
        return finalize(overall) | metrics

    def _fid_features(self):
        """The collector of this validation's Inception features (`fid_every`), or None: not this time, or the
        network is not installed (said once)."""
        from pipeline.evaluation.fid import FidUnavailable
        from pipeline.evaluation.per_image import FidFeatures

        every = self.config.fid_every
        if not every or self._validations % every or self._fid_unavailable:
            return None
        try:
            return FidFeatures(self.device, self._fid_reference)
        except FidUnavailable as e:
            self._fid_unavailable = True
            if self.is_rank_zero:
                log.warning("fid_every=%d: %s; training goes on without val/fid", every, e)
            return None

    def _fid_scores(self, features) -> dict[str, float]:
        """FID and KID of the model (and the gray baseline) against the truth over every rank's validation share:
        the features gathered, scored on rank 0, the scores shared. The truth's and gray's features are kept for
        the next validations (the same samples each time)."""
        self._fid_reference = features.reference()
        local = features.sets()
        gathered = [local]
        if self.world_size > 1:
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, local)
        names = ("val/fid", "val/kid", "val/kid_std", "val/gray_fid", "val/gray_kid", "val/gray_kid_std")
        scores = {}
        if self.is_rank_zero:
            from pipeline.evaluation.fid import FeatureSets

            merged = FeatureSets.of({name: [part[name] for part in gathered] for name in local})
            scores = merged.scores("val/", kid_subsets=20)
        scored, *values = self._sum_over_ranks(1.0 if scores else 0.0, *(scores.get(name, 0.0) for name in names))
        return dict(zip(names, values, strict=True)) if scored else {}

    # ------------------------------------------------------------------------------------ checkpoints

    def payload(self, next_position: Position, opts, scheds) -> dict:
        generator, discriminator = unwrap(self.generator), unwrap(self.discriminator)
        splits = self.splits if next_position.step_in_epoch else [(self.world_size, 0)]
        return build_payload(generator, discriminator, opts, scheds, next_position, self.config, self.plan,
                             self.interleave, self.global_batch, splits, self.owned)  # fmt: skip

    # ---------------------------------------------------------------------------------------- the run

    def run(self) -> dict[str, float]:
        config = self.config
        last_metrics: dict[str, float] = {}
        progress = Progress(self.is_rank_zero)
        self._note_resize()
        for stage_index in range(self.position.stage, len(config.stages)):
            stage = config.stages[stage_index]
            gan_loss = GANLoss(stage.gan_mode) if stage.gan_mode else None
            opt_g, opt_d, sched_g, sched_d = self._optimizers(stage)
            resume = self._resume_payload
            if resume is not None:
                restore_optimizers(resume, stage_index, (opt_g, opt_d), (sched_g, sched_d))
            self._resume_payload = None
            opts, scheds = (opt_g, opt_d), (sched_g, sched_d)
            start_epoch = self.position.epoch if stage_index == self.position.stage else 0
            for epoch in range(start_epoch, stage.epochs):
                metrics = self._run_epoch(stage_index, stage, epoch, gan_loss, opts, scheds, progress)
                if metrics is None:  # max_steps reached
                    progress.close()
                    return last_metrics
                last_metrics = metrics
            self.position = Position(stage_index + 1, 0, 0, self.position.global_step)
        progress.close()
        return last_metrics

    def _run_epoch(self, stage_index, stage, epoch, gan_loss, opts, scheds, progress) -> dict | None:
        """One epoch from the position on: its steps, then `_end_epoch`. None when max_steps stopped the run."""
        config = self.config
        start_step = self.position.step_in_epoch if self.position.epoch == epoch else 0
        batches, steps, bad = self._epoch_batches(stage_index, epoch, start_step)
        progress.start_epoch(f"{stage.name} epoch {epoch + 1}/{stage.epochs}", steps, start_step)
        window = StepWindow()
        losses: dict[str, torch.Tensor] = {}
        step_in_epoch = start_step
        # Samples trained on this epoch: rank 0 counts the steps before this group's start (on whatever group ran
        # them), each rank its own since; summed over ranks at the epoch's end.
        trained = start_step * self.global_batch if self.rank == 0 else 0
        pinned = self.cuda  # page-locked host batches: the non_blocking copies to the GPU then really overlap
        source = iter(prefetch((host_batch(b, pinned) for b in batches), config.data.prefetch_batches))
        while (batch := window.next_batch(source)) is not None:
            if config.max_steps is not None and self.position.global_step >= config.max_steps:
                return None
            faults.maybe_fail("train_step", self.rank)
            if TRAIN_PAUSE in os.environ:
                self._wait_while_paused()
            torch.manual_seed(step_seed(config.seed, self.rank, self.position.global_step))
            losses = self.train_step(batch, stage, gan_loss, opts, self.world_size * batch.shape[0] / self.global_batch)
            if faults.maybe_fail("loss_nan", self.rank):  # drills: a step whose losses diverge
                losses = {name: value * float("nan") for name, value in losses.items()}
            step_in_epoch += 1
            trained += batch.shape[0]
            if TRAINED_LOG in os.environ:
                self._log_trained(batch, stage_index, epoch, step_in_epoch)
            self.position = Position(stage_index, epoch, step_in_epoch, self.position.global_step + 1)
            window.steps += 1
            progress.step()
            step = self.position.global_step
            if step % config.log_every == 0 or step_in_epoch == steps:
                self._log_steps(window, losses, stage_index, gan_loss is not None, opts, progress)
            if step_in_epoch < steps and step % config.checkpoint_every == 0:
                self._stop_if_diverged(floats(losses), stage_index)
                self._checkpoint({**floats(losses), "epoch": epoch, "stage": stage_index}, self.position, opts, scheds)
        return self._end_epoch(stage_index, stage, epoch, gan_loss, losses, opts, scheds, bad.bad, trained)

    def _epoch_batches(self, stage_index: int, epoch: int, start_step: int):
        """This rank's batches of an epoch from `start_step` (`pipeline.data.batches.train_batches`), read as the epoch
        began (its interleave, its worker groups): (batches, the epoch's steps, the corrupt-sample counter)."""
        config = self.config
        self.interleave = config.data.interleave
        if start_step and self.resumed_interleave not in (None, self.interleave):
            log.warning("finishing this epoch reading %d shard(s) at a time, as it began; data.interleave=%d from "
                        "the next", self.resumed_interleave, self.interleave)  # fmt: skip
            self.interleave = self.resumed_interleave
        self.resumed_interleave = None
        self.owned = owns_shards(config, self.plan)
        if start_step and self.resumed_owned is not None and self.resumed_owned != self.owned:
            log.warning("finishing this epoch with shard ownership %s, as it began; %s from the next",
                        "on" if self.resumed_owned else "off", "on" if self.owned else "off")  # fmt: skip
            self.owned = self.resumed_owned
        self.resumed_owned = None
        self.splits = self._epoch_splits(start_step)
        # Shuffles differ per stage and epoch; flips and windows too (they derive from the same numbers).
        shuffle_epoch = stage_index * 100_000 + epoch
        options = LoaderOptions(
            global_batch=self.global_batch,
            shuffle_window=config.data.shuffle_window,
            flip=config.data.flip,
            rotate=config.data.rotate_degrees,
            interleave=self.interleave,
            loader_workers=config.data.loader_workers or config.cpus_per_worker,
            loader_processes=config.data.loader_processes,
            max_bad_fraction=config.data.max_bad_fraction,
            owned_shards=self.owned,
        )
        return train_batches(
            self.plan, shuffle_epoch, config.seed, self.rank, self.world_size, options, start_step, self.splits,
            cache=self.cache,
        )  # fmt: skip

    def _log_steps(self, window: StepWindow, losses, stage_index: int, gan: bool, opts, progress) -> None:
        """The losses (one device sync) and throughput of the steps since the last log; a divergence stops here."""
        elapsed = time.perf_counter() - window.start
        images_per_s = window.steps * self.global_batch / elapsed
        throughput = {
            "train/workers": float(self.world_size),
            "train/images_per_s": images_per_s,
            "train/step_time_s": elapsed / window.steps,
            "data/wait_s": window.wait / window.steps,
            **self._mfu(images_per_s / self.world_size, gan),
        }
        values = floats(losses)  # the one device sync of these steps
        self._stop_if_diverged(values, stage_index)
        self.logger.log({**values, **throughput, "train/lr": opts[0].param_groups[0]["lr"]}, self.position.global_step)
        shown = {k.removeprefix("train/"): f"{v:.3g}" for k, v in values.items()
                 if k in ("train/loss_D", "train/loss_G", "train/loss_G_L1")}  # fmt: skip
        progress.update(shown | {"img/s": f"{images_per_s:.1f}"})
        window.restart()

    def _end_epoch(self, stage_index, stage, epoch, gan_loss, losses, opts, scheds, bad: int, trained: int) -> dict:
        """Epoch end: schedule, validation on every rank, the epoch's metrics, a checkpoint pointing at the next."""
        # The discriminator's schedule advances only in stages that train it (an L1-only stage never steps opt_d).
        for scheduler in scheds if gan_loss is not None else scheds[:1]:
            scheduler.step()
        self._sync_buffers()
        self._stop_if_diverged(floats(losses), stage_index)
        grid = f"samples/{stage_index}-{stage.name}/epoch_{epoch + 1:03d}.png"
        store_bytes, cache_bytes = self.cache.stats.take() if self.cache is not None else (0, 0)
        bad_samples, epoch_samples, store_bytes, cache_bytes = self._sum_over_ranks(
            bad, trained, store_bytes, cache_bytes
        )
        metrics = {
            **floats(losses),
            **self.validate(grid, self.position.global_step),
            "data/bad_samples": bad_samples,
            "data/epoch_samples": epoch_samples,
            "stage": float(stage_index),
        }
        if self.cache is not None:  # the node-local shard cache this epoch, all ranks together
            metrics |= {"data/store_bytes": store_bytes, "data/cache_bytes": cache_bytes,
                        "data/cache_hit_ratio": cache_bytes / max(1.0, store_bytes + cache_bytes)}  # fmt: skip
        if self.rank == 0:
            available = self.plan.epoch_length()
            log.info("%s epoch %d: trained on %d of %d training samples (%d left out: less than one global batch of "
                     "%d)", stage.name, epoch + 1, epoch_samples, available, available - epoch_samples,
                     self.global_batch)  # fmt: skip
        self.logger.log(
            {k: v for k, v in metrics.items() if k.startswith(("val/", "data/"))},
            self.position.global_step,
        )
        next_position = Position(stage_index, epoch + 1, 0, self.position.global_step)
        self.position = next_position
        self._checkpoint({**metrics, "epoch": epoch, "stage": stage_index, "epoch_end": 1}, next_position, opts, scheds)
        return metrics

    def _epoch_splits(self, start_step: int) -> list[tuple[int, int]]:
        """The worker groups of the epoch about to run: this one from the first step, or, resuming mid-epoch, the
        checkpoint's groups and this one from `start_step` when its size differs (logged as an event)."""
        resumed, self.resumed_splits = self.resumed_splits, None
        if not start_step:
            return [(self.world_size, 0)]
        if resumed is None:  # a checkpoint older than elastic groups: taken on a group of this size, presumably
            return [(self.world_size, 0)]
        if resumed[-1][0] == self.world_size:
            return resumed
        return [*resumed, (self.world_size, start_step)]

    def _note_resize(self) -> None:
        """Say, once a worker group starts, that it has another size than the one that took its checkpoint."""
        before = self.resumed_splits[-1][0] if self.resumed_splits else None
        if before is None or before == self.world_size:
            return
        position = self.position
        text = (f"worker group resized {before} -> {self.world_size} (stage {position.stage}, epoch {position.epoch}, "
                f"step {position.step_in_epoch} of the epoch); {self.global_batch} samples a step, "
                f"{'/'.join(map(str, sorted(set(rank_batches(self.global_batch, self.world_size)), reverse=True)))} "
                "a worker")  # fmt: skip
        if self.is_rank_zero:
            log.warning("%s", text)
        self.logger.event(text, position.global_step)
        self.logger.log({"train/workers": float(self.world_size)}, position.global_step)

    def _log_trained(self, batch: torch.Tensor, stage_index: int, epoch: int, step_in_epoch: int) -> None:
        """A test hook (`$RECOLOR_TRAINED_LOG`, a folder): one line a step, "stage epoch step workers started crc32,..."
        (`started`: when rank 0's trainer of this worker group was made, so that steps a restarted group trained again
        can be told apart), the CRC-32 of each sample trained on (as stored, with data.flip off)."""
        if self._group_started is None:  # every rank logs rank 0's time: one id for the group
            (started,) = self._sum_over_ranks(self._started if self.is_rank_zero else 0)
            self._group_started = int(started)
        rows = batch.numpy().reshape(batch.shape[0], -1)
        crcs = ",".join(str(zlib.crc32(row.tobytes())) for row in rows)
        path = Path(os.environ[TRAINED_LOG]) / f"trained-rank{self.rank}.txt"
        with path.open("a") as log_file:
            log_file.write(f"{stage_index} {epoch} {step_in_epoch} {self.world_size} {self._group_started} {crcs}\n")

    def _wait_while_paused(self) -> None:
        """A test hook (`$RECOLOR_TRAIN_PAUSE`, a file holding a global step N): while it exists and the run has
        trained N steps or more, steps wait; each waiting rank says so in a file beside it named for the group's size
        and the step (`<file>.waiting-<workers>-<rank>-<step>`). The test moves N on or deletes the file."""
        pause = Path(os.environ[TRAIN_PAUSE])
        marker = pause.with_name(f"{pause.name}.waiting-{self.world_size}-{self.rank}-{self.position.global_step}")

        def paused() -> bool:
            try:
                return self.position.global_step >= int(pause.read_text() or 0)
            except (FileNotFoundError, ValueError):
                return False

        if paused():
            marker.touch()
        while paused():
            time.sleep(0.05)

    def _stop_if_diverged(self, losses: dict[str, float], stage_index: int) -> None:
        """Stop the run when any rank's losses are not finite, before a checkpoint of the diverged model is taken.

        Every rank decides alike (one all-reduce of a flag, at points every rank reaches together), so no rank
        waits for another at the next barrier. The latest checkpoint, taken while the losses were finite, is kept.

        Raises:
            NonFiniteLoss: names the step, the losses and what to change.
        """
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        (diverged,) = self._sum_over_ranks(1.0 if bad else 0.0)
        if not diverged:
            return
        stage = self.config.stages[stage_index]
        shown = ", ".join(f"{name.removeprefix('train/')}={value}" for name, value in bad.items()) or "on another rank"
        raise NonFiniteLoss(
            f"the losses are not finite at step {self.position.global_step} ({shown}): the run stopped, and its "
            f"latest checkpoint (taken while they were finite) is kept. Lower stages.{stage_index}.lr "
            f"(now {stage.lr:g}) or l1_lambda (now {self.config.l1_lambda:g}) and train under a new --name"
        )

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics, the checkpoint's. DDP broadcasts buffers only as a
        forward starts, so after a step each rank holds statistics updated with its own batch; validation,
        sharded across ranks, must judge one model."""
        if self.world_size > 1:
            for network in (self.generator, self.discriminator):
                for buffer in unwrap(network).buffers():
                    torch.distributed.broadcast(buffer, src=0)

    def _sum_over_ranks(self, *values: float) -> list[float]:
        """Each of `values` summed over all ranks, in one all-reduce (each rank counts what it read)."""
        if self.world_size == 1:
            return [float(value) for value in values]
        totals = torch.tensor([float(value) for value in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(totals)
        return totals.tolist()

    def _checkpoint(self, metrics: dict, position: Position, opts, scheds) -> None:
        payload = self.payload(position, opts, scheds) if self.is_rank_zero else None
        self.report({**metrics, "global_step": position.global_step, "global_batch": self.global_batch,
                     "workers": self.world_size}, payload)  # fmt: skip


class StepWindow:
    """The steps since the last log: how many, since when, and how long they waited for their batches."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def next_batch(self, source):
        """The next batch of `source` (None at its end), the wait counted."""
        waited = time.perf_counter()
        batch = next(source, None)
        self.wait += time.perf_counter() - waited
        return batch


def owns_shards(config: TrainConfig, plan: DataPlan) -> bool:
    """Whether each rank reads the shards it owns every epoch (`data.shard_ownership`; "auto": where the shard cache
    is configured). Decided by the config and the lake alone, never by whether the cache could be opened: the
    epoch's order must be the same when it resumes."""
    mode = config.data.shard_ownership
    if mode != "auto":
        return mode == "on"
    return config.data.cache == "on" or (config.data.cache == "auto" and any(s.uri.startswith("s3://")
                                                                              for s in plan.train))  # fmt: skip


def shard_cache_for(config: TrainConfig, plan: DataPlan):
    """The node's shard cache this worker reads through (`pipeline.data.shard_cache`), or None (`data.cache`: "auto"
    uses one for s3:// lakes only: local shards are read from disk anyway)."""
    from pipeline.data.shard_cache import default_cache_dir, node_cache

    mode = config.data.cache
    if mode == "off" or (mode == "auto" and not any(s.uri.startswith("s3://") for s in plan.train)):
        return None
    root = config.data.cache_dir or default_cache_dir()
    capacity = config.data.cache_bytes
    if capacity is None:
        import shutil

        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            capacity = int(0.8 * shutil.disk_usage(root).free)
        except OSError as e:
            log.warning("the shard cache %s cannot be used (%s): streaming shards from the store", root, e)
            return None
    return node_cache(root, capacity)


class Progress:
    """Rank 0's progress bar: Ray's tqdm (the driver draws it), showing the epoch, losses and images/s."""

    def __init__(self, enabled: bool):
        self.bar = None
        self.label = ""
        if enabled and not os.environ.get("RECOLOR_NO_PROGRESS"):
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=0, desc="train", unit="step")

    def start_epoch(self, label: str, total: int, done: int) -> None:
        self.label = label
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.set_description(label)

    def update(self, values: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_description(" ".join([self.label, *(f"{k}={v}" for k, v in values.items())]))

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
