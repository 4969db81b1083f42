"""One error rule per layer type: how a float32 evaluation of the layer adds rounding error and passes on the error
already in its input. :func:`crossport.exact.exact_outputs` runs a chain of layers through these rules; a new layer
type is one entry of :data:`RULES` (the model is in the package docstring, :mod:`crossport.exact`).

Each rule takes the layer (in float64), its exact input ``x``, the bound :class:`Error` on a float32 input's
distance from ``x`` and λ, and returns the layer's exact output and the bound on a float32 output's distance from
it, in two parts:

* ``random``: rounding errors of the layer's own arithmetic and what they become downstream. To first order each is
  a sum of independent roundings, symmetric about zero, so its sign varies from input to input;
* ``systematic``: error that may keep its sign from input to input and reaches the outputs coherently: constants
  a kernel derives from the weights once (BatchNorm's scale folded into the weights, LeakyReLU's slope as a float32
  number), the last layer's bias add (:func:`constant_added`), the softmax's exp approximation, and a rounding whose
  operand sits on one side of a float32 number (a softmax's denominator just above 1).

Their sum is the bound B; the systematic part is what the gate's sign test (:mod:`crossport.parity`) allows for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch  # imported only by the stages that compute exact references
from torch import nn
from torch.nn import functional as F

from crossport.exact.layers import (
    Add,
    Concat,
    GlobalAveragePool,
    HardSigmoid,
    HardSwish,
    Mul,
    Pad,
    Permute,
    Reshape,
    Sub,
    WithConstant,
)
from crossport.exact.rounding import CONSTANT_ROUNDINGS, EXP_ULPS, SIGMOID_ULPS, TANH_ULPS, U32, gamma

# Where an error crosses a kink (ReLU's 0, a max-pool's near-tie) it comes out one-sided. B keeps the whole effect;
# the systematic part does not: the error must be within its own size of the kink to cross, which happens on a
# fraction of inputs proportional to it, so the one-sided total is second order in u, like the products of two
# roundings that the running error analysis drops (docs/parity.md, "The error model").
# A hidden layer's bias add is fixed per unit while the unit's sum stays in one binade, but it is one rounding of
# the n + 1 behind the unit, each unit's with its own sign, and reaches an output only mixed through many units:
# B counts it, the sign test takes it as random. What reaches the outputs directly (the last layer's bias add, the
# softmax's exp), with one sign for a whole layer (BatchNorm's folded constants, LeakyReLU's slope), or leans over
# a range of inputs (a vectorised function's approximation error) is systematic. docs/parity.md, "The error
# model", states this and its check at full size.


class Error(NamedTuple):
    """Bounds on a float32 value's distance from the exact one: the symmetric part and the systematic part."""

    random: torch.Tensor
    systematic: torch.Tensor
    # Σ|w·x| + |b| behind each element when the layer that made it was a Linear or Conv, the size of what folding
    # constants into its weights rounds (a BatchNorm right after it reads it); None after any other layer
    magnitude: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        return self.random + self.systematic

    def map(self, move: Callable) -> Error:
        """Both parts through the same linear, non-negative map (a |W| product, a pool, a reshape); a part that is
        the number 0 (no incoming error) stays 0."""
        return Error(*(move(part) if torch.is_tensor(part) else part for part in (self.random, self.systematic)))

    def add(self, random=0.0, systematic=0.0) -> Error:
        return Error(self.random + random, self.systematic + systematic)


def coherent(y: torch.Tensor, error: Error, repeats: Callable | None = None) -> Error:
    """``error`` with the random part of every element whose exact value another input of the batch shares at the
    same position (and is not 0) moved to the systematic part; the bound B, their sum, is unchanged.

    The sign test takes roundings to be independent from one input to the next. That holds where the inputs differ;
    where a saturated activation (ReLU6 at 6, a HardSigmoid at 1) makes a whole region of a map the same number for
    many inputs, everything computed from it is the same computation on each, with the same rounding: an error that
    keeps its sign across inputs, which is what the systematic part is for. A shared 0 is left alone: a ReLU's
    zeros come from inputs that differ, and a product or sum of zeros rounds nothing. The batch is one walk's
    chunk (crossport.exact.WALK_BYTES), which holds many inputs of each class for the models this matters to.
    ``repeats()``, where given, is :func:`repeated` of ``y`` already known (the walk carries it through layers that
    keep it, :attr:`Rule.repeats`)."""
    if (y.dim() < 1 or y.shape[0] < 2 or not torch.is_tensor(error.random) or error.random.shape != y.shape
            or not bool(error.random.any())):  # nothing to move (an exact input, moved on): no search
        return error
    found = repeats() if repeats is not None else repeated(y.reshape(y.shape[0], -1)).reshape(y.shape)
    shared = found & (y != 0)
    if not shared.any():
        return error
    moved = torch.where(shared, error.random, torch.zeros_like(error.random))
    return error._replace(random=error.random - moved, systematic=error.systematic + moved)


