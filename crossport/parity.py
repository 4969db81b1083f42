"""The one parity module: every hop of the pipeline is checked here.

A hop compares a candidate artifact's outputs with a reference's on the same inputs:
output names first, then shapes and dtypes, then values, then top-1 agreement and
accuracy. Every failure is collected; :func:`raise_on_failure` raises one ``ParityError``
that lists all of them. Nothing here is a guessed number:

* **fp32 values** are bounded element by element by the float32 error analysis of the
  reference network (:mod:`crossport.exact`): both sides may each be off by ``B`` from
  the exact value, so they may differ by ``2·B``.
* **fp32 artifacts against the exact values** (:func:`compare_exact`): each element within
  ``B``, and, per output class, a sign test: rounding errors are as often positive as
  negative from one input to the next, so errors that lean one way beyond what the
  systematic part of ``B`` allows (and beyond chance, at a stated false-alarm probability)
  are drift, however small (:data:`SIGN_TEST`).
* **lossy variants** (fp16, int8) are judged by what deployers care about — how often the
  top-1 answer changes and how much accuracy moves — with one-sided exact confidence
  bounds, so the verdict is valid for any test size and says "undecided" when the test
  split is too small to tell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from crossport.errors import ParityError
from crossport.exact.rounding import FALSE_ALARM

FP32 = "fp32"  # both sides compute the same network in float32: |Δ| ≤ 2·B element-wise
CONFIDENCE = 0.99  # the one-sided level of every statistical call crossport makes (verdicts, tests, refusals)
RECORDED = "recorded"  # lossy by design: the error is recorded, the hop is judged by statistics


@dataclass(frozen=True)
class Tolerance:
    kind: str  # FP32 or RECORDED
    reason: str


@dataclass(frozen=True)
class LossyPolicy:
    """What a lossy variant may change, judged with one-sided confidence bounds at ``confidence``."""

    max_disagreement: float  # fraction of decisive examples whose top-1 answer may change
    max_accuracy_drop: float | None  # accuracy points (as a fraction) the variant may lose
    confidence: float
    reason: str


@dataclass(frozen=True)
class HopSpec:
    """One hop to check: which outputs with which tolerance, and how agreement is judged.

    ``lossy`` None: an fp32 hop, where every decisive example must keep its top-1 answer.
    """

    name: str
    reference: str
    candidate: str
    outputs: tuple[tuple[str, Tolerance], ...]
    lossy: LossyPolicy | None = None
    agreement_on: str = "scores"


@dataclass
class OutputStats:
    name: str
    kind: str
    max_abs: float
    max_rel: float
    worst_example: int
    violations: int
    worst_ratio: float | None = None  # max |Δ| / allowed (fp32): 1.0 is the edge of the bound
    allowed_at_worst: float | None = None  # the allowed |Δ| at that element


@dataclass
class Bound:
    """A one-sided confidence interval: estimate, lower and upper bound, the limit and the decision."""

    estimate: float
    lower: float
    upper: float
    limit: float | None
    decision: str  # "pass", "fail", "undecided", or "not applied"
    test: str


@dataclass
class HopResult:
    hop: str
    reference: str
    candidate: str
    examples: int
    outputs: list[OutputStats] = field(default_factory=list)
    top1_agreement: float | None = None
    near_ties_excluded: int = 0
    tie_rule: str = ""
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    disagreement: Bound | None = None
    accuracy_drop: Bound | None = None
    failures: list[str] = field(default_factory=list)
    undecided: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        return "fail" if self.failures else "undecided" if self.undecided else "pass"

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["verdict"] = self.verdict
        return payload


def compare(
    spec: HopSpec,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    bounds: Mapping[str, np.ndarray] | None = None,
) -> HopResult:
    """Compare ``candidate`` with ``reference`` per ``spec``; never raises on drift.

    ``bounds``: per output, each element's float32 error bound ``B`` (:mod:`crossport.exact`);
    required for every FP32 output.
    """
    wanted = [name for name, _ in spec.outputs]
    if spec.agreement_on not in wanted:
        wanted.append(spec.agreement_on)
    result = HopResult(spec.name, spec.reference, spec.candidate, examples=0)

    for side, outputs in (("reference", reference), ("candidate", candidate)):
        missing = [name for name in wanted if name not in outputs]
        if missing:
            result.failures.append(
                f"{spec.name}: {side} {getattr(spec, side)!r} has no output(s) {missing} "
                f"(it has {sorted(outputs)})"
            )
    if result.failures:
        return result

    shapes_ok = True
    for name in wanted:
        ref, cand = np.asarray(reference[name]), np.asarray(candidate[name])
        if ref.shape != cand.shape or ref.dtype != cand.dtype:
            shapes_ok = False
            result.failures.append(
                f"{spec.name}: output {name!r} expected {ref.dtype}{list(ref.shape)} "
                f"(as {spec.reference}), found {cand.dtype}{list(cand.shape)}"
            )
    if not shapes_ok:
        return result
    result.examples = int(np.asarray(reference[spec.agreement_on]).shape[0])

    allowed = {}  # per fp32 output, the bound B: the allowed |Δ| is ALLOWED_BOUNDS·B
    for name, tol in spec.outputs:
        ref, cand = np.asarray(reference[name]), np.asarray(candidate[name])
        if tol.kind == FP32:
            if bounds is None or name not in bounds:
                raise ValueError(f"{spec.name}: output {name!r} is fp32-checked but no error bound was given")
            allowed[name] = np.asarray(bounds[name], dtype=np.float64)
        stats = _value_stats(name, tol.kind, ref, cand, allowed.get(name))
        result.outputs.append(stats)
        if not np.all(np.isfinite(cand)):
            result.failures.append(f"{spec.name}: output {name!r} has non-finite values")
        elif stats.violations:
            result.failures.append(
                f"{spec.name}: output {name!r} max |Δ| {stats.max_abs:.3g} exceeds its float32 error bound in "
                f"{stats.violations} element(s), worst {stats.worst_ratio:.3g}× the bound "
                f"({stats.allowed_at_worst:.3g}) at example {stats.worst_example}"
            )

    # as they are: argmax is the same on float32 values as on their (exact) float64 copies, and where a difference or
    # a gap is taken the rows go float64 a block at a time (_by_rows)
    ref_top, cand_top = np.asarray(reference[spec.agreement_on]), np.asarray(candidate[spec.agreement_on])
    if labels is not None:
        labels = np.asarray(labels)
        result.reference_accuracy = float(np.mean(np.argmax(ref_top, 1) == labels))
        result.candidate_accuracy = float(np.mean(np.argmax(cand_top, 1) == labels))
    if spec.lossy is None:
        _fp32_agreement(result, spec, ref_top, cand_top, allowed.get(spec.agreement_on))
    else:
        _lossy_agreement(result, spec, ref_top, cand_top, labels)
    return result


# Two runtimes' values, each within B of the exact ones, are within 2·B of each other.
ALLOWED_BOUNDS = 2.0
# Rows compared at a time: the float64 differences of EMNIST byclass's full-size test split are 58 MB per array, and
# a comparison needs several at once; in blocks they stay a few MB.
BLOCK = 8192


def _value_stats(name: str, kind: str, ref: np.ndarray, cand: np.ndarray, bound: np.ndarray | None) -> OutputStats:
    """|Δ| between ``cand`` and ``ref`` in float64, BLOCK rows at a time: the largest (NaN ignored, and where it is;
    where no |Δ| is finite, the first element), the largest relative, and with ``bound`` how many exceed
    ALLOWED_BOUNDS·B and the largest |Δ|/allowed (where none is finite, at the largest |Δ|)."""
    if ref.size == 0:
        return OutputStats(name, kind, 0.0, 0.0, -1, 0)
    per_row = ref.size // len(ref)
    worst = _Largest()  # |Δ|
    relative, ratio = _Largest(), _Largest()
    violations = 0
    for start in range(0, len(ref), BLOCK):
        r = np.asarray(ref[start : start + BLOCK], dtype=np.float64)
        delta = np.abs(np.asarray(cand[start : start + BLOCK], dtype=np.float64) - r)
        offset = start * per_row
        worst.update(delta, offset)
        relative.update(delta / np.maximum(np.abs(r), np.finfo(np.float32).tiny), offset)
        if bound is not None:
            allowed = ALLOWED_BOUNDS * np.asarray(bound[start : start + BLOCK], dtype=np.float64)
            # NaN never satisfies <=, so a NaN in the candidate counts as a violation too.
            violations += int(np.sum(~(delta <= allowed)))
            ratio.update(delta / allowed, offset, extra=allowed)
    flat_worst = worst.index if worst.finite else 0
    stats = OutputStats(name, kind, max_abs=worst.value, max_rel=relative.value, worst_example=flat_worst // per_row,
                        violations=0)
    if bound is not None:
        stats.violations = violations
        if ratio.finite:
            at, stats.worst_ratio, stats.allowed_at_worst = ratio.index, ratio.at_index, ratio.extra_at_index
        else:  # the ratio and the allowance at the largest |Δ|
            at = flat_worst
            row, column = divmod(at, per_row)
            allowed_there = ALLOWED_BOUNDS * float(np.asarray(bound[row]).flat[column])
            stats.worst_ratio = float(np.abs(float(np.asarray(cand[row]).flat[column]) - float(
                np.asarray(ref[row]).flat[column])) / allowed_there)
            stats.allowed_at_worst = allowed_there
        stats.worst_example = at // per_row
    return stats


class _Largest:
    """The running ``np.nanmax`` and ``np.nanargmax`` of blocks of one flattened array (the first of equal largest
    values), and whether any value seen is finite."""

    def __init__(self) -> None:
        self.value = float("nan")  # np.nanmax of all NaN
        self.index = 0
        self.finite = False
        self.at_index = float("nan")
        self.extra_at_index: float | None = None

    def update(self, block: np.ndarray, offset: int, extra: np.ndarray | None = None) -> None:
        self.finite = self.finite or bool(np.any(np.isfinite(block)))
        seen = ~np.isnan(block)
        if not np.any(seen):
            return
        local = int(np.argmax(np.where(seen, block, -np.inf)))  # NaN never wins, as in np.nanargmax
        value = float(block.flat[local])
        if np.isnan(self.value) or value > self.value:
            self.value, self.index, self.at_index = value, offset + local, value
            self.extra_at_index = None if extra is None else float(extra.flat[local])


def _by_rows(function, *arrays: np.ndarray):
    """``function`` of the ``arrays``' rows in float64, BLOCK rows at a time; its per-row results (an array or a
    tuple of arrays) joined. A comparison's float64 copies of whole outputs were 58 MB each at EMNIST byclass's full
    size, several at once."""
    parts = [function(*(np.asarray(array[start : start + BLOCK], dtype=np.float64) for array in arrays))
             for start in range(0, len(arrays[0]), BLOCK)]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(column) for column in zip(*parts, strict=True))
    return np.concatenate(parts)


def _top2_gap(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the gap between the two highest values, and their columns (highest first)."""
    return _by_rows(_top2_block, ref)


