"""Rank 0's progress bar, and the steps between two logs: what a person watching a run sees."""

from __future__ import annotations

import os
import time


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
