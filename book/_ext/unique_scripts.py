"""A Sphinx extension of the book: each page lists every script once.

sphinx-thebe and sphinx-togglebutton register their inline configuration scripts on an event that Jupyter
Book emits twice (once with the file name ``None``, once with ``""``), so every page declared
``const THEBE_JS_URL`` twice, a JavaScript error in every browser (found by the browser test in
``tests/test_book.py``). Dropping exact repeats from the page's scripts fixes it without touching either
extension.
"""

from __future__ import annotations

from typing import Any


def _drop_repeated_scripts(app: Any, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    unique = []
    for script in context.get("script_files", []):
        key = (script.filename or "", tuple(sorted((name, str(value)) for name, value in script.attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


def setup(app: Any) -> dict[str, Any]:
    app.connect("html-page-context", _drop_repeated_scripts, priority=1000)  # after the extensions that add scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
