"""Loggers: an interface of two methods, so the training loop never asks whether tracking is on."""

from __future__ import annotations

from typing import Protocol


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """Logs nothing (ranks other than 0, and runs without tracking)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MemoryLogger:
    """Keeps every logged value in memory: `history[name] = [(step, value), ...]`."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.history.setdefault(name, []).append((step, float(value)))

    def close(self) -> None:
        pass
