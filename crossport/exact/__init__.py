"""The exact answer and how far a correct float32 computation may be from it.

A float64 pass of the reference network gives each output's exact value and, in the same
pass, each element's float32 error bound: Wilkinson's running error analysis with Higham &
Mary's probabilistic constant, λ chosen so that the chance of any element of a run leaving
its bound through rounding alone is below :data:`FALSE_ALARM`. The model is written once,
with its version, in docs/parity.md ("The error model"); each layer type's rule is one entry
of :mod:`crossport.exact.rules`, each ONNX op's reader one entry of
:mod:`crossport.exact.graph`, and float32's constants are :mod:`crossport.exact.rounding`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from crossport.errors import CrossportError
from crossport.exact.rounding import EXP_ULPS, FALSE_ALARM, FLOAT32_TINY, SCORE_FLOOR, U32, gamma, lam

__all__ = ["EXP_ULPS", "FALSE_ALARM", "FLOAT32_TINY", "SCORE_FLOOR", "U32", "Exact", "exact_outputs", "fan_ins",
           "gamma", "lam", "layers_of"]


@dataclass(frozen=True)
class Exact:
    """Float64 outputs of the reference network and each element's float32 error bound."""

    values: dict[str, np.ndarray]  # "logits", "scores": float64 [N, C]
    bounds: dict[str, np.ndarray]  # same keys: the most a correct float32 result may be off
    lam: float
    fan_ins: tuple[int, ...]

    @property
    def network_gamma(self) -> float:
        """Σ γ̃ over the accumulating layers: the relative float32 error any prefix of the network can build up."""
        return sum(gamma(n, self.lam) for n in self.fan_ins)

    @property
    def noise_factor(self) -> float:
        """How much noisier than PyTorch float32 (RMS against the exact values) a correct float32 artifact may be.

        Summation order is the freedom a correct float32 kernel has. A length-n reduction
        summed as p interleaved partial sums has RMS rounding error about √p times smaller
        than summed in one sequence (when the partial sums wander like a random walk, as
        they do over mixed-sign products): one-lane accumulation (TFLite's reference and
        XNNPACK convolutions) against PyTorch's wide vector lanes is measured at 3.5–6× on
        the CNN. With p at most n, no correct order is more than √n apart: the factor is
        √(largest fan-in), 28 for the MLP, 56 for the CNN. Reduced precision is what this
        check exists to catch; its nearest format, TF32 (u = 2⁻¹¹), is 2¹³ times noisier.
        """
        return math.sqrt(max(self.fan_ins, default=1))

    def rows(self, index) -> Exact:
        return Exact({k: v[index] for k, v in self.values.items()}, {k: v[index] for k, v in self.bounds.items()},
                     self.lam, self.fan_ins)

    def save(self, path) -> None:
        np.savez(path, **{f"value_{k}": v for k, v in self.values.items()},
                 **{f"bound_{k}": v for k, v in self.bounds.items()},
                 lam=np.float64(self.lam), fan_ins=np.asarray(self.fan_ins, dtype=np.int64))

    @classmethod
    def load(cls, path) -> Exact:
        with np.load(path) as arrays:
            values = {k.removeprefix("value_"): arrays[k] for k in arrays.files if k.startswith("value_")}
            bounds = {k.removeprefix("bound_"): arrays[k] for k in arrays.files if k.startswith("bound_")}
            return cls(values, bounds, float(arrays["lam"]), tuple(int(n) for n in arrays["fan_ins"]))


def layers_of(model) -> list:
    """The leaf modules of a network that is one chain of layers, in order; each must have an error rule."""
    from crossport.exact.rules import RULES, rule_of

    leaves = [module for module in model.modules() if not list(module.children())]
    unknown = sorted({type(module).__name__ for module in leaves if rule_of(module) is None})
    if unknown:
        raise CrossportError(
            f"no float32 error model for layer type(s) {', '.join(unknown)}: the parity gate's exact reference "
            f"covers chains of {', '.join(t.__name__ for t in RULES)}.",
            hint="Add the layer's rule to crossport/exact/rules.py (how it adds and passes on rounding error).",
        )
    return leaves


def fan_ins(model) -> tuple[int, ...]:
    """Rounded multiply-adds behind one output of each accumulating layer (fan-in, +1 for a bias)."""
    from crossport.exact.rules import rule_of

    return tuple(rule.terms(layer) for layer in layers_of(model) if (rule := rule_of(layer)).terms is not None)


def exact_outputs(model, images: np.ndarray, *, chunk: int = 8192) -> Exact:
    """Run ``model`` in float64 on float32 ``images`` [N, ...]; see the module docstring."""
    import copy

    import torch

    layers = layers_of(model)
    counts = fan_ins(model)
    double = [copy.deepcopy(layer).double().eval() for layer in layers]
    with torch.no_grad():
        sample = torch.from_numpy(np.ascontiguousarray(images[:1], dtype=np.float32)).double()
        dots = _dot_products_per_example(double, sample)
    lam_ = lam(len(images) * dots, max(counts, default=1))
    parts: dict[str, list[np.ndarray]] = {"logits": [], "scores": [], "bound_logits": [], "bound_scores": []}
    with torch.no_grad():
        for start in range(0, max(len(images), 1), chunk):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk], dtype=np.float32)).double()
            logits, error = _forward_with_bound(double, batch, lam_)
            scores, score_error = _softmax_with_bound(logits, error)
            for key, value in (("logits", logits), ("scores", scores), ("bound_logits", error),
                               ("bound_scores", score_error)):
                parts[key].append(value.numpy())
    joined = {key: np.concatenate(value) for key, value in parts.items()}
    return Exact({"logits": joined["logits"], "scores": joined["scores"]},
                 {"logits": joined["bound_logits"], "scores": joined["bound_scores"]}, lam_, counts)


def _dot_products_per_example(layers, sample) -> int:
    """How many dot products (rounded bounds that must all hold) one example's forward pass computes."""
    from crossport.exact.rules import rule_of

    count = 0
    for layer in layers:
        sample = layer(sample)
        if rule_of(layer).terms is not None:
            count += sample[:1].numel()
    return max(count, 1)


def _forward_with_bound(layers, x, lam_):
    import torch

    from crossport.exact.rules import rule_of

    error = torch.zeros_like(x)
    for layer in layers:
        x, error = rule_of(layer).propagate(layer, x, error, lam_)
    return x, error + FLOAT32_TINY  # kernels may flush subnormal results to zero


def _softmax_with_bound(logits, error):
    import torch

    scores = torch.softmax(logits, dim=-1)
    shifted = (logits - logits.max(dim=-1, keepdim=True).values).abs()
    classes = logits.shape[-1]
    propagated = error + (scores * error).sum(dim=-1, keepdim=True)
    rounding = U32 * (shifted + (scores * shifted).sum(dim=-1, keepdim=True) + classes + 2 * EXP_ULPS + 4)
    return scores, scores * (propagated + rounding) + SCORE_FLOOR
