"""Print the built HTML book to one PDF with headless Chromium, chapter bookmarks included: ``make pdf``.

    python tools/print_book.py [--html _build/html] [--output _build/pdf/book.pdf]

Each page of the table of contents is printed by Chromium (``--print-to-pdf``, after MathJax has had time
to typeset), in the book's order, and the pages are joined with pypdf, each page's first PDF page
bookmarked with its title. The theme's print stylesheet drops the navigation; ``_static/print.css`` wraps
long code lines. Nothing is downloaded: the HTML book serves its own MathJax.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-pdf-header-footer", "--virtual-time-budget=20000")


def book_pages() -> list[str]:
    """The pages of ``_toc.yml`` in reading order, as paths without suffix."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [chapter["file"] for part in toc["parts"] for chapter in part["chapters"]]


def find_chromium() -> str:
    """The Chromium (or Chrome) executable.

    Raises:
        FileNotFoundError: none is installed.
    """
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise FileNotFoundError("printing the book needs Chromium (Debian: apt-get install chromium)")


def print_page(chromium: str, page: Path, output: Path) -> None:
    """Print one HTML page to ``output``.

    Raises:
        RuntimeError: Chromium wrote no PDF.
    """
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--print-to-pdf={output}", page.resolve().as_uri()],
                       capture_output=True, check=False, timeout=300)
    if not output.is_file() or output.stat().st_size == 0:
        raise RuntimeError(f"Chromium printed nothing for {page}")


def print_book(html: Path, output: Path, pages: list[str] | None = None) -> int:
    """Print ``pages`` (default: the whole table of contents) of the built book in ``html`` to ``output``;
    returns the number of PDF pages.

    Raises:
        FileNotFoundError: the book is not built, or Chromium is missing.
    """
    from pypdf import PdfWriter

    chromium = find_chromium()
    pages = book_pages() if pages is None else pages
    missing = [page for page in pages if not (html / f"{page}.html").is_file()]
    if missing:
        raise FileNotFoundError(f"build the book first (make book): {missing[0]}.html is missing in {html}")
    writer = PdfWriter()
    with tempfile.TemporaryDirectory() as scratch:
        for index, page in enumerate(pages):
            part = Path(scratch) / f"{index:02d}.pdf"
            print_page(chromium, html / f"{page}.html", part)
            first = len(writer.pages)
            writer.append(str(part))
            writer.add_outline_item(title=page.split("/")[-1].replace("_", " "), page_number=first)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as file:
        writer.write(file)
    return len(writer.pages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html")
    parser.add_argument("--output", type=Path, default=ROOT / "_build" / "pdf" / "book.pdf")
    options = parser.parse_args()
    count = print_book(options.html, options.output)
    print(f"{options.output}: {count} pages")


if __name__ == "__main__":
    main()
