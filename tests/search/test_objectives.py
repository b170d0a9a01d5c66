"""Objectives and constraints: parsing, bounds against the baseline, clear errors."""

from __future__ import annotations

import pytest

from slimline.search.objectives import parse_constraint, parse_objectives

MODEL = {"perplexity": 10.3, "cosine": 0.995, "latency_ms_median": 4.0, "size_bytes_disk": 300}
BASELINE = {"perplexity": 10.0, "latency_ms_median": 8.0, "size_bytes_disk": 1000}


def test_absolute_constraints() -> None:
    c = parse_constraint("cosine >= 0.99")
    assert (c.metric.name, c.op, c.value, c.relative) == ("cosine", ">=", 0.99, False)
    assert c.violation(MODEL, BASELINE) <= 0
    assert parse_constraint("cosine>=0.999").violation(MODEL, BASELINE) > 0
    size = parse_constraint("size<=250")
    assert size.violation(MODEL, BASELINE) == pytest.approx((300 - 250) / 250)


def test_relative_constraints_bound_against_the_baseline() -> None:
    plus2 = parse_constraint("perplexity<=+2%")
    assert plus2.bound(BASELINE) == pytest.approx(10.2)  # 10.0 × 1.02
    assert plus2.violation(MODEL, BASELINE) == pytest.approx((10.3 - 10.2) / 10.2)
    assert parse_constraint("perplexity<=5%").violation(MODEL, BASELINE) <= 0  # 10.3 <= 10.5
    half_size = parse_constraint("size<=-50%")
    assert half_size.bound(BASELINE) == pytest.approx(500) and half_size.violation(
        MODEL, BASELINE) < 0
    # timing: the ratio to the baseline timed in the same trial (4 / 8 = 0.5)
    faster = parse_constraint("latency<=-40%")
    assert faster.measured(MODEL, BASELINE) == pytest.approx(0.5)
    assert faster.violation(MODEL, BASELINE) == pytest.approx((0.5 - 0.6) / 0.6)


@pytest.mark.parametrize(("text", "message"), [
    ("speed>=2", "unknown metric 'speed'"),
    ("cosine=>0.9", "does not parse"),
    ("cosine>=", "does not parse"),
    ("cosine>=abc", "does not parse"),
    ("cosine>0.9", "use <= or >="),
    ("cosine>=-1%", "measured against the baseline"),
    ("size<=-100%", "leaves nothing"),
])
def test_bad_constraints_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_constraint(text)


def test_objectives() -> None:
    found = parse_objectives("latency, size,accuracy")
    assert [m.name for m in found] == ["latency", "size", "accuracy"]
    assert [m.higher_is_better for m in found] == [False, False, True]
    with pytest.raises(ValueError, match="unknown metric 'fast'"):
        parse_objectives(["fast"])
    with pytest.raises(ValueError, match="more than once"):
        parse_objectives(["size", "size"])
    with pytest.raises(ValueError, match="at least one"):
        parse_objectives([])
