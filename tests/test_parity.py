import numpy as np
import pytest

from crossport.errors import ParityError
from crossport.parity import (
    FP32,
    RECORDED,
    HopSpec,
    LossyPolicy,
    Tolerance,
    accuracy_drop_bounds,
    clopper_pearson,
    compare,
    compare_exact,
    raise_on_failure,
)

VALUES = Tolerance(FP32, reason="test")
SPEC = HopSpec("ref -> cand", "ref", "cand", (("scores", VALUES), ("logits", VALUES)))
BOUND = 1e-5  # the per-element float32 error bound B these tests hand in: |Δ| may reach 2·B


def outputs(seed: int = 0, n: int = 50, classes: int = 6) -> dict[str, np.ndarray]:
    logits = np.random.default_rng(seed).normal(size=(n, classes)).astype(np.float32) * 4
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return {"scores": scores.astype(np.float32), "logits": logits}


def bounds_like(ref: dict, value: float = BOUND) -> dict[str, np.ndarray]:
    return {name: np.full(array.shape, value) for name, array in ref.items()}


def test_identical_outputs_pass_with_full_agreement():
    ref = outputs()
    result = compare(SPEC, ref, {k: v.copy() for k, v in ref.items()}, labels=np.zeros(50, dtype=int),
                     bounds=bounds_like(ref))
    assert result.passed and result.verdict == "pass"
    assert result.top1_agreement == 1.0
    assert all(stats.max_abs == 0.0 and stats.worst_ratio == 0.0 for stats in result.outputs)
    assert result.reference_accuracy == result.candidate_accuracy


def test_missing_output_name_is_reported_before_values():
    ref = outputs()
    result = compare(SPEC, ref, {"scores": ref["scores"]}, bounds=bounds_like(ref))
    assert not result.passed
    assert "no output(s) ['logits']" in result.failures[0]
    assert result.outputs == []  # names fail first: no value comparison on a broken interface


def test_shape_and_dtype_mismatch_are_reported():
    ref = outputs()
    cand = {"scores": ref["scores"][:, :5], "logits": ref["logits"].astype(np.float64)}
    result = compare(SPEC, ref, cand, bounds=bounds_like(ref))
    assert len(result.failures) == 2
    assert "expected float32[50, 6]" in result.failures[0] and "found float32[50, 5]" in result.failures[0]
    assert "found float64[50, 6]" in result.failures[1]


def test_fp32_values_without_a_bound_are_a_programming_error():
    ref = outputs()
    with pytest.raises(ValueError, match="no error bound was given"):
        compare(SPEC, ref, ref)


def test_value_drift_beyond_twice_the_bound_names_output_ratio_and_worst_example():
    ref = outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["logits"][17, 2] += 1e-3
    result = compare(SPEC, ref, cand, bounds=bounds_like(ref))
    assert not result.passed
    logits = next(stats for stats in result.outputs if stats.name == "logits")
    assert logits.worst_example == 17 and logits.violations == 1
    assert logits.worst_ratio == pytest.approx(1e-3 / (2 * BOUND), rel=1e-3)
    assert any("'logits' max |Δ|" in f and "float32 error bound" in f and "example 17" in f for f in result.failures)


def test_the_bound_is_per_element():
    ref = outputs()
    bounds = bounds_like(ref)
    bounds["logits"][0, 0] = 1e-2  # a large-magnitude element is allowed a larger error
    cand = {k: v.copy() for k, v in ref.items()}
    cand["logits"][0, 0] += 1.5e-2  # within 2·B = 2e-2
    assert compare(SPEC, ref, cand, bounds=bounds).passed
    cand["logits"][1, 0] += 1.5e-2  # the same error where B is 1e-5: out
    assert not compare(SPEC, ref, cand, bounds=bounds).passed


def test_nan_in_candidate_fails():
    ref = outputs()
    cand = {k: v.copy() for k, v in ref.items()}
    cand["scores"][3, 1] = np.nan
    result = compare(SPEC, ref, cand, bounds=bounds_like(ref))
    assert any("non-finite" in failure for failure in result.failures)


