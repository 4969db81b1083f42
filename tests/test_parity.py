from contextlib import nullcontext

import numpy as np
import pytest

from crossport.errors import ParityError
from crossport.exact import sign_threshold
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
    sign_statistics,
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
    # a bound far wider than the gaps (a deep network's, docs/parity.md) is said with its width
    spread = {"scores": np.tile(np.float32([0.4, 0.3, 0.2, 0.1]), (3, 1))}
    wide = compare(spec, spread, {"scores": spread["scores"].copy()},
                   bounds={"scores": np.full((3, 4), 50.0)})
    # the tie rule's allowance is 2·B per class (as above): (2·50 + 2·50) / 0.1 = 2000
    assert any("the bound is a median 2e+03× the gap" in failure for failure in wide.failures), wide.failures


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



def test_the_quantiles_are_scipy_stats_own():
    """clopper_pearson and the sampled bound's χ² limit take their quantiles from scipy.special (scipy.stats costs
    every process 0.4 s to import): the numbers scipy.stats' beta and chi2 give, exactly."""
    from scipy.stats import beta, chi2

    from crossport.exact.rounding import FALSE_ALARM, sampled_confidence

    for successes, trials in ((1, 10), (3, 359), (30, 1000), (359, 11632), (5000, 116323)):
        for confidence in (0.99, 0.999, 1 - 0.01 / 7):
            alpha = 1 - confidence
            assert clopper_pearson(successes, trials, confidence) == (
                float(beta.ppf(alpha, successes, trials - successes + 1)),
                float(beta.ppf(1 - alpha, successes + 1, trials - successes)))
    for outputs, samples in ((10, 16), (3590, 16), (7_212_026, 16), (100, 3)):
        assert sampled_confidence(outputs, samples)[1] == float(chi2.ppf(FALSE_ALARM / 2 / outputs, samples))

def test_accuracy_drop_bounds_bracket_the_estimate_and_shrink_with_size():
    assert accuracy_drop_bounds(0, 0, 100, 0.99) == (0.0, 0.0)
    small = accuracy_drop_bounds(5, 3, 400, 0.99)
    large = accuracy_drop_bounds(500, 300, 40000, 0.99)
    for (low, high), estimate in ((small, 2 / 400), (large, 200 / 40000)):
        assert low < estimate < high
    assert large[1] - large[0] < small[1] - small[0]


# --- against the exact values ------------------------------------------------------------------


def exact_case(seed=0, rows=400, classes=5):
    """Exact values, each element's bound B (100 × the noise) and no systematic part."""
    from crossport.exact import Exact

    rng = np.random.default_rng(seed)
    values = {"logits": rng.normal(size=(rows, classes)) * 10}
    bounds = {"logits": np.full(values["logits"].shape, 100 * NOISE)}
    return Exact(values, bounds, {"logits": np.zeros_like(values["logits"])}, 0.0, ())


NOISE = 1e-6
THRESHOLD = sign_threshold(5)


def noisy(exact, seed=9, scale=None):
    rng = np.random.default_rng(seed)
    values = exact.values["logits"]
    return {"logits": values + rng.normal(0, 1, values.shape) * (NOISE if scale is None else scale)}


def test_an_artifact_with_rounding_noise_passes_and_a_shifted_class_does_not():
    exact = exact_case()
    peer = noisy(exact)
    result = compare_exact("peer", peer, exact, THRESHOLD)
    assert result.passed and result.outputs[0].sign_statistic < THRESHOLD and result.outputs[0].probed == 400
    shifted = {"logits": peer["logits"].copy()}
    shifted["logits"][:, 3] += NOISE / 4  # a bias shift on class 3: a quarter of the noise, 1/400 of the bound
    result = compare_exact("shifted", shifted, exact, THRESHOLD)
    assert result.outputs[0].worst_ratio < 1 and result.outputs[0].sign_class == 3
    assert any("drifts one way in class 3" in f for f in result.failures), result.failures


def test_the_sign_test_is_blind_to_scale_so_near_zero_classes_cannot_fail_a_correct_artifact():
    """The false alarm of round 2: a class whose errors are near zero on most examples. Per element, the error's
    scale may be anything (here over 20 orders of magnitude, and heavy-tailed); only its sign is read."""
    exact = exact_case(rows=2000)
    rng = np.random.default_rng(1)
    scale = np.exp(rng.uniform(-25, 0, exact.values["logits"].shape)) * NOISE
    honest = noisy(exact, scale=scale * np.clip(rng.standard_cauchy(scale.shape), -50, 50))  # within B = 100·noise
    result = compare_exact("near-zero classes", honest, exact, THRESHOLD)
    assert result.passed, result.failures


