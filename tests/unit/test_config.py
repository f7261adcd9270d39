"""Typed training config: the presets hold the recipe, overrides reach any field, bad input names the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ingest.errors import ConfigError
from pipeline.config import StageConfig, TrainConfig, apply_overrides, flatten, load_config, parse_value
from pipeline.train.loop import lr_lambda

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


# --- presets -------------------------------------------------------------------------------------


def test_pix2pix_preset_is_the_recipe() -> None:
    config = load_config(CONFIGS / "pix2pix_unet.yaml")
    assert config.model.arch == "unet_256" and config.model.num_downs == 8 and config.model.base_filters == 64
    assert config.model.norm == "batch"
    [stage] = config.stages
    assert stage.gan_mode == "vanilla" and stage.lr == 2e-4 and stage.decay_epochs == 0
    assert (config.beta1, config.beta2) == (0.5, 0.999)
    assert config.l1_lambda == 100.0
    assert config.data.global_batch_size == 16 and config.data.flip is True
    # 16 a step whatever the worker count, as the recipe: the learning rate means the same on any cluster.
    for workers in (1, 2, 4, 8, 16):
        config = load_config(CONFIGS / "pix2pix_unet.yaml", [f"workers={workers}"])
        assert config.data.batch_size * config.workers == 16


def test_a_global_batch_that_does_not_split_over_the_workers_is_refused() -> None:
    with pytest.raises(
        ConfigError,
        match=r"data.global_batch_size=16 does not split evenly over 3 workers: use "
        r"--workers 1 / 2 / 4 / 8 / 16, .* \(e.g. 18\), or an elastic group",
    ):
        load_config(CONFIGS / "pix2pix_unet.yaml", ["workers=3"])
    elastic = load_config(CONFIGS / "pix2pix_unet.yaml", ["workers=[2, 5]"])  # unequal shares are weighted
    assert (elastic.workers, elastic.max_workers, elastic.global_batch, elastic.elastic) == (2, 5, 16, True)
    assert TrainConfig.from_dict(elastic.to_dict()) == elastic
    with pytest.raises(ConfigError, match=r"a global batch of 16 cannot feed 20 workers"):
        load_config(CONFIGS / "pix2pix_unet.yaml", ["workers=[2, 20]"])
    with pytest.raises(ConfigError, match=r"workers \[4, 2\]: the largest group is smaller"):
        load_config(CONFIGS / "pix2pix_unet.yaml", ["workers=[4, 2]"])
    config = load_config(CONFIGS / "tiny.yaml", ["data.global_batch_size=12", "workers=3"])
    assert config.data.batch_size == 4
    again = dataclasses.replace(config, workers=2)  # a sweep's trial: a new worker count, the global batch kept
    assert again.data.batch_size == 6 and config.data.batch_size == 4


def test_fp16_and_sync_batch_on_cpu_workers_are_refused_at_config_time() -> None:
    with pytest.raises(ConfigError, match="amp=fp16 needs loss scaling"):
        load_config(CONFIGS / "tiny.yaml", ["amp=fp16"])
    with pytest.raises(ConfigError, match="model.norm=sync_batch needs GPU workers"):
        load_config(CONFIGS / "tiny.yaml", ["model.norm=sync_batch", "workers=2"])
    assert load_config(CONFIGS / "tiny.yaml", ["model.norm=sync_batch", "workers=2", "use_gpu=true"])


def test_resnet18_preset_pretrains_on_l1_then_adds_the_gan_loss() -> None:
    config = load_config(CONFIGS / "resnet18_unet.yaml")
    assert config.model.arch == "resnet18_unet" and config.model.backbone_weights is None
    pretrain, gan = config.stages
    assert pretrain.gan_mode is None and pretrain.epochs == 20
    assert gan.gan_mode == "vanilla" and gan.epochs == 20
    assert pretrain.lr == gan.lr == 2e-4
    assert (config.beta1, config.beta2) == (0.5, 0.999)  # the defaults are the recipe's
    assert config.l1_lambda == 100.0


def test_the_demo_preset_learns_its_photos_on_cpus() -> None:
    config = load_config(CONFIGS / "demo.yaml")
    assert config.name == "demo" and config.use_gpu is False and config.cpu_amp == "auto"
    assert config.data.mix == {"demo-photos": 1.0} and config.data.epoch_samples == 160  # 40 steps an epoch, not 2
    assert [stage.gan_mode for stage in config.stages] == [None, "vanilla"]
    # The pretrained encoder, frozen: what colorizes camera.png (a photo it never saw) most plausibly in its time.
    assert config.model.arch == "inception_unet" and config.model.encoder == "frozen"


def test_tiny_preset_is_tiny_and_cpu_only() -> None:
    config = load_config(CONFIGS / "tiny.yaml")
    assert config.name == "tiny" and config.use_gpu is False
    assert config.data.datasets == ["demo-photos"] and config.data.batch_size == 2
    assert config.stages[0].decay_epochs == 1 and config.stages[0].lr == 2e-4
    assert config.model.base_filters < 64


def test_every_preset_round_trips_through_a_plain_dict() -> None:
    # The dict is what Ray's train_loop_config carries and what a checkpoint stores.
    for path in sorted(CONFIGS.glob("*.yaml")):
        config = load_config(path)
        assert TrainConfig.from_dict(config.to_dict()) == config, path.name


def test_a_missing_preset_names_the_presets_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_config(tmp_path / "nope.yaml")


# --- overrides -----------------------------------------------------------------------------------


def test_overrides_reach_nested_fields_and_list_items() -> None:
    config = load_config(
        CONFIGS / "resnet18_unet.yaml",
        [
            "stages.0.epochs=3",
            "stages.1.lr=1e-4",
            "data.batch_size=8",
            "model.backbone_weights=s3://weights/resnet18.pth",
            "data.datasets=[imagenet-5k@1, coco-val]",
            "data.max_val_batches=null",
            "deterministic=true",
        ],
    )
    assert config.stages[0].epochs == 3 and config.stages[1].epochs == 20
    assert config.stages[1].lr == pytest.approx(1e-4) and isinstance(config.stages[1].lr, float)
    assert config.data.batch_size == 8
    assert config.model.backbone_weights == "s3://weights/resnet18.pth"
    assert config.data.datasets == ["imagenet-5k@1", "coco-val"]
    assert config.data.max_val_batches is None
    assert config.deterministic is True


def test_null_turns_a_gan_stage_into_an_l1_only_stage() -> None:
    config = load_config(CONFIGS / "pix2pix_unet.yaml", ["stages.0.gan_mode=null"])
    assert config.stages[0].gan_mode is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1e-4", 1e-4),
        ("2.5E+3", 2500.0),
        ("3", 3),
        ("0.5", 0.5),
        ("null", None),
        ("true", True),
        ("[a, b]", ["a", "b"]),
    ],
)
def test_parse_value_reads_yaml_and_exponent_floats(text, expected) -> None:
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_an_int_where_a_float_is_wanted_becomes_a_float() -> None:
    config = load_config(None, ["l1_lambda=10", "stages=[{lr: 1}]"])
    assert config.l1_lambda == 10.0 and isinstance(config.l1_lambda, float)
    assert config.stages[0].lr == 1.0 and isinstance(config.stages[0].lr, float)


def test_exponent_floats_in_a_yaml_file_load_as_floats(tmp_path) -> None:
    # YAML 1.1 reads `1e-4` (no dot) as a string.
    preset = tmp_path / "p.yaml"
    preset.write_text("stages:\n  - lr: 1e-4\nl1_lambda: 1e2\n")
    config = load_config(preset)
    assert config.stages[0].lr == pytest.approx(1e-4) and config.l1_lambda == 100.0


def test_apply_overrides_edits_the_mapping_in_place() -> None:
    values = {"stages": [{"epochs": 1}, {"epochs": 2}]}
    assert apply_overrides(values, ["stages.1.epochs=5", "model.arch=resnet18_unet"]) is values
    assert values == {"stages": [{"epochs": 1}, {"epochs": 5}], "model": {"arch": "resnet18_unet"}}


# --- errors name the field -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, named",
    [
        ("nope=1", "nope"),
        ("model.nope=1", "model.nope"),
        ("stages.0.nope=1", "stages.0.nope"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.batch_size=abc", "data.batch_size"),
        ("data.shuffle_window=0", "data.shuffle_window"),
        ("data.max_bad_fraction=2", "data.max_bad_fraction"),
        ("data.datasets=demo-photos", "data.datasets"),
        ("model.arch=vgg16", "model.arch"),
        ("model.norm=group", "model.norm"),
        ("model.base_filters=0", "model.base_filters"),
        ("model.backbone_weights=w.pth", "model.backbone_weights"),
        ("stages.0.gan_mode=wgan", "gan_mode"),
        ("stages.0.epochs=0", "epochs"),
        ("stages.0.epochs=two", "stages.0.epochs"),
        ("stages.0.decay_epochs=99", "decay_epochs"),
        ("stages.0.lr=-1e-4", "lr"),
        ("stages.3.epochs=1", "stages.3.epochs"),
        ("stages.x.epochs=1", "stages.x.epochs"),
        ("stages=[]", "stage"),
        ("workers=0", "workers"),
        ("workers=1.5", "workers"),
        ("seed=abc", "seed"),
        ("deterministic=maybe", "deterministic"),
        ("amp=int8", "amp"),
        ("checkpoint_every=0", "checkpoint_every"),
        ("log_every=0", "log_every"),
        ("keep_checkpoints=1", "keep_checkpoints"),
        ("name=has space", "name"),
        ("model.arch.depth=3", "model.arch"),
        ("data.batch_size", "key=value"),
        ("=3", "key=value"),
    ],
)
def test_bad_overrides_raise_value_error_naming_the_field(override, named) -> None:
    with pytest.raises(ValueError) as error:
        load_config(CONFIGS / "pix2pix_unet.yaml", [override])
    assert named in str(error.value)


def test_keep_checkpoints_below_two_is_refused_with_the_reason() -> None:
    # A corrupt latest checkpoint needs the one before it to resume from.
    with pytest.raises(ValueError) as error:
        load_config(CONFIGS / "tiny.yaml", ["keep_checkpoints=1"])
    assert str(error.value) == (
        "keep_checkpoints must be at least 2, got 1: when the latest checkpoint is unreadable, "
        "a run resumes from the one before"
    )
    assert load_config(CONFIGS / "tiny.yaml", ["keep_checkpoints=2"]).keep_checkpoints == 2


def test_unknown_fields_in_a_preset_are_refused_and_the_known_ones_listed(tmp_path) -> None:
    preset = tmp_path / "typo.yaml"
    preset.write_text("data:\n  batchsize: 8\n")
    with pytest.raises(ValueError, match=r"unknown config field\(s\) data\.batchsize; known: .*batch_size"):
        load_config(preset)


def test_a_preset_that_is_not_a_mapping_is_refused(tmp_path) -> None:
    preset = tmp_path / "list.yaml"
    preset.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(preset)


# --- flatten (MLflow params) ---------------------------------------------------------------------


def test_flatten_joins_keys_with_dots_and_indexes_list_items() -> None:
    values = {
        "name": "run",
        "model": {"arch": "unet_256", "backbone_weights": None},
        "stages": [{"epochs": 2, "gan_mode": None}, {"epochs": 3, "gan_mode": "vanilla"}],
        "data": {"datasets": ["a@1", "b"], "batch_size": 4},
        "empty": [],
    }
    assert flatten(values) == {
        "name": "run",
        "model.arch": "unet_256",
        "model.backbone_weights": None,
        "stages.0.epochs": 2,
        "stages.0.gan_mode": None,
        "stages.1.epochs": 3,
        "stages.1.gan_mode": "vanilla",
        "data.datasets": ["a@1", "b"],  # a list of plain values stays one param
        "data.batch_size": 4,
        "empty": [],
    }


def test_flatten_of_a_whole_config_has_one_key_per_leaf() -> None:
    config = load_config(CONFIGS / "resnet18_unet.yaml")
    flat = flatten(config.to_dict())
    assert flat["stages.1.gan_mode"] == "vanilla" and flat["stages.0.gan_mode"] is None
    assert flat["model.arch"] == "resnet18_unet" and flat["data.global_batch_size"] == 16
    assert flat["data.batch_size"] == 8  # split over the preset's 2 workers
    assert not any(isinstance(value, dict) for value in flat.values())


# --- learning-rate schedule ----------------------------------------------------------------------


def test_lr_lambda_is_constant_without_decay() -> None:
    factor = lr_lambda(StageConfig(epochs=5, decay_epochs=0))
    assert [factor(epoch) for epoch in range(8)] == [1.0] * 8


def test_lr_lambda_is_constant_then_decays_linearly_to_zero() -> None:
    # pix2pix: n_epochs constant, then n_epochs_decay epochs with 1 - k / (n_epochs_decay + 1).
    factor = lr_lambda(StageConfig(epochs=6, decay_epochs=3))
    values = [factor(epoch) for epoch in range(8)]
    assert values[:3] == [1.0, 1.0, 1.0]
    assert values[3:6] == pytest.approx([0.75, 0.5, 0.25])
    assert values[6] == 0.0 and values[7] == 0.0  # after the last epoch: zero, never negative


def test_lr_lambda_drives_lambda_lr_as_the_loop_steps_it() -> None:
    import torch

    stage = StageConfig(epochs=4, decay_epochs=4, lr=2e-4)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=stage.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage))
    rates = []
    for _ in range(stage.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()  # at each epoch's end, as the training loop does
    assert rates == pytest.approx([2e-4 * f for f in (0.8, 0.6, 0.4, 0.2)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("l1_lambda=.nan", r"l1_lambda: expected a finite number, got nan"),
        ("stages.0.lr=.nan", r"stages.0.lr: expected a finite number, got nan"),
        ("stages.0.lr=.inf", r"stages.0.lr: expected a finite number, got inf"),
        ("beta1=1e999", r"beta1: expected a finite number, got inf"),
        ("stages.0.lr=2", r"lr must be in \(0, 1\], got 2.0"),
        ("l1_lambda=-1", r"l1_lambda must be in \[0, 1e6\], got -1.0"),
        ("beta1=1", r"beta1 must be in \[0, 1\), got 1.0"),
        ("beta2=-0.1", r"beta2 must be in \[0, 1\), got -0.1"),
        ("model.num_downs=0", r"model.num_downs must be in 1..12, got 0"),
        ("model.num_downs=40", r"model.num_downs must be in 1..12, got 40"),
        ("max_steps=0", r"max_steps must be at least 1"),
        ("max_failures=-2", r"max_failures must be at least 0 \(or -1: no limit\), got -2"),
        ("cpus_per_worker=0", r"cpus_per_worker must be at least 1"),
        ("data.max_val_batches=0", r"data.max_val_batches must be at least 1"),
        ("data.prefetch_batches=-1", r"data.prefetch_batches must be at least 0"),
        ("data.cache_bytes=lots", r"data.cache_bytes: invalid size 'lots': use e.g. 64MB"),
        ("data.cache_bytes=0", r"data.cache_bytes must be positive"),
        ("data.shard_ownership=node", r"data.shard_ownership must be one of \('auto', 'on', 'off'\), got 'node'"),
    ],
)
def test_non_finite_and_out_of_range_values_are_refused_when_the_config_is_read(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(Path(__file__).parents[2] / "configs" / "tiny.yaml", [override])


TINY = Path(__file__).parents[2] / "configs" / "tiny.yaml"


def test_the_documented_on_and_off_modes_are_read_as_modes_not_booleans():
    """The hostile pass: `data.cache=on` (the documented value) failed with "expected str, got True"."""
    for mode in ("on", "off", "auto"):
        config = load_config(TINY, [f"data.cache={mode}", f"data.shard_ownership={mode}"])
        assert config.data.cache == mode and config.data.shard_ownership == mode
    assert load_config(TINY, ["data.flip=off"]).data.flip is False  # a real boolean stays one


@pytest.mark.parametrize(
    ("weight", "why"),
    [("nan", r"is not a number \(NaN\)"), ("1e308", r"must lie in 1e-06\.\.1e\+06"),
     ("1e-320", r"must lie in 1e-06\.\.1e\+06"), ("inf", "is infinite"), ("0", "must be a positive number")],
)  # fmt: skip
def test_a_bad_mixture_weight_is_named_with_the_reason(weight, why):
    from pipeline.train.cli import dataset_override

    with pytest.raises(ConfigError, match=rf"^--dataset base:{weight}: the weight {why}"):
        dataset_override([f"base:{weight}", "coco:0.2"])
    with pytest.raises(ConfigError, match=rf"^data\.mix\.base: the weight {why}"):  # the same read from a config
        load_config(TINY, ["data.datasets=[]", f"data.mix={{base: {weight}, coco: 0.2}}"])


def test_a_dataset_named_twice_is_refused():
    """The hostile pass: `--dataset base:0.8 --dataset base:0.2` trained with the last weight only."""
    from pipeline.train.cli import dataset_override

    with pytest.raises(ConfigError, match=r"^--dataset base is given 2 times: name each dataset once"):
        dataset_override(["base:0.8", "base:0.2"])
    with pytest.raises(ConfigError, match=r"^--dataset base is given 2 times"):
        dataset_override(["base", "base"])
    with pytest.raises(ConfigError, match=r"data.datasets names base 2 times"):
        load_config(TINY, ["data.datasets=[base, base]"])


def test_a_sweep_replaces_the_presets_mixture_as_train_does(monkeypatch):
    """The hostile pass: `recolor sweep configs/demo.yaml --dataset c` failed on every trial, the preset's
    data.mix ['demo-photos'] lingering beside data.datasets ['c']."""
    import pipeline.sweep.driver
    from pipeline.cli import main

    seen = {}

    def fake_run_sweep(config_path, overrides, *args, **kwargs):
        seen["config"] = load_config(config_path, overrides)
        raise KeyboardInterrupt  # stop here: the trials' config is what matters

    monkeypatch.setattr(pipeline.sweep.driver, "run_sweep", fake_run_sweep)
    demo = Path(__file__).parents[2] / "configs" / "demo.yaml"
    assert main(["sweep", str(demo), "--dataset", "c", "--grid", "stages.0.lr=1e-4,2e-4"]) == 130
    assert seen["config"].data.datasets == ["c"] and seen["config"].data.mix is None
