"""tools/portability.py: a variant's kernels and the seed reach the chapter's kernel, failures name their cell."""

import importlib.util
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("portability", ROOT / "tools" / "portability.py")
portability = importlib.util.module_from_spec(spec)
sys.modules["portability"] = portability
spec.loader.exec_module(portability)


def notebook(path: Path, *sources: str) -> Path:
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in sources]), path)
    return path


def test_variant_and_seed_reach_the_kernel_and_claims_are_collected(tmp_path: Path) -> None:
    path = notebook(tmp_path / "probe.ipynb",
                    "import os, revlib\nseed = revlib.book_seed()",
                    "revlib.claim('the seed is two', seed, above=1.5, below=2.5)\n"
                    "assert os.environ['ATEN_CPU_CAPABILITY'] == 'avx2'")
    run = portability.execute(path, "aten-avx2", 2, timeout=120)
    assert run.passed, run.failure
    assert [(entry["statement"], entry["value"]) for entry in run.claims] == [("the seed is two", 2.0)]


def test_a_failing_claim_names_the_cell_and_the_statement(tmp_path: Path) -> None:
    path = notebook(tmp_path / "failing.ipynb", "import revlib", "x = 1", "revlib.claim('x is large', x, above=10)", "never = 1")
    run = portability.execute(path, "default", 0, timeout=120)
    assert not run.passed
    assert run.failure.startswith("cell 2: AssertionError: x is large: measured 1")
    assert run.claims[0]["margin"] < 0


def test_store_writes_outputs_only_when_the_run_passes(tmp_path: Path) -> None:
    path = notebook(tmp_path / "store.ipynb", "print(6 * 7)")
    assert portability.execute(path, "default", 0, timeout=120, store=True).passed
    assert nbformat.read(path, as_version=4).cells[0].outputs[0]["text"] == "42\n"
    failing = notebook(tmp_path / "fails.ipynb", "raise ValueError('no')")
    portability.execute(failing, "default", 0, timeout=120, store=True)
    assert nbformat.read(failing, as_version=4).cells[0].outputs == []


def test_report_lists_every_run_and_each_claims_smallest_margin() -> None:
    claim = {"statement": "ratio small", "above": None, "below": 1.0}
    runs = [portability.Run("03_x", "default", 0, 10.0, "", [dict(claim, value=0.5, margin=0.5)]),
            portability.Run("03_x", "aten-avx2", 0, 11.0, "cell 4: AssertionError: boom", [dict(claim, value=0.9, margin=0.1)])]
    text = portability.report(runs)
    assert "| 03_x | 1 of 2 | 10 |" in text, "runs passed and the median run time, per chapter"
    assert "- 03_x, aten-avx2, seed 0: cell 4: AssertionError: boom" in text
    assert "| 03_x | ratio small | < 1 | 0.5 to 0.9 (2 runs) | 10% |" in text
    assert [portability.headroom(m) for m in (25.0, 0.5, 0.05, 1e-6)] == ["over 10x the bound", "50%", "5% (tight)", "1e-06 (tight)"]


@pytest.mark.parametrize("variant", list(portability.VARIANTS))
def test_every_variant_sets_only_known_kernel_variables(variant: str) -> None:
    assert set(portability.VARIANTS[variant]) <= set(portability.KERNEL_VARIABLES)


def test_kept_runs_are_read_back_by_chapter_variant_and_seed(tmp_path: Path) -> None:
    import json
    from dataclasses import asdict

    runs = [portability.Run("03_x", "default", 0, 10.0, "cell 1: AssertionError: old"), portability.Run("03_x", "default", 0, 9.0)]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(asdict(run)) + "\n" for run in runs))
    kept = portability.load_runs(path)
    assert list(kept) == [("03_x", "default", 0)] and kept["03_x", "default", 0].passed, "a later run replaces an earlier one"
    assert portability.load_runs(tmp_path / "absent.jsonl") == {}


@pytest.mark.parametrize("path", sorted((ROOT / "chapters").glob("*.ipynb")), ids=lambda path: path.stem)
def test_stored_outputs_name_no_file_of_the_machine_that_stored_them(path: Path) -> None:
    """A warning printed with its source file (``/home/.../site-packages/x.py:21: Warning``) is stored with that
    machine's path, so nbval fails on every other checkout; a stored stream must not contain one."""
    source_location = re.compile(r"(/[\w.+-]+)+\.py:\d+")
    for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                assert not source_location.search(output.text), f"cell {index} stores a path of this machine: {output.text[:200]}"


def test_merge_replaces_the_rerun_chapters_rows_and_keeps_the_others() -> None:
    claim = {"statement": "ratio small", "above": None, "below": 1.0}
    old = portability.report([
        portability.Run("01_a", "default", 0, 10.0, "", [dict(claim, value=0.5, margin=0.5)]),
        portability.Run("02_b", "default", 0, 20.0, "cell 3: AssertionError: old", [dict(claim, value=2.0, margin=-1.0)]),
        portability.Run("03_c", "default", 0, 30.0, "", [dict(claim, value=0.2, margin=0.8)])])
    new = portability.report([
        portability.Run("02_b", "default", 0, 21.0, "", [dict(claim, value=0.4, margin=0.6),
                                                          dict(claim, statement="new claim", value=0.1, margin=0.9)])])
    merged = portability.merge_reports(old, new)
    assert merged.startswith("3 runs: chapters under the kernel variants default and the seeds 0 (")
    assert "| 01_a | 1 of 1 | 10 |" in merged and "| 03_c | 1 of 1 | 30 |" in merged, "other chapters kept"
    assert "| 02_b | 1 of 1 | 21 |" in merged and "| 02_b | 0 of 1 | 20 |" not in merged, "the rerun replaces"
    assert "old" not in merged, "the rerun chapter's old failure is gone"
    assert "| 02_b | new claim | < 1 | 0.1 to 0.1 (1 run) | 90% |" in merged
    for table in merged.split("| chapter | claim |"):
        rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| 0")]
        assert rows == sorted(rows), "chapters in order in both tables"
    other = portability.report([portability.Run("02_b", "aten-avx2", 1, 21.0, "", [])])
    with pytest.raises(ValueError, match="covers"):
        portability.merge_reports(old, other)
