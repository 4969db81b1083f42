"""onnx2tf: ONNX -> TFLite (float32, float16, dynamic-range int8 and int8 with float input and output), run in
onnx2tf's own environment by pipelines.bench --peers.

Usage: python convert_onnx2tf.py REPO MODEL.onnx LABELS SHAPE OUT_DIR CALIBRATION.npy (the arguments every converter
script takes; this one uses MODEL.onnx, OUT_DIR and CALIBRATION.npy, the inputs crossport calibrates its own full
int8 file with, already in [0, 1], so onnx2tf's normalisation is told mean 0 and std 1). Prints one JSON line: the
files made, the files it could not make (kind: why; its int8 conversion can fail where its float one succeeded), the
seconds its imports took, the seconds the float conversion took after them and the seconds the int8 files took
after that. onnx2tf rewrites the ONNX file it is given: pass a copy.
"""

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnx2tf  # noqa: E402

imported = time.perf_counter()
source, out, calibration = Path(sys.argv[2]), Path(sys.argv[5]), Path(sys.argv[6])
onnx2tf.convert(input_onnx_file_path=str(source), output_folder_path=str(out), non_verbose=True)
converted = time.perf_counter()
name = onnx.load(str(source), load_external_data=False).graph.input[0].name
failed = {}
try:
    onnx2tf.convert(input_onnx_file_path=str(source), output_folder_path=str(out / "int8"), non_verbose=True,
                    output_dynamic_range_quantized_tflite=True, output_integer_quantized_tflite=True,
                    custom_input_op_name_np_data_path=[[name, str(calibration), np.zeros(1, np.float32),
                                                        np.ones(1, np.float32)]])
except Exception as error:  # its float files stand: the int8 rows say why there are none
    failed = {kind: f"{type(error).__name__}: {error}" for kind in ("int8_dynamic", "int8_full")}
done = time.perf_counter()
files = {"fp32": out / f"{source.stem}_float32.tflite", "fp16": out / f"{source.stem}_float16.tflite",
         "int8_dynamic": out / "int8" / f"{source.stem}_dynamic_range_quant.tflite",
         "int8_full": out / "int8" / f"{source.stem}_integer_quant.tflite"}
print(json.dumps({"files": {kind: str(path) for kind, path in files.items() if path.is_file() and kind not in failed},
                  "failed": failed, "import_s": imported - started, "convert_s": converted - imported,
                  "quantize_s": done - converted}))
