"""The MLflow run of a training run: started (or, when a run of the same name resumes, found) by the driver,
which logs what it knows before training (the flattened config as params, tags, the dataset versions as inputs),
and finished after it (the generator registered, the description's results).

The training loop logs through `pipeline.tracking.loggers`; where MLflow is, is `pipeline.tracking.uri`'s.
"""

from __future__ import annotations

import logging
import math
import subprocess
from pathlib import Path

from pipeline.tracking.uri import connect_tracking, fluent_tracking_uri, get_experiment_id, quiet_run_links

RUN_NAME_TAG = "recolor.run_name"
CONTINUES_TAG = "recolor.continues"  # a run that goes on from a FINISHED run's checkpoints: that run's id
FAILURE_TAG = "recolor.failure"  # why a FAILED (or KILLED) run stopped, in one line

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    """The repository's commit, when the code runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        if out.returncode != 0:
            return None
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


NOTE_TAG = "mlflow.note.content"  # the run page's description (Markdown)
RESULT_HEADING = "### Result"
DETAILS_HEADING = "### What ran"
# What a user of colorizers asks first (does it look real? is it as colourful as photos?), then the pixel metrics.
SHOWN_METRICS = {"fid": "FID (lower is better)", "kid": "KID (lower is better)", "colorfulness": "colorfulness",
                 "psnr": "PSNR (dB)", "l1_ab": "L1 on ab", "ssim": "SSIM", "auc": "AuC"}  # fmt: skip


def describe_run(config, plan, device: str, preset: str | None = None) -> str:
    """The run page's description: what ran (preset, data, workers, stages), in Markdown."""
    stages = "; ".join(
        f"{stage.name}: {stage.epochs} epoch{'s' if stage.epochs != 1 else ''}, "
        f"{stage.gan_mode or 'L1 only'}, lr {stage.lr:g}" + (f" (linear decay over the last {stage.decay_epochs})"
                                                              if stage.decay_epochs else "")
        for stage in config.stages
    )  # fmt: skip
    shares = mixture_shares(plan)
    datasets = ", ".join(f"`{ref}`" + (f" ({shares[ref]:.0%})" if shares else "") for ref in plan.refs)
    if shares:
        datasets += f", a mixture of {plan.epoch_length()} samples an epoch"
    lines = [
        f"**{config.name}**: {config.model.arch} ({config.model.norm} norm), preset `{preset or 'defaults'}`",
        "",
        DETAILS_HEADING,
        "",
        "| | |",
        "|---|---|",
        f"| datasets | {datasets}: {plan.count('train')} training, {plan.count('val')} validation samples, "
        f"{plan.size} px |",
        f"| workers | {worker_text(config)} x {device}, {config.global_batch} samples a step "
        f"({'split over the group as it runs' if config.elastic else f'{config.data.batch_size} per worker'}) |",
        f"| stages | {stages} |",
    ]
    return "\n".join(lines)


def worker_text(config) -> str:
    """ "4", or "2-8 (elastic)"."""
    return f"{config.workers}-{config.max_workers} (elastic)" if config.elastic else str(config.workers)


def describe_result(metrics: dict) -> str:
    """The description's last section: the final validation metrics beside the gray baseline."""
    rows = [f"| {SHOWN_METRICS[name]} | {metrics[f'val/{name}']:.4g} | {metrics[f'val/gray_{name}']:.4g} |"
            for name in SHOWN_METRICS if f"val/{name}" in metrics and f"val/gray_{name}" in metrics]  # fmt: skip
    if not rows:
        return ""
    table = [RESULT_HEADING, "", "| validation | model | gray baseline |", "|---|---|---|", *rows]
    if "val/colorfulness_true" in metrics:
        table += ["", f"The photos' own colorfulness: {metrics['val/colorfulness_true']:.4g}."]
    return "\n".join(table)


