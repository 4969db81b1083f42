"""SavedModel ``serving_default`` → TFLite flatbuffers."""

from __future__ import annotations

from pathlib import Path

from crossport.errors import PackageError
from crossport.files import write_bytes_atomic

VARIANTS = ("fp32",)


def convert_tflite(saved_model_dir: Path, out_path: Path, variant: str = "fp32") -> None:
    """Convert the predict signature (classify's ParseExampleV2 is not a TFLite op)."""
    import tensorflow as tf

    if variant not in VARIANTS:
        raise PackageError(f"unknown TFLite variant {variant!r}: expected one of {', '.join(VARIANTS)}.")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=["serving_default"])
    try:
        flatbuffer = converter.convert()
    except Exception as error:  # the converter raises ConverterError and friends
        raise PackageError(f"TFLite conversion of {saved_model_dir} failed: {error}.") from error
    write_bytes_atomic(Path(out_path), flatbuffer)
