"""``python -m tools.gate_power RUN_DIR``: the parity gate's power, as numbers.

Breaks the run's ONNX model by a fault of size ε (the faults of ``tests/breakers``), runs it in
ONNX Runtime on the run's test split as the drifted artifact, and bisects for the smallest ε each
gate refuses:

* ``hidden unit``: one first-layer unit's (or the first convolution's channel's) incoming weights
  and bias scaled by 1 + ε (``scale_hidden_unit``);
* ``class bias``: one class's output bias shifted by ε (``shift_class_bias``);
* ``depthwise channel`` (MobileNets): one channel of the first depthwise convolution scaled by 1 + ε
  (``scale_depthwise_channel``);
* ``residual branch`` (ResNets, inverted residuals): one output channel of the first convolution an Add sums with
  its block's input, scaled by 1 + ε (``scale_residual_branch``).

Gates, smaller is more powerful:

* ``fixed``: one tolerance of the kind converters check with (scores |Δ| ≤ 1e-5; logits
  |Δ| ≤ 1e-5 + 1e-5·|ref|; every example with a top-2 gap ≥ 2e-5 keeps its answer);
* ``derived``: today's gate on an artifact with logits (ONNX Runtime, the TF graph): the hop against
  PyTorch (|Δ| ≤ 2·B) and the check against the exact values (within B; the sign test at the
  run's own threshold, from its ``parity.json``);
* ``served``: the same on scores alone, as a SavedModel or TFLite file is judged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from crossport.cli import summary_line

FAULTS = ("hidden unit", "class bias", "depthwise channel", "residual branch")  # the last two where the graph has one


def fixed_refuses(reference: dict, candidate: dict) -> bool:
    scores = np.abs(candidate["scores"] - reference["scores"]) > 1e-5
    logits = np.abs(candidate["logits"] - reference["logits"]) > 1e-5 + 1e-5 * np.abs(reference["logits"])
    top2 = np.sort(reference["scores"], axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] >= 2e-5
    flips = np.argmax(reference["scores"][decisive], 1) != np.argmax(candidate["scores"][decisive], 1)
    return bool(scores.any() or logits.any() or flips.any())


def derived_refuses(reference: dict, candidate: dict, references, threshold: float, served: bool) -> bool:
    """Today's gate on ``candidate`` (outputs on the probe) as a converted artifact: the hop against PyTorch within
    2·B of the model, and within B of, and the sign test against, the exact values of the run's ONNX graph."""
    from crossport.parity import compare, compare_exact
    from pipelines.gate import ONNX, REFERENCE, TFLITE_FP32, hop_spec

    if served:
        candidate = {"scores": candidate["scores"]}
    name = TFLITE_FP32 if served else ONNX
    hop = compare(hop_spec(REFERENCE, name), reference, candidate, bounds=references.model.bounds)
    against = compare_exact(name, candidate, references.graph, threshold)
    return not (hop.passed and against.passed)


def smallest_refused(refuses, low: float = 1e-9, high: float = 1e-1, steps: int = 24) -> float | None:
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


def drifted_outputs(broken, images: np.ndarray, threads: int | None = None) -> dict:
    """``broken`` (onnx.ModelProto) run in ONNX Runtime on ``images`` (``threads`` None: its default)."""
    from crossport.runtimes import load_onnx

    return load_onnx(broken, threads)(images)


def power(model, reference: dict, references, images: np.ndarray, threshold: float) -> dict[str, dict]:
    """{fault: {gate: smallest refused ε, or None / 0.0}} for ``model`` (onnx.ModelProto) on ``images`` (the probe),
    ``reference`` PyTorch's outputs on them and ``references`` their exact values (pipelines.stages.validate)."""
    from tests.breakers import (
        depthwise_conv,
        residual_conv,
        scale_depthwise_channel,
        scale_hidden_unit,
        scale_residual_branch,
        shift_class_bias,
    )

    breakers = {"hidden unit": lambda e: scale_hidden_unit(model, 1 + e),
                "class bias": lambda e: shift_class_bias(model, delta=e)}
    if depthwise_conv(model) is not None:  # MobileNets
        breakers["depthwise channel"] = lambda e: scale_depthwise_channel(model, 1 + e)
    if residual_conv(model) is not None:  # ResNets, and MobileNets' inverted residuals
        breakers["residual branch"] = lambda e: scale_residual_branch(model, 1 + e)
    found: dict[str, dict] = {}
    for fault, breaker in breakers.items():
        cache: dict[float, dict] = {}

        def drifted(epsilon: float, breaker=breaker, cache=cache) -> dict:
            if epsilon not in cache:
                cache[epsilon] = drifted_outputs(breaker(epsilon)[0], images)
            return cache[epsilon]

        found[fault] = {
            "fixed": smallest_refused(lambda e: fixed_refuses(reference, drifted(e))),
            "derived": smallest_refused(lambda e: derived_refuses(reference, drifted(e), references, threshold,
                                                                  served=False)),
            "served": smallest_refused(lambda e: derived_refuses(reference, drifted(e), references, threshold,
                                                                 served=True)),
        }
    return found


def probe_case(run_dir: Path, examples: int = 0):
    """What validate judges a converted artifact with, for the run at ``run_dir``: (its ONNX model, PyTorch's outputs
    on the probe, the probe's exact values, the probe, the run's sign-test threshold)."""
    import onnx

    from crossport.interface import to_inputs
    from pipelines.stages.validate import PROBE_SIZE, REFERENCE, dithered, exact_values
    from training.checkpoint import load_torch

    with np.load(run_dir / "data.npz") as arrays:
        images = dithered(to_inputs(arrays["x_test"][: examples or PROBE_SIZE]))
    reference = load_torch(run_dir / "model.pt")(images)
    paths = {"checkpoint": run_dir / "model.pt", "onnx": run_dir / "model.onnx"}
    model = json.loads((run_dir / "parity.json").read_text())["error_model"]
    references = exact_values(paths, REFERENCE, images, graph=True, bound=model.get("bound"))  # validate's choice
    threshold = model["sign_test"]["threshold"]
    return onnx.load(str(run_dir / "model.onnx"), load_external_data=False), reference, references, images, threshold


def describe(epsilon: float | None) -> str:
    return ("never" if epsilon is None else "0 (false alarm)" if epsilon == 0.0 else f"{epsilon:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.gate_power", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--examples", type=int, default=0,
                        help="probe inputs to use (default: as validate, the first 8,192 test images, dithered)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)

    from training.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(args.run_dir / "model.pt")
    model, reference, references, images, threshold = probe_case(args.run_dir, args.examples)
    found = power(model, reference, references, images, threshold)
    arch = checkpoint.model_config.arch
    if args.json:
        sys.stdout.write(json.dumps({"model": arch, "examples": len(images), "threshold": threshold,
                                     "smallest_refused": found}, indent=2) + "\n")
        return 0
    sys.stdout.write(f"{arch}: {len(images)} probe inputs, sign test t = {threshold:.3g}; smallest refused fault size "
                     f"ε (smaller is more powerful)\n")
    sys.stdout.write(f"{'fault':<40} {'fixed':>12} {'derived':>12} {'served':>12}\n")
    labels = {"hidden unit": "hidden unit scaled by 1 + ε", "class bias": "class 0's output bias shifted by ε",
              "depthwise channel": "depthwise channel scaled by 1 + ε",
              "residual branch": "residual branch channel scaled by 1 + ε"}
    for fault, gates in found.items():
        sys.stdout.write(f"{labels[fault]:<40} " + " ".join(f"{describe(gates[g]):>12}" for g in gates) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
