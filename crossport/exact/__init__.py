"""The exact answer and how far a correct float32 computation may be from it.

A float64 pass of the reference network gives each output's exact value and, in the same
pass, each element's float32 error bound: Wilkinson's running error analysis with Higham &
Mary's probabilistic constant, λ chosen so that the chance of any element of a run leaving
its bound through rounding alone is below :data:`FALSE_ALARM`. The bound comes in two parts:
the part of B that is a sum of independent roundings, symmetric about zero, and the part that
may keep its sign from input to input (:mod:`crossport.exact.rules`); the parity gate's sign
test (:func:`crossport.parity.compare_exact`) allows for the second. The model is written once,
with its version, in docs/parity.md ("The error model"); each layer type's rule is one entry
of :mod:`crossport.exact.rules`, each ONNX op's reader one entry of
:mod:`crossport.exact.graph`, and float32's constants are :mod:`crossport.exact.rounding`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossport.errors import CrossportError
from crossport.exact.rounding import EXP_ULPS, FALSE_ALARM, FLOAT32_TINY, SCORE_FLOOR, U32, gamma, lam, sign_threshold

__all__ = ["EXP_ULPS", "FALSE_ALARM", "FLOAT32_TINY", "SCORE_FLOOR", "U32", "Exact", "exact_outputs", "fan_ins",
           "folds", "gamma", "lam", "layers_of", "sign_threshold"]


@dataclass(frozen=True)
class Exact:
    """Float64 outputs of the reference network and each element's float32 error bound.

    ``bounds``: B, the most a correct float32 result may be off (the never-wrong outer limit); ``systematic``: the
    part of B that may keep its sign from input to input (:mod:`crossport.exact.rules`), which the sign test allows
    for. Both per output, the shape of ``values``.
    """

    values: dict[str, np.ndarray]  # "logits", "scores": float64 [N, C]
    bounds: dict[str, np.ndarray]
    systematic: dict[str, np.ndarray]
    lam: float
    fan_ins: tuple[int, ...]

    @property
    def network_gamma(self) -> float:
        """Σ γ̃ over the accumulating layers: the relative float32 error any prefix of the network can build up."""
        return sum(gamma(n, self.lam) for n in self.fan_ins)

    def rows(self, index) -> Exact:
        def pick(arrays):
            return {k: v[index] for k, v in arrays.items()}

        return Exact(pick(self.values), pick(self.bounds), pick(self.systematic), self.lam, self.fan_ins)

    def save(self, path) -> None:
        np.savez(path, **{f"value_{k}": v for k, v in self.values.items()},
                 **{f"bound_{k}": v for k, v in self.bounds.items()},
                 **{f"systematic_{k}": v for k, v in self.systematic.items()},
                 lam=np.float64(self.lam), fan_ins=np.asarray(self.fan_ins, dtype=np.int64))

    @classmethod
    def load(cls, path) -> Exact:
        with np.load(path) as arrays:
            def part(prefix):
                return {k.removeprefix(prefix): arrays[k] for k in arrays.files if k.startswith(prefix)}

            return cls(part("value_"), part("bound_"), part("systematic_"), float(arrays["lam"]),
                       tuple(int(n) for n in arrays["fan_ins"]))


def layers_of(model) -> list:
    """The layers of a network (:mod:`crossport.exact.network`: a PyTorch model is traced), in order; each must
    have an error rule."""
    from crossport.exact.network import as_network
    from crossport.exact.rules import RULES, rule_of

    layers = [step.layer for step in as_network(model).steps]
    unknown = sorted({type(layer).__name__ for layer in layers if rule_of(layer) is None})
    if unknown:
        raise CrossportError(
            f"no float32 error model for layer type(s) {', '.join(unknown)}: the parity gate's exact reference "
            f"covers graphs of {', '.join(t.__name__ for t in RULES)}.",
            hint="Add the layer's rule to crossport/exact/rules.py (how it adds and passes on rounding error).",
        )
    return layers


def folds(model) -> bool:
    """Whether an exporter may fold some of the model's constants into its weights (BatchNorm's scale and shift),
    so that its graph's float32 weights are the model's only to within a rounding each."""
    from crossport.exact.rules import rule_of

    return any(rule_of(layer).folds for layer in layers_of(model))


def fan_ins(model) -> tuple[int, ...]:
    """Rounded multiply-adds behind one output of each accumulating layer (fan-in, +1 for a bias)."""
    from crossport.exact.rules import rule_of

    return tuple(rule.terms(layer) for layer in layers_of(model) if (rule := rule_of(layer)).terms is not None)


# The float64 walk keeps, per live tensor, its value and two error parts (and a magnitude after a Linear or Conv):
# chunks are sized so that the largest tensor's share stays within this many bytes.
WALK_BYTES = 256 * 2**20


def exact_outputs(model, images: np.ndarray, *, chunk: int = 8192) -> Exact:
    """Run ``model`` (a PyTorch model or a :class:`crossport.exact.network.Network`) in float64 on float32
    ``images`` [N, ...]; see the module docstring."""
    import copy

    import torch

    from crossport.exact.network import as_network

    sample = torch.from_numpy(np.ascontiguousarray(images[:1], dtype=np.float32))
    network = as_network(model, sample)
    layers_of(network)  # every layer has a rule, or one line naming those that do not
    counts = fan_ins(network)
    with torch.no_grad():  # shapes only: float32 (PyTorch's float64 grouped convolutions are slow at batch 1)
        dots, largest = _per_example(network.eval(), sample)
    network = copy.deepcopy(network).double().eval()
    lam_ = lam(len(images) * dots, max(counts, default=1))
    chunk = max(1, min(chunk, WALK_BYTES // (8 * largest)))
    parts: dict[tuple[str, str], list[np.ndarray]] = {}
    with torch.no_grad():
        for start in range(0, max(len(images), 1), chunk):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk], dtype=np.float32)).double()
            logits, error = _forward_with_bound(network, batch, lam_)
            scores, score_error = _softmax_with_bound(logits, error)
            for output, value, bound in (("logits", logits, error), ("scores", scores, score_error)):
                for part, array in (("value", value), ("bound", bound.total), ("systematic", bound.systematic)):
                    parts.setdefault((part, output), []).append(array.numpy())
    joined = {key: np.concatenate(value) for key, value in parts.items()}

    def part(name):
        return {output: joined[(name, output)] for output in ("logits", "scores")}

    return Exact(part("value"), part("bound"), part("systematic"), lam_, counts)


def _per_example(network, sample) -> tuple[int, int]:
    """How many dot products (rounded bounds that must all hold) one example's forward pass computes, and the
    element count of its largest tensor."""
    from crossport.exact.rules import rule_of

    values = {network.source: sample}
    count, largest = 0, sample.numel()
    for step in network.steps:
        values[step.output] = y = step.layer(*(values[name] for name in step.inputs))
        largest = max(largest, y.numel())
        if rule_of(step.layer).terms is not None:
            count += y.numel()
    return max(count, 1), largest


def _forward_with_bound(network, x, lam_):
    """The walk: each step's exact output and Error from its inputs' (tensors freed after their last reader). The
    last accumulating layer's bias add reaches the outputs directly, so it is systematic (crossport.exact.rules):
    a second Error, ``constant``, follows it from that layer to the outputs."""
    import torch

    from crossport.exact.rules import Error, constant_added, rule_of

    steps = network.steps
    last = max((i for i, step in enumerate(steps) if rule_of(step.layer).terms is not None), default=None)
    reads = network.last_reads()
    values, constant = {network.source: x}, {}
    errors = {network.source: Error(torch.zeros_like(x), torch.zeros_like(x))}

    for index, step in enumerate(steps):
        rule = rule_of(step.layer)
        xs = [values[name] for name in step.inputs]
        y, errors[step.output] = rule.step(step.layer, xs, [errors[name] for name in step.inputs], lam_)
        if last is not None and index > last and any(name in constant for name in step.inputs):
            passed = [constant[name] if name in constant else Error(torch.zeros_like(v), torch.zeros_like(v))
                      for name, v in zip(step.inputs, xs, strict=True)]
            constant[step.output] = rule.step(step.layer, xs, passed, lam_)[1]
        if index == last:
            bias = getattr(step.layer, "bias", None)
            constant[step.output] = Error(torch.zeros_like(y), constant_added(y, bias))
        values[step.output] = y
        for name in step.inputs:
            if reads.get(name) == index and name != network.target:
                for held in (values, errors, constant):
                    held.pop(name, None)
    error = errors[network.target]
    systematic = FLOAT32_TINY  # kernels may flush subnormal results to zero
    if network.target in constant:
        systematic = systematic + constant[network.target].systematic
    return values[network.target], error.add(systematic=systematic)


def _softmax_with_bound(logits, error):
    """exp(l − max) / Σ: the logits' error to first order, the roundings (random), exp's approximation and the
    flush of probabilities below float32's resolution (systematic)."""
    import torch

    scores = torch.softmax(logits, dim=-1)
    shifted = (logits - logits.max(dim=-1, keepdim=True).values).abs()
    classes = logits.shape[-1]
    passed = error.map(lambda e: scores * (e + (scores * e).sum(dim=-1, keepdim=True)))
    rounding = U32 * (shifted + (scores * shifted).sum(dim=-1, keepdim=True) + classes + 4)
    # each exp within EXP_ULPS: s_c·|r_c − Σ s_j r_j| ≤ 2·EXP_ULPS·u·s_c·(1 − s_c)
    approximation = 2 * EXP_ULPS * U32 * scores * (1 - scores)
    # the denominator Σ exp(l − max) = 1 + t with t ≥ 0: for t below u it rounds down to 1, every time, and
    # every score of the example comes out larger by the factor 1 + t
    above_one = 1.0 / scores.max(dim=-1, keepdim=True).values - 1.0
    stagnation = scores * above_one * (above_one <= U32)
    # below float32's resolution a probability may be flushed to 0 (systematic) or computed to u² (B)
    return scores, passed.add(random=scores * rounding + SCORE_FLOOR,
                              systematic=approximation + stagnation + FLOAT32_TINY)
