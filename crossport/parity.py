"""The one parity module: every hop of the pipeline is checked here.

A hop compares a candidate artifact's outputs with a reference's on the same inputs:
output names first, then shapes and dtypes, then values, then top-1 agreement and
accuracy. Every failure is collected; :func:`raise_on_failure` raises one ``ParityError``
that lists all of them. Nothing here is a guessed number:

* **fp32 values** are bounded element by element by the float32 error analysis of the
  reference network (:mod:`crossport.exact`): both sides may each be off by ``B`` from
  the exact value, so they may differ by ``2·B``.
* **fp32 artifacts against the exact values** (:func:`compare_exact`): each element within
  ``B``, and the artifact's RMS error per output class at most ``noise_factor`` times
  PyTorch float32's own (the noise floor of float32 itself).
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

    allowed = {}
    for name, tol in spec.outputs:
        ref = np.asarray(reference[name], dtype=np.float64)
        cand = np.asarray(candidate[name], dtype=np.float64)
        if tol.kind == FP32:
            if bounds is None or name not in bounds:
                raise ValueError(f"{spec.name}: output {name!r} is fp32-checked but no error bound was given")
            allowed[name] = 2.0 * np.asarray(bounds[name], dtype=np.float64)
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

    ref_top = np.asarray(reference[spec.agreement_on], dtype=np.float64)
    cand_top = np.asarray(candidate[spec.agreement_on], dtype=np.float64)
    if labels is not None:
        labels = np.asarray(labels)
        result.reference_accuracy = float(np.mean(np.argmax(ref_top, 1) == labels))
        result.candidate_accuracy = float(np.mean(np.argmax(cand_top, 1) == labels))
    if spec.lossy is None:
        _fp32_agreement(result, spec, ref_top, cand_top, allowed.get(spec.agreement_on))
    else:
        _lossy_agreement(result, spec, ref_top, cand_top, labels)
    return result


def _value_stats(name: str, kind: str, ref: np.ndarray, cand: np.ndarray, allowed: np.ndarray | None) -> OutputStats:
    delta = np.abs(cand - ref)
    if delta.size == 0:
        return OutputStats(name, kind, 0.0, 0.0, -1, 0)
    flat_worst = int(np.nanargmax(delta)) if np.any(np.isfinite(delta)) else 0
    rel = delta / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)
    stats = OutputStats(name, kind, max_abs=float(np.nanmax(delta)), max_rel=float(np.nanmax(rel)),
                        worst_example=int(np.unravel_index(flat_worst, delta.shape)[0]), violations=0)
    if allowed is not None:
        ratio = delta / allowed
        # NaN never satisfies <=, so a NaN in the candidate counts as a violation too.
        stats.violations = int(np.sum(~(delta <= allowed)))
        worst = int(np.nanargmax(ratio)) if np.any(np.isfinite(ratio)) else flat_worst
        stats.worst_ratio = float(ratio.flat[worst])
        stats.allowed_at_worst = float(allowed.flat[worst])
        stats.worst_example = int(np.unravel_index(worst, delta.shape)[0])
    return stats


def _top2_gap(ref: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the gap between the two highest values, and their columns (highest first)."""
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
        keep = gap > allowed[rows, first] + allowed[rows, second]
        result.tie_rule = "top-2 reference gap within the two classes' float32 error bounds"
    result.near_ties_excluded = int(np.sum(~keep))
    if not np.any(keep):
        result.failures.append(f"{spec.name}: every example is a near-tie (top-2 gap within the error bound); "
                               "agreement cannot be measured")
        return
    agree = np.argmax(ref[keep], axis=1) == np.argmax(cand[keep], axis=1)
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
    typical = float(np.median(np.max(np.abs(cand - ref), axis=1)))
    margin = 2.0 * typical
    gap, _, _ = _top2_gap(ref) if ref.shape[1] > 1 else (np.full(len(ref), np.inf), None, None)
    keep = gap >= margin
    result.tie_rule = f"top-2 reference gap below 2 × the variant's median max |Δ| ({margin:.3g})"
    result.near_ties_excluded = int(np.sum(~keep))
    decisive = int(np.sum(keep))
    changed = int(np.sum(np.argmax(ref[keep], axis=1) != np.argmax(cand[keep], axis=1)))
    result.top1_agreement = 1.0 - changed / decisive if decisive else None

    as_accurate = (result.candidate_accuracy is not None and result.reference_accuracy is not None
                   and result.candidate_accuracy >= result.reference_accuracy)
    lower, upper = clopper_pearson(changed, decisive, policy.confidence)
    test = f"Clopper-Pearson exact binomial, one-sided {policy.confidence:.0%}"
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
                                     f"McNemar exact conditional (paired), one-sided {policy.confidence:.0%}")
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
    from scipy.stats import beta

    if trials == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    lower = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
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


