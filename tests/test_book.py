"""The book builds with warnings as errors, from the notebooks' stored outputs, and renders offline.

`make book` executes the chapters; this test does not (nbval already runs them) and checks the Sphinx side:
table of contents, cross-references, bibliography, API reference, figures, and math without network.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("jupyter-book", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("jupyter-book is not installed (pip install -e '.[book]')")
    work = tmp_path_factory.mktemp("book")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config["execute"]["execute_notebooks"] = "off"
    (work / "_config.yml").write_text(yaml.safe_dump(config))
    build = subprocess.run(
        [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--config", str(work / "_config.yml"),
         "--path-output", str(work), "-W", "-n", "--keep-going"],
        capture_output=True, text=True, check=False,
    )
    assert build.returncode == 0, f"the book did not build cleanly:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    return work / "_build" / "html"


def test_every_chapter_in_the_toc_is_built(html: Path) -> None:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [chapter["file"] for part in toc["parts"] for chapter in part["chapters"]]
    for file in files:
        assert (html / f"{file}.html").is_file(), f"{file} is in _toc.yml but was not built"


def test_math_is_served_locally(html: Path) -> None:
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in ("book/notation.html", "chapters/00_working_with_revlib.html"):
        scripts = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', (html / page).read_text())
        assert scripts and all(src.startswith("../_static/mathjax/") for src in scripts), scripts


def test_opening_chapter_shows_figures_and_numbered_equations(html: Path) -> None:
    page = (html / "chapters" / "00_working_with_revlib.html").read_text()
    assert len(re.findall(r'<img [^>]*src="[^"]*\.png"', page)) >= 3
    assert "Fig. 1" in page and "Fig. 3" in page
    assert 'id="equation-eq-cross-entropy"' in page


def test_api_reference_documents_the_library(html: Path) -> None:
    page = (html / "book" / "api.html").read_text()
    for name in ("revlib.claims.claim", "revlib.data.load_digits", "revlib.training.fit", "revlib.measure.saved_tensor_bytes", "revlib.measure.peak_memory",
                 "revlib.backprop.MLP", "revlib.residual.loss_surface", "revlib.reversible.ReversibleSequence"):
        assert f'id="{name}"' in page, f"{name} is missing from the API reference"


def test_bibliography_lists_the_sources(html: Path) -> None:
    page = (html / "book" / "bibliography.html").read_text()
    for title in ("The Reversible Residual Network", "Neural Ordinary Differential Equations", "Linear Backprop"):
        assert title in page


def test_reproducibility_appendix_shows_the_last_portability_report(html: Path) -> None:
    page = (html / "book" / "reproducibility.html").read_text()
    assert "smallest margin" in page, "the appendix must include the report written by make portability"
    for chapter in sorted(path.stem for path in (ROOT / "chapters").glob("*.ipynb")):
        assert chapter in page, f"{chapter} is missing from the portability report: run make portability"
