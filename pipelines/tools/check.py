"""``python -m pipelines.check FILE --against RUN_DIR``: crossport's gate on a servable any converter made.

FILE is a TFLite file or a SavedModel directory converted from the run's model (by crossport, litert-torch, onnx2tf
or anything else). Its kind is read from the file itself (crossport.foreign), and it is judged as validate judges
crossport's own artifact of that kind, on the run's test split: an fp32 file against the run's reference (every
value within 2·B, every decisive answer unchanged) and against the exact float64 values (every value within B, and
the sign test on the dithered probe); a lossy file by its agreement and accuracy drop with confidence bounds.
Exit code 0 on pass, 3 on fail.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from crossport.cli import summary_line

log = logging.getLogger("crossport")

SOURCES = ("onnx", "pytorch")  # what the file was converted from: its exact values for the sign test


def build_parser() -> argparse.ArgumentParser:
    from crossport.foreign import KINDS

    parser = argparse.ArgumentParser(prog="python -m pipelines.check", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("file", type=Path, help="a .tflite file or a SavedModel directory")
    parser.add_argument("--against", type=Path, required=True, metavar="RUN_DIR",
                        help="the crossport run whose model the file was converted from (its test split, reference "
                             "and exact values)")
    parser.add_argument("--converted-from", choices=SOURCES, default="onnx",
                        help="what the file was converted from: the run's ONNX graph (onnx2tf, onnx-tf; the default) "
                             "or its PyTorch model (litert-torch); the sign test compares with its exact values")
    parser.add_argument("--expect", choices=KINDS, help="fail unless the file is of this kind (e.g. fp32: a file "
                                                        "holding float16 or int8 weights fails)")
    parser.add_argument("--threads", type=int, default=None, help="the runtimes' threads (default: theirs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and the libraries' output (default: crossport-check-<pid>.log in the "
                             "temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from crossport.console import command_log, run_command

    args = build_parser().parse_args(argv)
    return run_command(lambda: _check(args), debug=args.debug, log_file=command_log("check"))


def _check(args: argparse.Namespace) -> int:
    report = check(args.file, args.against, converted_from=args.converted_from, expect=args.expect,
                   threads=args.threads)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(render(report) + "\n")
    return 0 if report["verdict"] == "pass" else 3


def check(path: Path, run_dir: Path, *, converted_from: str = "onnx", expect: str | None = None,
          threads: int | None = None) -> dict:
    """The gate's report on the servable at ``path`` against the run at ``run_dir`` (the module's docstring)."""
    from crossport.errors import ConfigError
    from crossport.exact import sign_threshold
    from crossport.files import read_npz
    from crossport.foreign import KINDS, inspect, load, softmax
    from crossport.interface import LOGITS, SCORES, to_inputs
    from crossport.parity import HopSpec, compare, compare_exact
    from crossport.runtimes import chunk_for, load_onnx
    from pipelines.gate import FP32_VALUES, ONNX, POLICIES, REFERENCE
    from pipelines.manifest import Manifest
    from pipelines.stages.validate import ERROR_MODEL, PROBE_SIZE, dithered, exact_values
    from training.checkpoint import load_torch

    foreign = inspect(path)  # before minutes of exact values: a file that is no servable ends here
    manifest = Manifest.load(run_dir)
    paths = {name: manifest.require(name, for_stage="check") for name in ("onnx", "checkpoint")
             if name in manifest.artifacts}
    reference = REFERENCE if "checkpoint" in paths else ONNX
    if converted_from == "pytorch" and reference != REFERENCE:
        raise ConfigError(f"--converted-from pytorch, but the run {run_dir} has no PyTorch model (it was brought as "
                          "an ONNX file).", hint="Drop --converted-from.")
    arrays = read_npz(manifest.require("dataset", for_stage="check"), redo="data", need=("x_test", "y_test"),
                      only=True)
    images, targets = to_inputs(arrays["x_test"]), arrays["y_test"]
    probe = dithered(images[:PROBE_SIZE])
    both = np.concatenate([images, probe])
    chunk = chunk_for(paths["onnx"])
    original = (load_torch(paths["checkpoint"], threads, chunk) if reference == REFERENCE
                else load_onnx(paths["onnx"], threads, chunk))(both)
    candidate = load(foreign, images.shape[1:], threads, chunk)(both)
    returned = sorted(candidate)
    if SCORES not in candidate:
        candidate[SCORES] = softmax(candidate[LOGITS])
    split = {name: value[: len(images)] for name, value in candidate.items()}
    probed = {name: value[len(images):] for name, value in candidate.items()}
    ours = {name: value[: len(images)] for name, value in original.items()}

    runtime = "saved_model:serving_default" if foreign.container == "saved_model" else f"tflite_{foreign.kind}"
    failures = []
    if foreign.kind not in KINDS:
        failures.append(f"{path} holds float16, bfloat16 or integer constants: crossport judges a SavedModel as "
                        "float32 only")
    if expect and foreign.kind != expect:
        failures.append(f"expected a {expect} file; {path} is {foreign.kind} (read from its tensor types)")
    policy = POLICIES[runtime]
    exact = exact_values(paths, reference, images).model
    outputs = [(SCORES, policy.values)]
    if policy.fp32 and LOGITS in split and LOGITS in ours:
        outputs.append((LOGITS, FP32_VALUES))
    name = f"{reference} -> {foreign.container}:{path.name} ({foreign.kind})"
    spec = HopSpec(name, reference, runtime, tuple(outputs), policy.lossy)
    hop = compare(spec, ours, split, targets, exact.bounds)
    if policy.fp32:
        source = exact_values(paths, reference, probe, graph=converted_from == "onnx")
        judged = [name for name in exact.values if name in split]
        threshold = sign_threshold(sum(exact.values[name].shape[1] for name in judged))
        against = compare_exact(path.name, split, exact, threshold,
                                (probed, source.graph if converted_from == "onnx" else source.model))
    else:  # a lossy file's error is recorded
        against = compare_exact(path.name, split, exact, None)
    checks = [hop, against]
    passed = not failures and all(check.passed for check in checks)
    return {
        "verdict": "pass" if passed else "fail",
        "file": str(path), "kind": foreign.kind, "container": foreign.container, "input": foreign.describe(),
        "outputs": returned, "scores_from_logits": SCORES not in returned,
        "against": str(run_dir), "reference": reference, "converted_from": converted_from,
        "examples": len(images), "probe_inputs": len(probe),
        "error_model": ERROR_MODEL, "failures": failures,
        "hops": [hop.to_dict()], "against_exact": [against.to_dict()],
        "detail": None,
    }


def render(report: dict) -> str:
    from pipelines.summary import parity_table

    lines = [f"{report['file']}: {report['input']}",
             f"judged against {report['against']} ({report['reference']} reference, {report['examples']} test "
             f"examples, {report['probe_inputs']} probe inputs; converted from its {report['converted_from']})",
             *report["failures"], "", parity_table(report), "", f"verdict: {report['verdict'].upper()}"]
    return "\n".join(lines)