PAIRWISE = 16  # batches up to this size are searched by comparing shifted copies: b − 1 passes, no sort


class Repeats(NamedTuple):
    """:func:`repeated` of a tensor (its shape), and each column's sort order where the search sorted ([b, M])."""

    found: torch.Tensor
    order: torch.Tensor | None = None


def repeated(flat: torch.Tensor) -> torch.Tensor:
    """Per element of ``flat`` [b, M], whether another row holds the same value in the same column."""
    return search(flat).found


def search(flat: torch.Tensor, order: torch.Tensor | None = None) -> Repeats:
    """:func:`repeated`, with the sort order it used; given ``order``, the sort order of a tensor that ``flat`` is a
    monotone function of, column by column, its values are in order along it already, and nothing is sorted."""
    if order is None and len(flat) <= PAIRWISE:  # the deep networks' walks (8 images for resnet18): 3–4× faster
        found = torch.zeros_like(flat, dtype=torch.bool)
        for shift in range(1, len(flat)):
            equal = flat[shift:] == flat[:-shift]
            found[shift:] |= equal
            found[:-shift] |= equal
        return Repeats(found)
    if order is None:
        ordered, order = flat.sort(dim=0)
    else:  # a monotone function keeps ties together: equal values are neighbours along the input's order
        ordered = flat.gather(0, order)
    equal = ordered[1:] == ordered[:-1]
    found = torch.zeros_like(ordered, dtype=torch.bool)
    found[1:] |= equal
    found[:-1] |= equal
    return Repeats(torch.zeros_like(found).scatter_(0, order, found), order)


