"""A mixture trains and scores each dataset (`val/<dataset>/...`) and is the run's lineage in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_checkpoint import Recorder, new_trainer

from ingest.driver import IngestConfig, run_ingest
from ingest.errors import ConfigError
from pipeline.config import DataConfig, ModelConfig, StageConfig, TrainConfig, load_config
from pipeline.data.plan import DataError, resolve_config_data
from pipeline.train.cli import dataset_override


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, photo_writer) -> str:
    root = tmp_path_factory.mktemp("mix-lake")
    lake = str(root / "lake")
    for name, ids in (("big", range(20)), ("small", range(100, 116))):
        photo_writer(root / name, ids, width=80, height=64)
        run_ingest(IngestConfig(kind="folder", source=str(root / name), dataset=name, lake=lake, size=64,
                                val_fraction=0.5, use_ray=False, progress=False))  # fmt: skip
    return lake


def mix_config(lake: str) -> TrainConfig:
    return TrainConfig(
        name="mix",
        model=ModelConfig(base_filters=4, num_downs=6),
        stages=[StageConfig(name="gan", epochs=1)],
        data=DataConfig(
            mix={"big": 0.7, "small": 0.3},
            epoch_samples=30,
            lake=lake,
            batch_size=2,
            shuffle_window=8,
            prefetch_batches=0,
        ),  # fmt: skip
        workers=1,
        checkpoint_every=1000,
    )


def test_a_mixture_trains_its_epoch_length_and_scores_each_dataset(two_datasets, monkeypatch) -> None:
    monkeypatch.setenv("RECOLOR_NO_PROGRESS", "1")
    config = mix_config(two_datasets)
    plan = resolve_config_data(config.data)
    assert plan.refs == ["big@1", "small@1"] and plan.weights == [0.7, 0.3] and plan.epoch_length() == 30
    recorder = Recorder()
    new_trainer(config, plan, recorder).run()
    [end] = [m for m in recorder.metrics if m.get("epoch_end")]
    assert end["data/epoch_samples"] == 30  # 15 steps of 2: the mixture's length, not the datasets' 30-odd samples
    for name in ("big", "small"):
        count = plan.source(plan.refs.index(f"{name}@1")).count("val")
        assert count > 0 and end[f"val/{name}/count"] == count
        assert {f"val/{name}/l1_ab", f"val/{name}/psnr", f"val/{name}/gray_psnr"} <= set(end)
    assert end["val/count"] == end["val/big/count"] + end["val/small/count"]


def test_a_mixture_is_the_runs_lineage_in_mlflow(two_datasets, tmp_path, mlflow_store) -> None:
    from mlflow import MlflowClient

    from pipeline.tracking.runs import start_or_resume_run

    uri = mlflow_store(tmp_path)
    config = mix_config(two_datasets)
    plan = resolve_config_data(config.data)
    run_id, _ = start_or_resume_run(uri, "recolor", config, plan, str(tmp_path / "runs"), "cpu")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["data.mix.big"] == "0.7" and run.data.params["data.epoch_samples"] == "30"
    weights = {
        i.dataset.name: {t.key: t.value for t in i.tags}.get("recolor.weight") for i in run.inputs.dataset_inputs
    }
    assert weights == {"big@1/train": "0.7", "small@1/train": "0.3", "big@1/val": None, "small@1/val": None}
    note = run.data.tags["mlflow.note.content"]
    assert "`big@1` (70%), `small@1` (30%), a mixture of 30 samples an epoch" in note


def test_the_command_line_names_a_mixture_by_weights() -> None:
    assert dataset_override(["a", "b@2"]) == ['data.datasets=["a", "b@2"]', "data.mix=null", "data.epoch_samples=null"]
    assert dataset_override(["a:0.8", "b@2:0.2"]) == ['data.mix={"a": 0.8, "b@2": 0.2}', "data.datasets=[]"]
    # The preset's mixture (configs/demo.yaml's) is replaced whole by plain datasets, and plain datasets by a mix.
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    plain = load_config(demo, dataset_override(["photos"]))
    assert plain.data.datasets == ["photos"] and plain.data.mix is None and plain.data.epoch_samples is None
    mixed = load_config(demo, [*dataset_override(["a:3", "b:1"]), "data.epoch_samples=8"])
    assert mixed.data.mix == {"a": 3.0, "b": 1.0} and mixed.data.epoch_samples == 8
    with pytest.raises(ConfigError, match=r"--dataset b: give every dataset of a mixture a weight"):
        dataset_override(["a:0.8", "b"])
    with pytest.raises(ConfigError, match=r"--dataset b:x: the weight must be a number"):
        dataset_override(["a:0.8", "b:x"])


def test_a_mixture_of_one_version_twice_is_refused(two_datasets) -> None:
    with pytest.raises(DataError, match=r"names one dataset version twice"):
        resolve_config_data(DataConfig(mix={"big": 1.0, "big@1": 1.0}, lake=two_datasets))


def test_validation_scores_fid_every_nth_time_with_the_truths_features_kept(two_datasets, monkeypatch) -> None:
    import dataclasses

    monkeypatch.setenv("RECOLOR_NO_PROGRESS", "1")
    config = dataclasses.replace(mix_config(two_datasets), stages=[StageConfig(name="gan", epochs=2)], fid_every=2)
    plan = resolve_config_data(config.data)
    recorder = Recorder()
    trainer = new_trainer(config, plan, recorder)
    trainer.run()
    ends = [m for m in recorder.metrics if m.get("epoch_end")]
    assert ["val/fid" in m for m in ends] == [False, True]  # the 2nd validation of 2
    scored = ends[1]
    assert scored["val/fid"] > 0 and scored["val/gray_fid"] > 0 and scored["val/kid_std"] >= 0
    truth, gray = trainer._validation._fid_reference
    assert len(truth) == len(gray) == scored["val/count"]