def start_or_resume_run(
    tracking_uri: str, experiment: str, config, plan, storage: str, device: str, preset: str | None = None,
    extra_tags: dict[str, str] | None = None, continues_checkpoint: bool = False,
) -> tuple[str, bool]:  # fmt: skip
    """The MLflow run of a training run: the unfinished run with the same name, or a new one.

    A new run that goes on from the checkpoints of a FINISHED run of the same name (`continues_checkpoint`: a
    config asking for more epochs) is tagged `recolor.continues` with that run's id and says so in its description.

    A new run gets the full flattened config as params, the tags, and every dataset version as an
    input (source: the version's lake URI, digest: its manifest's SHA-256) for training and validation.

    Returns:
        (run id, whether an existing run is resumed).
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Param, RunTag

    from pipeline.config import flatten

    client = MlflowClient(tracking_uri)
    experiment_id = get_experiment_id(client, experiment, tracking_uri)
    existing = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{config.name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if existing and existing[0].info.status != "FINISHED":
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        if FAILURE_TAG in existing[0].data.tags:
            client.delete_tag(run_id, FAILURE_TAG)  # the run goes on: its last failure is no longer why it stopped
        return run_id, True
    tags = {
        RUN_NAME_TAG: config.name,
        "recolor.ray_run_name": config.name,
        "recolor.storage": storage,
        "recolor.arch": config.model.arch,
        "recolor.workers": f"{config.workers}-{config.max_workers}" if config.elastic else str(config.workers),
        "recolor.device": device,
        "recolor.stages": ",".join(stage.name for stage in config.stages),
        "recolor.datasets": ",".join(plan.refs),
        NOTE_TAG: describe_run(config, plan, device, preset),
        **(extra_tags or {}),
    }
    if preset:
        tags["recolor.preset"] = preset
    if existing and continues_checkpoint:
        earlier = existing[0]
        tags[CONTINUES_TAG] = earlier.info.run_id
        step = int(earlier.data.metrics.get("global_step", 0) or 0)
        at = f" at step {step}" if step else ""
        tags[NOTE_TAG] = (
            f"Continues run {earlier.info.run_id} (FINISHED{at}) from its latest checkpoint.\n\n{tags[NOTE_TAG]}"
        )
    for ref in plan.refs:
        tags[manifest_tag(ref)] = plan.digests[ref]
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    run = client.create_run(experiment_id, run_name=config.name, tags=tags)
    run_id = run.info.run_id
    params = [
        Param(key, "None" if value is None else str(value)[:6000]) for key, value in flatten(config.to_dict()).items()
    ]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start : start + 100], tags=[RunTag("recolor.params_logged", "1")])
    with fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        shares = mixture_shares(plan)
        for ref in plan.refs:
            # One input per split: MLflow keeps a single context per dataset name and digest.
            for split, context in (("train", "training"), ("val", "validation")):
                dataset = lake_dataset(f"{ref}/{split}", plan.uris[ref], plan.digests[ref])
                extra = {"recolor.weight": f"{shares[ref]:.4g}"} if split == "train" and ref in shares else None
                _log_input(dataset, context, tags=extra)
    client.update_run(run_id, status="RUNNING")
    return run_id, False


def finished_run(tracking_uri: str | None, experiment: str, name: str, model_name: str | None):
    """(run id, newest registered model version or None) of the latest MLflow run named `name` if it is FINISHED;
    None when there is no such run or it did not finish (failed, killed, or still running)."""
    from mlflow import MlflowClient

    tracking_uri = connect_tracking(tracking_uri)
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not runs or runs[0].info.status != "FINISHED":
        return None
    run_id = runs[0].info.run_id
    version = None
    if model_name:
        versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
        version = max((v.version for v in versions), key=int, default=None)
    return run_id, version


def end_failed_run(tracking_uri: str, run_id: str, reason: str, status: str = "FAILED") -> None:
    """End an MLflow run that stopped early: `status` (FAILED, or KILLED when interrupted), `reason` in a tag.

    Never raises: it runs while another error is on its way to the user, which must not be masked
    (a tracking server that is down is only logged here).
    """
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        client.set_tag(run_id, FAILURE_TAG, reason)
        with quiet_run_links(tracking_uri):
            client.set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - see the docstring
        logging.getLogger(__name__).warning(
            "could not mark MLflow run %s %s: %s: %s", run_id, status, type(e).__name__, e
        )


def manifest_tag(ref: str) -> str:
    """The tag holding a dataset version's full manifest SHA-256 (`@` is not allowed in MLflow keys)."""
    return "recolor.manifest." + ref.replace("@", ":")


def mixture_shares(plan) -> dict[str, float]:
    """A mixture's share of each dataset version (`{ref: weight / total}`), or {} when the plan is no mixture."""
    if not plan.weights:
        return {}
    total = sum(plan.weights)
    return {ref: weight / total for ref, weight in zip(plan.refs, plan.weights, strict=True)}