def test_a_systematic_error_within_its_allowance_passes_and_beyond_it_fails():
    from crossport.exact import Exact

    exact = exact_case()
    leaning = {"logits": exact.values["logits"] + NOISE}  # every element one way, by the same amount
    assert not compare_exact("leaning", leaning, exact, THRESHOLD).passed
    allowed = Exact(exact.values, exact.bounds, {"logits": np.full(exact.values["logits"].shape, NOISE)}, 0.0, ())
    result = compare_exact("allowed", leaning, allowed, THRESHOLD)
    assert result.passed and result.outputs[0].sign_statistic <= 0.0
    half = Exact(exact.values, exact.bounds, {"logits": np.full(exact.values["logits"].shape, NOISE / 2)}, 0.0, ())
    assert not compare_exact("beyond", leaning, half, THRESHOLD).passed


def test_the_sign_tests_false_alarm_rate_is_below_its_bound():
    """Hoeffding's bound on random-sign sums: at t(α) the chance of any of the tests reaching it is ≤ α. Measured on
    4,000 seeded runs of symmetric, heavy-tailed, mixed-scale errors at α = 0.05 (the bound is conservative)."""
    rng = np.random.default_rng(0)
    threshold = sign_threshold(5, false_alarm=0.05)
    alarms = 0
    for _ in range(4000):
        error = rng.standard_cauchy((200, 5)) * np.exp(rng.uniform(-5, 5, (200, 1)))
        alarms += bool(np.any(sign_statistics(error, np.zeros_like(error)) >= threshold))
    assert alarms / 4000 <= 0.05
    assert sign_threshold(90) == pytest.approx(np.sqrt(2 * np.log(2 * 90 / 1e-6)))


def test_an_element_beyond_its_bound_fails_and_lossy_artifacts_are_only_recorded():
    exact = exact_case()
    far = noisy(exact)
    far["logits"][7, 1] += 1e-3
    assert any("float32 error bound away" in f for f in compare_exact("far", far, exact, THRESHOLD).failures)
    recorded = compare_exact("int8", far, exact, None)
    assert recorded.passed and not recorded.judged and recorded.outputs[0].max_abs > 9e-4
    assert recorded.outputs[0].sign_statistic is None


def test_raise_on_failure_lists_every_failure_of_every_hop():
    ref = outputs()
    bad = {k: v + 1.0 for k, v in ref.items()}
    results = [compare(SPEC, ref, bad, bounds=bounds_like(ref)),
               compare(SPEC, ref, {"scores": ref["scores"]}, bounds=bounds_like(ref))]
    with pytest.raises(ParityError, match=r"parity failed in 3 check\(s\).*'scores' max.*'logits' max.*no output"):
        raise_on_failure(results)
    raise_on_failure([compare(SPEC, ref, ref, bounds=bounds_like(ref))])  # passing hops raise nothing


def test_the_export_check_compares_the_two_exact_functions():
    """The graph's exact logits against the model's: equal to float64 rounding when the graph holds the model's own
    weights; within B when the exporter folded constants into them (one float32 rounding each)."""
    from crossport.exact import Exact
    from crossport.parity import compare_graph

    model = exact_case()
    same = Exact({"logits": model.values["logits"] * (1 + 2.0**-52)}, model.bounds, model.systematic, 0.0, ())
    assert compare_graph(model, same, folded=False).passed
    drifted = Exact({"logits": model.values["logits"] + NOISE}, model.bounds, model.systematic, 0.0, ())
    result = compare_graph(model, drifted, folded=False)
    assert not result.passed and "the export changed the model's function" in result.failures[0]
    assert compare_graph(model, drifted, folded=True).passed  # NOISE is 1/100 of B
    far = Exact({"logits": model.values["logits"] + 200 * NOISE}, model.bounds, model.systematic, 0.0, ())
    assert not compare_graph(model, far, folded=True).passed


