"""The first-order bound: rounding error carried by the network's own Jacobian, for networks too deep for the
running bound. Its Σ c_r² is estimated from Gaussian tangents (:class:`Sampled`, described here) or computed by one
backward pass per output class (:class:`Adjoint`, narrower by the χ² limit's factor, the one the gate uses; the
sampled estimate is cheaper above 2·SAMPLES classes, and is kept for tools that compare the two).

The running bound passes each layer's error on through |W|, which may grow it by Σ|w| where the values grow by
about ‖w‖, so it compounds with depth (docs/parity.md, "Deep networks"). This one does not. To first order, a float32
run's error in an output is Σ_r c_r·δ_r over every rounding r of the run, with δ_r independent, mean zero and at most
u (Higham & Mary's model), and c_r = ∂z/∂h·(the partial result r rounds) for the tensor h it lands in. Each rule,
given no incoming error and λ = 1, bounds √(Σ c_r²)/|∂z/∂h| over its own roundings: √(n)·u·Σ|w·x| for a dot
product of n terms, whatever the summation order. So:

* Hoeffding: |Σ c_r·δ_r| ≤ t·u·√(Σ c_r²) but with probability 2·exp(−t²/2);
* Σ c_r² is the variance of the output's tangent when every step adds a Gaussian of its own bound's size and the
  tangents are carried by the exact Jacobian (each rule's ``linear``): :data:`SAMPLES` such tangents give a sum of
  squares S with S/Σ c_r² distributed χ²(SAMPLES), so Σ c_r² ≤ S/q but with probability P(χ² ≤ q).

:func:`crossport.exact.rounding.sampled_confidence` picks t and q so that both hold for every output of the run with
probability 1 − FALSE_ALARM. The systematic part (constants rounded once: the same sign for an element, a channel
or a whole layer) is carried by a second set of tangents whose Gaussian is shared accordingly, so S covers each way
they can line up.

The bound is first order, as running error analysis is: the Jacobian is the exact network's, so where a float32
error carries a unit across a kink (a ReLU's 0, a max-pool's tie) the bound does not follow it. A unit crosses only
when its input lies within its own error of the kink, so over inputs the effect is a product of two small quantities
(second order in u, like the products of roundings both analyses drop). The gate uses this bound only where the
running bound, which keeps every crossing, is wider than the logits (crossport.exact.walks); docs/parity.md ("Deep
networks") gives the measured margin on a network built to sit at its kinks.

Sampled tangents are float32 in units of u (they are estimates of a size, not values), [2·SAMPLES·N, ...]: the
random set, then the systematic set. The adjoint's one tangent per input, [N, ...], stays zero: only its derivatives
by the sources are read, in float32 as the sampled tangents are.
"""

from __future__ import annotations

import torch  # imported only by the stages that compute exact references

from crossport.exact.rounding import SAMPLES, U32


class Sampled:
    """Σ c_r² estimated: 2·SAMPLES tangents carried forward, Gaussian sources drawn at every step (the module's
    docstring). Costs 2·SAMPLES float32 passes of the linear part, whatever the number of outputs."""

    def __init__(self, confidence: tuple[float, float], generator: torch.Generator) -> None:
        self.confidence, self.generator = confidence, generator

    def start(self, x: torch.Tensor) -> torch.Tensor:
        """The input's tangents: the images are exact (they are the float32 numbers every runtime reads)."""
        return torch.zeros((2 * SAMPLES * x.shape[0], *x.shape[1:]), dtype=torch.float32)

    def add(self, tangents: torch.Tensor, random, systematic, like: torch.Tensor) -> torch.Tensor:
        """Add each element's own error to its tangents (in place), as Gaussians of its bound's size: independent per
        element for the random part; for the systematic part the sum of one Gaussian per element, per channel
        (dimension 1) and per tensor, each shared by every input of the batch."""
        sets = tangents.view(2, SAMPLES, *like.shape)
        for into, part, shared in ((sets[0], random, False), (sets[1], systematic, True)):
            part = torch.as_tensor(part, dtype=like.dtype)
            if not bool(part.any()):
                continue
            scale = torch.broadcast_to(part / U32, like.shape).to(torch.float32)
            draw = torch.randn((SAMPLES, *like.shape), generator=self.generator)
            if shared:
                draw += torch.randn((SAMPLES, *(1,) * like.dim()), generator=self.generator)
                if like.dim() > 2:
                    draw += torch.randn((SAMPLES, 1, like.shape[1], *(1,) * (like.dim() - 2)),
                                        generator=self.generator)
            into.addcmul_(draw, scale)
        return tangents

    def bound(self, tangents: torch.Tensor, z: torch.Tensor):
        """The sampled bound of a tensor from its tangents: t·u·√(S/q) for each set (an Error: random, systematic)."""
        from crossport.exact.rules import Error

        t, q = self.confidence
        sets = tangents.view(2, SAMPLES, *z.shape).to(z.dtype)
        random, systematic = (t * U32 * torch.sqrt((part**2).sum(dim=0) / q) for part in sets)
        return Error(random, systematic)