class Searches:
    """:class:`Repeats` of a walk's tensors, each searched once, when :func:`coherent` first asks, or carried from
    its producer's input through a layer that keeps it (:attr:`Rule.repeats`) while that input is still held."""

    def __init__(self, steps, values: dict) -> None:
        self.producers = {step.output: step for step in steps}
        self.values = values  # the walk's exact values, by tensor name (it frees them after their last reader)
        self.known: dict[str, Repeats] = {}  # the walk drops each with its value

    def shared(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Per element of tensor ``name`` (its exact ``value``), whether another input of the batch repeats it."""
        return self.of(name, value).found

    def of(self, name: str, value: torch.Tensor) -> Repeats:
        if name not in self.known:
            step, carried = self.producers.get(name), None
            if step is not None and step.inputs[0] in self.values and rule_of(step.layer).repeats is not None:
                source = step.inputs[0]
                carried = rule_of(step.layer).repeats(step.layer, self.of(source, self.values[source]), value)
            if carried is None:  # no layer that keeps it, its input freed, or no order to search along
                flat = search(value.reshape(len(value), -1))
                carried = flat._replace(found=flat.found.reshape(value.shape))
            self.known[name] = carried
        return self.known[name]


def _affine(layer, xs, tangents):
    """J·t for a layer that is affine in its inputs: ``layer(t) − layer(0)`` (the bias or shift taken out)."""
    return layer(*tangents) - layer(*(torch.zeros_like(t[:1]) for t in tangents))


@dataclass(frozen=True)
class Rule:
    propagate: Callable  # (layer, x, error: Error, λ) -> (exact output, its Error); x, error tuples for 2+ inputs
    terms: Callable | None = None  # layer -> rounded multiply-adds behind one output (None: the layer sums nothing)
    folds: bool = False  # its float32 constants are computed from the weights, and exporters fold them into them
    # first order, for the sampled bound (crossport.exact.tangents): (float32 layer, exact inputs, tangents
    # [samples·N, ...]) -> J·t, the change a small change t of the inputs makes; the default is for affine layers
    linear: Callable = _affine
    # (layer, exact inputs) -> |∂y/∂x| for a layer that maps each element of its one input to the same element of
    # its output (elementwise functions, BatchNorm, a constant): its input's own error may then be added to the
    # layer's, scaled, and drawn once (crossport.exact.tangents); None for any other layer
    scale: Callable | None = None
    # (layer, Repeats of x, y) -> Repeats of y (off y's zeros, which coherent ignores), or None to search y: for a
    # layer that gives equal outputs exactly where its inputs are equal (moves, the identity, ReLU above 0) or that
    # is monotone in each column; the walk carries :func:`repeated` through it instead of sorting again. None for
    # any other layer
    repeats: Callable | None = None
    # (layer, exact inputs) -> the exact output alone, the very tensor ``propagate`` returns, for a layer whose error
    # costs as much again (a Linear's or Conv's |W|·|x|): the lower bound's walk (crossport.exact.walks) reads only
    # values before its tail. None: ``propagate``'s output is taken
    value: Callable | None = None

    def step(self, layer, xs: list, errors: list, lam_):
        """``propagate`` on a step's inputs: one as itself, several as tuples."""
        if len(xs) == 1:
            return self.propagate(layer, xs[0], errors[0], lam_)
        return self.propagate(layer, tuple(xs), tuple(errors), lam_)


def constant_added(y, bias):
    """Adding a constant (a bias) to a sum larger than it rounds by the constant's bits below the sum's last place:
    the same error for every input whose output lies in the same binade. At most half an ulp of the output (and at
    most the constant itself); 0 without a bias. It is one of the n + 1 roundings γ̃(n + 1) counts; where the layer
    is the last (its outputs are the network's), it is systematic too (crossport.exact.exact_outputs)."""
    if bias is None:
        return torch.zeros_like(y)
    half_ulp = torch.ldexp(torch.ones_like(y), torch.frexp(y).exponent - 25) * (y != 0)
    shape = (1, -1) + (1,) * (y.dim() - 2)
    return torch.minimum(half_ulp, bias.abs().view(shape).expand_as(y))


def _applied(layer, xs):
    """The layer itself on its one exact input: what :func:`_linear` and :func:`_conv2d` return as the output."""
    return layer(xs[0])


def _linear(layer, x, error, lam_):
    g = gamma(layer.in_features + 1, lam_)
    weight = layer.weight.abs()
    magnitude = F.linear(x.abs(), weight) + (layer.bias.abs() if layer.bias is not None else 0.0)
    return layer(x), error.map(lambda e: F.linear(e, weight)).add(random=g * magnitude)._replace(magnitude=magnitude)


def _conv_terms(layer) -> int:
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size)