# --- fp32 artifacts against the exact (float64) values ------------------------------------


@dataclass
class ExactStats:
    name: str
    max_abs: float
    rms: float
    worst_ratio: float  # max |error| / B
    worst_example: int
    noise_ratio: float  # max over classes of RMS error / PyTorch float32's RMS error
    noise_class: int


@dataclass
class ExactResult:
    artifact: str
    judged: bool  # fp32 artifacts are judged; lossy ones only recorded
    noise_factor: float | None
    outputs: list[ExactStats] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": "pass" if self.passed else "fail"}


def compare_exact(artifact: str, outputs: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray],
                  bounds: Mapping[str, np.ndarray], noise_floor: Mapping[str, np.ndarray],
                  noise_factor: float | None) -> ExactResult:
    """An artifact's error against the exact values, next to PyTorch float32's (``noise_floor``).

    ``noise_factor`` None: recorded only (lossy variants). Otherwise every element must be
    within its bound ``B`` and, per output class, the artifact's RMS error at most
    ``noise_factor`` × PyTorch's (floored at the RMS error of rounding the exact value once
    to float32, u·RMS|y|/√3, which no float32 result can beat).
    """
    from crossport.exact import U32

    result = ExactResult(artifact, judged=noise_factor is not None, noise_factor=noise_factor)
    for name in (name for name in ("logits", "scores") if name in outputs and name in values):
        exact = np.asarray(values[name], dtype=np.float64)
        candidate = np.asarray(outputs[name], dtype=np.float64)
        if candidate.shape != exact.shape or exact.size == 0:
            continue  # the hop comparison already reports a wrong shape
        error = candidate - exact
        ratio = np.abs(error) / bounds[name]
        worst = int(np.nanargmax(ratio)) if np.any(np.isfinite(ratio)) else 0
        floor = np.maximum(_column_rms(np.asarray(noise_floor[name], dtype=np.float64) - exact),
                           U32 * _column_rms(exact) / np.sqrt(3.0))
        noise = _column_rms(error) / np.maximum(floor, np.finfo(np.float64).tiny)
        stats = ExactStats(name, float(np.nanmax(np.abs(error))), float(np.sqrt(np.nanmean(error**2))),
                           float(ratio.flat[worst]), int(np.unravel_index(worst, ratio.shape)[0]),
                           float(np.nanmax(noise)), int(np.nanargmax(noise)))
        result.outputs.append(stats)
        if not result.judged:
            continue
        if not np.all(np.isfinite(candidate)) or not stats.worst_ratio <= 1.0:
            result.failures.append(
                f"{artifact}: output {name!r} is {stats.worst_ratio:.3g}× its float32 error bound away from the "
                f"exact value at example {stats.worst_example}")
        if not stats.noise_ratio <= noise_factor:
            result.failures.append(
                f"{artifact}: output {name!r} is {stats.noise_ratio:.3g}× noisier than PyTorch float32 against the "
                f"exact values in class {stats.noise_class} (allowed: {noise_factor:g}×)")
    return result


def _column_rms(values: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(values**2, axis=0))


def raise_on_failure(results: Iterable, detail: str | None = None) -> None:
    """Raise one ``ParityError`` listing every failure of every check, or return quietly."""
    failures = [failure for result in results for failure in result.failures]
    if failures:
        raise ParityError(failures, detail=detail)
