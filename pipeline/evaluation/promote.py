"""`recolor evaluate`: a generator's metrics on a lake dataset, an evaluation run, champion promotion.

Promotion moves the registry alias `champion` to the evaluated model version only when it beats
the current champion on the same data (both evaluated now, with the same code) on a chosen metric.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ingest.errors import ConfigError
from pipeline.config import MAX_BAD_FRACTION
from pipeline.evaluation.per_image import Inspection

# Lower is better for these; higher for the rest (psnr, ssim, auc, colorfulness).
LOWER_IS_BETTER = {"l1_ab", "colorfulness_abs_diff", "fid", "kid"}
EVAL_EXPERIMENT = "recolor-evaluation"


# How the scored photos were cut to the side, by the lake's ingest `--resize` mode (`ingest.images`), and the
# published numbers each matches (DDColor's answer in its issue #9): "crop", the short side resized and the centre
# cropped (ImageNet val5k, as CT2 and DDColor); "resize", the whole photo squashed to the side (ImageNet val50k,
# COCO-Stuff, ADE20K, as ColorFormer and DDColor). Both at 256 px in the papers.
PROTOCOLS = {"crop": "cover", "resize": "squash"}  # the evaluation protocols by the resize mode they read


@dataclass
class Evaluation:
    model_uri: str
    dataset: str  # name@version, pinned
    split: str
    metrics: dict[str, float]
    run_id: str | None = None
    promotion: dict = field(default_factory=dict)
    protocol: str = ""  # e.g. "crop-256" (`PROTOCOLS`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def compute_metrics(generator, plan, split: str, batch_size: int, device: torch.device, max_batches=None,
                    max_bad_fraction: float = MAX_BAD_FRACTION, dropout: bool = False,
                    inspection=None) -> dict:  # fmt: skip
    """The training validation's metrics (`eval/...`, gray baseline beside them) over one split of `plan`, with
    `eval/count` (samples scored), `eval/expected` (samples the split holds) and `eval/bad_samples` (skipped);
    with an `inspection` (`pipeline.evaluation.per_image.Inspection`), FID and KID too, and its table and worst
    images are filled.

    Raises:
        ConfigError: the split is empty, or the model needs larger samples than the dataset holds.
        DataError: more than `max_bad_fraction` of the split is corrupt, or nothing in it is readable.
    """
    from pipeline.data.batches import BadSampleCounter, validation_batches
    from pipeline.data.plan import DataError
    from pipeline.evaluation.validation import accumulate, finalize
    from pipeline.models.saved import min_side

    if plan.size < min_side(generator):
        raise ConfigError(
            f"the model needs samples of at least {min_side(generator)} px but {', '.join(plan.refs)} holds "
            f"{plan.size} px ones: evaluate on a dataset ingested with --size {min_side(generator)} or more"
        )
    shards = plan.train if split == "train" else plan.val
    if not shards:
        raise ConfigError(f"{', '.join(plan.refs)} has no samples in split {split!r}")
    view = dataclasses.replace(plan, val=shards)
    expected = sum(shard.count for shard in shards)
    counter = BadSampleCounter(max_bad_fraction, expected, what="--max-bad-fraction", scope=f"in split {split!r}")
    batches = validation_batches(view, 0, 1, batch_size, max_batches, counter=counter,
                                 keys=inspection.keys if inspection is not None else None)  # fmt: skip
    from pipeline.models import set_inference_mode

    torch.manual_seed(0)  # with dropout: the same draws for every model scored
    totals, _ = accumulate(set_inference_mode(generator.to(device), dropout), batches, device,
                           on_batch=inspection.on_batch if inspection is not None else None)  # fmt: skip
    metrics = finalize(totals.cpu(), prefix="eval/")
    if not metrics:
        raise DataError(f"{', '.join(plan.refs)}: none of the {expected} samples of split {split!r} is readable "
                        f"({counter.bad} corrupt): run `recolor lake check {plan.refs[0].split('@')[0]} --deep`, "
                        "then `recolor lake repair` on what it names")  # fmt: skip
    if inspection is not None:
        metrics |= inspection.scores("eval/")
    return metrics | {"eval/expected": float(expected), "eval/bad_samples": float(counter.bad)}


def _log_evaluation(client, tracking_uri: str, experiment: str, result: Evaluation, plan, registered, version,
                    partial: str | None, inspection: Inspection, batch_size: int, metric: str,
                    max_bad_fraction: float) -> str:  # fmt: skip
    """The evaluation's MLflow run: its params, tags (promotion included), metrics, dataset, per-image table and
    worst images. Returns its id."""
    import mlflow

    from pipeline.tracking.runs import lake_dataset, manifest_tag
    from pipeline.tracking.uri import fluent_tracking_uri, get_experiment_id

    metrics, split, model_uri, protocol_name = result.metrics, result.split, result.model_uri, result.protocol
    experiment_id = get_experiment_id(client, experiment, tracking_uri)
    run_name = f"eval {plan.refs[0]}"
    with fluent_tracking_uri(tracking_uri), mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run:
        mlflow.log_params(
            {
                "model_uri": model_uri,
                "dataset": plan.refs[0],
                "split": split,
                "batch_size": batch_size,
                "metric": metric,
                "max_bad_fraction": max_bad_fraction,
                "protocol": protocol_name,
            }
        )
        tags = {
            "recolor.kind": "evaluation",
            manifest_tag(plan.refs[0]): plan.digests[plan.refs[0]],
            "recolor.evaluated": f"{metrics['eval/count']:.0f} of {metrics['eval/expected']:.0f} samples"
            + (f" ({partial})" if partial else ""),
        }
        if registered is not None:
            tags.update({"recolor.model_name": registered[0], "recolor.model_version": str(version)})
        tags.update({f"promotion.{k}": str(v) for k, v in result.promotion.items()})
        mlflow.set_tags(tags)
        mlflow.log_metrics(metrics)
        mlflow.log_input(
            lake_dataset(f"{plan.refs[0]}/{split}", plan.uris[plan.refs[0]], plan.digests[plan.refs[0]]),
            context="evaluation",
        )
        mlflow.log_table(inspection.table(), artifact_file="per_image.json")
        worst = inspection.worst_grid()
        if worst is not None:
            mlflow.log_image(_png(worst), artifact_file="worst_16.png")
        return run.info.run_id


def check_protocol(plan, protocol: str | None) -> str:
    """The evaluation protocol of `plan`'s samples, e.g. "crop-256" (`PROTOCOLS`).

    Raises:
        ConfigError: `protocol` asks for another cut than the dataset's, naming how to ingest one.
    """
    mode = {resize: name for name, resize in PROTOCOLS.items()}.get(plan.resize, plan.resize)
    if protocol is not None and protocol != mode:
        raise ConfigError(
            f"--protocol {protocol} scores photos cut by `--resize {PROTOCOLS.get(protocol, protocol)}`, and "
            f"{plan.refs[0]} was ingested with --resize {plan.resize}: ingest the photos again with "
            f"`recolor ingest ... --resize {PROTOCOLS.get(protocol, protocol)} --size {plan.size}` under another name"
        )
    return f"{mode}-{plan.size}"


def _png(data: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as picture:
        return picture.convert("RGB")


def partial_reason(metrics: dict) -> str | None:
    """Why an evaluation did not score its whole split (corrupt samples, --max-batches), or None."""
    scored, expected, bad = metrics["eval/count"], metrics["eval/expected"], metrics["eval/bad_samples"]
    if scored >= expected:
        return None
    if bad:
        return f"{bad:.0f} of {expected:.0f} samples are corrupt"
    return f"{scored:.0f} of {expected:.0f} samples were scored (--max-batches)"


def parse_registered(uri: str) -> tuple[str, str | None, str | None] | None:
    """`models:/NAME@ALIAS` -> (NAME, None, ALIAS); `models:/NAME/VERSION` -> (NAME, VERSION, None); else None."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    return name, version or None, None