def _conv2d(layer, x, error, lam_):
    g = gamma(_conv_terms(layer) + 1, lam_)
    weight = layer.weight.abs()

    def conv(value, bias=None):
        return F.conv2d(value, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    magnitude = conv(x.abs(), layer.bias.abs() if layer.bias is not None else None)
    return layer(x), error.map(conv).add(random=g * magnitude)._replace(magnitude=magnitude)


def _batch_norm(layer, x, error, lam_):
    scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    shift = layer.bias - layer.running_mean * scale
    shape = (1, -1) + (1,) * (x.dim() - 2)
    scale, shift, mean_scaled = scale.view(shape), shift.view(shape), (layer.running_mean * scale).view(shape)
    scaled = scale.abs() * x.abs()
    # the scale and shift are computed once, from float32 parameters, and often folded into the weights of the layer
    # before, where each folded weight's rounding counts with the size of its product, |scale|·Σ|w·x|
    folded = scale.abs() * (error.magnitude if error.magnitude is not None else x.abs())
    constants = CONSTANT_ROUNDINGS * U32 * (folded + layer.bias.abs().view(shape) + mean_scaled.abs())
    return x * scale + shift, error.map(lambda e: scale.abs() * e).add(
        random=gamma(2, lam_) * (scaled + shift.abs()), systematic=constants)


def _kinked(x, error, kink, slope_below, slope_above) -> Error:
    """A function with slope ``slope_below`` below ``kink`` and ``slope_above`` above it: the error passes on scaled
    by the slope on x's side; an error large enough to cross the kink adds at most
    |slope_above − slope_below|·(|error| − |x − kink|), in B only (a kink crossing: see the top of this module)."""
    slope = torch.where(x > kink, torch.as_tensor(abs(slope_above), dtype=x.dtype),
                        torch.as_tensor(abs(slope_below), dtype=x.dtype))
    crossing = abs(slope_above - slope_below) * torch.clamp(error.total - (x - kink).abs(), min=0.0)
    return Error(error.random * slope + crossing, error.systematic * slope)


def _samples(x, t):
    """The tangents [samples·N, ...] of an input x [N, ...] as [samples, N, ...]."""
    return t.view(-1, *x.shape)


def _slope(layer, x):
    """An elementwise function's derivative at the exact input (elementwise layers hold no tensors)."""
    from torch.func import jvp

    return jvp(layer, (x,), (torch.ones_like(x),))[1]


def _by_slope(layer, xs, tangents):
    """J·t for an elementwise function: its derivative at the exact input times each tangent."""
    x, t = xs[0], tangents[0]
    return (_samples(x, t) * _slope(layer, x).to(t.dtype)).flatten(0, 1)


def _slope_size(layer, xs):
    return _slope(layer, xs[0]).abs()


def _batch_norm_scale(layer, xs):
    scale = (layer.weight / torch.sqrt(layer.running_var + layer.eps)).abs()
    return scale.view((1, -1) + (1,) * (xs[0].dim() - 2))


def _constant_scale(layer, xs):
    c = layer.constant.abs()
    return {"mul": c, "div": 1 / c}.get(layer.op, torch.ones_like(c))


def _relu(layer, x, error, lam_):
    return torch.relu(x), _kinked(x, error, 0.0, 0.0, 1.0)  # a unit farther below 0 than its error stays 0, exactly


def _leaky_relu(layer, x, error, lam_):
    slope = layer.negative_slope
    below = (x < 0) * (slope * x).abs()
    # the product a·x is rounded (random); the slope itself is a float32 number near the model's (systematic)
    return layer(x), _kinked(x, error, 0.0, slope, 1.0).add(random=U32 * below, systematic=U32 * below)


def _elu(layer, x, error, lam_):
    negative = x < 0
    approximation = layer.alpha * EXP_ULPS * U32 * torch.exp(torch.clamp(x, max=0))
    passed = _kinked(x, error, 0.0, layer.alpha, 1.0)  # the slope below 0 is α·eˣ ≤ α, and α at 0
    return layer(x), passed.add(random=2 * U32 * layer(x).abs() * negative, systematic=approximation * negative)


def _smooth(function, derivative, ulps, scale):
    """A smooth squashing function: the input error passes on scaled by the largest slope within it, the result is
    rounded once (random) and the vectorised approximation is within ``ulps`` of ``scale(y)`` (systematic: its
    error is a fixed function of the input, and leans one way over ranges of inputs)."""

    def propagate(layer, x, error, lam_):
        y = function(x)
        farthest = torch.clamp(x.abs() - error.total, min=0.0)  # the slope is largest nearest 0
        slope = derivative(farthest)
        return y, error.map(lambda e: slope * e).add(random=U32 * y.abs(), systematic=ulps * U32 * scale(y))

    return propagate


def _clip(layer, x, error, lam_):
    """``clamp(x, lo, hi)`` (ReLU6, a Clip): no arithmetic; the error passes where x is inside, and crossing either
    end adds at most the error beyond it, in B only (a kink crossing)."""
    lo, hi = layer.min_val, layer.max_val
    inside = ((x > lo) & (x < hi)).to(x.dtype)
    nearest = torch.minimum((x - lo).abs(), (x - hi).abs())
    crossing = torch.clamp(error.total - nearest, min=0.0)
    return layer(x), Error(error.random * inside + crossing, error.systematic * inside)


def _largest_slope(slope, kinks, x, reach):
    """max |f'| over [x − reach, x + reach] for a piecewise function whose |f'| is convex between its kinks: at the
    interval's ends and at the kinks it covers (approached from either side)."""
    ends = [slope(x - reach), slope(x + reach)]
    for kink, sides in kinks:
        covered = ((x - kink).abs() <= reach).to(x.dtype)
        ends += [covered * side for side in sides]
    return torch.stack(ends).amax(dim=0)


def _hard_sigmoid(layer, x, error, lam_):
    """``clip(α·x + β, 0, 1)``: slope α between the kinks; a multiply and an add rounded (random), and α as a float32
    number (systematic: the same relative error for every input)."""
    alpha, beta = _alpha(layer), _beta(layer)
    lo, hi = (-beta / alpha, (1 - beta) / alpha) if alpha > 0 else ((1 - beta) / alpha, -beta / alpha)
    y = layer(x)
    inside = ((x > lo) & (x < hi)).to(x.dtype)
    reach = error.total
    slope = abs(alpha) * torch.maximum(inside, ((x - lo).abs() <= reach).to(x.dtype) + ((x - hi).abs() <= reach))
    slope = torch.clamp(slope, max=abs(alpha))
    linear = (alpha * x).abs()
    # near a kink the rounded α·x + β may land on the other side: within the same γ̃(2)·(|α·x| + |β|)
    return y, error.map(lambda e: slope * e).add(random=gamma(2, lam_) * (linear + abs(beta)),
                                                 systematic=U32 * linear * inside)


def _hard_swish(layer, x, error, lam_):
    """``x·h(x)``, h = clip(α·x + β, 0, 1) (α = 1/6, β = 1/2 unless the layer says): f' is 0 below the lower kink,
    2α·x + β between, 1 above; the error passes scaled by the largest |f'| within its reach. Runtimes compute it in
    one of two forms, and the rule bounds both (docs/parity.md, "HardSwish's rule"):

    * ``x·relu6(x + 3)/6`` (TensorFlow's, PyTorch's): three roundings of at most |x|·h(x) (random);
    * ``x·clip(x/6 + 1/2, 0, 1)`` (ONNX Runtime's, TFLite's HARD_SWISH kernel): two (the shift, the product), and
      the rounding of α·x, u·|α·x| whatever h(x) is, which the product with x makes u·|x|·|α·x| (random), as large
      as 1.5u at −3 where |x|·h(x) is 0.

    The rule counts four roundings of |x|·h(x), one more than either form has: a spare, kept.

    The systematic part is α itself: ONNX's is the float32 number nearest 1/6, and a runtime's may differ from it
    by u·α, which moves the output by u·|x|·|α·x| where α multiplies x (and its kink with it) or by u·|x|·h(x)
    where 1/6 multiplies the product."""
    alpha, beta = _alpha(layer), _beta(layer)
    lo, hi = -beta / alpha, (1 - beta) / alpha
    y = layer(x)

    def slope(t):
        return torch.where(t < lo, torch.zeros_like(t), torch.where(t > hi, torch.ones_like(t),
                                                                     (2 * alpha * t + beta).abs()))

    largest = _largest_slope(slope, ((lo, (0.0, abs(beta))), (hi, (abs(2 - beta), 1.0))), x, error.total)
    h = torch.clamp(alpha * x + beta, 0.0, 1.0)
    shifted = x.abs() * (alpha * x).abs()  # |x|·|α·x|: what a rounding of α·x becomes in the product with x
    inside = ((x > lo) & (x < hi)).to(x.dtype)
    # just below the lower kink a rounded α·x + β may come out positive: a product of |x|·u·|α·x|
    near = ((x - lo).abs() <= 2 * U32 * x.abs()).to(x.dtype)
    random = 4 * U32 * (x.abs() * h + near * shifted) + U32 * inside * shifted
    return y, error.map(lambda e: largest * e).add(random=random,
                                                 systematic=U32 * torch.maximum(x.abs() * h, inside * shifted))


def _add(layer, xs, errors, lam_):
    """``a ± b``: the errors add (broadcast), and the result is rounded once (random)."""
    y = layer(*xs)
    return y, Error(errors[0].random + errors[1].random + U32 * y.abs(), errors[0].systematic + errors[1].systematic)


def _mul(layer, xs, errors, lam_):
    """``a · b``: to first order |b|·δa + |a|·δb, and the product rounded once (random)."""
    (a, b), (da, db) = xs, errors
    y = layer(a, b)
    return y, Error(b.abs() * da.random + a.abs() * db.random + U32 * y.abs(),
                    b.abs() * da.systematic + a.abs() * db.systematic)


def _concat(layer, xs, errors, lam_):
    def joined(parts):
        return layer(*(torch.broadcast_to(torch.as_tensor(p, dtype=x.dtype), x.shape) for p, x in zip(parts, xs,
                                                                                                        strict=True)))

    return layer(*xs), Error(joined(e.random for e in errors), joined(e.systematic for e in errors))


def _max_pool(layer, x, error, lam_):
    """The window's largest input brings its error (at most the window's largest); an error large enough to let
    another input overtake it adds at most 2·max|δ| − gap, in B only (a kink crossing)."""
    y, passed = layer(x), error.map(layer)
    if not torch.is_tensor(error.total):  # no incoming error: nothing to overtake with
        return y, passed
    overtaking = torch.clamp(2 * layer(error.total) - _window_gap(layer, x, y), min=0.0)
    return y, passed.add(random=overtaking)


def _window_gap(layer, x, y):
    """Per pooled output ``y``, the gap between the window's two largest inputs."""
    from torch.nn.modules.utils import _pair

    kernel, stride = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
    padding, dilation = _pair(layer.padding), _pair(layer.dilation)
    out_h, out_w = y.shape[-2:]
    # pad to cover every window, ceil_mode's partial last ones included; the padding never wins a max
    need = [(out - 1) * s + d * (k - 1) + 1 for out, s, d, k in zip((out_h, out_w), stride, dilation, kernel,
                                                                      strict=True)]
    extra = [max(0, n - (size + 2 * p)) for n, size, p in zip(need, x.shape[-2:], padding, strict=True)]
    padded = F.pad(x, (padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0]), value=-math.inf)
    # the two largest of each window, one position of the window at a time (a strided view each: no window is
    # copied out, as unfold and topk would); a tie makes the second equal to the first
    first = second = torch.full_like(y, -math.inf)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            at = padded[..., i * dilation[0] : i * dilation[0] + (out_h - 1) * stride[0] + 1 : stride[0],
                        j * dilation[1] : j * dilation[1] + (out_w - 1) * stride[1] + 1 : stride[1]]
            second = torch.maximum(second, torch.minimum(first, at))
            first = torch.maximum(first, at)
    return first - second


