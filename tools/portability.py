"""Execute the chapters under other machines' kernels and other seeds, assertions on, and report.

Trained and accumulated results depend on the floating-point kernels that compute them, and those differ
between CPU makes, generations and GPUs. Environment variables switch PyTorch's, MKL's and oneDNN's kernels
on one machine, so one machine can stand in for several. Each (chapter, variant, seed) runs in a fresh
kernel with ``REVLIB_SEED`` set; every :func:`revlib.claim` logs its margin, and the report gives, for
each claim, the smallest margin seen.

    python tools/portability.py                                 # every chapter, every variant, seeds 0-2
    python tools/portability.py --variants aten-avx2 --seeds 1  # one variant, one seed (CI)
    python tools/portability.py --chapters 03 --report FILE     # also write the Markdown report to FILE
    python tools/portability.py --chapters 03 --results RUNS    # keep the runs in RUNS; a re-run replaces its
                                                                # earlier outcome, the report covers them all
    python tools/portability.py --chapters 03 --report F --merge  # chapter 03's rows replaced in F, the others kept
    python tools/portability.py --store --chapters 03           # re-execute and store the outputs nbval compares

The closing line reads ``N passed, M failed``; the exit status is 1 when any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "aten-generic": {"ATEN_CPU_CAPABILITY": "default"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "mkl-onednn-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}
# Variables of the caller that would silently turn one variant into another.
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "REVLIB_SEED", "REVLIB_SCALE")


@dataclass
class Run:
    """The outcome of one chapter executed under one variant and seed."""

    chapter: str
    variant: str
    seed: int
    seconds: float = 0.0
    failure: str = ""  # "cell N: AssertionError: ..." when the run failed
    claims: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failure


def execute(notebook: Path, variant: str, seed: int, timeout: int, store: bool = False) -> Run:
    """Run every cell of ``notebook`` in a fresh kernel under ``variant`` and ``seed``; collect its claims.

    With ``store``, a run that passed is written back to ``notebook`` with its fresh outputs.
    """
    run = Run(notebook.stem, variant, seed)
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "claims.jsonl"
        env = {key: value for key, value in os.environ.items() if key not in KERNEL_VARIABLES}
        env.update(VARIANTS[variant], REVLIB_SEED=str(seed), REVLIB_CLAIMS=str(log))
        cells = nbformat.read(notebook, as_version=4)
        client = NotebookClient(cells, timeout=timeout, kernel_name="python3", record_timing=False,
                                resources={"metadata": {"path": str(CHAPTERS)}})
        start = time.perf_counter()
        try:
            client.execute(env=env)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:
            run.failure = _describe_failure(cells, error)
        run.seconds = time.perf_counter() - start
        if store and run.passed:
            nbformat.write(cells, notebook)
        if log.exists():
            run.claims = [json.loads(line) for line in log.read_text().splitlines()]
    return run


def _describe_failure(cells: nbformat.NotebookNode, error: Exception) -> str:
    for index, cell in enumerate(cells.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                return f"cell {index}: {output['ename']}: {output['evalue']}"
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"


def report(runs: list[Run]) -> str:
    """The Markdown report for the book's appendix: per chapter, how many runs passed (and which failed, why),
    then each claim's bound, the values seen over all runs and its headroom (:func:`headroom`).

    Claims with less than a tenth of their bound to spare are marked "tight".
    """
    chapters = sorted({run.chapter for run in runs})
    variants = [variant for variant in VARIANTS if any(run.variant == variant for run in runs)]
    seeds = sorted({run.seed for run in runs})
    lines = [f"{len(runs)} runs: chapters under the kernel variants {', '.join(variants)} and the seeds "
             f"{', '.join(map(str, seeds))} (the first table counts each chapter's).", "",
             "| chapter | runs passed | typical run (s) |", "| --- | --- | --- |"]
    for chapter in chapters:
        mine = [run for run in runs if run.chapter == chapter]
        passed = sum(run.passed for run in mine)
        lines.append(f"| {chapter} | {passed} of {len(mine)} | {statistics.median(run.seconds for run in mine):.0f} |")
    failures = [run for run in runs if not run.passed]
    if failures:
        lines += ["", "Failures:", ""]
        lines += [f"- {run.chapter}, {run.variant}, seed {run.seed}: {run.failure}" for run in failures]
    lines += ["", "| chapter | claim | bound | values seen | smallest margin |", "| --- | --- | --- | --- | --- |"]
    for chapter in chapters:
        seen: dict[str, list[dict]] = {}
        for run in runs:
            if run.chapter == chapter:
                for entry in run.claims:
                    seen.setdefault(entry["statement"], []).append(entry)
        for statement, entries in seen.items():
            values = [entry["value"] for entry in entries]
            first = entries[0]
            bounds = " and ".join(part for part in (first["above"] is not None and f"> {first['above']:.6g}",
                                                     first["below"] is not None and f"< {first['below']:.6g}") if part)
            margin = headroom(min(entry["margin"] for entry in entries))
            lines.append(f"| {chapter} | {statement} | {bounds} | {min(values):.3g} to {max(values):.3g} ({len(values)} run{'s' * (len(values) != 1)}) | {margin} |")
    return "\n".join(lines)


def merge_reports(kept: str, fresh: str) -> str:
    """``fresh`` (a :func:`report` of some chapters' runs) with the rows of the other chapters carried over from
    ``kept``, an earlier report: each chapter's rows come from its own latest runs. The opening line counts the
    runs of both; it names the variants and seeds of ``fresh``, which every chapter must share (the report says
    what was run, so a chapter checked on fewer variants cannot be merged silently).

    Raises:
        ValueError: ``kept`` names other variants or seeds than ``fresh``.
    """
    def parts(text: str) -> tuple[str, list[str], list[str], list[str]]:
        opening, rest = text.split("\n", 1)
        tables = [[line for line in block.splitlines() if line.startswith("| ") and not line.startswith(("| chapter", "| ---"))]
                  for block in rest.split("| chapter | claim |")]
        failures = [line for line in rest.splitlines() if line.startswith("- ")]
        return opening, tables[0], tables[1] if len(tables) > 1 else [], failures

    def scope(opening: str) -> str:
        return opening.split(" runs: ", 1)[1]

    kept_opening, kept_runs, kept_claims, kept_failures = parts(kept)
    fresh_opening, fresh_runs, fresh_claims, fresh_failures = parts(fresh)
    if scope(kept_opening) != scope(fresh_opening):
        raise ValueError(f"the kept report covers {scope(kept_opening)!r}, the new runs {scope(fresh_opening)!r}")
    chapter = lambda row: row.split(" | ", 1)[0][2:]  # noqa: E731 (the first cell of a table row)
    fresh_chapters = {chapter(row) for row in fresh_runs}
    carried = lambda rows: [row for row in rows if chapter(row) not in fresh_chapters]  # noqa: E731
    run_rows = sorted(carried(kept_runs) + fresh_runs, key=chapter)
    claim_rows = sorted(carried(kept_claims) + fresh_claims, key=chapter)  # stable: each chapter's order kept
    failures = [line for line in kept_failures if line[2:].split(",", 1)[0] not in fresh_chapters] + fresh_failures
    total = sum(int(row.split(" | ")[1].split(" of ")[1]) for row in run_rows)
    lines = [f"{total} runs: {scope(fresh_opening)}", "", "| chapter | runs passed | typical run (s) |",
             "| --- | --- | --- |", *run_rows]
    if failures:
        lines += ["", "Failures:", "", *failures]
    lines += ["", "| chapter | claim | bound | values seen | smallest margin |", "| --- | --- | --- | --- | --- |",
              *claim_rows]
    return "\n".join(lines)


def headroom(margin: float) -> str:
    """A claim's smallest margin (distance from its bound relative to the bound) as a reader reads it: a
    percentage, "over 10x" far from the bound, and "tight" below a tenth."""
    if margin >= 10:
        return "over 10x the bound"
    shown = f"{margin:.0%}" if margin >= 0.01 else f"{margin:.1g}"
    return f"{shown} (tight)" if margin < 0.1 else shown


def load_runs(path: Path | None) -> dict[tuple[str, str, int], Run]:
    """The runs kept in ``path`` (one JSON object a line), keyed by chapter, variant and seed."""
    if path is None or not path.exists():
        return {}
    runs = [Run(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return {(run.chapter, run.variant, run.seed): run for run in runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chapters", nargs="*", default=[], help="chapter file prefixes, e.g. 03 04 (default: all)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="kernel variants (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="values of REVLIB_SEED (default: 0 1 2)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--report", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--results", type=Path, help="keep every run in this JSON-lines file and report on all it holds")
    parser.add_argument("--report-only", action="store_true", help="run nothing: report on the runs kept in --results")
    parser.add_argument("--merge", action="store_true",
                        help="keep, in the --report file, the rows of the chapters these runs do not cover")
    parser.add_argument("--store", action="store_true",
                        help="write each chapter back with its fresh outputs (default kernels and seed 0 only)")
    arguments = parser.parse_args()
    if arguments.store:
        if arguments.variants or arguments.seeds:
            parser.error("--store keeps the outputs of the default kernels and seed 0; leave out --variants and --seeds")
        arguments.variants, arguments.seeds = ["default"], [0]
    if arguments.merge and not arguments.report:
        parser.error("--merge keeps other chapters' rows of the --report file: name that file")
    if arguments.report_only and not arguments.results:
        parser.error("--report-only reports on the runs kept in --results: name that file")
    notebooks = sorted(path for path in CHAPTERS.glob("*.ipynb")
                       if not arguments.chapters or any(path.name.startswith(prefix) for prefix in arguments.chapters))
    if not notebooks:
        parser.error(f"no chapter in {CHAPTERS} starts with any of {arguments.chapters}")
    jobs = [] if arguments.report_only else [(notebook, variant, seed) for variant in arguments.variants or list(VARIANTS)
                                             for seed in arguments.seeds or [0, 1, 2] for notebook in notebooks]
    kept = load_runs(arguments.results)
    runs = []
    with tqdm(jobs, desc="portability", unit="run", file=sys.stderr) as progress:
        for notebook, variant, seed in progress:
            progress.set_postfix_str(f"{notebook.stem[:24]} {variant} seed {seed}")
            run = execute(notebook, variant, seed, arguments.timeout, store=arguments.store)
            if not run.passed:
                progress.write(f"FAILED {run.chapter}, {variant}, seed {seed}: {run.failure}")
            runs.append(run)
            if arguments.results:
                kept[run.chapter, run.variant, run.seed] = run
                arguments.results.write_text("".join(json.dumps(asdict(each)) + "\n" for each in kept.values()))
    if arguments.results:
        runs = sorted(kept.values(), key=lambda each: (each.chapter, list(VARIANTS).index(each.variant), each.seed))
    text = report(runs)
    print(text)
    if arguments.report:
        if arguments.merge and arguments.report.exists():
            text = merge_reports(arguments.report.read_text(), text)
        arguments.report.write_text(text + "\n")
    failed = sum(not run.passed for run in runs)
    print(f"{len(runs) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
