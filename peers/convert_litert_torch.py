"""litert-torch: the PyTorch module -> TFLite (float32), run in litert-torch's own environment by
pipelines.bench --peers.

Usage: python convert_litert_torch.py REPO CHECKPOINT LABELS SHAPE OUT_DIR (the arguments every converter
script takes; SHAPE is one example's, e.g. 784 or 32,32,3; LABELS is not used). The module is read from
crossport's checkpoint with crossport's own model code (REPO on the path); litert-torch converts it for a
batch of one (it cannot keep the batch free). Prints one JSON line: the files made, the seconds the imports
and loading took and the seconds the conversion took after them.
"""

import json
import sys
import time
from pathlib import Path

started = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import litert_torch  # noqa: E402
import torch  # noqa: E402

from training.checkpoint import load_checkpoint  # noqa: E402

model = load_checkpoint(Path(sys.argv[2])).model.eval()
imported = time.perf_counter()
shape, out = tuple(int(d) for d in sys.argv[4].split(",")), Path(sys.argv[5])
out.mkdir(parents=True, exist_ok=True)
example = torch.zeros(1, *shape)
litert_torch.convert(model, (example,)).export(str(out / "model_fp32.tflite"))
done = time.perf_counter()
print(json.dumps({"files": {"fp32": str(out / "model_fp32.tflite")}, "import_s": imported - started,
                  "convert_s": done - imported}))