def _global_average(layer, x, error, lam_):
    """A sum of ``size`` terms (γ̃(size)) divided by the count, or multiplied by its reciprocal: that constant's
    rounding is the same relative error on every output (systematic)."""
    y = layer(x)
    return y, error.map(layer).add(random=gamma(layer.size, lam_) * layer(x.abs()), systematic=U32 * y.abs())


def _average_pool(layer, x, error, lam_):
    """Each window's sum of k terms (γ̃(k)) times the reciprocal of its count: that constant's rounding is the same
    relative error on every output (systematic), as for a global average pool."""
    y = layer(x)
    return y, error.map(layer).add(random=gamma(_window(layer), lam_) * layer(x.abs()), systematic=U32 * y.abs())


def _window(layer) -> int:
    from torch.nn.modules.utils import _pair

    return math.prod(_pair(layer.kernel_size))


def _pad(layer, x, error, lam_):
    """No arithmetic: the padding value is exact, its error 0."""
    return layer(x), error.map(lambda e: F.pad(e, layer.pads, value=0.0))


def _with_constant(layer, x, error, lam_):
    """``x ∘ c``: the error passes scaled by |∂y/∂x| (1, or |c|, or 1/|c|), the result is rounded once (random); a
    division may be a multiply by c's rounded reciprocal, the same relative error on every input (systematic)."""
    y = layer(x)
    c = layer.constant.abs()
    slope = {"mul": c, "div": 1 / c}.get(layer.op, torch.ones_like(c))
    reciprocal = U32 * y.abs() if layer.op == "div" else 0.0
    return y, error.map(lambda e: slope * e).add(random=U32 * y.abs(), systematic=reciprocal)