def test_inputs_made_a_chunk_at_a_time_are_the_float32_arrays_they_stand_for():
    """validate holds the test split as pixels (crossport.interface.Inputs): every slice, row, index and chunk a
    runtime reads is bit for bit what the float32 array of the pixels and the probe after them would give."""
    from crossport.interface import Inputs, to_inputs
    from crossport.runtimes import chunked

    rng = np.random.default_rng(0)
    pixels, probe = rng.integers(0, 256, (37, 6), dtype=np.uint8), rng.random((5, 6), dtype=np.float32)
    whole = np.concatenate([to_inputs(pixels), probe])
    lazy = Inputs(pixels, probe)
    assert lazy.shape == whole.shape and len(lazy) == 42 and lazy.dtype == np.float32
    assert np.asarray(lazy).view(np.uint32).tolist() == whole.view(np.uint32).tolist()
    for key in (slice(None, 37), slice(30, 40), slice(36, None), slice(0, 0), slice(40, 99)):
        assert np.array_equal(np.asarray(lazy[key]), whole[key]), key
        assert np.array_equal(np.asarray(lazy[30:][key]), whole[30:][key]), key  # a slice of a slice
    for key in (0, 36, 37, -1, [3, 39, 0], np.arange(40, 42)):
        assert np.array_equal(lazy[key], whole[key]), key
    with pytest.raises(IndexError):
        lazy[42]
    seen = []

    def run(batch):
        seen.append(type(batch))
        return {"x": batch * 2}

    assert np.array_equal(chunked(run, chunk=8)(lazy[:37])["x"], whole[:37] * 2)
    assert set(seen) == {np.ndarray}  # every runtime is handed float32 arrays, 8 rows at a time


@pytest.mark.parametrize("block", [1, 3, 7, 10_000])
def test_values_compared_in_blocks_give_what_whole_arrays_give(monkeypatch, block):
    """crossport.parity compares |Δ| BLOCK rows at a time (a full-size split's float64 differences are 58 MB an
    array): the same maximum, relative maximum, worst element, violations and worst ratio as numpy's own reductions
    over the whole arrays, NaN and infinity included, ties going to the first element."""
    import crossport.parity as parity

    rng = np.random.default_rng(3)
    ref = rng.normal(0, 1, (23, 5)).astype(np.float32)
    bound = rng.uniform(1e-7, 1e-6, ref.shape)
    cases = {"clean": ref + np.float32(1e-7), "nan": ref.copy(), "inf": ref.copy(), "tie": ref.copy(),
             "all-nan": np.full_like(ref, np.nan)}
    cases["nan"][4, 2] = np.nan
    cases["inf"][17, 1] = np.inf
    cases["tie"][[6, 20], [3, 0]] += np.float32(1.0)  # the same |Δ| twice: the first is the worst
    cases["tie"][20, 0] = cases["tie"][6, 3] - ref[6, 3] + ref[20, 0]
    for name, cand in cases.items():
        delta = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
        ratio = delta / (2 * bound)
        with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning) if name == "all-nan" else nullcontext():
            expected_max = np.nanmax(delta)
        monkeypatch.setattr(parity, "BLOCK", block)
        stats = parity._value_stats("logits", FP32, ref, cand, bound)
        assert stats.violations == int(np.sum(~(delta <= 2 * bound))), name
        if name == "all-nan":
            assert np.isnan(stats.max_abs) and stats.worst_example == 0, name
            continue
        worst = int(np.nanargmax(ratio)) if np.any(np.isfinite(ratio)) else int(np.nanargmax(delta))
        relative = delta / np.maximum(np.abs(ref.astype(np.float64)), np.finfo(np.float32).tiny)
        assert stats.max_abs == expected_max and stats.max_rel == np.nanmax(relative), name
        assert stats.worst_ratio == ratio.flat[worst], name
        assert stats.worst_example == worst // 5 and stats.allowed_at_worst == 2 * bound.flat[worst], name


@pytest.mark.parametrize("block", [1, 7, 10_000])
def test_errors_against_the_exact_values_in_blocks_give_what_whole_arrays_give(monkeypatch, block):
    """compare_exact's max |error|, worst ratio and its example are numpy's reductions over the whole arrays, and
    its rms theirs to rounding, at any block size; a NaN is skipped by them and fails the artifact."""
    import crossport.parity as parity

    exact = exact_case()
    peer = noisy(exact)
    peer["logits"][5, 2] = np.nan
    error = peer["logits"].astype(np.float64) - exact.values["logits"]
    ratio = np.abs(error) / exact.bounds["logits"]
    monkeypatch.setattr(parity, "BLOCK", block)
    with np.errstate(invalid="ignore"):  # the sign test's sum over a column with the NaN
        result = compare_exact("peer", peer, exact, THRESHOLD)
    (stats,) = result.outputs
    assert stats.max_abs == np.nanmax(np.abs(error)) and stats.worst_ratio == np.nanmax(ratio)
    assert stats.worst_example == int(np.nanargmax(ratio)) // error.shape[1]
    assert stats.rms == pytest.approx(np.sqrt(np.nanmean(error**2)), rel=1e-12)
    assert not result.passed


