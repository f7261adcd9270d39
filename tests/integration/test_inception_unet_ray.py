"""`model.arch: inception_unet` everywhere the other generators go, on the session's Ray: DDP training (identical
ranks), the registry and the champion gate, colorize as a Ray Data job and films on Ray, and the serving model.

One small run serves every test here (two gloo workers, 80 px samples: the encoder's unpadded stages need 75).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fixtures.training import differing, load_rank, state_saver
from fixtures.videos import clip_frames, read_clip, write_clip

from ingest.driver import IngestConfig, run_ingest
from pipeline.cli import main
from pipeline.config import DataConfig, ModelConfig, StageConfig, TrainConfig
from pipeline.data.plan import resolve_data
from pipeline.train.driver import TrackingOptions, run_training

pytestmark = pytest.mark.slow

SIDE = 80


@pytest.fixture(scope="module")
def trained(ray_local, quiet_env, tmp_path_factory, photo_writer, mlflow_store):  # noqa: F811
    """The recipe's schedule (an L1 epoch, then a GAN epoch) on two workers, tracked and registered."""
    root = tmp_path_factory.mktemp("inception")
    photo_writer(root / "photos", range(500, 524), width=100, height=SIDE)
    lake = str(root / "lake")
    run_ingest(IngestConfig(kind="folder", source=str(root / "photos"), dataset="photos", lake=lake, size=SIDE,
                            use_ray=False, progress=False, val_fraction=0.25))  # fmt: skip
    uri = mlflow_store(root)
    config = TrainConfig(
        name="inception", model=ModelConfig(arch="inception_unet", base_filters=4),
        stages=[StageConfig(name="l1", epochs=1, gan_mode=None), StageConfig(name="gan", epochs=1)],
        data=DataConfig(datasets=["photos"], lake=lake, batch_size=2, shuffle_window=8), workers=2,
        deterministic=True, storage=str(root / "runs"), checkpoint_every=1000, log_every=1,
    )  # fmt: skip
    result = run_training(config, tracking=TrackingOptions(tracking_uri=uri, model_name="colorizer"),
                          on_worker_end=state_saver(root))  # fmt: skip
    return SimpleNamespace(root=root, lake=lake, uri=uri, result=result, plan=resolve_data(["photos"], lake))


def test_ddp_ranks_train_the_same_network_and_the_frozen_encoder_stays_imagenets(trained) -> None:
    from pipeline.models.inception import inception_layers

    rank0, rank1 = load_rank(trained.root, 0), load_rank(trained.root, 1)
    assert not differing(rank0["generator"], rank1["generator"])
    imagenet = inception_layers().state_dict()
    encoder = {k.removeprefix("encoder."): v for k, v in rank0["generator"].items() if k.startswith("encoder.")}
    assert encoder.keys() == imagenet.keys() and not differing(encoder, imagenet)  # frozen: as the wheel has it
    torch.manual_seed(0)
    from pipeline.models import build_generator

    initial = build_generator("inception_unet").state_dict()
    assert any(name.startswith("decoder.") for name in differing(initial, rank0["generator"]))  # the decoder learned


def test_it_registers_passes_the_champion_gate_and_serves(trained, capsys) -> None:
    import mlflow.pyfunc
    import pandas as pd
    from fixtures.images import photo_bytes

    from pipeline.tracking.uri import fluent_tracking_uri

    assert str(trained.result.model_version) == "1"
    code = main(["evaluate", "--model", "models:/colorizer@candidate", "--dataset", "photos", "--lake", trained.lake,
                 "--tracking-uri", trained.uri, "--promote", "--device", "cpu"])  # fmt: skip
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "promoted" in capsys.readouterr().out
    with fluent_tracking_uri(trained.uri):
        served = mlflow.pyfunc.load_model("models:/colorizer@champion")  # what `mlflow models serve` loads
    answer = served.predict(pd.DataFrame({"image": [photo_bytes(7, 120, 90)]}))
    assert answer["error"][0] == "" and (answer["width"][0], answer["height"][0]) == (120, 90)


def test_colorize_as_a_ray_job_and_a_film_on_ray(trained, tmp_path, capsys) -> None:
    from fixtures.images import write_photos

    photos = write_photos(tmp_path / "photos", range(3), width=110, height=90)
    model = ["--model", "models:/colorizer/1", "--tracking-uri", trained.uri, "--no-progress"]
    assert main(["colorize", *model, str(tmp_path / "photos"), "-o", str(tmp_path / "out"), "--ray"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(p.with_suffix(".png").name
                                                                              for p in photos)  # fmt: skip
    film = write_clip(tmp_path / "film.mp4", clip_frames(12, 96, 80), codec="h264")
    assert main(["colorize", *model, str(film), "-o", str(tmp_path / "film-color.mp4"), "--ray",
                 "--chunk-frames", "6"]) == 0  # fmt: skip
    assert len(read_clip(tmp_path / "film-color.mp4")[0]) == 12
    assert "chunk(s) cut at keyframes" in capsys.readouterr().out
