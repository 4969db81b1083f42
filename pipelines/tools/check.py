"""``python -m pipelines.check FILE --against RUN_DIR`` (or ``--onnx MODEL``): crossport's gate on any converter's file.

FILE is a TFLite file or a SavedModel directory converted from the run's model (by crossport, litert-torch, onnx2tf
or anything else). ``--onnx MODEL --eval-data DATA`` instead judges a file converted from a model that never went
through crossport: the model is imported first (``pipelines.run``'s import stage alone, into ``--run-dir`` or
a temporary folder), and the file is fed MODEL's own input. Its kind is read from the file itself
(crossport.foreign), and it is judged as validate judges crossport's own artifact of that kind, on the run's test
split: an fp32 file against the run's reference (every
value within 2·B, every decisive answer unchanged) and against the exact float64 values (every value within B, and
the sign test on the dithered probe); a lossy file by its agreement and accuracy drop with confidence bounds.
Exit code 0 on pass, 3 on fail.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import sys
from pathlib import Path

import numpy as np

from crossport.cli import integer, summary_line

log = logging.getLogger("crossport")

# What the file was converted from: the run's ONNX graph, its PyTorch model, or the ONNX file a run was brought from
# (which reads its own input: crossport's mapping of the published input, scaling and layout, is applied first).
SOURCES = ("onnx", "pytorch", "source")


def build_parser() -> argparse.ArgumentParser:
    from crossport.foreign import KINDS

    parser = argparse.ArgumentParser(prog="python -m pipelines.check", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("file", type=Path, help="a .tflite file or a SavedModel directory")
    parser.add_argument("--against", type=Path, metavar="RUN_DIR",
                        help="the crossport run whose model the file was converted from (its test split, reference "
                             "and exact values)")
    parser.add_argument("--converted-from", choices=SOURCES, default=None,
                        help="what the file was converted from: the run's ONNX graph (onnx2tf, onnx-tf; the default), "
                             "its PyTorch model (litert-torch), or the ONNX file the run was brought from with --onnx "
                             "(source; the default with --onnx here): the file is fed what that model reads, and the "
                             "sign test compares with its exact values")
    from pipelines.run import add_bring_flags

    add_bring_flags(parser.add_argument_group("a file converted from a model crossport has not seen (instead of "
                                              "--against)"),
                    onnx_help="the ONNX model FILE was converted from: imported as pipelines.run --onnx imports it, "
                              "with the flags below, and FILE is fed the model's own input")
    parser.add_argument("--run-dir", type=Path, help="with --onnx: keep the imported run here, to check more files "
                                                     "--against it (default: a temporary folder, removed)")
    parser.add_argument("--expect", choices=KINDS, help="fail unless the file is of this kind (e.g. fp32: a file "
                                                        "holding float16 or int8 weights fails)")
    parser.add_argument("--threads", type=integer(1), default=None, help="the runtimes' threads (default: theirs)")
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
    import shutil
    import tempfile

    source = _source(args)
    if args.onnx:
        folder = args.run_dir or Path(tempfile.mkdtemp(prefix="crossport-check-"))
        try:
            report = check(args.file, imported(args, folder), converted_from=source, expect=args.expect,
                           threads=args.threads)
        finally:
            if args.run_dir is None:
                shutil.rmtree(folder, ignore_errors=True)
    else:
        report = check(args.file, args.against, converted_from=source, expect=args.expect, threads=args.threads)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        sys.stdout.write(render(report) + "\n")
    return 0 if report["verdict"] == "pass" else 3


# pipelines.run's flags that read the model brought with --onnx (pipelines.run.add_bring_flags), by argparse's name
BRING = {"eval_data": "--eval-data", "mean": "--mean", "std": "--std", "eval_orientation": "--eval-orientation",
         "labels_file": "--labels", "orientation": "--orientation"}


def _source(args: argparse.Namespace) -> str:
    """What the file was converted from, once the flags are checked against each other."""
    from crossport.errors import ConfigError

    if bool(args.against) == bool(args.onnx):
        given = "both were" if args.onnx else "neither was"
        raise ConfigError("pipelines.check judges a file against a crossport run (--against RUN_DIR) or against the "
                          f"ONNX model it was converted from (--onnx MODEL); {given} given.",
                          hint="Pass exactly one of --against and --onnx.")
    given = [flag for name, flag in {**BRING, "run_dir": "--run-dir"}.items() if getattr(args, name) is not None]
    if args.against and given:
        raise ConfigError(f"{', '.join(given)} apply to a model brought with --onnx; a run (--against) has its data "
                          "already.", hint="Drop them, or use --onnx MODEL.")
    if args.onnx and args.converted_from not in (None, "source"):
        raise ConfigError(f"--converted-from {args.converted_from} names a part of a crossport run; with --onnx the "
                          "file was converted from MODEL itself.", hint="Drop --converted-from.")
    return args.converted_from or ("source" if args.onnx else "onnx")


def imported(args: argparse.Namespace, folder: Path) -> Path:
    """``args.onnx`` imported into ``folder`` as ``pipelines.run --onnx`` imports it (the import stage alone: the graph,
    its evaluation data and the golden batch's exact values), untracked; the run directory."""
    from pipelines.run import resolve_config
    from pipelines.runner import open_run, run_stages, select
    from pipelines.tracking import NullTracker

    argv = ["--onnx", str(args.onnx), "--run-dir", str(folder), "--no-tracking"]
    for name, flag in BRING.items():
        value = getattr(args, name)
        if value is not None:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    config = resolve_config(argv).config
    manifest = open_run(folder, config, fresh=True)
    run_stages(manifest, config, select("import", config), NullTracker(), resume=False)
    return folder


# The exact values of a run's images are the same for every file checked against it: a process that checks several
# (pipelines.bench --peers checks nine, three converters' files) computes them once. resnet18's take minutes. Keyed
# by the model files (size, modification time, inode) and the images' bytes, so a changed model is never judged on
# an old one's values; the last few kept (one run's test split, and its probe with and without the graph's).
_EXACT: collections.OrderedDict[tuple, object] = collections.OrderedDict()
KEEP_EXACT = 3


def exact_once(paths: dict, reference: str, images: np.ndarray, graph: bool = False, bound: str | None = None,
               lower: bool = False):
    """:func:`pipelines.stages.validate.exact_values`, computed once per process for the same files and images."""
    import hashlib

    from crossport.files import fingerprint
    from pipelines.stages.validate import exact_values

    files = tuple((name, fingerprint(path)) for name, path in sorted(paths.items()))
    key = (reference, files, hashlib.sha256(np.ascontiguousarray(images).view(np.uint8)).hexdigest(), graph, bound,
           lower)
    if key not in _EXACT:
        _EXACT[key] = exact_values(paths, reference, images, graph=graph, bound=bound, lower=lower)
        while len(_EXACT) > KEEP_EXACT:
            _EXACT.popitem(last=False)
    _EXACT.move_to_end(key)
    return _EXACT[key]


def check(path: Path, run_dir: Path, *, converted_from: str = "onnx", expect: str | None = None,
          threads: int | None = None, squared: dict | None = None) -> dict:
    """The gate's report on the servable at ``path`` against the run at ``run_dir`` (the module's docstring).
    ``squared``, where given, gets each output's per-example squared error against the exact values
    (:func:`crossport.parity.squared_errors`), for comparing files with one another."""
    from crossport.errors import ConfigError
    from crossport.exact import sign_threshold
    from crossport.files import read_npz
    from crossport.foreign import KINDS, inspect, load, softmax
    from crossport.interface import INPUT, LOGITS, SCORES, to_inputs
    from crossport.parity import HopSpec, compare, compare_exact, squared_errors
    from crossport.runtimes import chunk_for, load_onnx
    from pipelines.gate import FP32_VALUES, ONNX, POLICIES, REFERENCE
    from pipelines.manifest import Manifest
    from pipelines.stages.validate import ERROR_MODEL, PROBE_SIZE, bound_walked, dithered, walked_where_near

    foreign = inspect(path)  # before minutes of exact values: a file that is no servable ends here
    manifest = Manifest.load(run_dir)
    paths = {name: manifest.require(name, for_stage="check") for name in ("onnx", "checkpoint")
             if name in manifest.artifacts}
    reference = REFERENCE if "checkpoint" in paths else ONNX
    if converted_from == "pytorch" and reference != REFERENCE:
        raise ConfigError(f"--converted-from pytorch, but the run {run_dir} has no PyTorch model (it was brought as "
                          "an ONNX file).", hint="Drop --converted-from.")
    if converted_from == "source" and "source" not in manifest.facts:
        raise ConfigError(f"--converted-from source, but the run {run_dir} was trained here, not brought as an ONNX "
                          "file.", hint="Drop --converted-from, or pass --converted-from pytorch.")
    arrays = read_npz(manifest.require("dataset", for_stage="check"), redo="data", need=("x_test", "y_test"),
                      only=True)
    images, targets = to_inputs(arrays["x_test"]), arrays["y_test"]
    probe = dithered(images[:PROBE_SIZE])
    both = np.concatenate([images, probe])
    chunk = chunk_for(paths["onnx"])
    from training.checkpoint import load_torch  # PyTorch, once the file is known to be a servable

    original = (load_torch(paths["checkpoint"], threads, chunk) if reference == REFERENCE
                else load_onnx(paths["onnx"], threads, chunk))(both)
    if converted_from == "source":  # the file reads what the brought model reads
        both = model_inputs(paths["onnx"], manifest.facts["source"].get("model_input", INPUT), both)
    candidate = load(foreign, both.shape[1:], threads, chunk)(both)
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
    # as validate: the lower bound L on the test split, B walked where the file's or the original's error passes it
    exact = exact_once(paths, reference, images, lower=True).model
    if policy.fp32:
        exact = walked_where_near(paths, reference, images, exact, {reference: ours, runtime: split})
    outputs = [(SCORES, policy.values)]
    if policy.fp32 and LOGITS in split and LOGITS in ours:
        outputs.append((LOGITS, FP32_VALUES))
    name = f"{reference} -> {foreign.container}:{path.name} ({foreign.kind})"
    spec = HopSpec(name, reference, runtime, tuple(outputs), policy.lossy)
    hop = compare(spec, ours, split, targets, exact.bounds)
    if policy.fp32:
        graph = converted_from != "pytorch"
        source = exact_once(paths, reference, probe, graph=graph, bound=exact.bound)  # validate's choice
        judged = [name for name in exact.values if name in split]
        threshold = sign_threshold(sum(exact.values[name].shape[1] for name in judged))
        against = compare_exact(path.name, split, exact, threshold, (probed, source.graph if graph else source.model))
    else:  # a lossy file's error is recorded
        against = compare_exact(path.name, split, exact, None)
    if squared is not None:
        squared.update({name: squared_errors(split[name], exact.values[name]) for name in exact.values
                        if name in split})
    checks = [hop, against]
    passed = not failures and all(check.passed for check in checks)
    return {
        "verdict": "pass" if passed else "fail",
        "file": str(path), "kind": foreign.kind, "container": foreign.container, "input": foreign.describe(),
        "outputs": returned, "scores_from_logits": SCORES not in returned,
        "against": str(run_dir), "reference": reference, "converted_from": converted_from,
        "examples": len(images), "probe_inputs": len(probe),
        "error_model": {**ERROR_MODEL, "bound": exact.bound, "bound_walked": bound_walked(exact)},
        "failures": failures,
        "hops": [hop.to_dict()], "against_exact": [against.to_dict()],
        "detail": None,
    }


def model_inputs(onnx_path: Path, name: str, images: np.ndarray) -> np.ndarray:
    """What the model brought with ``--onnx`` reads, tensor ``name`` of the run's graph, for the published
    ``images``: crossport's mapping (scaling, reshape, transpose; translation.onnx_import) as ONNX Runtime computes
    it."""
    import onnx

    from crossport.interface import INPUT
    from crossport.runtimes import onnx_session

    if name == INPUT:
        return images
    mapping = onnx.utils.Extractor(onnx.load(str(onnx_path))).extract_model([INPUT], [name])
    return onnx_session(mapping).run([name], {INPUT: np.ascontiguousarray(images, np.float32)})[0]


def render(report: dict) -> str:
    from pipelines.summary import parity_table

    lines = [f"{report['file']}: {report['input']}",
             f"judged against {report['against']} ({report['reference']} reference, {report['examples']} test "
             f"examples, {report['probe_inputs']} probe inputs; converted from its {report['converted_from']})",
             *report["failures"], "", parity_table(report), "", f"verdict: {report['verdict'].upper()}"]
    return "\n".join(lines)