def better(metric: str, candidate: float, champion: float) -> bool:
    return candidate < champion if metric in LOWER_IS_BETTER else candidate > champion


def evaluate(
    model_uri: str,
    dataset: str,
    lake: str | None = None,
    split: str = "val",
    batch_size: int = 16,
    device: str = "cpu",
    tracking_uri: str | None = None,
    experiment: str = EVAL_EXPERIMENT,
    promote: bool = False,
    metric: str = "l1_ab",
    max_batches: int | None = None,
    trust_pickle: bool = False,
    max_bad_fraction: float = MAX_BAD_FRACTION,
    dropout: bool = False,
    fid: bool = True,
    protocol: str | None = None,
) -> Evaluation:
    """Evaluate a generator on a lake dataset, log an evaluation run, optionally promote it to `champion`.

    `fid` adds FID and KID (`pipeline.evaluation.fid`; without its network, one warning and the rest). The photos'
    cut is the dataset's (`PROTOCOLS`); `protocol` ("crop" or "resize") insists on one. The run logs a table of
    every image's metrics and source (`per_image.json`) and the worst 16 by ab error beside their truth.

    `trust_pickle` allows models of the old pickled format (see `pipeline.tracking.registry.load_generator`).
    Corrupt samples are skipped up to `max_bad_fraction` of the split (more stops with `DataError`); promotion
    needs the whole split: with any skipped, or with `max_batches`, it is refused (decision "refused").

    Raises:
        ValueError: unknown metric, a model URI that cannot be promoted, unloadable model.
        LakeError: unknown dataset or version.
    """
    from mlflow import MlflowClient

    from pipeline.data.plan import resolve_data
    from pipeline.tracking.registry import load_generator
    from pipeline.tracking.uri import connect_tracking

    registered = _check_request(model_uri, metric, promote, max_batches)
    tracking_uri = connect_tracking(tracking_uri)
    client = MlflowClient(tracking_uri)
    torch_device = torch.device(device)
    plan = resolve_data([dataset], lake)
    protocol_name = check_protocol(plan, protocol)
    generator = load_generator(model_uri, tracking_uri, torch_device, trust_pickle=trust_pickle)
    inspection = Inspection([], fid=fid, device=torch_device)
    metrics = compute_metrics(generator, plan, split, batch_size, torch_device, max_batches, max_bad_fraction, dropout,
                              inspection)  # fmt: skip
    result = Evaluation(model_uri, plan.refs[0], split, metrics, protocol=protocol_name)
    partial = partial_reason(metrics)

    version = None
    if registered is not None:
        name, version, alias = registered
        if version is None:
            version = client.get_model_version_by_alias(name, alias).version
    if promote and partial:
        reason = (f"{partial}: promotion needs the whole split (`recolor lake check NAME --deep` finds the damaged "
                  "shards, `recolor lake repair NAME` rebuilds them)")  # fmt: skip
        result.promotion = {
            "metric": metric,
            "candidate_version": str(version),
            "decision": "refused",
            "reason": reason,
        }
    elif promote:
        result.promotion = _promotion(client, registered[0], version, metrics, metric, plan, split, batch_size,
                                      torch_device, tracking_uri, max_batches, trust_pickle, dropout)  # fmt: skip

    result.run_id = _log_evaluation(client, tracking_uri, experiment, result, plan, registered, version, partial,
                                    inspection, batch_size, metric, max_bad_fraction)  # fmt: skip
    if registered is not None:
        tag = f"eval.{plan.refs[0].replace('@', ':')}.{split}.{metric}"
        client.set_model_version_tag(registered[0], str(version), tag, f"{metrics[f'eval/{metric}']:.6g}")
    return result


