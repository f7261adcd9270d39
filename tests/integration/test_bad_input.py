"""Hostile and careless input to `recolor ingest` and `recolor colorize`, as real processes: what would hang
(a FIFO named like an image) or abort (a symlink loop) is refused with a reason, and the other images go on.

Each command runs under `run_cli`'s timeout: a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from bad_files import write_checkpoint

from ingest.lake import Lake

pytestmark = pytest.mark.slow

SIZE = 64
DEMO = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


@pytest.fixture
def hostile_folder(tmp_path, photo_writer):
    """Two good photos, a FIFO `stuck.jpg`, a symlink loop `loop.jpg` and a link to nowhere `gone.jpg`."""
    folder = tmp_path / "hostile"
    photo_writer(folder, [11, 12], width=80, height=64)
    os.mkfifo(folder / "stuck.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")
    os.symlink(tmp_path / "nowhere.jpg", folder / "gone.jpg")
    return folder


@pytest.mark.parametrize("use_ray", [False, True])
def test_ingest_refuses_fifos_and_symlink_loops_with_a_reason_and_keeps_the_rest(
    hostile_folder, recolor, tmp_path, use_ray, ray_address
) -> None:
    lake_dir = tmp_path / "lake"
    ray = ["--ray-address", ray_address] if use_ray else ["--no-ray"]  # Ray tasks of the session's Ray
    result = recolor("ingest", "folder", hostile_folder, "--dataset", "hostile", "--lake", lake_dir, *ray,
                     "--size", str(SIZE), "--no-progress", "--workers", "1", timeout=180)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lake = Lake(str(lake_dir))
    ref = lake.resolve("hostile")
    assert sum(ref.record["counts"].values()) == 2
    rejects = {os.path.basename(row["source_uri"]): row for row in lake.rejects(ref).to_pylist()}
    assert (
        rejects["stuck.jpg"]["reason"] == "unreadable"
        and "is a FIFO, not a regular file" in (rejects["stuck.jpg"]["detail"])
    )
    assert rejects["loop.jpg"]["reason"] == "unreadable" and "cannot be read" in rejects["loop.jpg"]["detail"]
    assert rejects["gone.jpg"]["reason"] == "missing"


def test_colorize_refuses_a_fifo_given_by_name_or_found_in_a_folder(hostile_folder, recolor, tmp_path) -> None:
    checkpoint = write_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    common = ["--model", checkpoint, "-o", out, "--size", str(SIZE), "--no-progress", "--device", "cpu"]
    named = recolor("colorize", hostile_folder / "stuck.jpg", hostile_folder / "img0011.jpg", *common, timeout=120)
    assert named.returncode == 1, named.stderr[-3000:]
    assert any("stuck.jpg" in line and "is a FIFO, not a regular file" in line for line in named.error_lines)
    assert (out / "img0011.png").is_file()
    walked = recolor("colorize", hostile_folder, *common, timeout=120)
    assert walked.returncode == 1, walked.stderr[-3000:]
    refused = [line for line in walked.error_lines if "stuck.jpg" in line or "loop.jpg" in line]
    assert len(refused) == 2, walked.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["img0011.png", "img0012.png"], walked.stderr


# --- one line instead of a traceback ------------------------------------------------------------------------


def one_line_error(result, *fragments: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert len(result.error_lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    return result.stderr


def test_bad_configs_are_one_line_naming_the_file_and_the_place(recolor, tmp_path) -> None:
    (tmp_path / "broken.yaml").write_text("name: x\nstages: [\n")
    one_line_error(recolor("train", "broken.yaml", "--dataset", "d"), "config broken.yaml is not valid YAML: line 3")
    (tmp_path / "tag.yaml").write_text(f'name: !!python/object/apply:os.system ["touch {tmp_path}/ran"]\n')
    one_line_error(recolor("train", "tag.yaml", "--dataset", "d"), "tag.yaml: line 1, column 7", "is not allowed")
    (tmp_path / "folder.yaml").mkdir()
    one_line_error(recolor("train", "folder.yaml", "--dataset", "d"), "config folder.yaml is a folder")
    one_line_error(recolor("train", "model.arch=x"), "model.arch=x is an override, not a config")
    one_line_error(recolor("train", DEMO, "--dataset", "d", "model.arch=!!python/name:os.system"), "not allowed")
    one_line_error(recolor("train", DEMO, "--dataset", "d", "data.batch_size=[1"), "data.batch_size=[1 is not a valid")
    assert not (tmp_path / "ran").exists()


def test_a_lake_that_cannot_be_written_is_refused_before_any_work(recolor, tmp_path, photo_writer) -> None:
    photo_writer(tmp_path / "photos", [1, 2], width=80, height=64)
    (tmp_path / "a-file").write_text("not a folder")
    result = recolor("ingest", "folder", tmp_path / "photos", "--dataset", "d", "--lake", tmp_path / "a-file" / "lake",
                     "--no-progress")  # fmt: skip
    one_line_error(result, "a-file/lake cannot be written: ", "a-file is a file, not a folder")
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs a user
        (tmp_path / "read-only").mkdir(mode=0o500)
        result = recolor("ingest", "folder", tmp_path / "photos", "--dataset", "d", "--lake", tmp_path / "read-only",
                         "--no-progress")  # fmt: skip
        one_line_error(result, "read-only cannot be written: ", "is not writable")


def test_files_that_are_no_torch_weights_are_one_line_without_torchs_advice(recolor, tmp_path, photo_writer) -> None:
    import torch

    (tmp_path / "text.pt").write_text("not torch at all\n")
    torch.save({"weight": RunsCode(tmp_path / "ran")}, tmp_path / "code.pt")
    photo = tmp_path / "photo.png"
    from bad_files import hue_picture

    hue_picture(1, 40, 30).save(photo)
    for name, reason in (("text.pt", "not a torch file of tensors"), ("code.pt", "it holds Python objects")):
        stderr = one_line_error(recolor("colorize", photo, "-o", tmp_path / "out", "--model", tmp_path / name),
                                f"{name} is not a readable checkpoint: {reason}")  # fmt: skip
        assert "weights_only" not in stderr
    photo_writer(tmp_path / "photos", range(8), width=80, height=64)
    ingest = recolor("ingest", "folder", tmp_path / "photos", "--dataset", "d", "--no-ray", "--size", str(SIZE),
                     "--val-fraction", "0.5", "--no-progress")  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    for name, reason in (("text.pt", "not a torch file of tensors"), ("code.pt", "it holds Python objects")):
        weights = f"model.backbone_weights={tmp_path / name}"
        trained = recolor("train", DEMO, "--dataset", "d", "model.arch=resnet18_unet", weights, "data.batch_size=1")
        stderr = one_line_error(
            trained, f"model.backbone_weights {tmp_path / name} is not a torch state dict: {reason}"
        )
        assert "weights_only" not in stderr
    assert not (tmp_path / "ran").exists()


class RunsCode:
    """Unpickling it creates `path` (any code an attacker picks)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):

        return (Path.touch, (Path(self.path),))


def test_an_s3_checkpoint_is_read_from_s3_never_from_a_local_look_alike(recolor, tmp_path, s3_env) -> None:
    from bad_files import hue_picture

    from ingest.storage import make_s3_client

    checkpoint = write_checkpoint(tmp_path / "model")
    key = "runs/demo/checkpoint_000001/checkpoint.pt"
    make_s3_client().upload_file(str(checkpoint), s3_env.bucket, key)
    (tmp_path / "s3:" / s3_env.bucket).mkdir(parents=True)  # what Path("s3://b/x.pt") would read: nothing there
    photo = tmp_path / "photo.png"
    hue_picture(2, 40, 30).save(photo)
    for model in (f"s3://{s3_env.bucket}/{key}", f"s3://{s3_env.bucket}/runs/demo/checkpoint_000001"):
        result = recolor("colorize", photo, "-o", tmp_path / "out", "--model", model, "--overwrite", "--no-progress",
                         env=s3_env.env)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    missing = recolor("colorize", photo, "-o", tmp_path / "out", "--model", f"s3://{s3_env.bucket}/runs/none.pt",
                      env=s3_env.env)  # fmt: skip
    one_line_error(missing, f"no checkpoint at s3://{s3_env.bucket}/runs/none.pt")


# --- evaluate on a split with corrupt samples -----------------------------------------------------------------