def _max_pool_linear(layer, xs, tangents):
    """J·t for a max pool: the tangent of each window's largest input."""
    x, t = xs[0], tangents[0]
    _, index = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                            ceil_mode=layer.ceil_mode, return_indices=True)
    index = index.repeat(t.shape[0] // x.shape[0], 1, 1, 1)
    return t.flatten(2).gather(2, index.flatten(2)).view(index.shape)


def _mul_linear(layer, xs, tangents):
    """J·t for ``a · b``: b·t_a + a·t_b."""
    (a, b), (ta, tb) = xs, tangents
    return (_samples(a, ta) * b.to(ta.dtype) + _samples(b, tb) * a.to(tb.dtype)).flatten(0, 1)


def _alpha(layer) -> float:
    return getattr(layer, "alpha", 1 / 6)  # PyTorch's Hardsigmoid and Hardswish: 1/6 and 1/2


def _beta(layer) -> float:
    return getattr(layer, "beta", 0.5)


def _moves_values(layer, x, error, lam_):
    return layer(x), error.map(layer)  # no arithmetic: values and their errors move together


def _monotone_if_rising(layer, repeats: Repeats, y) -> Repeats | None:
    """LeakyReLU is monotone where its slope below 0 is not negative."""
    return _monotone(layer, repeats, y) if layer.negative_slope >= 0 else None


def _moved(layer, repeats: Repeats, y) -> Repeats:
    """The elements move with the values (a reshape, a permutation of all but the batch), and each column's order
    with its column."""
    order = None if repeats.order is None else layer(repeats.order.view(repeats.found.shape)).flatten(1)
    return Repeats(layer(repeats.found), order)


def _kept(layer, repeats: Repeats, y) -> Repeats:
    """Each element stays where it is, with its value (the identity) or off zero (ReLU: its new zeros are shared
    zeros, which coherent ignores; it is monotone too, so the order holds)."""
    return repeats


def _monotone(layer, repeats: Repeats, y) -> Repeats | None:
    """A function monotone in each column (BatchNorm's scale and shift per channel, a clamp): new ties may appear
    (two inputs rounded to one output, a saturation), but only between neighbours in the input's order, so the
    search needs no sort; without an order (a pairwise search) it searches again (None)."""
    if repeats.order is None:
        return None
    found, order = search(y.reshape(len(y), -1), repeats.order)
    return Repeats(found.reshape(y.shape), order)


RULES: dict[type, Rule] = {
    nn.Linear: Rule(_linear, lambda layer: layer.in_features + (layer.bias is not None), value=_applied),
    nn.Conv2d: Rule(_conv2d, lambda layer: _conv_terms(layer) + (layer.bias is not None), value=_applied),
    nn.ReLU: Rule(_relu, linear=_by_slope, scale=_slope_size, repeats=_kept),
    nn.LeakyReLU: Rule(_leaky_relu, linear=_by_slope, scale=_slope_size, repeats=_monotone_if_rising),
    nn.ELU: Rule(_elu, linear=_by_slope, scale=_slope_size),
    nn.Tanh: Rule(_smooth(torch.tanh, lambda m: 1 - torch.tanh(m) ** 2, TANH_ULPS, torch.abs), linear=_by_slope,
                  scale=_slope_size),
    nn.Sigmoid: Rule(_smooth(torch.sigmoid, lambda m: torch.sigmoid(m) * torch.sigmoid(-m), SIGMOID_ULPS,
                             lambda y: torch.maximum(y, 1 - y)), linear=_by_slope, scale=_slope_size),
    nn.Hardtanh: Rule(_clip, linear=_by_slope, scale=_slope_size, repeats=_monotone),  # ReLU6 and ONNX Clip
    nn.Hardsigmoid: Rule(_hard_sigmoid, linear=_by_slope, scale=_slope_size, repeats=_monotone),
    HardSigmoid: Rule(_hard_sigmoid, linear=_by_slope, scale=_slope_size, repeats=_monotone),
    nn.Hardswish: Rule(_hard_swish, linear=_by_slope, scale=_slope_size),
    HardSwish: Rule(_hard_swish, linear=_by_slope, scale=_slope_size),
    Add: Rule(_add),
    Sub: Rule(_add),
    Mul: Rule(_mul, linear=_mul_linear),
    Concat: Rule(_concat),
    nn.MaxPool2d: Rule(_max_pool, linear=_max_pool_linear),
    nn.AvgPool2d: Rule(_average_pool, _window),
    WithConstant: Rule(_with_constant, scale=_constant_scale),
    Pad: Rule(_pad),
    nn.Flatten: Rule(_moves_values, repeats=_moved),
    nn.Unflatten: Rule(_moves_values, repeats=_moved),
    nn.Dropout: Rule(_moves_values, scale=lambda layer, xs: 1.0, repeats=_kept),  # evaluation mode: the identity
    nn.Identity: Rule(_moves_values, scale=lambda layer, xs: 1.0, repeats=_kept),
    nn.BatchNorm2d: Rule(_batch_norm, lambda layer: 2, folds=True, scale=_batch_norm_scale, repeats=_monotone),
    nn.BatchNorm1d: Rule(_batch_norm, lambda layer: 2, folds=True, scale=_batch_norm_scale, repeats=_monotone),
    GlobalAveragePool: Rule(_global_average, lambda layer: layer.size),
    Reshape: Rule(_moves_values, repeats=_moved),
    Permute: Rule(_moves_values, repeats=_moved),
}


def rule_of(layer) -> Rule | None:
    """The rule of the layer's type, or of the nearest base class that has one."""
    return next((RULES[cls] for cls in type(layer).__mro__ if cls in RULES), None)
