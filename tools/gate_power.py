"""``python -m tools.gate_power RUN_DIR``: the parity gate's power, as a number.

Scales one first-layer hidden unit's incoming weights by ``1 + ε`` in the run's ONNX model
(the fault of ``tests/breakers.scale_hidden_unit``), runs it in ONNX Runtime on the run's
test split as the drifted artifact, and bisects for the smallest ε each gate refuses:

* ``round 1``: the fixed thresholds this project shipped first (scores |Δ| ≤ 1e-5; logits
  |Δ| ≤ 1e-5 + 1e-5·|ref|; every example with a top-2 gap ≥ 2e-5 keeps its answer);
* ``derived``: today's gate (the hop against PyTorch with |Δ| ≤ 2·B, and the artifact
  against the exact values: within B, RMS per class ≤ the noise factor × PyTorch's).

Prints one line per gate. Smaller is more powerful.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from crossport.cli import summary_line


def round1_refuses(reference: dict, candidate: dict) -> bool:
    scores = np.abs(candidate["scores"] - reference["scores"]) > 1e-5
    logits = np.abs(candidate["logits"] - reference["logits"]) > 1e-5 + 1e-5 * np.abs(reference["logits"])
    top2 = np.sort(reference["scores"], axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= 2e-5
    flips = np.argmax(reference["scores"][decisive], 1) != np.argmax(candidate["scores"][decisive], 1)
    return bool(scores.any() or logits.any() or flips.any())


def derived_refuses(reference: dict, candidate: dict, exact) -> bool:
    from crossport.parity import compare, compare_exact
    from pipelines.gate import ONNX, REFERENCE, hop_spec

    hop = compare(hop_spec(REFERENCE, ONNX), reference, candidate, bounds=exact.bounds)
    against = compare_exact(ONNX, candidate, exact.values, exact.bounds, reference, exact.noise_factor)
    return not (hop.passed and against.passed)


def smallest_refused(refuses, low: float = 1e-8, high: float = 1e-1, steps: int = 24) -> float | None:
    """Bisect in log space for the smallest ε with ``refuses(ε)`` (assumed monotone); 0.0 when the
    gate refuses the unmodified artifact (a false alarm), None when it never refuses."""
    if refuses(0.0):
        return 0.0
    if not refuses(high):
        return None
    for _ in range(steps):
        middle = float(np.sqrt(low * high))
        low, high = (low, middle) if refuses(middle) else (middle, high)
    return high


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gate_power", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--examples", type=int, default=0, help="test images to use (default: all)")
    args = parser.parse_args(argv)

    import onnx
    import onnxruntime as ort

    from crossport.exact import exact_outputs
    from crossport.interface import to_inputs
    from tests.breakers import scale_hidden_unit
    from training.checkpoint import load_checkpoint, load_torch

    with np.load(args.run_dir / "data.npz") as arrays:
        images = to_inputs(arrays["x_test"][: args.examples or None])
    reference = load_torch(args.run_dir / "model.pt")(images)
    exact = exact_outputs(load_checkpoint(args.run_dir / "model.pt").model, images)
    model = onnx.load(str(args.run_dir / "model.onnx"), load_external_data=False)

    cache: dict[float, dict] = {}

    def drifted(epsilon: float) -> dict:
        if epsilon not in cache:
            broken, _ = scale_hidden_unit(model, 1 + epsilon)
            session = ort.InferenceSession(broken.SerializeToString(), providers=["CPUExecutionProvider"])
            names = [output.name for output in session.get_outputs()]
            cache[epsilon] = dict(zip(names, session.run(names, {"images": images}), strict=True))
        return cache[epsilon]

    for name, refuses in (("round 1", lambda e: round1_refuses(reference, drifted(e))),
                          ("derived", lambda e: derived_refuses(reference, drifted(e), exact))):
        epsilon = smallest_refused(refuses)
        found = ("not refused up to 1e-1" if epsilon is None else
                 "0 (it refuses the unmodified, correct artifact)" if epsilon == 0.0 else f"{epsilon:.2e}")
        sys.stdout.write(f"{name:<8} smallest refused hidden-unit scaling 1 + ε: ε = {found} "
                         f"({len(images)} test images)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
