"""The one table of published formats: every module that lists formats derives it from here.

Validate, publish, the servable card, the web service, the benchmark, the serverless
builder and the TFLite converter read :data:`FORMATS`; adding a format is one row here
plus its converter (and, for a lossy one, its policy in ``pipelines/gate.py``). An ``optional`` format is made
only when a run needs it (``int8_mixed``: by validate's int8 fallback, when ``int8_full`` fails the gate); every
consumer takes the formats a run or a version holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossport.interface import ASSETS_EXTRA


@dataclass(frozen=True)
class Format:
    name: str  # artifact name in run manifests and version manifests; the card's key; the serve backend
    path: str  # where it lives inside a published version
    runtime: str  # the name validate checks it under (its parity candidate)
    parent: str  # the runtime it is converted from, which validate also checks it against
    loader: str  # its runtime: a key of crossport.runtimes.LOADERS ("saved_model", "onnx" or "tflite")
    variant: str | None = None  # the TFLite variant
    lossy: bool = False  # judged by agreement and accuracy statistics instead of float32 error bounds
    served: bool = True  # a backend of pipelines.serve
    serverless: bool = False  # can be packaged by serving.serverless
    calibrated: bool = False  # converted with the calibration images too
    arithmetic: str = "float32"  # what its matrix products run in on a CPU (the benchmark's ceiling is float32's)
    optional: bool = False  # made only when needed, by validate rather than by a converting stage


def _tflite(variant: str, *, lossy: bool, calibrated: bool = False, arithmetic: str = "float32",
            optional: bool = False) -> Format:
    return Format(f"tflite_{variant}", f"{ASSETS_EXTRA}/model_{variant}.tflite", f"tflite_{variant}",
                  "saved_model:serving_default", "tflite", variant=variant, lossy=lossy, serverless=True,
                  calibrated=calibrated, arithmetic=arithmetic, optional=optional)


# In conversion order: each format's parent comes before it.
FORMATS: tuple[Format, ...] = (
    Format("onnx", f"{ASSETS_EXTRA}/model.onnx", "onnxruntime", "pytorch", "onnx"),
    Format("saved_model", ".", "saved_model:serving_default", "onnxruntime", "saved_model"),
    _tflite("fp32", lossy=False),
    _tflite("fp16", lossy=True),  # float16 weights, widened to float32 on CPUs
    _tflite("int8_dynamic", lossy=True, arithmetic="int8"),
    _tflite("int8_full", lossy=True, calibrated=True, arithmetic="int8"),
    # int8_full with the fewest layers kept in float that passes the gate, when int8_full itself fails it
    _tflite("int8_mixed", lossy=True, calibrated=True, arithmetic="int8", optional=True),
)
BY_NAME = {fmt.name: fmt for fmt in FORMATS}
BY_RUNTIME = {fmt.runtime: fmt for fmt in FORMATS}
TFLITE_FORMATS = tuple(fmt for fmt in FORMATS if fmt.variant is not None)
TFLITE_CONVERTED = tuple(fmt for fmt in TFLITE_FORMATS if not fmt.optional)  # what the tflite stage makes
TFLITE_VARIANTS = tuple(fmt.variant for fmt in TFLITE_CONVERTED)  # what export/tflite.py converts to
OPTIONAL = tuple(fmt.name for fmt in FORMATS if fmt.optional)
SERVED = tuple(fmt.name for fmt in FORMATS if fmt.served)
SERVERLESS_VARIANTS = tuple(fmt.variant for fmt in TFLITE_FORMATS if fmt.serverless)

