"""``python -m tools.bound_width [ARCH ...]``: how wide the float32 error bound B is, per architecture, two ways.

* ``forward``: each layer's error passed on through |W| (Wilkinson's running error bound): every layer may multiply
  it by Σ|w| against the values' ‖w‖, so it compounds with depth;
* ``sampled``: the same local roundings carried by the network's own Jacobian (:mod:`crossport.exact.tangents`):
  Hoeffding over the roundings, their sum of squares bounded from Gaussian tangents.

The gate keeps, per element and part, the narrower. Prints, per architecture (seeded, untrained, BatchNorm statistics
drawn as training leaves them), the median of B / |logit| each way and for the gate, the share of logits where the
sampled bound is the narrower, and the largest |float32 PyTorch − exact| / B. The measurement behind docs/parity.md,
"Deep networks".
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

log = logging.getLogger("crossport")


def measure(arch: str, images: np.ndarray) -> dict:
    import torch

    from crossport.exact import exact_outputs, walks
    from crossport.exact.tangents import narrower
    from training.model import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, num_classes=10)).eval()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 2.0)
        float32 = model(torch.from_numpy(images)).double().numpy()
    walk = walks(model, images, chunk=len(images))
    next(walk)
    logits, forward, sampled = next(walk)
    gate = narrower(forward, sampled)[0]
    size = np.abs(logits.numpy())
    exact = exact_outputs(model, images)
    return {"arch": arch, "forward": float(np.median(forward.total.numpy() / size)),
            "sampled": float(np.median(sampled.total.numpy() / size)),
            "gate": float(np.median(gate.total.numpy() / size)), "share": exact.sampled,
            "float32_over_gate": float(np.max(np.abs(float32 - exact.values["logits"]) / exact.bounds["logits"]))}


def main(argv: list[str] | None = None) -> int:
    from training.model import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="python -m tools.bound_width", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("archs", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--images", type=int, default=16, help="random 28×28 images (default 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = np.random.default_rng(1).random((args.images, 784), dtype=np.float32)
    log.info("%-20s %14s %14s %14s %14s %20s", "model", "forward B/|z|", "sampled B/|z|", "gate B/|z|",
             "sampled share", "max |fp32 err|/B")
    for arch in args.archs:
        row = measure(arch, images)
        log.info("%-20s %14.3g %14.3g %14.3g %14.2f %20.3g", arch, row["forward"], row["sampled"], row["gate"],
                 row["share"], row["float32_over_gate"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
