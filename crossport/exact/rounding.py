"""Float32's rounding, as the exact reference's bounds use it (no frameworks: the parity gate reads these too)."""

from __future__ import annotations

import math

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: the flush-to-zero floor of logits
SCORE_FLOOR = U32 * U32  # absolute resolution of probabilities (see crossport.exact's docstring)
FALSE_ALARM = 1e-6  # chance that any element of a run leaves its bound through rounding alone
EXP_ULPS = 2  # vectorised exp in MLAS, Eigen, XNNPack, MKL is accurate to within 2 ulp


def lam(bounds: int, terms: int, false_alarm: float = FALSE_ALARM) -> float:
    """λ such that ``bounds`` dot products of ``terms`` roundings each all hold with probability ≥ 1 − false_alarm."""
    return math.sqrt(2.0 * math.log(2.0 * max(bounds, 1) * max(terms, 1) / false_alarm)) / (1.0 - U32)


def gamma(n: int, lam_: float) -> float:
    """Higham & Mary's probabilistic γ̃(n) for float32."""
    return math.expm1(lam_ * math.sqrt(n) * U32 + n * U32 * U32 / (1.0 - U32))
