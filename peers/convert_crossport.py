"""crossport: ONNX -> TFLite (float32, then dynamic-range and full int8) in a fresh process, as pipelines.bench --peers
times the peers: onnx-tf's translation, the servable's signatures, the TFLite converter.

Usage: python convert_crossport.py REPO MODEL.onnx LABELS.txt SHAPE OUT_DIR CALIBRATION.npy (the arguments every
converter script takes; SHAPE is not used; CALIBRATION.npy holds the inputs the run's own full int8 file was
calibrated with). Prints one JSON line: the files made, the seconds its imports (TensorFlow's among them) took, the
seconds the float conversion took after them and the seconds the int8 files took after that.
"""

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import numpy as np  # noqa: E402

from crossport.frameworks import own_the_process  # noqa: E402

own_the_process()  # as every crossport command does (crossport.console.run_command)
import tensorflow  # noqa: E402, F401

from export.servable import build_saved_model  # noqa: E402
from export.tflite import convert_tflite  # noqa: E402
from translation.onnx_to_tf import translate  # noqa: E402

imported = time.perf_counter()
source, labels, out, calibration = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[5]), Path(sys.argv[6])
translate(source, out / "tf_graph", expose_intermediates=False)
build_saved_model(out / "tf_graph", tuple(labels.read_text().splitlines()), out / "saved_model")
files = {kind: out / f"model_{kind}.tflite" for kind in ("fp32", "int8_dynamic", "int8_full")}
convert_tflite(out / "saved_model", files["fp32"])
converted = time.perf_counter()
convert_tflite(out / "saved_model", files["int8_dynamic"], "int8_dynamic")
convert_tflite(out / "saved_model", files["int8_full"], "int8_full", calibration=np.load(calibration))
done = time.perf_counter()
print(json.dumps({"files": {kind: str(path) for kind, path in files.items()}, "import_s": imported - started,
                  "convert_s": converted - imported, "quantize_s": done - converted}))
