"""``python -m tools.bound_width [ARCH ...]``: how wide the float32 error bound B is, per architecture, two ways.

* ``forward``: B as the gate computes it (:func:`crossport.exact.exact_outputs`), each layer's error passed on
  through |W| (Wilkinson's running error bound). Every layer may multiply it by Σ|w| against the values' ‖w‖, so
  it compounds with depth.
* ``adjoint``: the same local roundings (each rule with no incoming error), carried to each logit by the exact
  first-order sensitivity instead: Σ over every tensor of |∂z/∂h|·(error the step producing h adds). Tighter (|J|
  against a product of |W|), but first order at a fixed activation pattern: a kink crossing is not in it.

Prints, per architecture (seeded, untrained, BatchNorm statistics drawn as training leaves them), the median of
B / |logit| each way and the largest |float32 PyTorch − exact| / adjoint B. The measurement behind docs/parity.md,
"Deep networks".
"""

from __future__ import annotations

import argparse
import copy
import logging

import numpy as np

log = logging.getLogger("crossport")


def adjoint_bounds(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The logits and Σ|∂z/∂h|·(local error) per logit, in float64 (one backward pass per class)."""
    import torch

    from crossport.exact import lam
    from crossport.exact.network import as_network
    from crossport.exact.rules import Error, rule_of

    network = copy.deepcopy(as_network(model, torch.from_numpy(images[:1]))).double().eval()
    lam_ = lam(len(images), 1)
    values = {network.source: torch.from_numpy(images).double().requires_grad_()}
    added, magnitude = {}, {}
    for step in network.steps:
        xs = [values[name] for name in step.inputs]
        with torch.no_grad():
            zero = [Error(torch.zeros_like(v), torch.zeros_like(v), magnitude.get(name))
                    for name, v in zip(step.inputs, xs, strict=True)]
            _, error = rule_of(step.layer).step(step.layer, xs, zero, lam_)
        added[step.output], magnitude[step.output] = error.total, error.magnitude
        values[step.output] = step.layer(*xs)
        values[step.output].retain_grad()
    logits = values[network.target]
    bounds = torch.zeros_like(logits)
    for c in range(logits.shape[1]):
        for value in values.values():
            value.grad = None
        logits[:, c].sum().backward(retain_graph=True)
        bounds[:, c] = sum((values[name].grad.abs() * error).flatten(1).sum(1)
                           for name, error in added.items() if values[name].grad is not None)
    return logits.detach().numpy(), bounds.detach().numpy()


def measure(arch: str, images: np.ndarray) -> dict:
    import torch

    from crossport.exact import exact_outputs
    from training.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, num_classes=10)).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 2.0)
        float32 = model(torch.from_numpy(images)).double().numpy()
    exact = exact_outputs(model, images)
    logits, adjoint = adjoint_bounds(model, images)
    size = np.abs(logits)
    return {"arch": arch, "forward": float(np.median(exact.bounds["logits"] / size)),
            "adjoint": float(np.median(adjoint / size)),
            "float32_over_adjoint": float(np.max(np.abs(float32 - exact.values["logits"]) / adjoint))}


def main(argv: list[str] | None = None) -> int:
    from training.model import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="python -m tools.bound_width", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("archs", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--images", type=int, default=4, help="random 28×28 images (default 4)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = np.random.default_rng(1).random((args.images, 784), dtype=np.float32)
    log.info("%-20s %16s %16s %24s", "model", "forward B/|z|", "adjoint B/|z|", "max |fp32 err|/adjoint B")
    for arch in args.archs:
        row = measure(arch, images)
        log.info("%-20s %16.3g %16.3g %24.3g", arch, row["forward"], row["adjoint"], row["float32_over_adjoint"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
