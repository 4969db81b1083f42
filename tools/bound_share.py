"""``python -m tools.bound_share RUN_DIR``: how much of the adjoint bound B the network's last rounding steps carry.

The adjoint's variance is a sum over the walk's rounding sources, in the order of its steps, so the sources of the
last k steps alone give a lower bound L ≤ B (the same t, a part of the same sum). Where every check on the test split
passes far inside B (an fp32 artifact's largest error is a fraction of a percent of it), an L that is a sizeable
share of B decides those checks without the whole walk: the measurement behind docs/parity.md, "What would meet it
without giving power away". Prints, for the run's first ``--images`` test images and each k of ``--last``, the
smallest and the median L / B over the logits, and the largest error / B of the run's fp32 artifacts (parity.json).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from crossport.cli import integer, summary_line
from pipelines.summary import exact_ratio

log = logging.getLogger("crossport")


def shares(run_dir: Path, images: int, lasts: tuple[int, ...]) -> dict:
    """{"sources": how many, "last": {k: (min, median) of L / B}, "fp32_worst": the artifacts' largest |err| / B}."""
    import torch

    from crossport.exact import walks
    from crossport.interface import to_inputs

    with np.load(run_dir / "data.npz") as data:
        inputs = to_inputs(data["x_test"][:images])
    if (run_dir / "model.pt").is_file():
        from training.checkpoint import load_checkpoint

        model = load_checkpoint(run_dir / "model.pt").model
    else:  # a model brought as an ONNX file: its graph is the reference
        import onnx

        from crossport.exact.graph import network_from_onnx

        model = network_from_onnx(onnx.load(str(run_dir / "model.onnx"), load_external_data=False))
    record: list = []
    walk = walks(model, inputs, bound="adjoint", record=record)
    next(walk)
    for _ in walk:
        pass
    variance = torch.cat(record, dim=2)  # [sources, 2 (random, systematic), N, classes]
    tail = variance.flip(0).cumsum(dim=0)  # tail[k - 1]: the last k sources

    def width(parts):  # B's own form, t left out: √(random variance) + √(systematic variance)
        return torch.sqrt(parts[0]) + torch.sqrt(parts[1])

    whole = width(tail[-1])
    found = {}
    for k in lasts:
        ratio = (width(tail[min(k, len(tail)) - 1]) / whole).flatten().numpy()
        found[k] = (float(ratio.min()), float(np.median(ratio)))
    report = json.loads((run_dir / "parity.json").read_text()) if (run_dir / "parity.json").is_file() else {}
    return {"sources": len(variance), "last": found, "fp32_worst": exact_ratio(report)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bound_share", description=summary_line(__doc__),
                                     allow_abbrev=False)
    parser.add_argument("run_dir", type=Path, help="a crossport run directory")
    parser.add_argument("--images", type=integer(1), default=16, help="test images walked (default 16)")
    parser.add_argument("--last", type=integer(1), nargs="+", default=[1, 5], help="k: the last k sources' share")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    found = shares(args.run_dir, args.images, tuple(args.last))
    for k, (low, middle) in found["last"].items():
        log.info("last %d of %d sources: L / B min %.3f, median %.3f", k, found["sources"], low, middle)
    if found["fp32_worst"] is not None:
        log.info("the run's fp32 artifacts: largest |err| / B %.4f (parity.json)", found["fp32_worst"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
