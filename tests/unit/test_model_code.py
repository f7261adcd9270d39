"""A model folder whose code is not the installed project's is refused before anything is loaded from it.

The hostile pass: a registered model carrying its own `code/pipeline/serving/pyfunc.py` (which ran a shell command)
was accepted because its weights were real, promoted to champion by `evaluate --promote`, and then run by
`mlflow models serve`. Each way a folder can bring code is refused here, in one line naming it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ingest.errors import ConfigError
from pipeline.models.saved import GeneratorSpec, save_generator
from pipeline.tracking.registry import SERVING_MODULE, load_generator, serving_requirements


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """A model folder as `log_generator` writes it (MLflow's `save_model`, the same arguments, no registry)."""
    import mlflow.pyfunc

    from pipeline.serving.signature import serving_signature

    root = tmp_path_factory.mktemp("models")
    spec = GeneratorSpec("unet_256", "batch", 4, 5, 32)
    torch.manual_seed(0)
    data = save_generator(spec.build(), spec, root / "generator")
    mlflow.pyfunc.save_model(str(root / "honest"), loader_module=SERVING_MODULE, data_path=str(data),
                             signature=serving_signature(), pip_requirements=serving_requirements())  # fmt: skip
    return root / "honest"


def tampered(honest: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(honest, folder)
    return folder


def edit_mlmodel(folder: Path, change) -> None:
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    change(mlmodel["flavors"]["python_function"])
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))


def test_the_folder_recolor_writes_loads(honest) -> None:
    assert load_generator(str(honest)).training is False


def test_a_model_bringing_its_own_serving_module_is_refused_and_never_run(honest, tmp_path, recolor) -> None:
    folder = tampered(honest, tmp_path)
    ran = tmp_path / "code-ran"
    evil = folder / "code" / "pipeline" / "serving"
    evil.mkdir(parents=True)
    (evil / "pyfunc.py").write_text(f"import pathlib; pathlib.Path({str(ran)!r}).touch()\n")
    edit_mlmodel(folder, lambda flavor: flavor.update(code="code"))
    with pytest.raises(ConfigError, match=r"carries code that is not the installed recolor's: bundled code paths "
                                          r"\(python_function flavor: code: code\); files under code/ "
                                          r"\(code/pipeline/serving/pyfunc\.py\)"):  # fmt: skip
        load_generator(str(folder))
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (90, 120, 30)).save(photo)
    for command in (["colorize", photo, "-o", tmp_path / "out", "--model", folder, "--no-progress"],
                    ["export", "--model", folder, "--format", "pt2", "-o", tmp_path / "g.pt2"]):  # fmt: skip
        result = recolor(*command)
        assert result.returncode == 2 and len(result.error_lines) == 1, result.stderr
        assert "carries code that is not the installed recolor's" in result.stderr
    assert not ran.exists() and not (tmp_path / "out").exists() and not (tmp_path / "g.pt2").exists()


def test_code_files_without_a_code_entry_are_refused_too(honest, tmp_path) -> None:
    folder = tampered(honest, tmp_path)
    (folder / "code").mkdir()
    (folder / "code" / "sitecustomize.py").write_text("print('hi')\n")
    with pytest.raises(ConfigError, match=r"files under code/ \(code/sitecustomize\.py\)"):
        load_generator(str(folder))


def test_a_foreign_loader_module_is_refused(honest, tmp_path) -> None:
    folder = tampered(honest, tmp_path)
    edit_mlmodel(folder, lambda flavor: flavor.update(loader_module="evil.loader"))
    with pytest.raises(ConfigError, match=r"a foreign loader_module 'evil\.loader' \(recolor's is pipeline"):
        load_generator(str(folder))


@pytest.mark.parametrize("line", ["evil-package==1.0", "torch @ https://example.invalid/torch.whl", "-e ./x"])
def test_a_requirement_recolor_does_not_write_is_refused(honest, tmp_path, line) -> None:
    folder = tampered(honest, tmp_path)
    with open(folder / "requirements.txt", "a") as requirements:
        requirements.write("\n" + line + "\n")
    with pytest.raises(ConfigError, match=r"a requirement recolor does not write"):
        load_generator(str(folder))


def test_export_as_mlflow_writes_a_fresh_folder_that_serves_only_recolors_code(honest, tmp_path) -> None:
    """What the README gives for serving only verified models: `recolor export --format mlflow`, then
    `mlflow models serve -m FOLDER --env-manager local`."""
    import mlflow.pyfunc
    import pandas as pd

    from pipeline.cli import main

    out = tmp_path / "served"
    assert main(["export", "--model", str(honest), "--format", "mlflow", "-o", str(out)]) == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "MLmodel" in files and not any(name.startswith("code/") for name in files), files
    assert [p.name for p in tmp_path.iterdir()] == ["served"]  # the partial folder is gone
    probe = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_generator(str(out))(probe), load_generator(str(honest))(probe))
    served = mlflow.pyfunc.load_model(str(out))  # what `mlflow models serve` loads
    from fixtures.images import photo_bytes

    answer = served.predict(pd.DataFrame({"image": [photo_bytes(1, 40, 30)]}))
    assert answer["error"][0] == "" and answer["width"][0] == 40

    assert main(["export", "--model", str(honest), "--format", "mlflow", "-o", str(out)]) == 2  # exists
    assert main(["export", "--model", str(honest), "--format", "mlflow", "-o", str(out), "--overwrite"]) == 0
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep")
    assert main(["export", "--model", str(honest), "--format", "mlflow", "-o", str(stranger), "--overwrite"]) == 2
    assert (stranger / "notes.txt").read_text() == "keep"
