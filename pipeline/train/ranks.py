"""What one rank of a training group does with the others, beside the steps: sums over ranks, validation on each
rank's share of the split (FID included), and the test hooks that steer and record a group."""

from __future__ import annotations

import logging
import os
import time
import zlib
from pathlib import Path

import torch

from pipeline.data.batches import prefetch, validation_batches
from pipeline.evaluation.validation import accumulate, finalize
from pipeline.tracking.charts import SAMPLES_KEY
from pipeline.tracking.plots import sample_grid

log = logging.getLogger("pipeline.train.loop")

TRAINED_LOG = "RECOLOR_TRAINED_LOG"  # test hooks: see `GroupHooks`
TRAIN_PAUSE = "RECOLOR_TRAIN_PAUSE"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (or torch.compile) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def sum_over_ranks(world_size: int, device: torch.device, *values: float) -> list[float]:
    """Each of `values` summed over all ranks, in one all-reduce (each rank counts what it read)."""
    if world_size == 1:
        return [float(value) for value in values]
    totals = torch.tensor([float(value) for value in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(totals)
    return totals.tolist()


class RankValidation:
    """Validation on this rank's share of the validation split, all-reduced, the gray baseline beside it; every
    `fid_every`th one with FID and KID, whose truth and gray features are kept between validations (the same
    samples each time)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.count = 0  # validations so far in this worker group (`fid_every` counts them)
        self._fid_reference = None
        self._fid_unavailable = False

    def __call__(self, grid_name: str | None = None, step: int | None = None) -> dict[str, float]:
        """The metrics; with several datasets each one's too, as `val/<dataset>/<metric>` (`data.max_val_batches` caps
        each one). Rank 0 also logs a sample grid of its first validation batch (the same images every epoch)."""
        trainer, config = self.trainer, self.trainer.config
        generator = unwrap(trainer.generator)
        was_training = generator.training
        generator.eval()  # the plain (maybe compiled) module shares these weights and this mode
        sources = range(len(trainer.plan.refs)) if len(trainer.plan.refs) > 1 else [None]
        overall, first, metrics = None, None, {}
        self.count += 1
        features = self._fid_features()
        for source in sources:
            plan = trainer.plan if source is None else trainer.plan.source(source)
            batches = validation_batches(plan, trainer.rank, trainer.world_size, config.data.batch_size,
                                         config.data.max_val_batches, cache=trainer.cache)  # fmt: skip
            # fp32, as `recolor evaluate` scores: the same checkpoint gets the same metrics in both.
            totals, source_first = accumulate(trainer.plain_generator, prefetch(batches, config.data.prefetch_batches),
                                              trainer.device, memory_format=trainer.memory_format,
                                              on_batch=features.on_batch if features is not None else None)  # fmt: skip
            if trainer.world_size > 1:
                torch.distributed.all_reduce(totals)
            if source is not None:
                metrics |= finalize(totals, prefix=f"val/{trainer.plan.refs[source].partition('@')[0]}/")
            overall = totals if overall is None else overall + totals
            first = first if first is not None else source_first
        generator.train(was_training)
        if grid_name and first is not None:
            trainer.logger.log_image(sample_grid(*first), grid_name, key=SAMPLES_KEY, step=step)
        if features is not None:
            metrics |= self._fid_scores(features)
        return finalize(overall) | metrics

    def _fid_features(self):
        """The collector of this validation's Inception features, or None: not this time, or the network is not
        installed (said once)."""
        from pipeline.evaluation.fid import FidUnavailable
        from pipeline.evaluation.per_image import FidFeatures

        every = self.trainer.config.fid_every
        if not every or self.count % every or self._fid_unavailable:
            return None
        try:
            return FidFeatures(self.trainer.device, self._fid_reference)
        except FidUnavailable as e:
            self._fid_unavailable = True
            if self.trainer.is_rank_zero:
                log.warning("fid_every=%d: %s; training goes on without val/fid", every, e)
            return None

    def _fid_scores(self, features) -> dict[str, float]:
        """FID and KID of the model (and the gray baseline) against the truth over every rank's share: the features
        gathered, scored on rank 0, the scores shared."""
        trainer = self.trainer
        self._fid_reference = features.reference()
        local = features.sets()
        gathered = [local]
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, local)
        names = ("val/fid", "val/kid", "val/kid_std", "val/gray_fid", "val/gray_kid", "val/gray_kid_std")
        scores = {}
        if trainer.is_rank_zero:
            from pipeline.evaluation.fid import FeatureSets

            merged = FeatureSets.of({name: [part[name] for part in gathered] for name in local})
            scores = merged.scores("val/", kid_subsets=20)
        scored, *values = sum_over_ranks(trainer.world_size, trainer.device, 1.0 if scores else 0.0,
                                         *(scores.get(name, 0.0) for name in names))  # fmt: skip
        return dict(zip(names, values, strict=True)) if scored else {}


class GroupHooks:
    """Test hooks that steer and record a worker group, off unless their variable is set."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.started = time.time_ns()  # tells this worker group's steps from a restarted one's
        self._group_started: int | None = None

    def trained(self, batch: torch.Tensor, stage_index: int, epoch: int, step_in_epoch: int) -> None:
        """`$RECOLOR_TRAINED_LOG` (a folder): one line a step, "stage epoch step workers started crc32,..."
        (`started`: when rank 0's trainer of this worker group was made, so that steps a restarted group trained again
        can be told apart), the CRC-32 of each sample trained on (as stored, with data.flip off)."""
        if self._group_started is None:  # every rank logs rank 0's time: one id for the group
            (started,) = sum_over_ranks(self.world_size, self.device, self.started if self.rank == 0 else 0)
            self._group_started = int(started)
        rows = batch.numpy().reshape(batch.shape[0], -1)
        crcs = ",".join(str(zlib.crc32(row.tobytes())) for row in rows)
        path = Path(os.environ[TRAINED_LOG]) / f"trained-rank{self.rank}.txt"
        with path.open("a") as log_file:
            log_file.write(f"{stage_index} {epoch} {step_in_epoch} {self.world_size} {self._group_started} {crcs}\n")

    def wait_while_paused(self, global_step: int) -> None:
        """`$RECOLOR_TRAIN_PAUSE` (a file holding a global step N): while it exists and the run has trained N steps or
        more, steps wait; each waiting rank says so in a file beside it named for the group's size and the step
        (`<file>.waiting-<workers>-<rank>-<step>`). The test moves N on or deletes the file."""
        pause = Path(os.environ[TRAIN_PAUSE])
        marker = pause.with_name(f"{pause.name}.waiting-{self.world_size}-{self.rank}-{global_step}")

        def paused() -> bool:
            try:
                return global_step >= int(pause.read_text() or 0)
            except (FileNotFoundError, ValueError):
                return False

        if paused():
            marker.touch()
        while paused():
            time.sleep(0.05)
