"""``python -m pipelines.diagnose <run-dir>``: where does the TensorFlow graph leave ONNX?

Runs every intermediate tensor of the run's ONNX graph in ONNX Runtime and the same
tensors in its TensorFlow translation, compares them node by node and names the first
node whose output leaves tolerance. Exit code 0 when every node agrees, 3 when one does not.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from crossport.cli import integer, summary_line

log = logging.getLogger("crossport")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipelines.diagnose", allow_abbrev=False,
                                     description=summary_line(__doc__))
    parser.add_argument("run_dir", type=Path, help="a run directory with export and translate done")
    parser.add_argument("--examples", type=integer(1), default=512, help="test images to run (default: 512)")
    parser.add_argument("--json", action="store_true", help="print the full node table as JSON")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks and the libraries' output (default: crossport-diagnose-<pid>.log in "
                             "the temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from crossport.console import command_log, run_command

    args = build_parser().parse_args(argv)
    # onnx-tf and TensorFlow print as they load: into the command's log
    return run_command(lambda: _diagnose(args), debug=args.debug, log_file=command_log("diagnose"))


def _diagnose(args: argparse.Namespace) -> int:

    from crossport.exact import Exact
    from crossport.interface import to_inputs
    from pipelines.manifest import Manifest
    from pipelines.stages.context import locate_divergence

    manifest = Manifest.load(args.run_dir)
    onnx_path = manifest.require("onnx", for_stage="diagnose")
    tf_graph = manifest.require("tf_graph", for_stage="diagnose")
    from crossport.files import read_npz

    arrays = read_npz(manifest.require("dataset", for_stage="diagnose"), redo="data", need=("x_test",))
    images = to_inputs(arrays["x_test"][: args.examples])
    network_gamma = Exact.load(manifest.require("golden_exact", for_stage="diagnose")).network_gamma
    divergence = locate_divergence(onnx_path, tf_graph, images, network_gamma)
    if args.json:
        sys.stdout.write(json.dumps(divergence.to_dict(), indent=2) + "\n")
    else:
        lines = [f"{'#':>3} {'node':<32} {'op':<12} {'max |Δ|':>10}  within tolerance"]
        for diff in divergence.nodes:
            lines.append(f"{diff.index:>3} {diff.node[:32]:<32} {diff.op_type:<12} {diff.max_abs:>10.2e}  "
                         f"{'no' if diff.bound_exceeded else 'yes'}")
        lines.append(divergence.describe())
        sys.stdout.write("\n".join(lines) + "\n")
    return 3 if divergence.first else 0


if __name__ == "__main__":
    sys.exit(main())