def _log_input(dataset, context: str, attempts: int = 5, tags: dict[str, str] | None = None) -> None:
    """`mlflow.log_input`, again when a concurrent run (a sweep's trials start together) created the same dataset
    row first: a SQL store then refuses the second insert (UNIQUE constraint); the retry links the existing row."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ingest.retrying import Backoff, retried

    def created_meanwhile(error: BaseException) -> bool:
        return isinstance(error, MlflowException) and (
            "UNIQUE constraint" in str(error) or "IntegrityError" in str(error)
        )

    retried(lambda: mlflow.log_input(dataset, context=context, tags=tags), attempts, Backoff(0.2), created_meanwhile)


def lake_dataset(ref: str, uri: str, manifest_sha256: str):
    """An MLflow dataset for a lake version: its record's URI as source, its manifest's digest."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        # A local path matches MLflow's local-artifact source twice over; it warns and picks that one.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        source = resolve_dataset_source(uri)
    # MLflow stores at most 36 characters of digest; the full SHA-256 is in the run's tags.
    return MetaDataset(source, name=ref, digest=manifest_sha256[:32])


def finish_run(tracking_uri: str, run_id: str, name: str, plan, metrics: dict, payload: dict | None,
               model_name: str | None) -> str | None:  # fmt: skip
    """After training: loss curves as a PNG, the generator of checkpoint `payload` logged and registered as
    `model_name` (alias `candidate`, tagged with the run and its validation metrics), the run FINISHED.

    Returns:
        The registered model version (None without a checkpoint or a model name).
    """
    from mlflow import MlflowClient

    from pipeline.models.saved import generator_from_checkpoint, min_side, spec_from_checkpoint
    from pipeline.tracking.loggers import MlflowLogger
    from pipeline.tracking.plots import LOSS_PANELS, loss_curves
    from pipeline.tracking.registry import log_generator

    client = MlflowClient(tracking_uri)
    history = {
        metric: [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
        for names in LOSS_PANELS.values()
        for metric in names
    }
    MlflowLogger(tracking_uri, run_id, system_metrics=False).log_image(
        loss_curves(history, title=name), "plots/loss_curves.png"
    )
    result = describe_result(metrics)
    validated = client.get_metric_history(run_id, "val/l1_ab")
    if validated:  # the experiment's chart view opens on this run's last sample grid
        from pipeline.tracking.charts import save_chart_view

        try:
            route = save_chart_view(client, client.get_run(run_id).info.experiment_id, max(m.step for m in validated))
            result += f"\n\nThe sample grids by step, beside the charts: [chart view]({route})."
        except Exception as e:  # noqa: BLE001 - a view is not worth the registered model
            log.warning("could not save the experiment's chart view: %s: %s", type(e).__name__, e)
    if result:  # first under the title, where the run page shows it without "Show more"
        note = client.get_run(run_id).data.tags.get(NOTE_TAG, "")
        title, details = note.split("\n", 1)[0], note.partition(DETAILS_HEADING)[2]
        parts = [title, result, DETAILS_HEADING + details.rstrip() if details else ""]
        client.set_tag(run_id, NOTE_TAG, "\n\n".join(part for part in parts if part))
    version = None
    not_finite = sorted(k for k, v in metrics.items() if k.startswith("val/") and not math.isfinite(float(v)))
    if payload is not None and not_finite:  # a diverged generator: never a candidate, never a champion
        log.warning("not registering the generator of run %s: its validation metrics %s are not finite", name,
                    ", ".join(not_finite))  # fmt: skip
        client.set_tag(run_id, "recolor.not_registered", f"validation metrics not finite: {', '.join(not_finite)}")
        payload = None
    if payload is not None:
        generator = generator_from_checkpoint(payload)
        shown = {k: f"{v:.6g}" for k, v in metrics.items() if k.startswith("val/")}
        tags = {"run_id": run_id, "run_name": name, "datasets": ",".join(plan.refs), **shown}
        registered = log_generator(
            generator,
            spec_from_checkpoint(payload, image_size=max(plan.size, min_side(generator))),  # resize: the payload's
            run_id,
            tracking_uri,
            registered_name=model_name,
            alias="candidate" if model_name else None,
            version_tags=tags,
        )
        version = registered.version if registered is not None else None
    with quiet_run_links(tracking_uri):
        client.set_terminated(run_id, status="FINISHED")
    return version
