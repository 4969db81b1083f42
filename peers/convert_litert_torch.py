"""litert-torch: the PyTorch module -> TFLite (float32, dynamic-range int8 and static int8), run in litert-torch's
own environment by pipelines.bench --peers.

Usage: python convert_litert_torch.py REPO CHECKPOINT LABELS SHAPE OUT_DIR CALIBRATION.npy (the arguments every
converter script takes; SHAPE is one example's, e.g. 784 or 32,32,3; LABELS is not used). The module is read from
crossport's checkpoint with crossport's own model code (REPO on the path); litert-torch converts it for a batch of
one (it cannot keep the batch free). Its int8 files follow its own documented routes:
- dynamic-range int8 by its ``full_dynamic_recipe``. Its PT2E dynamic configuration made a digits MLP file that
  agreed with the model on 0 % of pipelines.check's decisive examples.
- static int8 by PT2E, calibrated on CALIBRATION.npy, the inputs crossport calibrates its own full int8 file with.
Prints one JSON line: the files made, the seconds the imports and loading took, the seconds the float conversion
took after them and the seconds the int8 files took after that.
"""

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import litert_torch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from litert_torch.generative.quantize import quant_recipes  # noqa: E402
from litert_torch.quantize import pt2e_quantizer  # noqa: E402
from litert_torch.quantize.quant_config import QuantConfig  # noqa: E402
from torchao.quantization.pt2e import quantize_pt2e  # noqa: E402

from training.checkpoint import load_checkpoint  # noqa: E402

model = load_checkpoint(Path(sys.argv[2])).model.eval()
imported = time.perf_counter()
shape, out, calibration = tuple(int(d) for d in sys.argv[4].split(",")), Path(sys.argv[5]), Path(sys.argv[6])
out.mkdir(parents=True, exist_ok=True)
example = torch.zeros(1, *shape)
files = {kind: out / f"model_{kind}.tflite" for kind in ("fp32", "int8_dynamic", "int8_full")}
litert_torch.convert(model, (example,)).export(str(files["fp32"]))
converted = time.perf_counter()
litert_torch.convert(model, (example,), quant_config=quant_recipes.full_dynamic_recipe()).export(
    str(files["int8_dynamic"]))
quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
    pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
observed = quantize_pt2e.prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
with torch.no_grad():
    for row in np.load(calibration).reshape(-1, 1, *shape):
        observed(torch.from_numpy(row))
quantized = quantize_pt2e.convert_pt2e(observed, fold_quantize=False)
litert_torch.convert(quantized, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
    str(files["int8_full"]))
done = time.perf_counter()
print(json.dumps({"files": {kind: str(path) for kind, path in files.items()}, "import_s": imported - started,
                  "convert_s": converted - imported, "quantize_s": done - converted}))
