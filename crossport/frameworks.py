"""Process-wide workarounds for clashes between the ML frameworks crossport loads together."""

from __future__ import annotations

import importlib.util
import logging
import sys

log = logging.getLogger(__name__)


def keep_triton_away_from_tensorflow() -> None:
    """Stop torch.export from importing triton into a process that already loaded TensorFlow.

    The CUDA build of torch pulls in triton, and torch.export (used by the ONNX exporter
    and by MLflow's PyTorch flavor) imports it when present. Loading triton's native
    library after TensorFlow's crashes the process (segmentation fault, seen with torch
    2.14.1 / triton 3.8 and TF 2.21). CPU export never needs triton, so in that case it is
    marked unavailable for this process. Call this right before anything runs torch.export.
    """
    if "tensorflow" in sys.modules and "triton" not in sys.modules and importlib.util.find_spec("triton"):
        log.debug("TensorFlow is loaded: hiding triton from torch.export to avoid a native-library clash")
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
