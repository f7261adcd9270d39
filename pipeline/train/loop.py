"""`ColorizerTrainer`: one DDP rank's training state and the recipe's steps, epochs, validation and checkpoints.

Only this module moves models to devices and wraps them (through the `prepare` function
`pipeline.train.worker` passes: Ray's `prepare_model`); it reports through the `report` function
it is given, so it runs without Ray in unit tests. `is_rank_zero` decides who logs and who writes
checkpoints; what a checkpoint holds is `pipeline.checkpoint`'s.

Each step is the recipe's: generate ab from L; one discriminator update on (L, fake ab detached)
as fake and (L, true ab) as real; then one generator update (GAN loss of fakes judged real +
lambda * L1) with the discriminator frozen. A stage without a GAN loss (the ResNet18 recipe's
pretraining) updates the generator on L1 alone.

The class holds one rank's state (networks, optimizers, position) and its steps and epochs; what it leans on lives
beside it: the read path and its resume state (`pipeline.data.reader.EpochReader`), validation and the test hooks
(`pipeline.train.ranks`), MFU (`pipeline.train.throughput`), the progress bar (`pipeline.train.progress`).
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
import zlib

import torch
from torch import nn

from ingest import faults
from ingest.lab import lab8_to_network_torch
from pipeline.checkpoint import Position, build_payload, read_state, restore_networks, restore_optimizers
from pipeline.config import StageConfig, TrainConfig
from pipeline.data.batches import prefetch
from pipeline.data.plan import DataPlan
from pipeline.data.reader import EpochReader
from pipeline.losses import GANLoss, discriminator_loss, generator_loss
from pipeline.models import build_discriminator, build_generator
from pipeline.tracking.loggers import Logger, NullLogger
from pipeline.train.failures import NonFiniteLoss
from pipeline.train.progress import Progress, StepWindow
from pipeline.train.ranks import TRAIN_PAUSE, TRAINED_LOG, GroupHooks, RankValidation, sum_over_ranks, unwrap
from pipeline.train.throughput import MfuMeter

log = logging.getLogger(__name__)


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
        self.reader = EpochReader(config, plan, rank, world_size)  # the read path, and its state
        self.cache = self.reader.cache
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
        if checkpoint_payload is not None:
            self.position = restore_networks(checkpoint_payload, generator, discriminator)
            self.reader.load_state_dict(read_state(checkpoint_payload))
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
        self._validation = RankValidation(self)
        self.hooks = GroupHooks(rank, world_size, device)
        self._mfu = MfuMeter(device)

    # ----------------------------------------------------------------------------------------- steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(device_type=self.device.type, enabled=False)
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

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
        """Metrics on this rank's share of the validation split, all-reduced (`ranks.RankValidation`)."""
        return self._validation(grid_name, step)

    # ------------------------------------------------------------------------------------ checkpoints

    def payload(self, next_position: Position, opts, scheds) -> dict:
        generator, discriminator = unwrap(self.generator), unwrap(self.discriminator)
        return build_payload(generator, discriminator, opts, scheds, next_position, self.config, self.plan,
                             self.reader.state_dict(mid_epoch=bool(next_position.step_in_epoch)))  # fmt: skip

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
        batches, steps, bad = self.reader.batches(stage_index, epoch, start_step)
        progress.start_epoch(f"{stage.name} epoch {epoch + 1}/{stage.epochs}", steps, start_step)
        window = StepWindow()
        losses: dict[str, torch.Tensor] = {}
        step_in_epoch = start_step
        # Samples trained on this epoch: rank 0 counts the steps before this group's start (on whatever group ran
        # them), each rank its own since; summed over ranks at the epoch's end.
        trained = start_step * self.reader.global_batch if self.rank == 0 else 0
        pinned = self.cuda  # page-locked host batches: the non_blocking copies to the GPU then really overlap
        source = iter(prefetch((host_batch(b, pinned) for b in batches), config.data.prefetch_batches))
        while (batch := window.next_batch(source)) is not None:
            if config.max_steps is not None and self.position.global_step >= config.max_steps:
                return None
            faults.maybe_fail("train_step", self.rank)
            if TRAIN_PAUSE in os.environ:
                self.hooks.wait_while_paused(self.position.global_step)
            torch.manual_seed(step_seed(config.seed, self.rank, self.position.global_step))
            share = self.world_size * batch.shape[0] / self.reader.global_batch  # this rank's part of the step
            losses = self.train_step(batch, stage, gan_loss, opts, share)
            if faults.maybe_fail("loss_nan", self.rank):  # drills: a step whose losses diverge
                losses = {name: value * float("nan") for name, value in losses.items()}
            step_in_epoch += 1
            trained += batch.shape[0]
            if TRAINED_LOG in os.environ:
                self.hooks.trained(batch, stage_index, epoch, step_in_epoch)
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

    def _log_steps(self, window: StepWindow, losses, stage_index: int, gan: bool, opts, progress) -> None:
        """The losses (one device sync) and throughput of the steps since the last log; a divergence stops here."""
        elapsed = time.perf_counter() - window.start
        images_per_s = window.steps * self.reader.global_batch / elapsed
        throughput = {
            "train/workers": float(self.world_size),
            "train/images_per_s": images_per_s,
            "train/step_time_s": elapsed / window.steps,
            "data/wait_s": window.wait / window.steps,
            **self._mfu(
                self.plain_generator, self.plain_discriminator, self.plan.size, images_per_s / self.world_size, gan
            ),
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
                     self.reader.global_batch)  # fmt: skip
        self.logger.log(
            {k: v for k, v in metrics.items() if k.startswith(("val/", "data/"))},
            self.position.global_step,
        )
        next_position = Position(stage_index, epoch + 1, 0, self.position.global_step)
        self.position = next_position
        self._checkpoint({**metrics, "epoch": epoch, "stage": stage_index, "epoch_end": 1}, next_position, opts, scheds)
        return metrics

    def _note_resize(self) -> None:
        """Say, once a worker group starts, that it has another size than the one that took its checkpoint."""
        if self.reader.resized_from() is None:
            return
        text = self.reader.resize_note(self.position)
        if self.is_rank_zero:
            log.warning("%s", text)
        self.logger.event(text, self.position.global_step)
        self.logger.log({"train/workers": float(self.world_size)}, self.position.global_step)

    def _stop_if_diverged(self, losses: dict[str, float], stage_index: int) -> None:
        """Stop the run when any rank's losses are not finite, before a checkpoint of the diverged model is taken.
        Every rank decides alike (one all-reduce of a flag, at points every rank reaches together), so no rank waits
        for another at the next barrier. The latest checkpoint, taken while the losses were finite, is kept."""
        bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
        (diverged,) = self._sum_over_ranks(1.0 if bad else 0.0)
        if diverged:
            raise NonFiniteLoss.at(self.position.global_step, bad, self.config, stage_index)

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's BatchNorm statistics, the checkpoint's. DDP broadcasts buffers only as a
        forward starts, so after a step each rank holds statistics updated with its own batch; validation,
        sharded across ranks, must judge one model."""
        if self.world_size > 1:
            for network in (self.generator, self.discriminator):
                for buffer in unwrap(network).buffers():
                    torch.distributed.broadcast(buffer, src=0)

    def _sum_over_ranks(self, *values: float) -> list[float]:
        return sum_over_ranks(self.world_size, self.device, *values)

    def _checkpoint(self, metrics: dict, position: Position, opts, scheds) -> None:
        payload = self.payload(position, opts, scheds) if self.is_rank_zero else None
        self.report({**metrics, "global_step": position.global_step, "global_batch": self.reader.global_batch,
                     "workers": self.world_size}, payload)  # fmt: skip
