"""`recolor sweep`: many training runs at once, Ray Tune driving one Ray Train V2 run a trial.

The driver builds every trial's config first (a bad override fails before anything starts), opens
the sweep's parent MLflow run, and runs a `Tuner` whose trial function calls `run_training` (the
same code as `recolor train`) with the trial's config, a child MLflow run, and a Ray Train callback
that reports each validation's metrics to Tune (`ray.tune.integration.ray_train.TuneReportCallback`,
the Train V2 way). With `--stop-early` Tune's ASHA or median-stopping scheduler ends losing trials
after a validation; the driver records the decision on their runs. At the end the parent run gets
the ranking (CSV and a chart of the metric per trial), tags naming the best trial, and the best
trial's generator is registered (alias `candidate`).

Rerunning the same command resumes: each trial's run is found by its name (the sweep's name and
its index), so finished trials train nothing, unfinished ones resume from their checkpoints, and
stopped ones stay stopped. Tune's own state is scratch: nothing needs `Tuner.restore`. When every
trial is finished or stopped, no Tune run starts at all: the parent's ranking is made again, in seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass, field

from ingest.errors import ConfigError
from pipeline.sweep.ranking import (
    DECISION_TAG,
    OVERRIDE_PREFIX,
    ROLE_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    format_table,
    lower_is_better,
    metric_chart,
    ranking,
    ranking_csv,
    trial_runs,
)
from pipeline.sweep.space import Trial

log = logging.getLogger(__name__)

SCHEDULERS = ("asha", "median")
TRIAL_CPU = 0.01  # a trial's own actor: it waits on its Ray Train run (Tune refuses 0)


@dataclass
class SweepOptions:
    """What a sweep runs and how."""

    name: str  # the parent run's name; trials are NAME-00, NAME-01, ...
    metric: str = "val/l1_ab"  # a validation metric (val/...), ranked lower- or higher-is-better by its kind
    workers_per_trial: int | None = None  # Ray Train workers of each trial; None: the preset's (or override's)
    max_concurrent: int = 2  # trials training at once
    stop_early: str | None = None  # None, "asha" or "median"
    register: bool = True  # register the best trial's generator as the model (alias candidate)


@dataclass
class SweepResult:
    name: str
    parent_run_id: str | None
    rows: list[dict] = field(default_factory=list)
    best: dict | None = None
    table: str = ""


def trial_configs(preset: str | None, base_overrides: list[str], trials: list[Trial], options: SweepOptions):
    """Every trial's `TrainConfig` (name NAME-II, the workers per trial), or the first bad one's error.

    The lake and the storage are made absolute here: Tune runs each trial in a folder of its own.
    """
    from pathlib import Path

    from ingest.lake import resolve_lake_uri
    from ingest.storage import is_s3
    from pipeline.config import load_config
    from pipeline.train.driver import resolve_storage

    configs = []
    for trial in trials:
        try:
            config = load_config(preset, [*base_overrides, *trial.override_args()])
        except ConfigError as e:
            raise ConfigError(f"trial {trial.index} ({' '.join(trial.override_args())}): {e}") from None
        lake = resolve_lake_uri(config.data.lake)
        data = dataclasses.replace(config.data, lake=lake if is_s3(lake) else str(Path(lake).expanduser().absolute()))
        configs.append(
            dataclasses.replace(
                config,
                name=trial.name(options.name),
                workers=options.workers_per_trial or config.workers,
                data=data,
                storage=resolve_storage(config.storage),
            )
        )
    return configs


def run_sweep(preset: str | None, base_overrides: list[str], trials: list[Trial], options: SweepOptions,
              tracking, ray_address: str | None = None) -> SweepResult:  # fmt: skip
    """Run (or resume) a sweep; see the module's docstring. `tracking` is the training's `TrackingOptions`.

    Raises:
        ConfigError: a bad override, metric or option (before anything starts).
        LakeError, DataError: the data of the preset cannot train.
    """
    from ingest.cluster import ensure_ray
    from pipeline.data.plan import resolve_config_data
    from pipeline.tracking.uri import check_tracking_server, resolve_tracking_uri
    from pipeline.train.driver import check_before_start

    _check_options(trials, options, ray_address)
    configs = trial_configs(preset, base_overrides, trials, options)
    plan = resolve_config_data(configs[0].data)
    check_before_start(configs[0], plan, ray_address)
    tracking_uri = None
    if tracking is not None and tracking.enabled:
        tracking_uri = resolve_tracking_uri(tracking.tracking_uri)
        check_tracking_server(tracking_uri)
    parent_run_id = _open_parent(tracking_uri, tracking, options, preset, trials) if tracking_uri else None
    # The trials' runs register nothing: the sweep registers its best at the end.
    trial_tracking = dataclasses.replace(tracking, tracking_uri=tracking_uri, model_name=None) if tracking_uri else None
    if trial_tracking is not None and _every_trial_done(configs, plan, options, trial_tracking):
        log.warning("sweep %s finished earlier: every trial trained all it asks for or was stopped early; nothing "
                    "to train, no cluster started (raise stages.N.epochs to train on, or pick another --name)",
                    options.name)  # fmt: skip
        result = SweepResult(options.name, parent_run_id)
        _finish_parent(tracking_uri, tracking, options, parent_run_id, trials, result)
        return result

    # The trials' Train workers, and a little for the trial drivers themselves (a local instance only).
    needed = options.max_concurrent * configs[0].workers * configs[0].cpus_per_worker + 1
    with ensure_ray(ray_address, max(os.cpu_count() or 1, needed)):
        from ray import tune

        trial_fn = tune.with_parameters(
            _train_trial,
            configs=[config.to_dict() for config in configs],
            trials=trials,
            options=options,
            tracking=trial_tracking,
            parent_run_id=parent_run_id,
        )
        scheduler = _scheduler(options, configs[0])
        with tempfile.TemporaryDirectory(prefix="recolor-tune-") as scratch:
            tuner = tune.Tuner(
                tune.with_resources(trial_fn, {"cpu": TRIAL_CPU}),  # it only drives; its Train workers hold the CPUs
                param_space={"trial": tune.grid_search(list(range(len(trials))))},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=options.max_concurrent,
                    scheduler=scheduler,
                    metric=options.metric if scheduler else None,
                    mode=("min" if lower_is_better(options.metric) else "max") if scheduler else None,
                ),
                run_config=tune.RunConfig(name=f"sweep-{options.name}", storage_path=scratch, verbose=0),
            )
            grid = tuner.fit()
    stopped = {trials[index].name(options.name): at for index, at in getattr(scheduler, "stopped", {}).items()}
    errors = [
        outcome.error
        for outcome in grid
        if outcome.error is not None and trials[outcome.config["trial"]].name(options.name) not in stopped
    ]
    result = SweepResult(options.name, parent_run_id)
    if tracking_uri:
        _record_stopped(tracking_uri, tracking, options, stopped)
        _finish_parent(tracking_uri, tracking, options, parent_run_id, trials, result)
    if errors:
        from pipeline.train.failures import TrainingError, describe_failure

        raise TrainingError(
            f"{len(errors)} of {len(trials)} trials failed; first: {describe_failure(errors[0])}", parent_run_id, True
        )
    return result


def _every_trial_done(configs, plan, options: SweepOptions, tracking) -> bool:
    """Whether a rerun would train nothing: every trial's run finished all its config asks for (as `recolor train`
    judges it, `finished_earlier`) or was stopped early by an earlier run of the sweep. Then no Tune run starts
    (each trial's actor would only find its run done)."""
    from pipeline.train.driver import finished_earlier, run_location

    for config in configs:
        if _stopped_value(tracking, config.name, options.metric) is not None:
            continue
        if finished_earlier(config, plan, run_location(config.storage, config.name), tracking) is None:
            return False
    return True


def _check_options(trials: list[Trial], options: SweepOptions, ray_address: str | None) -> None:
    """What a sweep refuses before anything starts.

    Raises:
        ConfigError: a metric that is not a validation metric, an unknown scheduler, counts below 1, a grid over
            workers, or early stopping over a ray:// address.
    """
    from pipeline.evaluation.validation import metric_names

    # The gray baseline's metrics are the same for every trial: ranking by them would rank nothing.
    known = sorted(f"val/{name}" for name in metric_names() if name != "count" and not name.startswith("gray_"))
    if options.metric not in known:
        raise ConfigError(f"--metric must be a validation metric: one of {', '.join(known)}")
    if options.stop_early is not None and options.stop_early not in SCHEDULERS:
        raise ConfigError(f"--stop-early must be one of {SCHEDULERS}, got {options.stop_early!r}")
    if options.max_concurrent < 1 or (options.workers_per_trial is not None and options.workers_per_trial < 1):
        raise ConfigError("--max-concurrent and --workers-per-trial must be at least 1")
    if any(key == "workers" for trial in trials for key, _ in trial.overrides):
        raise ConfigError("--grid workers=...: a trial's workers are --workers-per-trial (the same for every trial)")
    address = ray_address or os.environ.get("RAY_ADDRESS") or ""
    if options.stop_early and address.startswith("ray://"):
        # Ray Tune then runs the tuner on the cluster: its scheduler's decisions never reach this process.
        raise ConfigError(
            "--stop-early with a ray:// address: run the sweep on the cluster with `recolor submit sweep`"
        )


def _scheduler(options: SweepOptions, config):
    """Tune's early-stopping scheduler, deciding after each validation (`training_iteration`: one an epoch)."""
    if options.stop_early is None:
        return None
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    epochs = sum(stage.epochs for stage in config.stages)
    if options.stop_early == "asha":
        # max_t past the last validation: ASHA stops a trial that reaches max_t, which would race the run's own end.
        return _recording(ASHAScheduler, epochs)(
            time_attr="training_iteration", max_t=epochs + 1, grace_period=1, reduction_factor=2
        )
    return _recording(MedianStoppingRule, epochs)(
        time_attr="training_iteration", grace_period=1, min_samples_required=2
    )


def _recording(scheduler_class, epochs: int):
    """The scheduler, remembering which trials it stopped ({trial index: validations seen}): a stopped trial's
    run ends abruptly (its Train run is killed), so only the scheduler knows it was a decision, not a failure.
    A STOP on a trial's last validation, or on the result Tune adds when the trial's function returns, stops
    nothing: it is not recorded."""

    class Recording(scheduler_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.stopped: dict[int, int] = {}

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            iteration = int(result.get("training_iteration", 0))
            if decision == self.STOP and not result.get("done") and iteration < epochs:
                self.stopped[trial.config["trial"]] = iteration
            return decision

    Recording.__name__ = scheduler_class.__name__
    return Recording


def _train_trial(params: dict, configs, trials, options: SweepOptions, tracking, parent_run_id) -> None:
    """One trial, in a Tune actor: `run_training` of its config, each validation's metrics reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.config import TrainConfig
    from pipeline.train.driver import run_training

    class ValidationReport(TuneReportCallback):
        """Only the reports that hold the metric (a validation's): Tune counts each as one iteration."""

        reported = 0

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and options.metric in metrics[0]:
                super().after_report(run_context, [_plain(metrics[0])], None)
                self.reported += 1

    trial = trials[params["trial"]]
    config = TrainConfig.from_dict(configs[trial.index])
    stopped = _stopped_value(tracking, config.name, options.metric)
    if stopped is not None:  # stopped early by an earlier run of this sweep: it stays stopped
        tune.report({options.metric: stopped})
        return
    trial_tracking = None
    if tracking is not None:
        tags = {SWEEP_TAG: options.name, ROLE_TAG: "trial", TRIAL_TAG: str(trial.index)}
        tags.update({f"{OVERRIDE_PREFIX}{key}": value for key, value in trial.overrides})
        trial_tracking = dataclasses.replace(tracking, parent_run_id=parent_run_id, tags=tags)
    callback = ValidationReport()
    result = run_training(config, tracking=trial_tracking, callbacks=[callback])
    if options.metric in result.metrics and not callback.reported:
        tune.report({options.metric: float(result.metrics[options.metric])})  # finished earlier: its last value


def _plain(metrics: dict) -> dict:
    return {key: float(value) for key, value in metrics.items() if isinstance(value, (int, float))}


def _stopped_value(tracking, name: str, metric: str) -> float | None:
    if tracking is None:
        return None
    from mlflow import MlflowClient

    from pipeline.tracking.runs import RUN_NAME_TAG

    client = MlflowClient(tracking.tracking_uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return None
    runs = client.search_runs([experiment.experiment_id], f"tags.`{RUN_NAME_TAG}` = '{name}'", max_results=1,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    if runs and runs[0].data.tags.get(DECISION_TAG):
        return runs[0].data.metrics.get(metric, float("nan"))
    return None


def _open_parent(tracking_uri: str, tracking, options: SweepOptions, preset, trials: list[Trial]) -> str:
    """The sweep's parent run: the one of an earlier run of this sweep, or a new one."""
    from mlflow import MlflowClient

    from pipeline.tracking.uri import get_experiment_id

    client = MlflowClient(tracking_uri)
    experiment_id = get_experiment_id(client, tracking.experiment, tracking_uri)
    found = client.search_runs([experiment_id], f"tags.`{SWEEP_TAG}` = '{options.name}' and tags.`{ROLE_TAG}` = "
                               "'parent'", max_results=1, order_by=["attributes.start_time DESC"])  # fmt: skip
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    axes = {}
    for trial in trials:
        for key, value in trial.overrides:
            axes.setdefault(key, []).append(value)
    description = (
        f"**sweep {options.name}**: {len(trials)} trials of preset `{preset or 'defaults'}`, ranked by "
        f"`{options.metric}`, {options.workers_per_trial or 'the preset'} worker(s) a trial, "
        f"{options.max_concurrent} at once"
        + (f", losing trials stopped early ({options.stop_early})" if options.stop_early else "")
        + "\n\n"
        + "\n".join(f"- `{key}`: {', '.join(dict.fromkeys(values))}" for key, values in axes.items())
    )
    run = client.create_run(
        experiment_id,
        run_name=options.name,
        tags={SWEEP_TAG: options.name, ROLE_TAG: "parent", "mlflow.note.content": description,
              "recolor.sweep.metric": options.metric, "recolor.preset": preset or "defaults"},
    )  # fmt: skip
    for key, values in axes.items():
        client.log_param(run.info.run_id, f"grid.{key}", ",".join(dict.fromkeys(values)))
    for name, value in (("trials", len(trials)), ("metric", options.metric), ("stop_early", options.stop_early)):
        client.log_param(run.info.run_id, name, str(value))
    return run.info.run_id


def _record_stopped(tracking_uri: str, tracking, options: SweepOptions, stopped: dict[str, int]) -> None:
    """The runs of trials the scheduler stopped end abruptly (RUNNING, or FAILED with the error of their killed
    Train run): mark them KILLED, with the decision. A run left RUNNING otherwise ended with its trial: KILLED."""
    from mlflow import MlflowClient

    from pipeline.tracking.runs import FAILURE_TAG

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    for run in trial_runs(client, experiment.experiment_id, options.name):
        name = run.info.run_name
        if DECISION_TAG in run.data.tags or (name not in stopped and run.info.status != "RUNNING"):
            continue
        value = run.data.metrics.get(options.metric)
        history = client.get_metric_history(run.info.run_id, options.metric)
        shown = f"{value:.4g}" if value is not None else "none"
        if name in stopped:
            client.set_tag(run.info.run_id, DECISION_TAG, (
                f"stopped early by {options.stop_early} at validation {stopped[name]}: {options.metric} was not among "
                f"the best (the run had {len(history)} validation(s) when it ended, last {shown})"))  # fmt: skip
            if FAILURE_TAG in run.data.tags:
                client.delete_tag(run.info.run_id, FAILURE_TAG)
        client.set_terminated(run.info.run_id, status="KILLED")


def _finish_parent(tracking_uri: str, tracking, options: SweepOptions, parent_run_id: str, trials, result) -> None:
    """The ranking on the parent run (CSV, chart, best-trial tags), the best generator registered, parent FINISHED."""
    from mlflow import MlflowClient

    from pipeline.tracking.loggers import MlflowLogger

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(tracking.experiment)
    rows = ranking(client, experiment.experiment_id, options.name, options.metric)
    result.rows, result.table = rows, format_table(rows, options.metric)
    labels = {trial.name(options.name): trial.label() for trial in trials}
    histories = {
        f"{row['name']}: {labels.get(row['name'], '')}": [
            (m.step, m.value) for m in client.get_metric_history(row["run_id"], options.metric)
        ]
        for row in rows
    }
    logger = MlflowLogger(tracking_uri, parent_run_id, system_metrics=False)
    logger.log_image(metric_chart(histories, options.metric, f"sweep {options.name}"), "sweep/metric_by_step.png")
    client.log_text(parent_run_id, ranking_csv(rows, options.metric).decode(), "sweep/ranking.csv")
    finished = [row for row in rows if row["status"] == "FINISHED" and not row["decision"] and row[options.metric]
                is not None]  # fmt: skip
    if finished:
        best = result.best = finished[0]
        client.set_tag(parent_run_id, "recolor.sweep.best_trial", best["name"])
        client.set_tag(parent_run_id, "recolor.sweep.best_run_id", best["run_id"])
        client.set_tag(parent_run_id, f"recolor.sweep.best_{options.metric}", f"{best[options.metric]:.6g}")
        client.log_metric(parent_run_id, f"best_{options.metric}", best[options.metric])
        if options.register and tracking.model_name:
            _register_best(client, tracking_uri, tracking.model_name, best, options)
    done = all(row["status"] in ("FINISHED", "KILLED") for row in rows) and len(rows) == len(trials)
    from pipeline.tracking.uri import quiet_run_links

    with quiet_run_links(tracking_uri):
        client.set_terminated(parent_run_id, status="FINISHED" if done else "FAILED")


def _register_best(client, tracking_uri: str, model_name: str, best: dict, options: SweepOptions) -> None:
    """The best trial's logged generator as a version of `model_name` with alias candidate (once per run)."""
    import mlflow

    from pipeline.tracking.uri import fluent_tracking_uri

    existing = client.search_model_versions(f"name = '{model_name}' and run_id = '{best['run_id']}'")
    if existing:
        version = max(existing, key=lambda v: int(v.version)).version
    else:
        with fluent_tracking_uri(tracking_uri):
            version = mlflow.register_model(f"runs:/{best['run_id']}/generator", model_name).version
        client.set_model_version_tag(model_name, str(version), "recolor.sweep", options.name)
    client.set_registered_model_alias(model_name, "candidate", str(version))
