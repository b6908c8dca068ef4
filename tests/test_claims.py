import json
import math

import numpy as np
import pytest
import torch

import revlib
from revlib.claims import CLAIMS_VARIABLE


def test_a_claim_that_holds_returns_quietly() -> None:
    revlib.claim("ratio below 1.1", 0.98, below=1.1)
    revlib.claim("slope near -1", -1.05, above=-1.25, below=-0.75)
    revlib.claim("accepts tensors and numpy numbers", torch.tensor(3.0), above=np.float64(2.0))


@pytest.mark.parametrize(("value", "bounds"), [(1.2, {"below": 1.1}), (1.1, {"below": 1.1}), (0.5, {"above": 0.6, "below": 2.0}),
                                               (math.nan, {"above": 0.0})])
def test_a_claim_that_fails_names_statement_value_and_bounds(value: float, bounds: dict) -> None:
    with pytest.raises(AssertionError, match=r"the statement: measured .* expected"):
        revlib.claim("the statement", value, **bounds)


def test_margins_are_logged_relative_to_the_bound(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "claims.jsonl"
    monkeypatch.setenv(CLAIMS_VARIABLE, str(log))
    revlib.claim("upper", 0.75, below=1.0)
    revlib.claim("two-sided", 1.9, above=1.0, below=2.0)
    revlib.claim("zero bound", 0.25, above=0.0)
    with pytest.raises(AssertionError):
        revlib.claim("fails", 3.0, below=2.0)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["statement"] for entry in entries] == ["upper", "two-sided", "zero bound", "fails"]
    assert [entry["margin"] for entry in entries] == pytest.approx([0.25, 0.05, 0.25, -0.5])
    assert entries[1]["above"] == 1.0 and entries[1]["below"] == 2.0 and entries[1]["value"] == 1.9


def test_no_log_is_written_unless_asked(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CLAIMS_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    revlib.claim("quiet", 1.0, above=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("arguments", "error", "message"), [
    (("s", 1.0), ValueError, "needs a bound"),
    (("", 1.0), ValueError, "statement must say"),
    ((3, 1.0), TypeError, "statement must be a string"),
    (("s", "1.0"), TypeError, "value must be a real number"),
    (("s", True), TypeError, "value must be a real number"),
    (("s", torch.ones(2)), TypeError, "one-element tensor"),
])
def test_bad_arguments_are_refused(arguments: tuple, error: type, message: str) -> None:
    bounds = {} if "bound" in message else {"above": 0.0}
    with pytest.raises(error, match=message):
        revlib.claim(*arguments, **bounds)


def test_bounds_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="above must be less than below"):
        revlib.claim("s", 1.0, above=2.0, below=1.0)


def test_a_false_claim_fails_under_python_optimisations() -> None:
    """``python -O`` strips assert statements; a claim must still fail."""
    import subprocess
    import sys

    code = "import revlib; revlib.claim('one is below zero', 1.0, below=0.0)"
    run = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True)
    assert run.returncode != 0 and "one is below zero" in run.stderr
