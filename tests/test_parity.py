import numpy as np
import pytest

from crossport.errors import ParityError
from crossport.parity import HopSpec, Tolerance, compare, raise_on_failure

TOL = Tolerance(atol=1e-5, rtol=0.0, reason="test")
LOGIT_TOL = Tolerance(atol=1e-5, rtol=1e-5, reason="test")
SPEC = HopSpec("ref -> cand", "ref", "cand", (("scores", TOL), ("logits", LOGIT_TOL)), 1.0, "test", tie_margin=2e-5)


def outputs(seed: int = 0, n: int = 50, classes: int = 6) -> dict[str, np.ndarray]:
    logits = np.random.default_rng(seed).normal(size=(n, classes)).astype(np.float32) * 4
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return {"scores": scores.astype(np.float32), "logits": logits}


def test_identical_outputs_pass_with_full_agreement():
    ref = outputs()
    result = compare(SPEC, ref, {k: v.copy() for k, v in ref.items()}, labels=np.zeros(50, dtype=int))
    assert result.passed
    assert result.top1_agreement == 1.0
    assert all(stats.max_abs == 0.0 for stats in result.outputs)
    assert result.reference_accuracy == result.candidate_accuracy


def test_missing_output_name_is_reported_before_values():
    ref = outputs()
    result = compare(SPEC, ref, {"scores": ref["scores"]})
    assert not result.passed
    assert "no output(s) ['logits']" in result.failures[0]
    assert result.outputs == []  # names fail first: no value comparison on a broken interface


def test_shape_and_dtype_mismatch_are_reported():
    ref = outputs()
    cand = {"scores": ref["scores"][:, :5], "logits": ref["logits"].astype(np.float64)}
    result = compare(SPEC, ref, cand)
    assert len(result.failures) == 2
    assert "expected float32[50, 6]" in result.failures[0] and "found float32[50, 5]" in result.failures[0]
    assert "found float64[50, 6]" in result.failures[1]


def test_value_drift_beyond_tolerance_names_output_and_worst_example():
    ref = outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["logits"][17, 2] += 1e-3
    result = compare(SPEC, ref, cand)
    assert not result.passed
    logits = next(stats for stats in result.outputs if stats.name == "logits")
    assert logits.worst_example == 17
    assert logits.max_abs == pytest.approx(1e-3, rel=1e-3)
    assert any("'logits' max |Δ|" in failure and "example 17" in failure for failure in result.failures)


def test_relative_tolerance_scales_with_reference_magnitude():
    ref = outputs()
    ref["logits"][0, 0] = 1000.0
    cand = {k: v.copy() for k, v in ref.items()}
    cand["logits"][0, 0] += 5e-3  # within 1e-5 + 1e-5 * 1000 = 1.001e-2
    assert compare(SPEC, ref, cand).passed
    cand["logits"][0, 0] += 1e-2  # now 1.5e-2 off: beyond it
    assert not compare(SPEC, ref, cand).passed


def test_nan_in_candidate_fails():
    ref = outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["scores"][3, 1] = np.nan
    result = compare(SPEC, ref, cand)
    assert any("non-finite" in failure for failure in result.failures)


def test_swapped_classes_fail_agreement_even_with_loose_values():
    loose = Tolerance(atol=10.0, rtol=0.0, reason="test: values unchecked")
    spec = HopSpec("ref -> cand", "ref", "cand", (("scores", loose),), 1.0, "test")
    ref = outputs()
    cand = {"scores": ref["scores"][:, ::-1].copy()}
    result = compare(spec, ref, cand)
    assert result.top1_agreement < 1.0
    assert any("top-1 agreement" in failure for failure in result.failures)


def test_near_ties_are_excluded_and_counted():
    ref = outputs(n=4, classes=3)
    ref["scores"][0] = [0.5, 0.5 - 1e-6, 1e-6]  # top-2 gap far below 2 × atol
    cand = {k: v.copy() for k, v in ref.items()}
    cand["scores"][0] = [0.5 - 1e-6, 0.5, 1e-6]  # flips the near-tie, within tolerance
    result = compare(SPEC, ref, cand)
    assert result.near_ties_excluded == 1
    assert result.passed, result.failures
    strict = HopSpec("ref -> cand", "ref", "cand", SPEC.outputs, 1.0, "test", tie_margin=None)
    assert not compare(strict, ref, cand).passed  # without the margin the flip counts


def test_all_near_ties_is_a_failure_not_a_vacuous_pass():
    ref = {"scores": np.full((3, 4), 0.25, dtype=np.float32)}
    spec = HopSpec("ref -> cand", "ref", "cand", (("scores", TOL),), 1.0, "test", tie_margin=1e-3)
    result = compare(spec, ref, {"scores": ref["scores"].copy()})
    assert any("every example is a near-tie" in failure for failure in result.failures)


def test_raise_on_failure_lists_every_failure_of_every_hop():
    ref = outputs()
    bad = {k: v + 1.0 for k, v in ref.items()}
    results = [compare(SPEC, ref, bad), compare(SPEC, ref, {"scores": ref["scores"]})]
    with pytest.raises(ParityError, match=r"parity failed in 3 check\(s\).*'scores' max.*'logits' max.*no output"):
        raise_on_failure(results)
    raise_on_failure([compare(SPEC, ref, ref)])  # passing hops raise nothing
