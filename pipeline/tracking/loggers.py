"""Loggers: an interface of `log(metrics, step)`, `log_image(png, path)`, `event(text, step)` and `close()`, a null
logger and rank 0's MLflow logger, so the training loop never asks whether tracking is on."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

EVENTS_TAG = "recolor.events"  # what happened to a run (resizes), one line each


class Logger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_image(self, png: bytes, artifact_path: str, key: str | None = None, step: int | None = None) -> None: ...
    def event(self, text: str, step: int) -> None: ...
    def close(self) -> None: ...


class NullLogger:
    """Logs nothing (ranks other than 0, and runs without tracking)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, png: bytes, artifact_path: str, key: str | None = None, step: int | None = None) -> None:
        pass

    def event(self, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def start_system_metrics(tracking_uri: str, run_id: str, node_id: str | None = None, sampling_interval: float = 10):
    """MLflow's system metrics of this machine (CPU, memory, disk, network; GPU utilization and memory with
    nvidia-ml-py) logged to `run_id`, under `system/<node_id>/` when given: one monitor a node. Returns the monitor
    (`.finish()` it), or None when MLflow cannot monitor here (said once, as a warning)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_interval, node_id=node_id,
                                       tracking_uri=tracking_uri)  # fmt: skip
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - system metrics are a nicety; never fail training for them
        # Say so: MLflow needs psutil for them, and a silent gap in the UI looks like a bug.
        logging.getLogger(__name__).warning("MLflow system metrics are off: %s: %s", type(e).__name__, e)
        return None


class MlflowLogger:
    """Rank 0's logger: metrics to an existing MLflow run (batched), MLflow system metrics on (of rank 0's node,
    named `node_id` in a run over several nodes; the other nodes' first workers run their own monitor)."""

    def __init__(self, tracking_uri: str, run_id: str, system_metrics: bool = True, node_id: str | None = None):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.monitor = start_system_metrics(tracking_uri, run_id, node_id) if system_metrics else None

    def log(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(name, float(value), now, step) for name, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def log_image(self, png: bytes, artifact_path: str, key: str | None = None, step: int | None = None) -> None:
        """The picture as the file `artifact_path` and, with `key`, also as MLflow's image of that key at `step`
        (the run page's image view, with a slider over the steps)."""
        import io
        import tempfile

        directory, name = os.path.split(artifact_path)
        with tempfile.TemporaryDirectory() as temp:
            path = Path(temp) / name
            path.write_bytes(png)
            try:
                self.client.log_artifact(self.run_id, str(path), artifact_path=directory or None)
                if key is not None:
                    from PIL import Image

                    with Image.open(io.BytesIO(png)) as picture:
                        self.client.log_image(self.run_id, picture.convert("RGB"), key=key, step=step or 0)
            except Exception as e:  # noqa: BLE001 - a picture is not worth a restart of every worker
                logging.getLogger(__name__).warning(
                    "could not log %s to MLflow run %s (training goes on): %s: %s",
                    artifact_path,
                    self.run_id,
                    type(e).__name__,
                    " ".join(str(e).split())[:300],
                )

    def event(self, text: str, step: int) -> None:
        """Something that happened to the run (a worker group resized), where its page shows it: a line in the tag
        `recolor.events` and under "Events" in the run's description."""
        line = f"step {step}: {text}"
        try:
            run = self.client.get_run(self.run_id)
            events = run.data.tags.get(EVENTS_TAG, "")
            self.client.set_tag(self.run_id, EVENTS_TAG, f"{events}\n{line}".strip()[-4900:])
            note = run.data.tags.get("mlflow.note.content", "")
            heading = "\n\n#### Events\n"
            note = note + ("" if heading in note else heading) + f"- {line}\n"
            self.client.set_tag(self.run_id, "mlflow.note.content", note)
        except Exception as e:  # noqa: BLE001 - an event line is not worth a restart of every worker
            logging.getLogger(__name__).warning("could not record event %r in MLflow: %s", line, e)

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None
