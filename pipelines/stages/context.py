"""What every stage is given (:class:`Context`), what a stage is (:class:`Stage`), and the helpers stages share:
reading the run's arrays, labels and golden batch, and a stage's own check of the file it just wrote."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from crossport.errors import DataError
from crossport.interface import INPUT
from crossport.parity import LossyPolicy, compare, raise_on_failure
from pipelines.config import PipelineConfig
from pipelines.gate import hop_spec
from pipelines.manifest import Manifest
from pipelines.results import StageResult

log = logging.getLogger(__name__)

GOLDEN_SIZE = 64
CALIBRATION_SIZE = 500  # full-int8 calibration images drawn from the training split


@dataclass
class Context:
    config: PipelineConfig
    manifest: Manifest
    inputs: dict[str, Path] = field(default_factory=dict)  # the stage's needs, hashes verified
    tracker: object = None  # pipelines.tracking tracker; only the register stage uses it

    def input(self, name: str) -> Path:
        return self.inputs[name]

    @property
    def run_dir(self) -> Path:
        return self.manifest.run_dir


@dataclass(frozen=True)
class Stage:
    """A plain function and its contract: the artifacts it needs and makes, and the config
    fields its outputs depend on (``reads``: a change to one re-runs the stage on resume)."""

    name: str
    needs: tuple[str, ...]
    makes: tuple[str, ...]
    run: Callable[[Context], StageResult]
    reads: tuple[str, ...] = ()
    # For a stage whose result lives outside the run directory: is it still there and current?
    intact: Callable[[Manifest], bool] | None = None
    # The run route (PipelineConfig.route) the stage belongs to; None: every route.
    route: str | None = None
    # Artifacts the stage makes only when a run needs them (crossport.formats: optional formats); a stage that runs
    # again without making one drops the old one from the manifest, so nothing stale is read after it.
    may_make: tuple[str, ...] = ()



# --- helpers ---------------------------------------------------------------------------


DATASET_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def load_arrays(ctx: Context, names: tuple[str, ...] = DATASET_ARRAYS) -> dict[str, np.ndarray]:
    """The dataset's arrays ``names``, and only those (EMNIST byclass's training images are 0.55 GB)."""
    from crossport.files import read_npz

    return read_npz(ctx.input("dataset"), redo="import" if ctx.config.onnx else "data", need=names, only=True)


def read_labels(ctx: Context) -> tuple[str, ...]:
    from crossport.interface import label_problem

    path = ctx.input("labels")
    labels = tuple(path.read_text(encoding="utf-8", errors="replace").splitlines())
    problem = label_problem(labels)
    if problem:
        raise DataError(f"the run's {path} {problem}.",
                        hint=f"Re-run the {'import' if ctx.config.onnx else 'data'} stage.")
    return labels


def golden_inputs(ctx: Context) -> np.ndarray:
    return recorded_inputs(ctx, "golden")


def recorded_inputs(ctx: Context, name: str) -> np.ndarray:
    """The model inputs of a recorded image set (``golden``, ``calibration``), made by data or import."""
    from crossport.files import read_npz
    from crossport.interface import to_inputs

    return to_inputs(read_npz(ctx.input(name), redo="import" if ctx.config.onnx else "data",
                              need=("images",))["images"])


def golden_exact(ctx: Context):
    from crossport.exact import Exact

    return Exact.load(ctx.input("golden_exact"))


# On 64 golden images a lossy variant's agreement rate cannot be measured; a stage's own
# check only proves it loads, keeps the interface and stays finite. validate judges it.
INTERFACE_ONLY = LossyPolicy(max_disagreement=1.0, max_accuracy_drop=None, confidence=0.5,
                             reason="golden-batch self-check: interface and finiteness only")


def self_check(reference: str, candidate: str, ref_out: dict, cand_out: dict, exact, *, diagnose=None) -> None:
    """A stage's check of the file it just wrote, on the golden batch, with the golden batch's exact bounds.

    ``diagnose``, when given, is called on failure and its text added to the error (the
    divergence finder, for the TensorFlow graph).
    """
    spec = hop_spec(reference, candidate)
    if spec.lossy is not None:
        spec = replace(spec, lossy=INTERFACE_ONLY)
    result = compare(spec, ref_out, cand_out, bounds=exact.bounds)
    raise_on_failure([result], detail=diagnose() if diagnose and not result.passed else None)


def locate_divergence(onnx_path: Path, tf_graph: Path, images: np.ndarray, network_gamma: float):
    """Run the divergence finder (ONNX Runtime vs the TF translation, node by node)."""
    from translation.divergence import find_divergence
    from translation.onnx_export import read_onnx

    proto = read_onnx(onnx_path, missing="Run the export or import stage first.", redo="Re-run the stage that made it.")
    return find_divergence(proto, tf_graph, {INPUT: images}, network_gamma)