def test_fp32_flip_on_a_decisive_example_fails_but_a_near_tie_within_the_bounds_is_excluded():
    ref = outputs(n=4, classes=3)
    ref["scores"][0] = [0.5, 0.5 - 1e-6, 1e-6]  # top-2 gap 1e-6, below the two classes' 2·B + 2·B
    cand = {k: v.copy() for k, v in ref.items()}
    cand["scores"][0] = [0.5 - 1e-6, 0.5, 1e-6]
    result = compare(SPEC, ref, cand, bounds=bounds_like(ref))
    assert result.near_ties_excluded == 1 and result.passed, result.failures
    tight = bounds_like(ref, 1e-8)  # with tighter bounds the same example is decisive, and its flip counts
    cand["scores"] = ref["scores"].copy()
    cand["scores"][0] = [0.5 - 1e-6, 0.5, 1e-6]
    failed = compare(HopSpec("r -> c", "r", "c", (("scores", VALUES),)), ref, cand, bounds=tight)
    assert any("top-1 answer changed on 1 of 4 decisive examples" in f for f in failed.failures)


def test_all_near_ties_is_a_failure_not_a_vacuous_pass():
    ref = {"scores": np.full((3, 4), 0.25, dtype=np.float32)}
    spec = HopSpec("ref -> cand", "ref", "cand", (("scores", VALUES),))
    result = compare(spec, ref, {"scores": ref["scores"].copy()}, bounds=bounds_like(ref))
    assert any("every example is a near-tie" in failure for failure in result.failures)


# --- lossy variants: statistics valid at any test size -----------------------------------------

LOSSY = HopSpec("ref -> q", "ref", "q", (("scores", Tolerance(RECORDED, "test")),),
                lossy=LossyPolicy(max_disagreement=0.01, max_accuracy_drop=0.005, confidence=0.99, reason="test"))


def lossy_case(n: int, flips: int, *, flips_lose: bool, seed: int = 0):
    """Confident reference answers, ``flips`` of them changed by the candidate; labels = reference answers
    where ``flips_lose`` (the variant loses accuracy), else labels = the candidate's answers on the flips."""
    rng = np.random.default_rng(seed)
    scores = np.full((n, 4), 0.02, dtype=np.float32)
    top = rng.integers(0, 4, n)
    scores[np.arange(n), top] = 0.94
    cand = scores.copy()
    changed = rng.choice(n, flips, replace=False)
    other = (top[changed] + 1) % 4
    cand[changed, top[changed]], cand[changed, other] = 0.02, 0.94
    labels = top.copy()
    if not flips_lose:
        labels[changed] = other
    return {"scores": scores}, {"scores": cand}, labels


def test_a_lossy_variant_at_least_as_accurate_is_never_failed_for_disagreeing():
    ref, cand, labels = lossy_case(2000, 200, flips_lose=False)  # 10 % changed, every change a correction
    result = compare(LOSSY, ref, cand, labels)
    assert result.candidate_accuracy > result.reference_accuracy
    assert result.disagreement.decision == "not applied"
    assert result.verdict == "pass", result.failures + result.undecided


def test_too_few_examples_is_undecided_not_pass_or_fail():
    ref, cand, labels = lossy_case(359, 1, flips_lose=True)  # 0.28 %: the 99 % upper bound is above 1 %
    result = compare(LOSSY, ref, cand, labels)
    assert result.verdict == "undecided" and result.passed
    assert result.disagreement.decision == "undecided"
    assert any("undecided (359 examples)" in line for line in result.undecided)


def test_enough_examples_decide_both_ways():
    ref, cand, labels = lossy_case(20000, 20, flips_lose=False)  # 0.1 % changed: upper bound well under 1 %
    labels = np.argmax(ref["scores"], 1)  # ... and every change an error, so the rule is applied
    passed = compare(LOSSY, ref, cand, labels)
    assert passed.disagreement.decision == "pass" and passed.accuracy_drop.decision == "pass"
    assert passed.verdict == "pass"
    ref, cand, labels = lossy_case(20000, 600, flips_lose=True)  # 3 % changed, 3 points lost
    failed = compare(LOSSY, ref, cand, labels)
    assert failed.disagreement.decision == "fail" and failed.accuracy_drop.decision == "fail"
    assert any("top-1 disagreement 3.000%" in f and "above the limit" in f for f in failed.failures)


