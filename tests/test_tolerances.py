"""The tolerance table is the one place figures are held to: tests use it, and every entry is used."""

import re
from pathlib import Path

import numpy as np
import pytest

from t2r_export.tolerances import MIN_AGREEMENT, TOLERANCES, ToleranceError, check_close

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*REPO.glob("tests/*.py"), *REPO.glob("t2r_export/**/*.py")]


def test_no_literal_tolerances_in_tests():
    literal = re.compile(r"\b(atol|rtol)=(?!0\b)[0-9.]+(e-?[0-9]+)?\b")
    offenders = [f"{p.name}:{i}" for p in REPO.glob("tests/*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert offenders == [], "take the tolerance from t2r_export/tolerances.py"


@pytest.mark.parametrize("key", sorted(TOLERANCES))
def test_every_tolerance_is_used(key):
    text = "\n".join(p.read_text() for p in SOURCES if p.name != "tolerances.py")
    pairs = set(re.findall(r'\("([\w-]+)", "([\w-]+)"\)', text))
    # a key is read whole, or by backend with the dtype chosen at run time (precision, key, ...)
    backends = set(re.findall(r'\("([\w-]+)", (?:precision|key|"fp32" if)', text))
    assert key in pairs or key[0] in backends, f"{key} is in tolerances.py but nothing checks against it"


def test_goals_are_bounds_a_bad_plan_fails():
    # every precision has an agreement goal below 100% and a perplexity bound above 0, both reachable
    for precision, goal in MIN_AGREEMENT.items():
        assert 0.5 < goal < 1.0
        assert 0.0 < TOLERANCES[("ppl-delta", precision)] < 0.1
        assert TOLERANCES[("ort", precision)] < 1.0


def test_check_close_names_the_output_and_fails_beyond_the_tolerance():
    tol = TOLERANCES[("ort", "fp32")]
    assert check_close("x", np.zeros(3), np.full(3, tol / 2), ("ort", "fp32")) == pytest.approx(tol / 2)
    with pytest.raises(ToleranceError, match="logits: max |diff| .* exceeds"):
        check_close("logits", np.zeros(3), np.full(3, tol * 2), ("ort", "fp32"))
