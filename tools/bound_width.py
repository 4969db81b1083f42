"""``python -m tools.bound_width [ARCH ...]``: how wide the float32 error bound B is, per architecture, two ways.

* ``running``: each layer's error passed on through |W| (Wilkinson's running error bound): every layer may multiply
  it by Σ|w| against the values' ‖w‖, so it compounds with depth;
* ``sampled``: the same local roundings carried by the network's own Jacobian (:mod:`crossport.exact.tangents`):
  Hoeffding over the roundings, their sum of squares bounded from Gaussian tangents.

Prints, per architecture (seeded, untrained, BatchNorm statistics drawn as training leaves them), the median of
B / |logit| each way, which one the gate uses (the running bound unless it is wider than the logits), and the largest
|float32 PyTorch − exact| in units of the gate's B and of the sampled B. The measurement behind docs/parity.md,
"Deep networks".
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

log = logging.getLogger("crossport")


def measure(arch: str, images: np.ndarray) -> dict:
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
    widths = {}
    for bound in ("running", "sampled"):
        walk = walks(model, images, bound=bound)
        next(walk)
        chunks = list(walk)
        logits = np.concatenate([z.numpy() for z, _ in chunks])
        widths[bound] = np.concatenate([error.total.numpy() for _, error in chunks])
    gate = "sampled" if next(walks(model, images))[2] else "running"  # the choice, made on the pilot images
    size, error = np.abs(logits), np.abs(float32 - logits)
    return {"arch": arch, "running": float(np.median(widths["running"] / size)),
            "sampled": float(np.median(widths["sampled"] / size)), "gate": gate,
            "float32_over_gate": float(np.max(error / widths[gate])),
            "float32_over_sampled": float(np.max(error / widths["sampled"]))}


def main(argv: list[str] | None = None) -> int:
    from training.model import ARCHITECTURES

    parser = argparse.ArgumentParser(prog="python -m tools.bound_width", description=__doc__.split("\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("archs", nargs="*", default=list(ARCHITECTURES))
    parser.add_argument("--images", type=int, default=16, help="random 28×28 images (default 16)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = np.random.default_rng(1).random((args.images, 784), dtype=np.float32)
    log.info("%-20s %14s %14s %8s %22s %25s", "model", "running B/|z|", "sampled B/|z|", "gate",
             "max |fp32 err|/gate B", "max |fp32 err|/sampled B")
    for arch in args.archs:
        row = measure(arch, images)
        log.info("%-20s %14.3g %14.3g %8s %22.3g %25.3g", arch, row["running"], row["sampled"], row["gate"],
                 row["float32_over_gate"], row["float32_over_sampled"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
