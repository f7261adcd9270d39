"""A sweep in MLflow: its parent run, its trials' child runs, and the table that ranks them by a metric.

parent run   tags recolor.sweep=NAME, recolor.sweep.role=parent, recolor.sweep.best_*; artifacts
             sweep/ranking.csv and sweep/metric_by_step.png
trial runs   tags recolor.sweep=NAME, recolor.sweep.role=trial, recolor.sweep.trial=INDEX,
             recolor.sweep.override.KEY=VALUE, mlflow.parentRunId; recolor.sweep.decision when stopped early
"""

from __future__ import annotations

import csv
import io
import math

SWEEP_TAG = "recolor.sweep"
ROLE_TAG = "recolor.sweep.role"
TRIAL_TAG = "recolor.sweep.trial"
DECISION_TAG = "recolor.sweep.decision"
OVERRIDE_PREFIX = "recolor.sweep.override."


def metric_name(given: str) -> str:
    """A validation metric's name as the runs record it (`val/psnr`); the spelling before metrics were grouped by
    prefix (`val_psnr`) is still understood."""
    return f"val/{given.removeprefix('val_')}" if given.startswith("val_") else given


def lower_is_better(metric: str) -> bool:
    from pipeline.evaluation.promote import LOWER_IS_BETTER

    return metric.removeprefix("val/") in LOWER_IS_BETTER


def trial_runs(client, experiment_id: str, sweep: str) -> list:
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{ROLE_TAG}` = 'trial'",
        max_results=5000,
    )  # fmt: skip


def ranking(client, experiment_id: str, sweep: str, metric: str) -> list[dict]:
    """One row a trial, best first: trials that trained to the end by `metric`, then the stopped, then the rest.

    Each row: rank, trial, run_id, status, `metric` (its last value, None if never reported), validations
    (how many values were reported), decision, and the overrides (KEY: VALUE).
    """
    rows = []
    for run in trial_runs(client, experiment_id, sweep):
        tags = run.data.tags
        history = client.get_metric_history(run.info.run_id, metric)
        value = run.data.metrics.get(metric)
        value = None if value is None or math.isnan(value) else value  # a diverged trial ranks with the unscored
        rows.append(
            {
                "trial": int(tags.get(TRIAL_TAG, -1)),
                "run_id": run.info.run_id,
                "name": run.info.run_name,
                "status": run.info.status,
                metric: value,
                "validations": len(history),
                "decision": tags.get(DECISION_TAG, ""),
                **{
                    key[len(OVERRIDE_PREFIX) :]: value for key, value in tags.items() if key.startswith(OVERRIDE_PREFIX)
                },
            }
        )
    sign = 1 if lower_is_better(metric) else -1

    def order(row: dict):
        group = 0 if row["status"] == "FINISHED" and not row["decision"] else 1 if row["decision"] else 2
        value = row[metric]
        return (group, value is None, sign * value if value is not None else 0.0, row["trial"])

    rows.sort(key=order)
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows


def ranking_csv(rows: list[dict], metric: str) -> bytes:
    overrides = sorted({key for row in rows for key in row} - {"rank", "trial", "run_id", "name", "status", metric,
                                                               "validations", "decision"})  # fmt: skip
    columns = ["rank", "trial", "name", *overrides, metric, "validations", "status", "decision", "run_id"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def metric_chart(histories: dict[str, list[tuple[int, float]]], metric: str, title: str) -> bytes:
    """A PNG of `metric` over training steps, one line a trial (labelled with its overrides)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5), dpi=100)
    for label, points in histories.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            axis.plot(steps, values, marker="o", label=label)
    axis.set_xlabel("step")
    axis.set_ylabel(metric + (" (lower is better)" if lower_is_better(metric) else " (higher is better)"))
    axis.set_title(title)
    axis.grid(alpha=0.3)
    if histories:
        axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def format_table(rows: list[dict], metric: str) -> str:
    """The ranking as text, one line a trial."""
    keys = sorted({key for row in rows for key in row} - {"rank", "trial", "run_id", "name", "status", metric,
                                                          "validations", "decision"})  # fmt: skip
    header = f"{'rank':>4}  {'trial':<24} " + " ".join(f"{key.rsplit('.', 1)[-1]:>12}" for key in keys)
    header += f" {metric:>12}  {'status':<9} run"
    lines = [header]
    for row in rows:
        value = f"{row[metric]:12.4f}" if row[metric] is not None else f"{'-':>12}"
        line = f"{row['rank']:>4}  {row['name'][:24]:<24} " + " ".join(f"{str(row.get(k, ''))[:12]:>12}" for k in keys)
        status = "stopped" if row["decision"] else row["status"].lower()
        lines.append(f"{line} {value}  {status:<9} {row['run_id'][:8]}")
    return "\n".join(lines)
