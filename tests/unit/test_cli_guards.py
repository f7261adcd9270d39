"""Mistakes a user will make end in one line, in seconds, with no secret in it: an unreachable MLflow, a device the
machine lacks, options without sense, an export or colorize onto a file the product did not write."""

from __future__ import annotations

import errno
import socket
import time
from pathlib import Path

import pytest

from ingest.errors import ConfigError
from pipeline.cli import main
from pipeline.colorize.files import OUTPUT_MARKER
from pipeline.colorize.local import plan_outputs


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(
    "command",
    [
        ["runs", "compare"],
        ["evaluate", "--model", "models:/colorizer@champion", "--dataset", "photos", "--device", "cpu"],
        ["colorize", "photo.jpg", "-o", "out", "--model", "models:/colorizer@champion", "--device", "cpu"],
        ["export", "--model", "models:/colorizer@champion", "--format", "onnx", "-o", "g.onnx"],
    ],
)
def test_every_mlflow_command_probes_the_server_and_never_shows_its_password(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photo.jpg").write_bytes(b"x")
    uri = f"http://admin:hunter2secret@127.0.0.1:{closed_port()}"
    started = time.monotonic()
    assert main([*command, "--tracking-uri", uri]) == 2
    assert time.monotonic() - started < 60  # seconds, not MLflow's minutes of retries (not a speed test: a bound)
    captured = capsys.readouterr()
    assert "hunter2secret" not in captured.out + captured.err and "Traceback" not in captured.err
    assert f"the MLflow tracking server http://admin:***@127.0.0.1:{uri.rsplit(':', 1)[1]} does not answer" in (
        captured.err
    )


def test_an_mlflow_error_is_one_masked_line(capsys, monkeypatch):
    from mlflow.exceptions import MlflowException

    from pipeline.cli import exit_code_and_message

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-token")
    code, line = exit_code_and_message(MlflowException("API request to http://u:pw@host/x failed s3cr3t-token\nmore"))
    assert code == 2 and line == "recolor: error: MLflow: API request to http://u:***@host/x failed ***"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["colorize", "a.jpg", "-o", "out", "--model", "m", "--device", "tpu"], "unknown device 'tpu'"),
        (["colorize", "a.jpg", "-o", "out", "--model", "m", "--device", "cuda"], "this machine has no CUDA device"),
        (["evaluate", "--model", "m", "--dataset", "d", "--device", "cuda:0"], "this machine has no CUDA device"),
        (["colorize", "a.jpg", "-o", "out", "--model", "m", "--size", "0"], "--size: must be at least 1, got 0"),
        (["ingest", "folder", "src", "--dataset", "d", "--max-pixels", "-1"], "--max-pixels: must be at least 1"),
        (["evaluate", "--model", "m", "--dataset", "d", "--max-batches", "-1"], "--max-batches: must be at least 1"),
        (["lake", "urls", "d", "--expires", "-5"], "--expires: must be at least 1, got -5"),
        (["export", "--model", "m", "--format", "onnx", "-o", "x", "--size", "abc"], "'abc' is not a whole number"),
    ],
)
def test_options_without_sense_are_refused_in_one_line(args, message, capsys):
    import torch

    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_export_onto_an_existing_file_asks_for_overwrite(tmp_path):
    from pipeline.models import build_generator
    from pipeline.serving.export import export_generator

    target = tmp_path / "colorizer.onnx"
    target.write_bytes(b"the user's file")
    generator = build_generator("unet_256", base_filters=4, num_downs=6)
    with pytest.raises(ValueError, match=r"colorizer.onnx exists: pass --overwrite to replace it"):
        export_generator(generator, 64, "pt2", target)
    assert target.read_bytes() == b"the user's file"