def test_lossy_near_ties_come_from_the_variants_own_error():
    ref, cand, labels = lossy_case(500, 0, flips_lose=True)
    noisy = cand["scores"] + np.random.default_rng(1).normal(0, 1e-2, cand["scores"].shape).astype(np.float32)
    ref["scores"][0] = [0.49, 0.48, 0.02, 0.01]  # gap 0.01: within twice the variant's typical error
    result = compare(LOSSY, ref, {"scores": noisy.astype(np.float32)}, labels)
    assert result.near_ties_excluded >= 1
    assert "median max |Δ|" in result.tie_rule


def test_clopper_pearson_matches_its_closed_forms():
    # 0 successes: upper = 1 − α^(1/n); n successes: lower = α^(1/n)
    for n in (10, 359, 116323):
        assert clopper_pearson(0, n, 0.99) == (0.0, pytest.approx(1 - 0.01 ** (1 / n), rel=1e-9))
        assert clopper_pearson(n, n, 0.99) == (pytest.approx(0.01 ** (1 / n), rel=1e-9), 1.0)
    low, high = clopper_pearson(30, 1000, 0.99)
    assert low < 0.03 < high


def test_accuracy_drop_bounds_bracket_the_estimate_and_shrink_with_size():
    assert accuracy_drop_bounds(0, 0, 100, 0.99) == (0.0, 0.0)
    small = accuracy_drop_bounds(5, 3, 400, 0.99)
    large = accuracy_drop_bounds(500, 300, 40000, 0.99)
    for (low, high), estimate in ((small, 2 / 400), (large, 200 / 40000)):
        assert low < estimate < high
    assert large[1] - large[0] < small[1] - small[0]


# --- against the exact values ------------------------------------------------------------------


def exact_case(seed=0):
    rng = np.random.default_rng(seed)
    exact = {"logits": rng.normal(size=(400, 5)) * 10}
    noise = 1e-6
    pytorch = {"logits": exact["logits"] + rng.normal(0, noise, exact["logits"].shape)}
    return exact, pytorch, {"logits": np.full(exact["logits"].shape, 100 * noise)}


def test_an_artifact_as_noisy_as_pytorch_passes_and_a_shifted_class_does_not():
    exact, pytorch, bounds = exact_case()
    peer = {"logits": exact["logits"] + np.random.default_rng(9).normal(0, 1e-6, exact["logits"].shape)}
    result = compare_exact("peer", peer, exact, bounds, pytorch, noise_factor=4.0)
    assert result.passed and result.outputs[0].noise_ratio < 2
    shifted = {"logits": peer["logits"].copy()}
    shifted["logits"][:, 3] += 1e-5  # a bias shift on class 3: inside every element's bound, 10× the noise
    result = compare_exact("shifted", shifted, exact, bounds, pytorch, noise_factor=4.0)
    assert result.outputs[0].worst_ratio < 1 and result.outputs[0].noise_class == 3
    assert any("noisier than PyTorch float32" in f and "class 3" in f for f in result.failures)


def test_an_element_beyond_its_bound_fails_and_lossy_artifacts_are_only_recorded():
    exact, pytorch, bounds = exact_case()
    far = {"logits": pytorch["logits"].copy()}
    far["logits"][7, 1] += 1e-3
    assert any("float32 error bound away" in f for f in compare_exact("far", far, exact, bounds, pytorch, 4.0).failures)
    recorded = compare_exact("int8", far, exact, bounds, pytorch, None)
    assert recorded.passed and not recorded.judged and recorded.outputs[0].max_abs > 9e-4


def test_raise_on_failure_lists_every_failure_of_every_hop():
    ref = outputs()
    bad = {k: v + 1.0 for k, v in ref.items()}
    results = [compare(SPEC, ref, bad, bounds=bounds_like(ref)),
               compare(SPEC, ref, {"scores": ref["scores"]}, bounds=bounds_like(ref))]
    with pytest.raises(ParityError, match=r"parity failed in 3 check\(s\).*'scores' max.*'logits' max.*no output"):
        raise_on_failure(results)
    raise_on_failure([compare(SPEC, ref, ref, bounds=bounds_like(ref))])  # passing hops raise nothing