class Adjoint:
    """Σ c_r² computed, not estimated: one tangent carried forward with a zero source added at every step, then
    one vector–Jacobian product per output class gives ∂z/∂(source) for every step at once, and the variance the
    sampled bound's Gaussians would have is summed exactly: Σ (g·r)² for the random part; for the systematic part
    Σ (g·s)² + Σ over channels (Σ g·s)² + (Σ g·s)², its per-element, per-channel and per-tensor Gaussians. No χ²
    limit: the bound is t·√(that variance), t Hoeffding's for the run's every output. Costs one float32 pass of the
    linear part and one backward pass per class."""

    def __init__(self, t: float, record: list | None = None) -> None:
        # record: each chunk's variance per source is appended to it, [sources, 2 (random, systematic), N, classes]
        # in the walk's order of steps (tools.bound_share reads how much of B the last steps carry)
        self.t, self.sources, self.record = t, [], record

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape, dtype=torch.float32)

    def add(self, tangents: torch.Tensor, random, systematic, like: torch.Tensor) -> torch.Tensor:
        random, systematic = (part if bool(part.any()) else None
                              for part in (torch.as_tensor(p, dtype=like.dtype) for p in (random, systematic)))
        if random is None and systematic is None:
            return tangents
        source = torch.zeros(like.shape, dtype=torch.float32, requires_grad=True)
        self.sources.append((source, random, systematic))
        return tangents + source

    def bound(self, tangents: torch.Tensor, z: torch.Tensor):
        from crossport.exact.rules import Error

        variance = torch.zeros((2, *z.shape), dtype=z.dtype)
        sources = [source for source, _, _ in self.sources]
        per_source = None if self.record is None else torch.zeros((len(sources), 2, *z.shape), dtype=z.dtype)
        for c in range(z.shape[1] if sources and tangents.requires_grad else 0):  # one backward pass per class
            with torch.enable_grad():  # walks run under no_grad
                grads = torch.autograd.grad(tangents[:, c].sum(), sources, retain_graph=c + 1 < z.shape[1],
                                            allow_unused=True)
            for i, (g, (_, random, systematic)) in enumerate(zip(grads, self.sources, strict=True)):
                g = None if g is None else g.to(z.dtype)
                for index, part in enumerate((random, systematic)):
                    if g is not None and part is not None:
                        spread = _spread(g * part, shared=index == 1)
                        variance[index, :, c] += spread
                        if per_source is not None:
                            per_source[i, index, :, c] += spread
        if per_source is not None:
            self.record.append(per_source)
        self.sources = []
        random, systematic = self.t * torch.sqrt(variance)
        return Error(random, systematic)


def _spread(weighted: torch.Tensor, shared: bool) -> torch.Tensor:
    """Per input (dimension 0), the variance its output gets from one Gaussian per element of ``weighted`` (the
    output's coefficient times the source's size) and, ``shared``, one per channel (dimension 1) and one per tensor
    too; only the input's own elements count, as an output depends on its own input alone."""
    per_input = weighted.flatten(1)
    variance = (per_input**2).sum(dim=1)
    if shared:
        variance = variance + per_input.sum(dim=1) ** 2
        if weighted.dim() > 2:
            variance = variance + (weighted.flatten(2).sum(dim=2) ** 2).sum(dim=1)
    return variance
