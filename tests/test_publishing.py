"""Publishing: one repository address in _config.yml, followed by the launch buttons, the chapters' install
cells, Binder and the README; the workflows run the README's commands and deploy the built book."""

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPOSITORY = CONFIG["repository"]["url"]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))


def workflow(name: str) -> dict:
    # YAML reads the key `on` as True
    return yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())


def steps(job: dict) -> list[dict]:
    return job["steps"]


def test_readme_commands_are_the_ones_the_workflows_and_ci_run() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make book" in readme and "make test" in readme
    tests = workflow("test.yml")
    assert {"push", "pull_request"} <= set(tests[True])
    assert any(step.get("run") == "make test" for step in steps(tests["jobs"]["test"]))
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("make test")


def test_book_workflow_builds_with_the_readme_command_and_deploys_pages_from_main() -> None:
    book = workflow("book.yml")
    assert book[True]["push"]["branches"] == [CONFIG["repository"]["branch"]]
    assert {"pages": "write", "id-token": "write"}.items() <= book["permissions"].items()
    build = steps(book["jobs"]["build"])
    assert any(step.get("run") == "make book" for step in build)
    upload = next(step for step in build if step.get("uses", "").startswith("actions/upload-pages-artifact@"))
    assert upload["with"]["path"] == "_build/html"
    deploy = book["jobs"]["deploy"]
    assert deploy["needs"] == "build" and any(step.get("uses", "").startswith("actions/deploy-pages@") for step in steps(deploy))


def test_launch_buttons_and_repository_buttons_are_on() -> None:
    assert REPOSITORY.startswith("https://github.com/")
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert CONFIG["launch_buttons"]["binderhub_url"] == "https://mybinder.org"
    assert CONFIG["html"]["use_repository_button"] and CONFIG["html"]["use_issues_button"]
    owner, name = REPOSITORY.removeprefix("https://github.com/").split("/")
    assert CONFIG["html"]["baseurl"] == f"https://{owner}.github.io/{name}/", "the Pages address of the repository"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_each_chapter_installs_the_library_from_the_books_branch_only_when_it_is_missing(chapter: Path) -> None:
    cells = json.loads(chapter.read_text())["cells"]
    first = "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])
    guard, install = first.split("except ImportError:")[:2]
    assert guard.startswith("try:") and "import revlib" in guard
    branch = CONFIG["repository"]["branch"]
    assert f'"revlib-book @ git+{REPOSITORY}@{branch}"' in install, "the distribution, from the branch the book is built from"


def test_the_install_cell_does_nothing_where_revlib_is_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    cells = json.loads(CHAPTERS[0].read_text())["cells"]
    first = "".join(next(cell for cell in cells if cell["cell_type"] == "code")["source"])
    guarded = first.split("\n\n", 1)[0] + "\n"  # the try/except block, before the chapter's own imports
    calls: list[tuple] = []
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: calls.append(args))
    namespace: dict = {}
    exec(compile(guarded, "first cell", "exec"), namespace)
    assert calls == [] and "revlib" in namespace


def test_binder_installs_the_cpu_build_of_torch_and_the_library() -> None:
    requirements = (ROOT / "binder" / "requirements.txt").read_text()
    assert re.search(r"^torch==2\.13\.0$", requirements, re.MULTILINE)
    assert "download.pytorch.org/whl/cpu" in requirements
    post_build = ROOT / "binder" / "postBuild"
    assert post_build.stat().st_mode & 0o111, "postBuild must be executable"
    assert re.search(r"pip install .*\"\.\[book\]\"", post_build.read_text()), "the library from the repository itself"


def test_readme_points_to_the_published_book_and_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert CONFIG["html"]["baseurl"] in readme
    assert REPOSITORY in readme
