"""The map of the code stays true: README's Layout names every module of `pipeline/` and `ingest/` and no module that
is gone, and each package's docstring names its modules and only those.

A newcomer reads these two first; both drifted before (five modules missing from Layout, package docstrings naming
modules that had moved), so a module added, moved or removed now fails here until the map says so.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAPPED = ("pipeline", "ingest")  # README's Layout names every module below these
PACKAGES = [  # each package's docstring names its modules
    "pipeline/data", "pipeline/train", "pipeline/evaluation", "pipeline/colorize", "pipeline/serving", "pipeline/sweep",
    "pipeline/tracking", "pipeline/remote", "pipeline/models", "ingest/storage", "ingest/sources", "jobs",
    "infra/stack",
]  # fmt: skip
NAME = re.compile(r"^(?:\w+\.py|\w+/)$")
MODULE = re.compile(r"\b(\w+)\.py\b")


def modules(folder: Path) -> set[str]:
    return {path.name for path in folder.glob("*.py") if path.name != "__init__.py"}


def layout_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Layout\n") :]
    return section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n") + 4)].splitlines()


def layout_modules() -> set[tuple[str, str]]:
    """(folder, module file) of every module README's Layout names. An entry's first words (up to two spaces) are
    the files and folders it is about; `.py` names in its description (and the indented lines under it) are
    modules of the folder the entry names, else of the top-level folder it sits in."""
    named: set[tuple[str, str]] = set()
    top, folder = "", ""
    for line in layout_block():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent >= 10:  # the description goes on
            named |= {(folder or top, f"{m}.py") for m in MODULE.findall(line)}
            continue
        parts = re.split(r"\s{2,}", line.strip())
        names = []
        while parts and all(NAME.match(word) for word in parts[0].split()):
            names += parts.pop(0).split()
        if indent == 0:
            top, folder = (names[0].rstrip("/") if names else ""), ""
            continue
        folders = [name.rstrip("/") for name in names if name.endswith("/")]
        folder = f"{top}/{folders[-1]}" if folders else ""
        named |= {(top, name) for name in names if name.endswith(".py")}
        named |= {(folder or top, f"{m}.py") for m in MODULE.findall(" ".join(parts))}
    return named


def test_readme_layout_names_every_module_and_only_modules_that_exist() -> None:
    named = layout_modules()
    gone = sorted(f"{folder}/{name}" for folder, name in named if not (REPO / folder / name).is_file())
    assert not gone, f"README's Layout names modules that are not there: {gone}"
    present = {
        (str(path.parent.relative_to(REPO)), path.name)
        for top in MAPPED
        for path in (REPO / top).rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    }
    missing = sorted(f"{folder}/{name}" for folder, name in present - named)
    assert not missing, f"README's Layout does not name: {missing} (say in a few words what each is for)"


@pytest.mark.parametrize("package", PACKAGES)
def test_a_packages_docstring_names_its_modules_and_only_those(package: str) -> None:
    folder = REPO / package
    docstring = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    named = {f"{m}.py" for m in MODULE.findall(docstring)}
    named |= {f"{m}.py" for m in re.findall(r"`(\w+)`", docstring) if (folder / f"{m}.py").is_file()}
    assert not named - modules(folder), (
        f"{package}'s docstring names modules that are not there: {named - modules(folder)}"
    )
    assert not modules(folder) - named, f"{package}'s docstring does not name: {sorted(modules(folder) - named)}"
