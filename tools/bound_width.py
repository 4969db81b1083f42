"""``python -m tools.bound_width [ARCH ...]``: how wide the float32 error bound B is, per architecture, three ways.

* ``running``: each layer's error passed on through |W| (Wilkinson's running error bound): every layer may multiply
  it by Σ|w| against the values' ‖w‖, so it compounds with depth;
* ``adjoint`` and ``sampled``: the same local roundings carried by the network's own Jacobian
  (:mod:`crossport.exact.tangents`): Hoeffding over the roundings, their coefficients' sum of squares computed by one
  backward pass per class (``adjoint``) or bounded from Gaussian tangents (``sampled``, a χ² limit).

Prints, per architecture (seeded, untrained, BatchNorm statistics drawn as training leaves them), the median of
B / |logit| each way, which one the gate uses (the running bound unless it is wider than the logits), the seconds each
first-order walk took, and the largest |float32 PyTorch − exact| in units of the gate's B. The measurement behind
docs/parity.md, "Deep networks".
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from crossport.cli import summary_line

log = logging.getLogger("crossport")


def measure(arch: str, images: np.ndarray) -> dict:
    import time

    import torch

    from crossport.exact import walks
    from training.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, num_classes=10)).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 2.0)
        float32 = model(torch.from_numpy(images)).double().numpy()
    widths, seconds = {}, {}
    for bound in BOUNDS:
        started = time.perf_counter()
        walk = walks(model, images, bound=bound)
        next(walk)
        chunks = list(walk)
        seconds[bound] = time.perf_counter() - started
        logits = np.concatenate([z.numpy() for z, _ in chunks])
        widths[bound] = np.concatenate([error.total.numpy() for _, error in chunks])
    gate = next(walks(model, images))[2]  # the choice, made on the pilot images
    size, error = np.abs(logits), np.abs(float32 - logits)
    return {"arch": arch, **{bound: float(np.median(widths[bound] / size)) for bound in BOUNDS}, "gate": gate,
            "seconds": seconds, "float32_over_gate": float(np.max(error / widths[gate]))}


BOUNDS = ("running", "adjoint", "sampled")


def main(argv: list[str] | None = None) -> int:
    from training.model import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="python -m tools.bound_width", description=summary_line(__doc__),
                                     allow_abbrev=False)
    parser.add_argument("archs", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--images", type=int, default=16, help="random 28×28 images (default 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = np.random.default_rng(1).random((args.images, 784), dtype=np.float32)
    log.info("%-20s %14s %14s %14s %8s %20s %22s", "model", "running B/|z|", "adjoint B/|z|", "sampled B/|z|",
             "gate", "adjoint / sampled s", "max |fp32 err|/gate B")
    for arch in args.archs:
        row = measure(arch, images)
        log.info("%-20s %14.3g %14.3g %14.3g %8s %20s %22.3g", arch, row["running"], row["adjoint"], row["sampled"],
                 row["gate"], f"{row['seconds']['adjoint']:.2f} / {row['seconds']['sampled']:.2f}",
                 row["float32_over_gate"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
