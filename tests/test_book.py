"""The book builds with warnings as errors, from the notebooks' stored outputs, and renders offline.

`make book` executes the chapters; this test does not (nbval already runs them) and checks the Sphinx side:
table of contents, cross-references, bibliography, API reference, figures, and math without network.
"""

import functools
import importlib.util
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    config["sphinx"]["local_extensions"] = {name: str(ROOT / path) for name, path in config["sphinx"]["local_extensions"].items()}
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


# The pages as a reader's browser shows them: headless Chromium driven through ChromeDriver (Selenium),
# the built HTML served on 127.0.0.1 so that any request to another host stands out.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1600")
# Everything measured on a page once MathJax has finished: rendered math, images, figures, numbered
# equations, links to the bibliography, and the visible text outside code (where raw TeX must not remain).
PAGE_REPORT = """
const done = arguments[arguments.length - 1];
const report = () => {
  const text = document.querySelector("main") || document.body;
  const prose = text.cloneNode(true);
  prose.querySelectorAll("pre, code, script, style, .highlight, .math").forEach(node => node.remove());
  done({
    mathjax: Boolean(window.MathJax && MathJax.startup),
    math: document.querySelectorAll("div.math, span.math").length,
    untypeset: [...document.querySelectorAll("div.math, span.math")].filter(node => !node.querySelector("mjx-container")).length,
    images: [...document.images].map(image => ({src: image.src, width: image.complete ? image.naturalWidth : 0})),
    figures: document.querySelectorAll("figure img").length,
    numbered: document.querySelectorAll("div.math span.eqno").length,
    bibliography: [...document.querySelectorAll("a[href]")].filter(link => link.getAttribute("href").includes("bibliography.html")).length,
    prose: prose.textContent,
  });
};
if (window.MathJax && MathJax.startup && MathJax.startup.promise) MathJax.startup.promise.then(report); else report();
"""


@pytest.fixture(scope="module")
def served(html: Path) -> Iterator[str]:
    """The built book on an HTTP server on 127.0.0.1, as a reader's browser would fetch it."""
    handler = functools.partial(QuietHandler, directory=str(html))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no Chromium and ChromeDriver here (Debian: apt-get install chromium chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    with webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver)) as chrome:
        chrome.set_script_timeout(60)
        yield chrome


def load(browser: Any, url: str, attempts: int = 3) -> bool:
    """Open ``url``; true once its article heading is there. Chromium occasionally reports a navigation to the
    local server as finished before the document is in, so an empty page is loaded again (up to ``attempts``)."""
    for _ in range(attempts):
        browser.get(url)
        if browser.execute_script("return document.querySelector('main h1') !== null"):
            return True
    return False


def book_pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [chapter["file"] for part in toc["parts"] for chapter in part["chapters"]]


def test_every_page_renders_in_a_browser_without_network(browser: Any, served: str) -> None:
    """Every page in the table of contents, opened in headless Chromium: MathJax typeset every formula and
    no TeX is left in the text, every image loaded, no request left 127.0.0.1, no JavaScript error. Every
    chapter has figures, numbered equations and links into the bibliography."""
    problems: list[str] = []
    for page in book_pages():
        if not load(browser, f"{served}/{page}.html"):
            problems.append(f"{page}: the page did not load (no heading in <main> after three attempts)")
            continue
        report = browser.execute_async_script(PAGE_REPORT)
        requests = [entry for entry in browser.get_log("performance") if '"Network.requestWillBeSent"' in entry["message"]]
        hosts = {urllib.parse.urlsplit(json.loads(entry["message"])["message"]["params"]["request"]["url"]) for entry in requests}
        foreign = sorted(url.geturl() for url in hosts if url.scheme in ("http", "https", "ws", "wss") and url.hostname != "127.0.0.1")
        # Chromium asks every site for /favicon.ico; the book has none, and that 404 is not an error of the page
        errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]
        broken = [image["src"] for image in report["images"] if image["width"] == 0]
        raw_tex = [token for token in ("$$", "\\begin{", "\\frac", "\\mathcal") if token in report["prose"]]
        if report["math"] and not report["mathjax"]:
            problems.append(f"{page}: MathJax did not load")
        if report["untypeset"]:
            problems.append(f"{page}: {report['untypeset']} of {report['math']} formulas not typeset")
        problems += [f"{page}: raw TeX {token!r} in the text" for token in raw_tex]
        problems += [f"{page}: image did not load: {src}" for src in broken]
        problems += [f"{page}: request to another host: {url}" for url in foreign]
        problems += [f"{page}: JavaScript error: {error}" for error in errors]
        if page.startswith("chapters/"):
            if not report["figures"]:
                problems.append(f"{page}: no figure")
            if not report["numbered"]:
                problems.append(f"{page}: no numbered equation")
            if not report["bibliography"]:
                problems.append(f"{page}: no link into the bibliography")
        if page == "chapters/03_reversible_networks":
            shots = ROOT / "_build" / "browser"
            shots.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(shots / "03_reversible_networks.png"))
    assert not problems, "\n".join(problems)


def test_every_chapter_page_has_launch_and_repository_buttons(html: Path) -> None:
    """Colab and Binder open the chapter's own notebook from the configured repository and branch."""
    repository = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]
    owner_name, branch = repository["url"].removeprefix("https://github.com/"), repository["branch"]
    for notebook in sorted((ROOT / "chapters").glob("*.ipynb")):
        page = (html / "chapters" / f"{notebook.stem}.html").read_text()
        links = set(re.findall(r'href="(https://[^"]+)"', page))
        expected = {f"https://colab.research.google.com/github/{owner_name}/blob/{branch}/chapters/{notebook.name}",
                    f"https://mybinder.org/v2/gh/{owner_name}/{branch}?urlpath=tree/chapters/{notebook.name}",
                    repository["url"]}
        assert expected <= links, f"{notebook.stem}: missing {sorted(expected - links)}"
        assert any(link.startswith(f"{repository['url']}/issues/new") for link in links), f"{notebook.stem}: no 'open issue' button"


def test_the_book_prints_to_a_pdf_with_its_math_and_bookmarks(html: Path, tmp_path: Path) -> None:
    """tools/print_book.py (make pdf): two pages printed by Chromium and joined, typeset math and all."""
    spec = importlib.util.spec_from_file_location("print_book", ROOT / "tools" / "print_book.py")
    print_book = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(print_book)  # type: ignore[union-attr]
    try:
        print_book.find_chromium()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    pypdf = pytest.importorskip("pypdf", reason="pypdf is not installed (pip install -e '.[book]')")
    assert print_book.book_pages() == book_pages()
    output = tmp_path / "book.pdf"
    count = print_book.print_book(html, output, ["book/notation", "chapters/03_reversible_networks"])
    reader = pypdf.PdfReader(output)
    assert count == len(reader.pages) > 3
    assert [item.title for item in reader.outline] == ["notation", "03 reversible networks"]
    text = " ".join(page.extract_text() for page in reader.pages)
    assert "Reversible residual networks" in text and "Additive coupling" in text
    assert "\\begin{" not in text and "$$" not in text, "the math is typeset, not raw TeX"
    with pytest.raises(FileNotFoundError, match="make book"):
        print_book.print_book(tmp_path, output, ["chapters/03_reversible_networks"])
