"""onnx2tf: ONNX -> TFLite (float32 and float16), run in onnx2tf's own environment by pipelines.bench --peers.

Usage: python convert_onnx2tf.py REPO MODEL.onnx LABELS SHAPE OUT_DIR (the arguments every converter
script takes; this one uses MODEL.onnx and OUT_DIR). Prints one JSON line: the files made, the seconds its imports
took and the seconds the conversion took after them. onnx2tf rewrites the ONNX file it is given: pass a copy.
"""

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
import onnx2tf  # noqa: E402

imported = time.perf_counter()
source, out = Path(sys.argv[2]), Path(sys.argv[5])
onnx2tf.convert(input_onnx_file_path=str(source), output_folder_path=str(out), non_verbose=True)
done = time.perf_counter()
files = {"fp32": out / f"{source.stem}_float32.tflite", "fp16": out / f"{source.stem}_float16.tflite"}
print(json.dumps({"files": {kind: str(path) for kind, path in files.items() if path.is_file()},
                  "import_s": imported - started, "convert_s": done - imported}))
