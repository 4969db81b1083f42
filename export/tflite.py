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
    - the SavedModel loaded once (:func:`_one_load`).
    """
    from crossport.frameworks import heap_left_to_itself

    with warnings.catch_warnings(), heap_left_to_itself(), _one_load():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        yield


@contextlib.contextmanager
def _one_load():
    """TF 2.21's converter loads the whole SavedModel twice for each file it makes: ``from_saved_model`` to list its
    signatures, ``convert()`` for its debug information, each dropped at once. Both only read it, so both get
    :func:`crossport.runtimes.open_saved_model`'s one load, kept while its files are unchanged (and shared with the
    stage that checked the SavedModel). MobileNetV3-small's three files took 3.9 s of conversion after TensorFlow's
    import instead of 5.2 s (each load 0.3-0.6 s).
    """
    from tensorflow.lite.python import lite

    from crossport.runtimes import open_saved_model

    original = lite._load

    def load(export_dir, tags=None, options=None):
        if options is None and set(tags or ("serve",)) == {"serve"}:  # what a tf.saved_model.load(dir) loads
            return open_saved_model(Path(export_dir))
        return original(export_dir, tags, options)

    lite._load = load
    try:
        yield
    finally:
        lite._load = original


def tflite_converter(saved_model_dir: Path, variant: str, calibration: np.ndarray | None = None):
    """The ``tf.lite.TFLiteConverter`` of ``variant``, configured and not run (the int8 diagnosis runs LiteRT's
    quantization debugger with the very converter the published file came from)."""
    import tensorflow as tf

    if variant not in VARIANTS:
        raise PackageError(f"unknown TFLite variant {variant!r}: expected one of {', '.join(VARIANTS)}.")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[PREDICT_KEY])
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