def corrupt_samples(shard_uri: str, count: int | None = None) -> int:
    """Overwrite bytes inside the data of the first `count` (default: all) arrays of a shard, in place: valid tar,
    valid .npy headers, changed pixels (caught by the checksum only). Returns how many were changed."""
    import tarfile

    with tarfile.open(shard_uri) as archive:
        members = [m for m in archive.getmembers() if m.name.endswith(".lab.npy")][:count]
    with open(shard_uri, "r+b") as shard:
        for member in members:  # 32 bytes inverted: changed whatever they were (0xff-saturated pixels too)
            shard.seek(member.offset_data + member.size - 64)
            inverted = bytes(byte ^ 0xFF for byte in shard.read(32))
            shard.seek(member.offset_data + member.size - 64)
            shard.write(inverted)
    return len(members)


@pytest.fixture
def registered_on_lake(tmp_path, recolor, photo_writer, mlflow_store):
    """A lake dataset `d` (32 px, half validation) and an untrained generator registered as `c` version 1."""
    from mlflow import MlflowClient

    from pipeline.data.plan import resolve_data
    from pipeline.models.saved import GeneratorSpec
    from pipeline.tracking.registry import log_generator

    photo_writer(tmp_path / "photos", range(12), width=80, height=64)
    ingest = recolor("ingest", "folder", tmp_path / "photos", "--dataset", "d", "--no-ray", "--size", "32",
                     "--val-fraction", "0.5", "--no-progress")  # fmt: skip
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts")))
    spec = GeneratorSpec("unet_256", "batch", 4, 5, 32)
    log_generator(spec.build(), spec, run.info.run_id, uri, "c", alias=None)
    plan = resolve_data(["d"], str(tmp_path / "lake"))
    return SimpleNamespace(uri=uri, client=client, plan=plan, env={"MLFLOW_TRACKING_URI": uri})


def test_evaluate_refuses_to_promote_on_a_split_with_corrupt_samples(registered_on_lake, recolor) -> None:
    setup = registered_on_lake
    expected = setup.plan.count("val")
    assert corrupt_samples(setup.plan.val[0].uri, 1) == 1
    result = recolor("evaluate", "--model", "models:/c/1", "--dataset", "d", "--promote", "--max-bad-fraction", "0.5",
                     "--no-fid", env=setup.env, timeout=180)  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert f"{expected - 1} of {expected} images, 1 corrupt skipped" in result.stdout
    assert result.error_lines[-1].startswith(f"recolor: error: promotion refused: 1 of {expected} samples are corrupt")
    assert not setup.client.get_registered_model("c").aliases  # nothing promoted
    [run] = setup.client.search_runs([setup.client.get_experiment_by_name("recolor-evaluation").experiment_id])
    assert run.data.metrics["eval/count"] == expected - 1 and run.data.metrics["eval/bad_samples"] == 1
    assert (
        run.data.tags["recolor.evaluated"]
        == f"{expected - 1} of {expected} samples (1 of {expected} samples are corrupt)"
    )
    assert run.data.tags["promotion.decision"] == "refused"

    strict = recolor("evaluate", "--model", "models:/c/1", "--dataset", "d", "--max-bad-fraction", "0", "--no-fid",
                     env=setup.env)  # fmt: skip
    assert strict.returncode == 2 and "Traceback" not in strict.stderr  # the corrupt sample's warning, then why
    assert (
        f"1 corrupt samples (of {expected} expected in split 'val') exceed --max-bad-fraction=0.0"
        in (strict.error_lines[-1])
    )
    partial = recolor("evaluate", "--model", "models:/c/1", "--dataset", "d", "--promote", "--max-batches", "1",
                      env=setup.env)  # fmt: skip
    one_line_error(partial, "drop --max-batches")


def test_evaluate_on_an_all_corrupt_split_is_one_line(registered_on_lake, recolor) -> None:
    setup = registered_on_lake
    for shard in setup.plan.val:
        corrupt_samples(shard.uri)
    result = recolor("evaluate", "--model", "models:/c/1", "--dataset", "d", "--promote", "--max-bad-fraction", "1",
                     env=setup.env, timeout=180)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr and "KeyError" not in result.stderr
    assert f"none of the {setup.plan.count('val')} samples of split 'val' is readable" in result.error_lines[-1]
