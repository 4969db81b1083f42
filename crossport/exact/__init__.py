"""The exact answer and how far a correct float32 computation may be from it.

A float64 pass of the reference network gives each output's exact value and, in the same
pass, each element's float32 error bound: Wilkinson's running error analysis with Higham &
Mary's probabilistic constant, λ chosen so that the chance of any element of a run leaving
its bound through rounding alone is below :data:`FALSE_ALARM`. Where that running bound compounds
past the logits themselves (deep networks), the sampled bound of :mod:`crossport.exact.tangents`
is used instead (:func:`walks`). The bound comes in two parts:
the part of B that is a sum of independent roundings, symmetric about zero, and the part that
may keep its sign from input to input (:mod:`crossport.exact.rules`); the parity gate's sign
test (:func:`crossport.parity.compare_exact`) allows for the second. The model is written once,
with its version, in docs/parity.md ("The error model"); each layer type's rule is one entry
of :mod:`crossport.exact.rules`, each ONNX op's reader one entry of
:mod:`crossport.exact.graph`, and float32's constants are :mod:`crossport.exact.rounding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from crossport.errors import CrossportError
from crossport.exact.rounding import (
    EXP_ULPS,
    FALSE_ALARM,
    FLOAT32_TINY,
    SAMPLES,
    SCORE_FLOOR,
    U32,
    gamma,
    lam,
    sampled_confidence,
    sign_threshold,
)

__all__ = ["EXP_ULPS", "FALSE_ALARM", "FLOAT32_TINY", "SCORE_FLOOR", "U32", "Exact", "Plan", "complete",
           "exact_outputs", "fan_ins", "folds", "gamma", "lam", "layers_of", "sign_threshold", "walks"]


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
    # which bound B is: "running", or the first-order bound of crossport.exact.tangents, its Σ c_r² "adjoint"
    # (computed) or "sampled" (estimated)
    bound: str = "running"
    # per row, whether ``bounds`` holds B itself; where not, it holds a lower bound L ≤ B (:func:`exact_outputs`
    # with ``lower``, :func:`complete`). None: B on every row
    walked: np.ndarray | None = None

    @property
    def network_gamma(self) -> float:
        """Σ γ̃ over the accumulating layers: the relative float32 error any prefix of the network can build up."""
        return sum(gamma(n, self.lam) for n in self.fan_ins)

    def rows(self, index) -> Exact:
        def pick(arrays):
            return {k: v[index] for k, v in arrays.items()}

        return Exact(pick(self.values), pick(self.bounds), pick(self.systematic), self.lam, self.fan_ins,
                     self.bound, None if self.walked is None else self.walked[index])

    def save(self, path) -> None:
        if self.walked is not None and not self.walked.all():
            raise ValueError("only a reference with B on every row is saved (complete() walks the rest)")
        np.savez(path, **{f"value_{k}": v for k, v in self.values.items()},
                 **{f"bound_{k}": v for k, v in self.bounds.items()},
                 **{f"systematic_{k}": v for k, v in self.systematic.items()},
                 lam=np.float64(self.lam), fan_ins=np.asarray(self.fan_ins, dtype=np.int64),
                 bound=np.str_(self.bound))

    @classmethod
    def load(cls, path) -> Exact:
        with np.load(path) as arrays:
            def part(prefix):
                return {k.removeprefix(prefix): arrays[k] for k in arrays.files if k.startswith(prefix)}

            return cls(part("value_"), part("bound_"), part("systematic_"), float(arrays["lam"]),
                       tuple(int(n) for n in arrays["fan_ins"]),
                       _bound_of(arrays))


def _bound_of(arrays) -> str:
    """The bound a saved reference used (files written before version 5 of the error model record a flag)."""
    if "bound" in arrays.files:
        return str(arrays["bound"])
    return "sampled" if "sampled" in arrays.files and bool(arrays["sampled"]) else "running"


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


# The float64 walk keeps, per live tensor, its value and two error parts (and a magnitude after a Linear or Conv),
# and for the sampled bound 2·SAMPLES float32 tangents: chunks are sized so that the largest tensor's share stays
# within this many bytes (smaller chunks are no slower: resnet18's sampled walk took 60 s for 96 images at 32 MiB,
# 70 s at 64 MiB and 79 s at 256 MiB, peaking at 1.6, 1.6 and 2.2 GiB).
WALK_BYTES = 64 * 2**20


def exact_outputs(model, images: np.ndarray, *, chunk: int = 8192, bound: str | None = None,
                  lower: bool = False) -> Exact:
    """Run ``model`` (a PyTorch model or a :class:`crossport.exact.network.Network`) in float64 on float32
    ``images`` [N, ...]; see the module docstring. ``bound``: as :func:`walks` (None: chosen on the images' pilot).
    ``lower``: where the bound is the adjoint, each row gets the lower bound L ≤ B of :func:`walks` instead of B
    (``walked`` all False), and :func:`complete` walks B where a check needs it."""
    walk = walks(model, images, chunk=chunk, bound=bound, lower=lower)
    plan = next(walk)
    joined = _Joined(len(images))
    start = 0
    for logits, error in walk:
        joined.put(start, logits, error)
        start += len(logits)
    lowered = lower and plan.bound == "adjoint"
    return Exact(*joined.arrays, plan.lam, plan.fan_ins, bound=plan.bound,
                 walked=np.zeros(len(images), dtype=bool) if lowered else None)


def complete(model, images: np.ndarray, exact: Exact, rows, *, chunk: int = 8192) -> Exact:
    """``exact`` (from :func:`exact_outputs` with ``lower``) with B walked on every row of ``rows``: each walk chunk
    that holds one is walked again whole, with the run's λ and bound, so its rows get the very B a walk of all the
    images gives (an image's B depends on its chunk's other images through :func:`crossport.exact.rules.coherent`,
    and a float64 BLAS may sum a batch in another order than a smaller one). ``chunk``: as given to
    :func:`exact_outputs`."""
    if exact.walked is None:
        return exact
    walk = walks(model, images, chunk=chunk, bound=exact.bound, only=rows)
    plan = next(walk)
    starts = _chunks_of(rows, plan.chunk)
    bounds, systematic = ({k: v.copy() for k, v in part.items()} for part in (exact.bounds, exact.systematic))
    walked = exact.walked.copy()
    joined = _Joined(len(images), (None, bounds, systematic))  # the values are the lower walk's, to the bit
    for start, (logits, error) in zip(starts, walk, strict=True):
        joined.put(start, logits, error)
        walked[start : start + len(logits)] = True
    return Exact(exact.values, bounds, systematic, exact.lam, exact.fan_ins, bound=exact.bound, walked=walked)


class _Joined:
    """The values, B and systematic part of the logits and the scores, written into arrays of ``rows`` rows as each
    chunk comes (at EMNIST's full size 58 MB an array), or into ``parts`` given (None: that part is not kept)."""

    def __init__(self, rows: int, parts: tuple[dict | None, dict, dict] | None = None) -> None:
        self.rows = rows
        self.arrays = parts or ({}, {}, {})

    def put(self, start: int, logits, error) -> None:
        scores, score_error = _softmax_with_bound(logits, error)
        for output, value, width in (("logits", logits, error), ("scores", scores, score_error)):
            for into, array in zip(self.arrays, (value, width.total, width.systematic), strict=True):
                if into is None:
                    continue
                rows = array.numpy()
                if output not in into:
                    into[output] = np.empty((self.rows, *rows.shape[1:]), rows.dtype)
                into[output][start : start + len(rows)] = rows


def _chunks_of(rows, chunk: int) -> list[int]:
    """The first image of each walk chunk (of ``chunk`` images) that holds one of ``rows``, in order."""
    return sorted({int(row) // chunk * chunk for row in rows})


# The running bound decides unless it is wider than the logits themselves (median B/|z| over the first PILOT images,
# which depend on the exact values alone, not on any rounding): then the network is too deep for it, and the
# first-order bound is used instead (docs/parity.md, "Deep networks").
PILOT = 64


class Plan(NamedTuple):
    """What a walk settled before its first chunk: λ, the accumulating layers' fan-ins, the bound ("running",
    "adjoint" or "sampled") and the images per chunk."""

    lam: float
    fan_ins: tuple[int, ...]
    bound: str
    chunk: int


def walks(model, images: np.ndarray, *, chunk: int = 8192, bound: str | None = None,
          record: list | None = None, lower: bool = False, only=None):
    """First the :class:`Plan`, then per chunk of ``images``: (exact logits, their Error). ``bound`` overrides the
    choice: the running bound unless it is wider than the logits (:data:`PILOT`); then the first-order bound of
    :mod:`crossport.exact.tangents`, its Σ c_r² computed by one backward pass per class (the adjoint) whatever the
    number of classes: estimated from 2·SAMPLES forward tangents instead ("sampled", only when asked for) it is
    cheaper above 2·SAMPLES classes but wider by the χ² limit's factor, and the gate does not buy time with power.
    ``record``: with the adjoint, each chunk's variance per rounding source is appended to it
    (crossport.exact.tangents.Adjoint).

    ``lower``: with the adjoint, each chunk's Error is L, the part of B that the rounding sources of the last
    accumulating layer and the steps after it give (:func:`_walk`'s ``tail``): the same λ, t and chunks, a sum over
    fewer of the same non-negative terms, so L ≤ B element by element, and no backward pass through the network.
    ``only``: rows of ``images``; just the chunks that hold one are walked (in order)."""
    import torch

    from crossport.exact import tangents as carry
    from crossport.exact.network import as_network

    sample = torch.from_numpy(np.ascontiguousarray(images[:1], dtype=np.float32))
    network = as_network(model, sample)
    layers_of(network)  # every layer has a rule, or one line naming those that do not
    counts = fan_ins(network)
    with torch.no_grad():  # shapes only: float32 (PyTorch's float64 grouped convolutions are slow at batch 1)
        dots, largest, classes = _per_example(network.eval(), sample)
    wide, narrow = precisions(network)
    lam_ = lam(len(images) * dots, max(counts, default=1))
    confidence = sampled_confidence(len(images) * classes)

    def rows(per_element: int) -> int:  # images per chunk of a walk
        return max(1, min(chunk, WALK_BYTES // (per_element * largest)))

    with torch.no_grad():
        if bound is None:  # the pilot in chunks too (the smaller walk's): resnet18's 64 at once took 2 GB
            ratios = []
            for start in range(0, min(len(images), PILOT), step := rows(32 + 8 * SAMPLES)):
                end = min(start + step, PILOT)
                pilot = torch.from_numpy(np.ascontiguousarray(images[start:end], dtype=np.float32)).double()
                z, running = _walk(wide, narrow, pilot, lam_, None)
                ratios.append((running.total / z.abs()).flatten())
            deep = float(torch.median(torch.cat(ratios))) >= 1.0
            bound = "adjoint" if deep else "running"
        chunk = rows(32 + (8 * SAMPLES if bound != "running" else 0))
        yield Plan(lam_, counts, bound, chunk)
        starts = range(0, max(len(images), 1), chunk)
        if only is not None:
            starts = _chunks_of(only, chunk)
        for start in starts:
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + chunk], dtype=np.float32)).double()
            if bound == "sampled":  # the same draws for the same images, run to run
                carrier = carry.Sampled(confidence, torch.Generator().manual_seed(start))
            else:
                carrier = (carry.Adjoint(sign_threshold(len(images) * classes), record) if bound == "adjoint"
                           else None)
            yield _walk(wide, narrow, batch, lam_, carrier, tail=lower and bound == "adjoint")


def precisions(network):
    """The network's float64 copy, which the walks compute exact values with, and its float32 copy, which carries
    the first-order bound's tangents (no gradients of its own: the adjoint differentiates by the sources alone)."""
    import copy

    return copy.deepcopy(network).double().eval(), copy.deepcopy(network).float().eval().requires_grad_(False)


def _per_example(network, sample) -> tuple[int, int, int]:
    """How many dot products (rounded bounds that must all hold) one example's forward pass computes, the element
    count of its largest tensor, and of its output."""
    from crossport.exact.rules import rule_of

    values = {network.source: sample}
    count, largest = 0, sample.numel()
    for step in network.steps:
        values[step.output] = y = step.layer(*(values[name] for name in step.inputs))
        largest = max(largest, y.numel())
        if rule_of(step.layer).terms is not None:
            count += y.numel()
    return max(count, 1), largest, values[network.target].numel()


def _walk(network, narrow, x, lam_, carrier=None, tail: bool = False):
    """Each step's exact output and its Error from its inputs' (tensors freed after their last reader), by one of
    two bounds:

    * the running bound (no ``carrier``), each step's Error from its inputs' Errors (its rule). The last
      accumulating layer's bias add reaches the outputs directly, so it is systematic (crossport.exact.rules): a
      second Error, ``constant``, follows it from that layer to the outputs;
    * the first-order bound (crossport.exact.tangents): each step's tangents from its inputs' (its rule's
      ``linear``, on ``narrow``, the float32 copy of the network), plus the step's own error as a source (its rule
      with no incoming error and λ = 1, and that bias add), which the ``carrier`` samples (``Sampled``) or sums
      exactly (``Adjoint``). With ``tail``, only the last accumulating layer and the steps after it add sources
      (:func:`_tail_start`): the steps before compute their exact outputs alone (``Rule.value``; with the
      magnitude a tail step reads), their tangents zero, so each source the tail adds is one the full walk adds.
    """
    from functools import partial

    import torch

    from crossport.exact.rules import Error, Searches, coherent, constant_added, rule_of

    forward, first_order = carrier is None, carrier is not None
    steps = network.steps
    last = max((i for i, step in enumerate(steps) if rule_of(step.layer).terms is not None), default=None)
    reads = network.last_reads()
    readers = network.readers()
    first = _tail_start(steps, last, readers) if tail and last is not None else 0
    values, constant, magnitudes = {network.source: x}, {}, {}
    tangents = {network.source: carrier.start(x)} if first_order else {}
    errors = {network.source: Error(torch.zeros_like(x), torch.zeros_like(x))}
    pending = {}  # a tensor's own error, not drawn yet: its one reader maps elements to elements
    searches = Searches(steps, values)  # what the batch repeats: searched once, or carried where a layer keeps it

    for index, (step, small) in enumerate(zip(steps, narrow.steps, strict=True)):
        rule = rule_of(step.layer)
        xs = [values[name] for name in step.inputs]
        if forward:
            y, error = rule.step(step.layer, xs, [errors[name] for name in step.inputs], lam_)
            errors[step.output] = coherent(y, error, partial(searches.shared, step.output, y))  # rounded alike
            magnitudes[step.output] = errors[step.output].magnitude
        if forward and last is not None and index > last and any(name in constant for name in step.inputs):
            passed = [constant[name] if name in constant else Error(torch.zeros_like(v), torch.zeros_like(v))
                      for name, v in zip(step.inputs, xs, strict=True)]
            constant[step.output] = rule.step(step.layer, xs, passed, lam_)[1]
        # before the tail, its exact value alone where no tail step reads its magnitude (a BatchNorm after the last
        # Linear or Conv does)
        if index < first and rule.value is not None and all(reader < first for reader in readers.get(step.output, ())):
            y = rule.value(step.layer, xs)
        elif first_order:
            none = [Error(0.0, 0.0, magnitudes.get(name)) for name in step.inputs]
            y, own = rule.step(step.layer, xs, none, 1.0)
            magnitudes[step.output] = own.magnitude
        if index < first:  # before the tail: no source
            values[step.output], tangents[step.output] = y, torch.zeros(y.shape, dtype=torch.float32)
            _free(network, index, step, reads, (values, errors, constant, tangents, magnitudes, searches.known))
            continue
        if index == last:
            constant[step.output] = Error(torch.zeros_like(y), constant_added(y, getattr(step.layer, "bias", None)))
        if first_order:
            random, systematic = own.random, own.systematic
            if step.inputs[0] in pending:  # the input's own error, through this elementwise layer, drawn with its own
                held = pending.pop(step.inputs[0])
                size = rule.scale(step.layer, xs)
                random, systematic = random + size * held.random, systematic + size * held.systematic
            if index == last:
                systematic = systematic + constant[step.output].systematic
            if torch.is_tensor(random):  # rounding that inputs computing alike share: systematic (rules.coherent)
                random, systematic = coherent(y, Error(random, systematic + torch.zeros_like(random)),
                                              partial(searches.shared, step.output, y))[:2]
            following = readers.get(step.output, ())
            with torch.enable_grad():  # the adjoint carrier differentiates the tangents by their sources
                tangents[step.output] = rule.linear(small.layer, xs, [tangents[name] for name in step.inputs])
                if len(following) == 1 and rule_of(steps[following[0]].layer).scale is not None:
                    pending[step.output] = Error(random, systematic)
                else:
                    tangents[step.output] = carrier.add(tangents[step.output], random, systematic, y)
        values[step.output] = y
        _free(network, index, step, reads, (values, errors, constant, tangents, magnitudes, searches.known))
    z = values[network.target]
    floor = FLOAT32_TINY  # kernels may flush subnormal results to zero
    if first_order:
        return z, carrier.bound(tangents[network.target], z).add(systematic=floor)
    through = constant[network.target].systematic if network.target in constant else 0.0
    return z, errors[network.target].add(systematic=floor + through)


def _tail_start(steps, last: int, readers: dict) -> int:
    """The lower bound's first step: the last accumulating layer, moved back past every step whose own error the walk
    draws with a later step's (its one reader elementwise: ``pending`` in :func:`_walk`), so that each source the
    tail adds is one the full walk adds."""
    from crossport.exact.rules import rule_of

    start, moved = last, True
    while moved:
        moved = False
        for index in range(start):
            following = readers.get(steps[index].output, ())
            if len(following) == 1 and following[0] >= start and rule_of(steps[following[0]].layer).scale is not None:
                start, moved = index, True
                break
    return start


def _free(network, index: int, step, reads: dict, held: tuple) -> None:
    """Drop every tensor whose last reader was this step (the network's output stays)."""
    for name in step.inputs:
        if reads.get(name) == index and name != network.target:
            for kept in held:
                kept.pop(name, None)


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