def _top2_block(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pair = np.argpartition(ref, -2, axis=1)[:, -2:]  # the two highest, in either order
    values = np.take_along_axis(ref, pair, axis=1)
    swap = values[:, 0] > values[:, 1]
    first = np.where(swap, pair[:, 0], pair[:, 1])
    second = np.where(swap, pair[:, 1], pair[:, 0])
    return np.abs(values[:, 1] - values[:, 0]), first, second


def _fp32_agreement(result: HopResult, spec: HopSpec, ref: np.ndarray, cand: np.ndarray,
                    allowed: np.ndarray | None) -> None:
    """Every decisive example keeps its answer; a near-tie is one the error bounds could reorder."""
    if ref.shape[0] == 0:
        result.failures.append(f"{spec.name}: no examples to compare")
        return
    keep = np.ones(ref.shape[0], dtype=bool)
    if allowed is not None and ref.shape[1] > 1:
        gap, first, second = _top2_gap(ref)
        rows = np.arange(len(ref))
        keep = gap > ALLOWED_BOUNDS * (allowed[rows, first] + allowed[rows, second])
        result.tie_rule = "top-2 reference gap within the two classes' float32 error bounds"
    result.near_ties_excluded = int(np.sum(~keep))
    if not np.any(keep):
        width = ""
        if allowed is not None and ref.shape[1] > 1:
            with np.errstate(divide="ignore", invalid="ignore"):
                times = np.median(ALLOWED_BOUNDS * (allowed[rows, first] + allowed[rows, second]) / gap)
            width = (f"; the bound is a median {times:.3g}"
                     "× the gap (a bound far wider than the gap comes from depth: docs/parity.md, 'Deep networks')")
        result.failures.append(f"{spec.name}: every example is a near-tie (top-2 gap within the error bound"
                               f"{width}); agreement cannot be measured")
        return
    agree = (np.argmax(ref, axis=1) == np.argmax(cand, axis=1))[keep]
    result.top1_agreement = float(np.mean(agree))
    if not np.all(agree):
        first_bad = int(np.flatnonzero(keep)[np.flatnonzero(~agree)[0]])
        result.failures.append(
            f"{spec.name}: top-1 answer changed on {int(np.sum(~agree))} of {int(np.sum(keep))} decisive examples "
            f"(agreement {result.top1_agreement:.4%}, first at example {first_bad}); an fp32 artifact may change none"
        )


def _lossy_agreement(result: HopResult, spec: HopSpec, ref: np.ndarray, cand: np.ndarray,
                     labels: np.ndarray | None) -> None:
    policy = spec.lossy
    if ref.shape[0] == 0:
        result.failures.append(f"{spec.name}: no examples to compare")
        return
    # A near-tie is an example whose two highest reference scores are closer than twice
    # the variant's own typical score error: two scores that each move by that much can
    # swap order without the variant being any worse.
    typical = float(np.median(_by_rows(lambda r, c: np.max(np.abs(c - r), axis=1), ref, cand)))
    margin = 2.0 * typical
    gap, _, _ = _top2_gap(ref) if ref.shape[1] > 1 else (np.full(len(ref), np.inf), None, None)
    keep = gap >= margin
    result.tie_rule = f"top-2 reference gap below 2 × the variant's median max |Δ| ({margin:.3g})"
    result.near_ties_excluded = int(np.sum(~keep))
    decisive = int(np.sum(keep))
    changed = int(np.sum((np.argmax(ref, axis=1) != np.argmax(cand, axis=1))[keep]))
    result.top1_agreement = 1.0 - changed / decisive if decisive else None

    as_accurate = (result.candidate_accuracy is not None and result.reference_accuracy is not None
                   and result.candidate_accuracy >= result.reference_accuracy)
    lower, upper = clopper_pearson(changed, decisive, policy.confidence)
    test = f"Clopper-Pearson exact binomial, one-sided {100 * policy.confidence:.4g}%"
    # never failed for disagreeing while at least as accurate as the reference
    decision = "not applied" if as_accurate else _decide(lower, upper, policy.max_disagreement)
    result.disagreement = Bound(changed / decisive if decisive else 0.0, lower, upper, policy.max_disagreement,
                                decision, test)
    _record_decision(result, spec.name, "top-1 disagreement", result.disagreement, decisive)

    if labels is not None and policy.max_accuracy_drop is not None:
        ref_ok = np.argmax(ref, axis=1) == labels
        cand_ok = np.argmax(cand, axis=1) == labels
        lost, gained = int(np.sum(ref_ok & ~cand_ok)), int(np.sum(~ref_ok & cand_ok))
        lower, upper = accuracy_drop_bounds(lost, gained, len(labels), policy.confidence)
        result.accuracy_drop = Bound((lost - gained) / len(labels), lower, upper, policy.max_accuracy_drop,
                                     _decide(lower, upper, policy.max_accuracy_drop),
                                     f"McNemar exact conditional (paired), one-sided {100 * policy.confidence:.4g}%")
        _record_decision(result, spec.name, "accuracy drop", result.accuracy_drop, len(labels))


def _decide(lower: float, upper: float, limit: float) -> str:
    if upper <= limit:
        return "pass"
    if lower > limit:
        return "fail"
    return "undecided"


def _record_decision(result: HopResult, hop: str, what: str, bound: Bound, examples: int) -> None:
    interval = (f"{what} {bound.estimate:.3%} (one-sided bounds {bound.lower:.3%}..{bound.upper:.3%}, "
                f"limit {bound.limit:.2%})")
    if bound.decision == "fail":
        result.failures.append(f"{hop}: {interval} is above the limit with confidence")
    elif bound.decision == "undecided":
        result.undecided.append(f"{hop}: undecided ({examples} examples): {interval}")


def clopper_pearson(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """One-sided exact binomial bounds: P(p < lower) and P(p > upper) are each ≤ 1 − confidence."""
    from scipy.special import betaincinv  # the beta distribution's quantile, without scipy.stats' 0.4 s import

    if trials == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lower = 0.0 if successes == 0 else float(betaincinv(successes, trials - successes + 1, alpha))
    upper = 1.0 if successes == trials else float(betaincinv(successes + 1, trials - successes, 1 - alpha))
    return lower, upper


def accuracy_drop_bounds(lost: int, gained: int, total: int, confidence: float) -> tuple[float, float]:
    """Bounds on (reference accuracy − candidate accuracy) from the discordant pairs.

    Given the ``lost + gained`` examples where exactly one side is right, ``lost`` is
    binomial with rate π and the drop is ``(lost + gained)·(2π − 1)/total`` (McNemar's
    exact conditional test, turned into a confidence bound).
    """
    discordant = lost + gained
    if discordant == 0 or total == 0:
        return 0.0, 0.0
    low, high = clopper_pearson(lost, discordant, confidence)
    return discordant * (2 * low - 1) / total, discordant * (2 * high - 1) / total


def squared_errors(outputs: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Each example's summed squared error [N] of ``outputs`` [N, classes] against the exact values, in float64."""
    return _by_rows(lambda a, b: np.square(a - b).sum(axis=1), outputs, exact)


def error_ratio(theirs: np.ndarray, ours: np.ndarray, confidence: float = CONFIDENCE) -> dict | None:
    """Two files' RMS errors against the same exact values, theirs ÷ ours, from each example's summed squared error
    (:func:`squared_errors`; the examples are the independent draws, an example's classes are not): the ratio of the
    mean squared errors with the delta method's standard error, bounds each holding at ``confidence``, square-rooted.
    Bounds on either side of 1 are a tie at this many examples. None where ours has no error at all."""
    from statistics import NormalDist

    theirs, ours = np.asarray(theirs, np.float64), np.asarray(ours, np.float64)
    if len(ours) < 2 or not ours.mean() > 0:
        return None
    ratio = theirs.mean() / ours.mean()
    spread = NormalDist().inv_cdf(confidence) * np.std(theirs - ratio * ours, ddof=1) / (np.sqrt(len(ours)) *
                                                                                        ours.mean())
    return {"ratio": float(np.sqrt(ratio)), "low": float(np.sqrt(max(ratio - spread, 0.0))),
            "high": float(np.sqrt(ratio + spread)), "examples": len(ours)}


# --- fp32 artifacts against the exact (float64) values ------------------------------------


@dataclass
class ExactStats:
    name: str
    max_abs: float
    rms: float
    worst_ratio: float  # max |error| / B (where the exact values' rows hold L ≤ B instead, a ceiling: Exact.walked)
    worst_example: int
    # max |error| / B on the sign test's probe, where B is walked on every row (None without a probe)
    probe_ratio: float | None = None
    # the sign test (judged artifacts only): the largest T over classes (negative: within the systematic
    # allowance), its class, and the probe inputs it pooled
    sign_statistic: float | None = None
    sign_class: int | None = None
    probed: int | None = None


class Verdict:
    """A check's outcome as data: passed when its ``failures`` (a dataclass field) are none; its report adds the
    verdict."""

    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": "pass" if self.passed else "fail"}


@dataclass
class ExactResult(Verdict):
    artifact: str
    judged: bool  # fp32 artifacts are judged; lossy ones only recorded
    threshold: float | None  # the sign test's t
    outputs: list[ExactStats] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


SIGN_TEST = (
    "on the probe (test images dithered by 1/1024 of their range, so that no two inputs share a sub-computation), "
    "a correct float32 artifact's error in each element, divided by the element's bound B, is a sum of roundings "
    "symmetric about zero and independent from one input to the next, plus a systematic part within its stated "
    "bound b; then, per output class, T = (|Σe/B| − Σb/B) / (√Σ(e/B)² + √Σ(b/B)²) reaches t = √(2·ln(2·tests/α)) "
    "with probability at most α/tests (Hoeffding's inequality for sums with random signs), whatever each "
    "element's scale, so a run of that many tests refuses a correct artifact with probability at most α = 1e-6"
)


def sign_statistics(error: np.ndarray, systematic: np.ndarray) -> np.ndarray:
    """Per column: T = (|Σe| − Σb) / (√Σe² + √Σb²), the sign test's statistic (:data:`SIGN_TEST`).

    With e = a + r, |a| ≤ b and r of random signs, |Σr| ≥ |Σe| − Σb and √Σr² ≤ √Σe² + √Σb², so T ≥ t implies
    |Σr| ≥ t·√Σr², which fair signs reach with probability ≤ 2·exp(−t²/2).
    """
    drift = np.abs(error.sum(axis=0)) - systematic.sum(axis=0)
    spread = np.sqrt((error**2).sum(axis=0)) + np.sqrt((systematic**2).sum(axis=0))
    return drift / np.maximum(spread, np.finfo(np.float64).tiny)


def compare_exact(artifact: str, outputs: Mapping[str, np.ndarray], exact, threshold: float | None,
                  probe: tuple[Mapping[str, np.ndarray], object] | None = None) -> ExactResult:
    """An artifact's error against the exact values (``exact``: :class:`crossport.exact.Exact`).

    ``threshold`` None: recorded only (lossy variants). Otherwise every element must be within its bound ``B`` and,
    per output class, the sign test's T must stay below ``threshold`` (:data:`SIGN_TEST`; the caller sets it for the
    number of tests its run makes, :func:`crossport.exact.sign_threshold`). ``probe``: the artifact's outputs on the
    sign test's own inputs and their exact values (default: ``outputs`` and ``exact``).
    """
    result = ExactResult(artifact, judged=threshold is not None, threshold=threshold)
    probe_outputs, probe_exact = probe or (outputs, exact)
    for name in (name for name in ("logits", "scores") if name in outputs and name in exact.values):
        values, candidate = np.asarray(exact.values[name]), np.asarray(outputs[name])
        probed = np.asarray(probe_outputs.get(name, np.empty(0)), dtype=np.float64)
        if candidate.shape != values.shape or values.size == 0 or probed.shape != probe_exact.values[name].shape:
            continue  # the hop comparison already reports a wrong shape
        largest, ratio, squares, counted = _Largest(), _Largest(), 0.0, 0
        per_row = values.size // len(values)
        for start in range(0, len(values), BLOCK):  # float64 temporaries of BLOCK rows, not of the whole split
            error = np.asarray(candidate[start : start + BLOCK], dtype=np.float64) - values[start : start + BLOCK]
            magnitude = np.abs(error)
            largest.update(magnitude, start * per_row)
            ratio.update(magnitude / exact.bounds[name][start : start + BLOCK], start * per_row)
            squares += float(np.nansum(error**2))
            counted += int(np.sum(~np.isnan(error)))
        worst = ratio.index if ratio.finite else 0
        worst_ratio = ratio.at_index if ratio.finite else float(np.abs(
            float(candidate.flat[0]) - float(values.flat[0])) / float(np.asarray(exact.bounds[name]).flat[0]))
        stats = ExactStats(name, largest.value, float(np.sqrt(squares / counted)) if counted else float("nan"),
                           worst_ratio, worst // per_row)
        result.outputs.append(stats)
        if probe is None and not result.judged:
            continue
        drift = np.nan_to_num(probed - probe_exact.values[name], nan=np.inf)
        if probe is not None and probed.size:
            stats.probe_ratio = float(np.max(np.abs(drift) / probe_exact.bounds[name]))
        if not result.judged:
            continue
        # each element in units of its own bound: weights fixed by the exact values alone, so the signs stay fair
        bound = probe_exact.bounds[name]
        statistic = sign_statistics(drift / bound, probe_exact.systematic[name] / bound)
        stats.sign_class = int(np.nanargmax(statistic)) if np.any(~np.isnan(statistic)) else 0
        stats.sign_statistic, stats.probed = float(statistic[stats.sign_class]), len(probed)
        if not bool(np.all(np.isfinite(candidate))) or not stats.worst_ratio <= 1.0:
            result.failures.append(
                f"{artifact}: output {name!r} is {stats.worst_ratio:.3g}× its float32 error bound away from the "
                f"exact value at example {stats.worst_example}")
        elif not stats.sign_statistic < threshold:
            column = (probed - probe_exact.values[name])[:, stats.sign_class]
            result.failures.append(
                f"{artifact}: output {name!r} drifts one way in class {stats.sign_class}: its errors against the exact "
                f"values sum to {column.sum():.3g} over {stats.probed} probe inputs, T = "
                f"{stats.sign_statistic:.3g} root sums of squares beyond the systematic allowance; rounding alone "
                f"stays below {threshold:.3g} (false-alarm chance ≤ {FALSE_ALARM:g} per run)")
    return result


def near_bound(exact, outputs: Mapping[str, Mapping[str, np.ndarray]], reference: str) -> np.ndarray:
    """The rows on which the checks need B itself where ``exact`` holds its lower bound L (``exact.walked``): some
    output of an fp32 artifact (``outputs``, by runtime, the reference's included) is farther than L from the exact
    value, or not finite, or its top-1 answer is not the reference's (whether that is a near-tie takes B). On every
    other row each artifact is within L ≤ B of the exact values, so within 2·B of each other, and keeps its answer:
    every check there passes with B as it does with L."""
    flagged = np.zeros(len(next(iter(exact.values.values()))), dtype=bool)
    for values in outputs.values():
        for name in (name for name in ("logits", "scores") if name in values and name in exact.values):
            candidate, ours = np.asarray(values[name]), np.asarray(outputs[reference].get(name, values[name]))
            if candidate.shape != exact.values[name].shape or ours.shape != candidate.shape:
                continue  # the hop comparison reports a wrong shape
            flagged |= _by_rows(_near_rows, candidate, exact.values[name], exact.bounds[name], ours)
    return np.flatnonzero(flagged & ~exact.walked if exact.walked is not None else flagged)


def _near_rows(candidate, values, lower, ours) -> np.ndarray:
    """Per row: some element farther than ``lower`` from ``values`` (NaN is never within), or the top-1 answer not
    ``ours``'s."""
    return ~np.all(np.abs(candidate - values) <= lower, axis=1) | (np.argmax(candidate, 1) != np.argmax(ours, 1))


@dataclass
class GraphResult(Verdict):
    """The exported graph's exact function against the model's (both float64, so no float32 noise between them)."""

    max_abs: float
    worst_ratio: float  # max |Δ| / allowed
    worst_example: int
    allowance: str
    failures: list[str] = field(default_factory=list)


FLOAT64_OVER_FLOAT32 = 2.0**-53 / 2.0**-24  # a float64 evaluation's error is B scaled by this


def compare_graph(model, graph, folded: bool) -> GraphResult:
    """Whether the exported graph computes the model's function: their exact logits (``model``, ``graph``:
    :class:`crossport.exact.Exact`) agree to float64 rounding when the graph holds the model's own weights, and
    within the model's float32 bound B when the exporter folded constants into them (``folded``: a float32
    rounding of each folded weight, which a correct float32 evaluation of the model may make too).
    """
    if folded:
        allowed, allowance = np.asarray(model.bounds["logits"]), "B (constants folded into the weights)"
    else:
        allowed = FLOAT64_OVER_FLOAT32 * (model.bounds["logits"] + graph.bounds["logits"])
        allowance = "float64 rounding (the model's own weights)"
    delta = np.abs(np.asarray(graph.values["logits"]) - np.asarray(model.values["logits"]))
    ratio = delta / allowed
    worst = int(np.nanargmax(ratio)) if np.any(np.isfinite(ratio)) else 0
    result = GraphResult(float(np.nanmax(delta)), float(ratio.flat[worst]),
                         int(np.unravel_index(worst, ratio.shape)[0]), allowance)
    if not result.worst_ratio <= 1.0:
        result.failures.append(
            f"exported graph: its exact logits differ from the model's by {result.max_abs:.3g}, "
            f"{result.worst_ratio:.3g}× the allowance ({allowance}) at example {result.worst_example}: the export "
            "changed the model's function")
    return result


def raise_on_failure(results: Iterable, detail: str | None = None) -> None:
    """Raise one ``ParityError`` listing every failure of every check, or return quietly."""
    failures = [failure for result in results for failure in result.failures]
    if failures:
        raise ParityError(failures, detail=detail)