def test_export_on_a_read_only_file_system_says_so_in_one_line(tmp_path, monkeypatch):
    """The write fails with EROFS, and so does the cleanup of the temporary file: the write's error is the one."""
    import pipeline.serving.export as export
    from pipeline.models import build_generator

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(export, "_write_pt2", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    generator = build_generator("unet_256", base_filters=4, num_downs=6)
    with pytest.raises(ValueError, match=r"cannot write .*colorizer.pt2: Read-only file system"):
        export.export_generator(generator, 64, "pt2", tmp_path / "colorizer.pt2")


def test_colorize_overwrite_replaces_only_what_its_ledger_lists(tmp_path, photo_writer):
    photos = photo_writer(tmp_path / "photos", range(3), width=48, height=40)
    out = tmp_path / "out"
    out.mkdir()
    (out / "img0000.png").write_bytes(b"an earlier run's picture")
    (out / "img0001.png").write_bytes(b"the user's own picture")
    (out / OUTPUT_MARKER).write_text("img0000.png\n")
    _, todo, summary = plan_outputs([str(tmp_path / "photos")], str(out), "png", overwrite=True)
    assert sorted(name for _, name in todo) == ["img0000.png", "img0002.png"]
    ((uri, reason),) = summary.failed
    assert uri == str(photos[1]) and reason.startswith("not_ours:") and "--overwrite-any" in reason
    _, todo, summary = plan_outputs([str(tmp_path / "photos")], str(out), "png", overwrite=True, overwrite_any=True)
    assert len(todo) == 3 and not summary.failed
    _, todo, summary = plan_outputs([str(tmp_path / "photos")], str(out), "png", overwrite=False)
    assert [name for _, name in todo] == ["img0002.png"] and summary.skipped == [str(out / "img0000.png")]
    ((uri, reason),) = summary.failed  # the user's own picture is not "already there": it is not_ours
    assert uri == str(photos[1]) and reason.startswith("not_ours:")


def test_evaluate_refuses_before_loading_anything() -> None:
    from pipeline.evaluation.promote import _check_request, check_protocol

    assert _check_request("models:/c/3", "l1_ab", True, None) == ("c", "3", None)
    with pytest.raises(ConfigError, match=r"unknown metric 'psnr_x': use one of auc, colorfulness"):
        _check_request("models:/c/3", "psnr_x", False, None)
    with pytest.raises(ConfigError, match=r"--promote needs a registered model"):
        _check_request("ckpt/checkpoint.pt", "l1_ab", True, None)
    with pytest.raises(ConfigError, match=r"drop --max-batches"):
        _check_request("models:/c@champion", "l1_ab", True, 2)

    class Plan:
        refs, size, resize = ["photos@2"], 256, "cover"

    assert check_protocol(Plan(), None) == "crop-256" and check_protocol(Plan(), "crop") == "crop-256"
    with pytest.raises(ConfigError, match=r"--protocol resize scores photos cut by `--resize squash`, and photos@2 "
                                          r"was ingested with --resize cover: ingest the photos again"):  # fmt: skip
        check_protocol(Plan(), "resize")


# --- credentials in addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["lake", "ls", "--lake", "s3://AKIDEXAMPLE:Wj4lrXUtnFEMI@lake/l"],
        ["ingest", "folder", "photos", "--dataset", "d", "--lake", "s3://AKIDEXAMPLE:Wj4lrXUtnFEMI@lake/l", "--no-ray"],
        ["evaluate", "--model", "m", "--dataset", "d", "--lake=s3://AKIDEXAMPLE:Wj4lrXUtnFEMI@lake/l"],
        ["colorize", "--model", "m", "photo.jpg", "-o", "s3://AKIDEXAMPLE:Wj4lrXUtnFEMI@lake/out"],
        ["train", "configs/tiny.yaml", "--storage", "s3://AKIDEXAMPLE:Wj4lrXUtnFEMI@lake/runs"],
        ["train", "configs/tiny.yaml", "data.lake=s3://AKIDEXAMPLE:Wj4lrXUtnFEMI@lake/l"],
    ],
)
def test_credentials_in_an_s3_address_are_refused_in_one_masked_line(command, capsys) -> None:
    """The hostile pass: `--lake 's3://AKID:Secret@lake/l'` gave a 42-line botocore traceback printing the secret."""
    assert main(command) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Wj4lrXUtnFEMI" not in captured.out + captured.err and "AKIDEXAMPLE" not in lines[0]
    assert "s3://***@lake/" in lines[0] and "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in lines[0]


def test_open_storage_refuses_keys_in_its_address_too() -> None:
    from ingest.storage import StorageError, open_storage

    with pytest.raises(StorageError, match=r"^s3://\*\*\*@bucket/p carries credentials") as raised:
        open_storage("s3://key:secret@bucket/p")
    assert "secret" not in str(raised.value).replace("credentials", "")


