"""Float32's rounding, as the exact reference's bounds use it (no frameworks: the parity gate reads these too).

The accuracy of vectorised functions is the one input that is measured, not derived: each runtime's worst error on
a dense grid of 3 million float32 inputs in [−30, 30] (docs/parity.md, "The error model"), rounded up to a power of
two.
"""

from __future__ import annotations

import math

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: the flush-to-zero floor of logits
SCORE_FLOOR = U32 * U32  # absolute resolution of probabilities (see crossport.exact's docstring)
FALSE_ALARM = 1e-6  # chance that a run's bound, or its sign test, refuses a correct artifact through rounding alone
EXP_ULPS = 2  # exp/expm1 (softmax, ELU): worst measured 1.25 (ONNX Runtime), 1.98 (TensorFlow), 1.47 (LiteRT)
TANH_ULPS = 8  # tanh, relative to |y|: worst measured 5.5 (ONNX Runtime, TensorFlow), 4.8 (LiteRT)
# sigmoid, relative to max(y, 1 − y): worst measured 2.8 (ONNX Runtime), 4.3 (TensorFlow), 2.6 (LiteRT)
SIGMOID_ULPS = 8
# BatchNorm's scale γ/√(σ² + ε) and shift β − μ·scale, computed once in float32 and often folded into the weights:
# ε's add, the square root, the divide and the fold for the scale; the product, the subtraction and the fold for
# the shift: at most 5 roundings on either, fixed for every input (so systematic).
CONSTANT_ROUNDINGS = 5


# Gaussian tangents behind the sampled bound (crossport.exact.tangents): their sum of squares over χ²'s lower quantile
# is a confidence limit within √(SAMPLES/q) of what it estimates: 6.2 for digits' test split, 10 for full EMNIST
# byclass (8 samples: 25 and 65); each sample costs one float32 pass of the network's linear part.
SAMPLES = 16


def lam(bounds: int, terms: int, false_alarm: float = FALSE_ALARM) -> float:
    """λ such that ``bounds`` dot products of ``terms`` roundings each all hold with probability ≥ 1 − false_alarm."""
    return math.sqrt(2.0 * math.log(2.0 * max(bounds, 1) * max(terms, 1) / false_alarm)) / (1.0 - U32)


def gamma(n: int, lam_: float) -> float:
    """Higham & Mary's probabilistic γ̃(n) for float32."""
    return math.expm1(lam_ * math.sqrt(n) * U32 + n * U32 * U32 / (1.0 - U32))


def sign_threshold(tests: int, false_alarm: float = FALSE_ALARM) -> float:
    """t such that ``tests`` self-normalised sums of independent symmetric terms all stay below t in absolute value
    with probability ≥ 1 − false_alarm: P(|Σ εᵢaᵢ| ≥ t·√Σaᵢ²) ≤ 2·exp(−t²/2) for fair signs εᵢ (Hoeffding)."""
    return math.sqrt(2.0 * math.log(2.0 * max(tests, 1) / false_alarm))


def sampled_confidence(outputs: int, samples: int = SAMPLES, false_alarm: float = FALSE_ALARM) -> tuple[float, float]:
    """(t, q) for the sampled bound: with probability ≥ 1 − false_alarm, each of ``outputs`` first-order errors
    Σ c_r·δ_r (independent, mean-zero roundings |δ_r| ≤ u) stays within t·u·√(Σ c_r²) (Hoeffding, half the
    chance), and Σ c_r² ≤ S/q for S the sum of squares of ``samples`` Gaussian tangents with variance Σ c_r²
    (S/Σ c_r² is χ² with ``samples`` degrees of freedom; the other half)."""
    from scipy.special import gammaincinv  # χ²(k)'s quantile is 2·P⁻¹(k/2, p), without scipy.stats' 0.4 s import

    share = false_alarm / 2
    return sign_threshold(outputs, share), 2.0 * float(gammaincinv(samples / 2, share / max(outputs, 1)))
