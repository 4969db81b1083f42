"""crossport: ONNX -> TFLite (float32) in a fresh process, as pipelines.bench --peers times the peers: onnx-tf's
translation, the servable's signatures, the TFLite converter.

Usage: python convert_crossport.py REPO MODEL.onnx LABELS.txt SHAPE OUT_DIR (the arguments every converter
script takes; SHAPE is not used). Prints one JSON line: the files made, the
seconds its imports (TensorFlow's among them) took and the seconds the conversion took after them.
"""

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import tensorflow  # noqa: E402, F401

from export.servable import build_saved_model  # noqa: E402
from export.tflite import convert_tflite  # noqa: E402
from translation.onnx_to_tf import translate  # noqa: E402

imported = time.perf_counter()
source, labels, out = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[5])
translate(source, out / "tf_graph", expose_intermediates=False)
build_saved_model(out / "tf_graph", tuple(labels.read_text().splitlines()), out / "saved_model")
convert_tflite(out / "saved_model", out / "model_fp32.tflite")
done = time.perf_counter()
print(json.dumps({"files": {"fp32": str(out / "model_fp32.tflite")}, "import_s": imported - started,
                  "convert_s": done - imported}))