def test_masking_hides_secrets_only() -> None:
    from ingest.cluster import mask_secrets

    assert mask_secrets("GET http://admin:hunter2@127.0.0.1:9/lake?list-type=2&max-keys=1&prefix=a") == (
        "GET http://admin:***@127.0.0.1:9/lake?list-type=2&max-keys=1&prefix=a"
    )  # max-keys names no secret
    assert mask_secrets("https://b.s3/k?X-Amz-Credential=AKID%2F1&X-Amz-Date=1&X-Amz-Signature=ab12&api_key=z") == (
        "https://b.s3/k?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***&api_key=***"
    )
    assert mask_secrets("s3://AKID:Secret@lake/l and s3://Secret@lake") == "s3://***@lake/l and s3://***@lake"


def test_a_password_in_the_endpoint_is_masked_in_every_retry_line(tmp_path) -> None:
    """The hostile pass: `lake ls` printed AWS_ENDPOINT_URL's password in clear in its retry warnings."""
    from fixtures.cli import run_cli

    env = {"AWS_ENDPOINT_URL": f"http://admin:hunter2secret@127.0.0.1:{closed_port()}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "RECOLOR_S3_RETRY_SECONDS": "1"}  # fmt: skip
    for command in (["lake", "ls"], ["lake", "show", "d"], ["lake", "check", "d"]):
        result = run_cli(*command, "--lake", "s3://lake/l", cwd=tmp_path, env=env, timeout=60)
        said = result.stdout + result.stderr
        assert result.returncode == 2 and "hunter2secret" not in said, said
        assert "retrying for up to 1 s" in said and "http://admin:***@127.0.0.1:" in said, said
        assert "Traceback" not in said


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["lake", "urls", "d", "--form", "presigned", "--expires", "604801"], "longer than S3's limit"),
        (["evaluate", "--model", "m", "--dataset", "d", "--max-bad-fraction", "-1"], "is not a share in 0..1"),
        (["evaluate", "--model", "m", "--dataset", "d", "--max-bad-fraction", "1.5"], "is not a share in 0..1"),
    ],
)
def test_values_past_their_limits_are_refused(command, said, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(command)
    assert exited.value.code == 2 and said in capsys.readouterr().err


def test_a_model_that_is_some_other_file_is_named_not_a_temporary_folder(tmp_path, capsys) -> None:
    """The hostile pass: `--model /etc/passwd` said `/tmp/recolor-model-*/passwd/MLmodel is not readable`."""
    other = tmp_path / "passwd"
    other.write_text("root:x:0:0:root:/root:/bin/bash\n")
    photo = tmp_path / "p.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(photo)
    assert main(["colorize", "--model", str(other), str(photo), "-o", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{other} is not a readable checkpoint: not a torch file of tensors" in err and "recolor-model-" not in err


def test_an_unwritable_lake_or_run_storage_is_one_line_not_a_traceback(tmp_path, capsys, photo_writer) -> None:
    """The hostile pass: an unwritable `versions/` at commit and an unwritable `--storage` gave tracebacks (and a
    file where `versions/` should be was taken for racing ingests, retried five times)."""
    photo_writer(tmp_path / "photos", range(3), width=48, height=40)
    lake = tmp_path / "lake"
    (lake / "d").mkdir(parents=True)
    (lake / "d" / "versions").write_text("a file where the folder should be")
    ingest = ["ingest", "folder", str(tmp_path / "photos"), "--dataset", "d", "--lake", str(lake), "--size", "32",
              "--no-ray", "--no-progress", "--val-fraction", "0.5"]  # fmt: skip
    assert main(ingest) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{lake / 'd' / 'versions'} cannot be made" in err and "attempts" not in err
    (lake / "d" / "versions").unlink()
    assert main(ingest) == 0  # the same command, once the folder can be made, commits from the finished chunks
    (tmp_path / "afile").write_text("not a folder")
    capsys.readouterr()
    tiny = Path(__file__).parents[2] / "configs" / "tiny.yaml"
    storage = tmp_path / "afile" / "runs"
    code = main(["train", str(tiny), "--dataset", "d", "--lake", str(lake), "--storage", str(storage), "--workers", "1",
                 "model.num_downs=5", "data.batch_size=1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"{tmp_path / 'afile' / 'runs'}" in err and "cannot be" in err