def _check_request(model_uri: str, metric: str, promote: bool, max_batches: int | None):
    """What `evaluate` refuses before loading anything; returns the registered model's (name, version, alias) or
    None.

    Raises:
        ConfigError: an unknown promotion metric; --promote of an unregistered model, or with --max-batches.
    """
    from pipeline.evaluation.validation import metric_names

    known = {name for name in metric_names() if not name.startswith("gray_") and name != "count"}
    if metric not in known:
        raise ConfigError(f"unknown metric {metric!r}: use one of {', '.join(sorted(known))}")
    registered = parse_registered(model_uri)
    if promote and registered is None:
        raise ConfigError("--promote needs a registered model: models:/NAME/VERSION or models:/NAME@ALIAS")
    if promote and max_batches is not None:
        raise ConfigError("--promote compares models on the whole split: drop --max-batches")
    return registered


def _promotion(client, name, version, metrics, metric, plan, split, batch_size, device, tracking_uri, max_batches,
               trust_pickle=False, dropout=False):  # fmt: skip
    from pipeline.tracking.registry import load_generator

    key = f"eval/{metric}"
    decision = {"metric": metric, "candidate_version": str(version), "candidate_value": metrics[key]}
    not_finite = sorted(name for name, value in metrics.items() if not math.isfinite(float(value)))
    if not_finite:  # a diverged generator scores NaN, and NaN compares as neither better nor worse
        return decision | {"decision": "refused", "reason": f"metrics not finite ({', '.join(not_finite)}): a "
                           "diverged generator is never promoted"}  # fmt: skip
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except Exception:  # noqa: BLE001 - no champion yet
        champion = None
    if champion is None:
        client.set_registered_model_alias(name, "champion", str(version))
        return decision | {"decision": "promoted", "reason": "no champion yet"}
    decision["champion_version"] = str(champion.version)
    if str(champion.version) == str(version):
        return decision | {"decision": "unchanged", "reason": "already the champion"}
    champion_model = load_generator(f"models:/{name}/{champion.version}", tracking_uri, device, trust_pickle)
    champion_value = compute_metrics(champion_model, plan, split, batch_size, device, max_batches, dropout=dropout)[key]
    decision["champion_value"] = champion_value
    if better(metric, metrics[key], champion_value):
        client.set_registered_model_alias(name, "champion", str(version))
        return decision | {"decision": "promoted", "reason": f"{metric} {metrics[key]:.6g} beats {champion_value:.6g}"}
    return decision | {"decision": "kept", "reason": f"{metric} {metrics[key]:.6g} does not beat {champion_value:.6g}"}
