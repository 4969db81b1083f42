"""SavedModel ``serving_default`` → TFLite flatbuffers, one per variant.

Every variant keeps float32 inputs and outputs (``images`` in, ``scores`` out), so the
same client code drives all four; the int8 variants quantize inside the graph.

- ``fp32``: no optimization.
- ``fp16``: weights stored as float16, computed in float32.
- ``int8_dynamic``: dynamic-range quantization: int8 weights, activations quantized on the fly.
- ``int8_full``: int8 weights and activations, calibrated on a representative set of
  training images; float32 at the edges (quantize/dequantize ops).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path

import numpy as np

from crossport.errors import PackageError
from crossport.files import write_bytes_atomic
from crossport.formats import TFLITE_VARIANTS as VARIANTS
from crossport.interface import INPUT, PREDICT_KEY

MIN_CALIBRATION = 200


def convert_tflite(saved_model_dir: Path, out_path: Path, variant: str = "fp32",
                   calibration: np.ndarray | None = None) -> None:
    """Convert the predict signature (classify's ParseExampleV2 is not a TFLite op)."""
    with converting():
        converter = tflite_converter(saved_model_dir, variant, calibration)
        try:
            flatbuffer = converter.convert()
        except Exception as error:  # the converter raises ConverterError and friends
            raise PackageError(f"TFLite {variant} conversion of {saved_model_dir} failed: {error}.") from error
    write_bytes_atomic(Path(out_path), flatbuffer)


@contextlib.contextmanager
def converting():
    """The TFLite converter at work, made from :func:`tflite_converter` and run inside this block:

    - its warning about TF's own (deprecated) ``tf.lite.Interpreter``, which calibration runs, silenced (crossport
      itself runs TFLite files with ai_edge_litert);
    - its full garbage collection after each conversion walking only what the conversion made
      (:func:`crossport.frameworks.heap_left_to_itself`);
    - the SavedModel not loaded at all (:func:`_no_load`).
    """
    from crossport.frameworks import heap_left_to_itself

    with warnings.catch_warnings(), heap_left_to_itself(), _no_load():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        yield


@contextlib.contextmanager
def _no_load():
    """TF 2.21's converter loads the whole SavedModel twice for each file it makes: ``from_saved_model`` to list its
    signatures' names, ``convert()`` for the debug information saved beside the graph; and ``convert()`` imports the
    graph once more, into a TF1 graph of its own, only to hand on the GraphDef it read from ``saved_model.pb`` (the
    tensors it also finds there are used by its route for TF1 SavedModels alone). Its MLIR importer then reads the
    directory itself. All three get :class:`SavedSignatures`, which reads them from the directory's files as the
    loads do: a load of MobileNetV3-small's servable took 0.3-0.4 s a file, the import 0.16-0.20 s of the 0.76-0.86 s
    its fp32 file took, and every file comes out byte for byte the same (tests/test_tflite.py). A converter that
    takes TensorFlow's other route (a SavedModel the MLIR importer cannot read, a TF1 SavedModel) is refused
    (:func:`tflite_converter`); crossport's are TF2 SavedModels.
    """
    from tensorflow.lite.python import lite

    original, importing = lite._load, lite.TFLiteSavedModelConverterV2._load_saved_model
    read: dict[Path, SavedSignatures | None] = {}  # asked three times a file; resnet18's parses in 0.12 s

    def saved(export_dir, tags) -> SavedSignatures | None:
        if set(tags or ("serve",)) != {"serve"}:  # what a tf.saved_model.load(dir) loads
            return None
        directory = Path(export_dir)
        if directory not in read:
            read[directory] = SavedSignatures.read(directory)
        return read[directory]

    def load(export_dir, tags=None, options=None):
        found = saved(export_dir, tags) if options is None else None
        return found if found is not None else original(export_dir, tags, options)

    def graph_of(converter, saved_model_dir, saved_model_tags):
        found = saved(saved_model_dir, saved_model_tags)
        return (found.graph_def, [], []) if found is not None else importing(converter, saved_model_dir,
                                                                            saved_model_tags)

    lite._load, lite.TFLiteSavedModelConverterV2._load_saved_model = load, graph_of
    try:
        yield
    finally:
        lite._load, lite.TFLiteSavedModelConverterV2._load_saved_model = original, importing


@dataclasses.dataclass(frozen=True)
class SavedSignatures:
    """What the TFLite converter reads of a SavedModel on its saved-model route: the signatures' names (each standing
    for a function that route never calls), the graph's debug information, which is empty unless the SavedModel was
    saved with it, and the GraphDef of its one MetaGraph."""

    signatures: dict
    graph_debug_info: object
    graph_def: object

    @classmethod
    def read(cls, saved_model_dir: Path) -> SavedSignatures | None:
        """From the directory's files, as ``tf.saved_model.load`` reads them; None for a SavedModel saved with debug
        information (``SaveOptions(save_debug_info=True)``; crossport's are not), which a load rewrites, or with
        other MetaGraphs than one tagged ``serve``."""
        from tensorflow.python.saved_model import loader_impl

        proto, debug_info = loader_impl.parse_saved_model_with_debug_info(str(saved_model_dir))
        if debug_info.ByteSize() or len(proto.meta_graphs) != 1 or list(proto.meta_graphs[0].meta_info_def.tags) != [
                "serve"]:
            return None
        meta_graph = proto.meta_graphs[0]
        return cls({key: None for key in meta_graph.signature_def}, debug_info, meta_graph.graph_def)


def tflite_converter(saved_model_dir: Path, variant: str, calibration: np.ndarray | None = None):
    """The ``tf.lite.TFLiteConverter`` of ``variant``, configured and not run (the int8 diagnosis runs LiteRT's
    quantization debugger with the very converter the published file came from)."""
    import tensorflow as tf
    from tensorflow.lite.python import lite

    if variant not in VARIANTS:
        raise PackageError(f"unknown TFLite variant {variant!r}: expected one of {', '.join(VARIANTS)}.")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[PREDICT_KEY])
    if not isinstance(converter, lite.TFLiteSavedModelConverterV2):  # the route for TF1 SavedModels (schema 0)
        raise PackageError(f"{saved_model_dir} is not a TensorFlow 2 SavedModel the TFLite converter imports whole.",
                           hint="Re-run the package stage, which writes one.")
    if variant != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8_full":
        if calibration is None or len(calibration) < MIN_CALIBRATION:
            found = 0 if calibration is None else len(calibration)
            raise PackageError(f"full int8 needs at least {MIN_CALIBRATION} calibration images, found {found}.",
                               hint="Re-run the data stage; it samples them from the training split (for a model "
                                    "brought with --onnx, from --eval-data).")
        samples = np.asarray(calibration, dtype=np.float32)

        def representative_dataset():
            from crossport.console import progress

            for index in progress(range(len(samples)), desc="int8 calibration", unit="image"):
                yield {INPUT: samples[index : index + 1]}

        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter
