"""The one parity module: every hop of the pipeline is checked here.

A hop compares a candidate artifact's outputs with a reference's on the same inputs:
output names first, then shapes and dtypes, then values, then top-1 agreement. Every
failure is collected and reported; :func:`raise_on_failure` raises one ``ParityError``
that lists all of them. Tolerances are data (:class:`Tolerance`), never literals here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from crossport.errors import ParityError


@dataclass(frozen=True)
class Tolerance:
    """``|candidate - reference| <= atol + rtol * |reference|`` element-wise (numpy ``allclose``).

    ``atol=None`` records the error without bounding it (quantized variants are judged by
    agreement and accuracy instead).
    """

    atol: float | None
    rtol: float
    reason: str


@dataclass(frozen=True)
class HopSpec:
    """One hop to check: which outputs, with which tolerance, and the agreement floor."""

    name: str
    reference: str
    candidate: str
    outputs: tuple[tuple[str, Tolerance], ...]
    min_agreement: float
    agreement_reason: str
    agreement_on: str = "scores"
    # Examples whose two highest reference values are closer than this are near-ties: a
    # candidate within tolerance may legitimately order them either way, so they are left
    # out of top-1 agreement and counted. None: every example counts.
    tie_margin: float | None = None
    # The candidate's accuracy may be at most this far (a fraction) below the reference's.
    max_accuracy_drop: float | None = None


@dataclass
class OutputStats:
    name: str
    atol: float | None
    rtol: float
    max_abs: float
    max_rel: float
    worst_example: int
    violations: int


@dataclass
class HopResult:
    hop: str
    reference: str
    candidate: str
    examples: int
    outputs: list[OutputStats] = field(default_factory=list)
    top1_agreement: float | None = None
    min_agreement: float = 1.0
    near_ties_excluded: int = 0
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["verdict"] = "pass" if self.passed else "fail"
        return payload


def compare(
    spec: HopSpec,
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
) -> HopResult:
    """Compare ``candidate`` with ``reference`` per ``spec``; never raises on drift."""
    wanted = [name for name, _ in spec.outputs]
    if spec.agreement_on not in wanted:
        wanted.append(spec.agreement_on)
    result = HopResult(spec.name, spec.reference, spec.candidate, examples=0, min_agreement=spec.min_agreement,
                       max_accuracy_drop=spec.max_accuracy_drop)

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

    for name, tol in spec.outputs:
        ref = np.asarray(reference[name], dtype=np.float64)
        cand = np.asarray(candidate[name], dtype=np.float64)
        stats = _value_stats(name, ref, cand, tol)
        result.outputs.append(stats)
        if not np.all(np.isfinite(cand)):
            result.failures.append(f"{spec.name}: output {name!r} has non-finite values")
        elif stats.violations:
            result.failures.append(
                f"{spec.name}: output {name!r} max |Δ| {stats.max_abs:.3g} exceeds "
                f"atol {tol.atol:g} + rtol {tol.rtol:g}·|ref| in {stats.violations} element(s), "
                f"worst at example {stats.worst_example}"
            )

    _agreement(result, spec, reference[spec.agreement_on], candidate[spec.agreement_on])
    if labels is not None:
        labels = np.asarray(labels)
        result.reference_accuracy = float(np.mean(np.argmax(reference[spec.agreement_on], 1) == labels))
        result.candidate_accuracy = float(np.mean(np.argmax(candidate[spec.agreement_on], 1) == labels))
        drop = result.reference_accuracy - result.candidate_accuracy
        if spec.max_accuracy_drop is not None and drop > spec.max_accuracy_drop:
            result.failures.append(
                f"{spec.name}: accuracy {result.candidate_accuracy:.2%} is {100 * drop:.2f} points below "
                f"{spec.reference}'s {result.reference_accuracy:.2%} (allowed: {100 * spec.max_accuracy_drop:.2f})"
            )
    return result


def _value_stats(name: str, ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> OutputStats:
    delta = np.abs(cand - ref)
    if delta.size == 0:
        return OutputStats(name, tol.atol, tol.rtol, 0.0, 0.0, -1, 0)
    if tol.atol is None:
        violations = 0
    else:
        bound = tol.atol + tol.rtol * np.abs(ref)
        # NaN never satisfies <=, so a NaN in the candidate counts as a violation too.
        violations = int(np.sum(~(delta <= bound)))
    flat_worst = int(np.nanargmax(delta)) if np.any(np.isfinite(delta)) else 0
    worst_example = int(np.unravel_index(flat_worst, delta.shape)[0])
    rel = delta / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)
    return OutputStats(
        name=name,
        atol=tol.atol,
        rtol=tol.rtol,
        max_abs=float(np.nanmax(delta)),
        max_rel=float(np.nanmax(rel)),
        worst_example=worst_example,
        violations=violations,
    )


def _agreement(result: HopResult, spec: HopSpec, ref: np.ndarray, cand: np.ndarray) -> None:
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64)
    if ref.shape[0] == 0:
        result.failures.append(f"{spec.name}: no examples to compare")
        return
    keep = np.ones(ref.shape[0], dtype=bool)
    if spec.tie_margin is not None and ref.shape[1] > 1:
        top2 = np.sort(ref, axis=1)[:, -2:]
        keep = (top2[:, 1] - top2[:, 0]) >= spec.tie_margin
    result.near_ties_excluded = int(np.sum(~keep))
    if not np.any(keep):
        result.failures.append(f"{spec.name}: every example is a near-tie (top-2 gap < {spec.tie_margin:g}); "
                               "agreement cannot be measured")
        return
    agree = np.argmax(ref[keep], axis=1) == np.argmax(cand[keep], axis=1)
    result.top1_agreement = float(np.mean(agree))
    if result.top1_agreement < spec.min_agreement:
        first = int(np.flatnonzero(keep)[np.flatnonzero(~agree)[0]])
        result.failures.append(
            f"{spec.name}: top-1 agreement {result.top1_agreement:.4%} below {spec.min_agreement:.2%} "
            f"({int(np.sum(~agree))} of {int(np.sum(keep))} differ, first at example {first})"
        )


def raise_on_failure(results: Iterable[HopResult], detail: str | None = None) -> None:
    """Raise one ``ParityError`` listing every failure of every hop, or return quietly."""
    failures = [failure for result in results for failure in result.failures]
    if failures:
        raise ParityError(failures, detail=detail)
