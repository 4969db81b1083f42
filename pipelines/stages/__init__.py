"""The stage table. Each stage is a plain function of a :class:`Context`, one module per kind of stage.

A stage reads its inputs through the manifest (which checks their hashes), writes its
outputs into the run directory, checks what it wrote by reloading it from disk, and returns
them with their parents (the runner records them in the manifest and holds them to the
stage's declared ``makes``) together with params and metrics for tracking.
"""

from __future__ import annotations

from crossport.formats import FORMATS, OPTIONAL, TFLITE_CONVERTED
from pipelines.stages.context import Context, Stage
from pipelines.stages.convert import export_stage, package_stage, tflite_stage, translate_stage
from pipelines.stages.data import data_stage
from pipelines.stages.importing import import_stage
from pipelines.stages.publish import publish_stage, register_stage, registered_as_published, still_published
from pipelines.stages.train import train_stage
from pipelines.stages.validate import VALIDATED, validate_stage

__all__ = ["STAGES", "STAGE_NAMES", "Context", "Stage", "needs_on", "stage_by_name", "stages_on"]

STAGES: tuple[Stage, ...] = (
    Stage("data", (), ("dataset", "labels", "golden", "calibration"), data_stage,
          reads=("dataset", "seed", "data_dir"), route="train"),
    Stage("train", ("dataset", "labels", "golden"), ("checkpoint",), train_stage,
          reads=("model", "epochs", "batch_size", "learning_rate", "seed", "patience", "nproc", "nnodes"),
          route="train"),
    Stage("export", ("checkpoint", "golden"), ("onnx", "golden_exact"), export_stage, route="train"),
    # A model brought as an ONNX file (--onnx): its file, labels and evaluation data instead of the three above.
    Stage("import", (), ("source_onnx", "dataset", "labels", "golden", "calibration", "onnx", "golden_exact"),
          import_stage, reads=("onnx", "eval_data", "eval_orientation", "labels_file", "orientation", "mean", "std",
                                      "seed", "data_dir"),
          route="import"),
    Stage("translate", ("onnx", "golden", "golden_exact"), ("tf_graph",), translate_stage),
    Stage("package", ("tf_graph", "onnx", "labels", "golden", "golden_exact"), ("saved_model", "warmup"),
          package_stage, reads=("name",)),  # the warmup records name the model
    Stage("tflite", ("saved_model", "golden", "golden_exact", "calibration"), tuple(f.name for f in TFLITE_CONVERTED),
          tflite_stage),
    Stage("validate", ("dataset", "labels", "tf_graph", "calibration", *VALIDATED),
          ("parity", "parity_errors", "confusion_matrix", "parity_html"), validate_stage,
          reads=("int8_fallback", "int8_max_drop", "undecided"),
          may_make=OPTIONAL),  # int8_mixed, when int8_full does not pass and the fallback does
    Stage("publish", ("parity", "parity_errors", "confusion_matrix", "parity_html", *(f.name for f in FORMATS),
                      "labels", "warmup"),
          (), publish_stage, reads=("models_dir", "name", "undecided", "serving_root", "republish"),
          intact=still_published),
    Stage("register", ("parity", "parity_html", "golden"), (), register_stage,
          reads=("name", "tracking", "tracking_uri"), intact=registered_as_published),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def stages_on(route: str) -> tuple[Stage, ...]:
    return tuple(stage for stage in STAGES if stage.route in (None, route))


def stage_by_name(name: str) -> Stage:
    return next(stage for stage in STAGES if stage.name == name)


def needs_on(stage: Stage, route: str) -> tuple[str, ...]:
    """The needs of ``stage`` that some stage of ``route`` makes or may make: validate reads the checkpoint only
    where one is trained."""
    made = {name for other in stages_on(route) for name in (*other.makes, *other.may_make)}
    return tuple(need for need in stage.needs if need in made)