def _agreement_case(n: int = 600, classes: int = 7):
    """Reference and candidate scores with near-ties, flips and a NaN, and per-element bounds."""
    rng = np.random.default_rng(5)
    ref = rng.dirichlet(np.full(classes, 0.3), n).astype(np.float32)
    ref[::9, :2] = [0.4, 0.4 - 1e-6]  # near-ties
    cand = (ref + rng.normal(0, 1e-3, ref.shape)).astype(np.float32)
    cand[::50] = cand[::50, ::-1]  # changed answers
    cand[7, 3] = np.nan
    return {"scores": ref}, {"scores": cand}, rng.integers(0, classes, n), {"scores": np.full(ref.shape, 1e-6)}


FP32_SCORES = HopSpec("ref -> cand", "ref", "cand", (("scores", VALUES),))


@pytest.mark.parametrize("block", [1, 7, 64])
def test_agreement_in_blocks_gives_what_whole_arrays_give(monkeypatch, block):
    """The top-1 agreement, its near-ties and the lossy decisions are taken BLOCK rows at a time: the same report at
    any block size as on the whole arrays."""
    import crossport.parity as parity

    ref, cand, labels, bounds = _agreement_case()
    whole = [compare(spec, ref, cand, labels, bounds).to_dict() for spec in (FP32_SCORES, LOSSY)]
    monkeypatch.setattr(parity, "BLOCK", block)
    assert [compare(spec, ref, cand, labels, bounds).to_dict() for spec in (FP32_SCORES, LOSSY)] == whole
    assert whole[0]["near_ties_excluded"] > 0 and whole[0]["top1_agreement"] < 1.0


def test_a_comparison_holds_no_float64_copy_of_a_whole_output(monkeypatch):
    """At full size one output is 58 MB in float64 and validate compares a dozen hops: a comparison works BLOCK rows
    at a time and keeps per-row results only (NumPy reports its buffers to tracemalloc)."""
    import tracemalloc

    import crossport.parity as parity

    monkeypatch.setattr(parity, "BLOCK", 256)
    ref, cand, labels, bounds = _agreement_case(n=8192, classes=62)
    whole_copy = ref["scores"].size * 8
    for spec in (FP32_SCORES, LOSSY):
        tracemalloc.start()
        try:
            compare(spec, ref, cand, labels, bounds)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < whole_copy / 2, (spec.name, peak, whole_copy)


def test_two_files_errors_are_compared_example_by_example_with_bounds():
    """The RMS ratio of two files' errors against the same exact values: a file 1.1× as noisy is told apart at 4000
    examples and is a tie at 20; one scaled copy of the other has its ratio exactly, with no spread; and for two files
    equally noisy the bounds leave 1 out no more often than their confidence allows (seeded: the same count on every
    machine)."""
    from scipy.stats import binom

    from crossport.parity import CONFIDENCE, error_ratio, squared_errors

    rng = np.random.default_rng(0)
    exact = rng.random((4000, 10))

    def noisy(scale, count=4000):
        return (exact[:count] + scale * 1e-7 * rng.standard_normal((count, 10))).astype(np.float32)

    many = error_ratio(squared_errors(noisy(1.1), exact), squared_errors(noisy(1.0), exact))
    assert 1.0 < many["low"] < 1.1 < many["high"] < 1.2 and many["examples"] == 4000
    few = error_ratio(squared_errors(noisy(1.1, 20), exact[:20]), squared_errors(noisy(1.0, 20), exact[:20]))
    assert few["low"] < 1.0 < few["high"]
    ours = exact + 1e-7 * rng.standard_normal(exact.shape)
    scaled = error_ratio(squared_errors(exact + 1.1 * (ours - exact), exact), squared_errors(ours, exact))
    assert scaled["ratio"] == pytest.approx(1.1) and scaled["low"] == pytest.approx(1.1)
    assert scaled["high"] == pytest.approx(1.1)
    assert error_ratio(squared_errors(ours, exact), squared_errors(exact, exact)) is None  # ours exact: no ratio
    trials = 300
    outside = 0
    for _ in range(trials):
        ratio = error_ratio(squared_errors(noisy(1.0, 500), exact[:500]), squared_errors(noisy(1.0, 500), exact[:500]))
        outside += not ratio["low"] <= 1.0 <= ratio["high"]
    assert outside <= binom.ppf(0.999, trials, 2 * (1 - CONFIDENCE))  # about 2 % of them: 6 expected
