"""Packaging: the distribution's name is revlib-book (the name revlib on the package index is another library)."""

import re
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from importlib import metadata
from pathlib import Path

import revlib

ROOT = Path(__file__).resolve().parents[1]


def test_distribution_name_differs_from_the_unrelated_revlib() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "revlib-book"
    assert metadata.version("revlib-book") == revlib.__version__ == project["version"]


def test_no_instruction_installs_the_unrelated_package() -> None:
    texts = [ROOT / "README.md", ROOT / "Makefile", *(ROOT / "book").glob("*.md"), *(ROOT / "chapters").glob("*.ipynb")]
    for path in texts:
        assert not re.search(r"pip install[^\n]*\brevlib(?![-\w])", path.read_text()), f"{path.name} installs `revlib`"
