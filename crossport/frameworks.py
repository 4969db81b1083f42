"""Process-wide workarounds for clashes between the ML frameworks crossport loads together."""

from __future__ import annotations

import importlib.abc
import logging
import sys

log = logging.getLogger(__name__)


class _NoTritonAfterTensorFlow(importlib.abc.MetaPathFinder):
    """Refuses to import triton into a process that has loaded TensorFlow.

    The CUDA build of torch ships triton, and torch imports it whenever its compiler stack
    loads: torch.export (the ONNX exporter, MLflow's PyTorch flavor), deterministic
    algorithms, torchvision, and forward-mode derivatives through primitives such as
    ``clamp`` (crossport's float64 reference). Loading triton's native library after
    TensorFlow's crashes the process (segmentation fault, seen with torch 2.14.1 / triton 3.8
    and TF 2.21). crossport never compiles kernels, so triton is reported missing instead,
    which every caller in torch handles. The decision is taken when triton is imported, not
    when the guard is installed: which framework a process loads first depends on the stages
    it runs.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "triton" or "tensorflow" not in sys.modules:
            return None
        log.debug("TensorFlow is loaded: triton is reported missing to avoid a native-library clash")
        sys.modules["triton"] = None  # later imports and importlib.util.find_spec see it as absent
        raise ModuleNotFoundError("triton is not loaded into a process that loaded TensorFlow", name="triton")


def keep_triton_away_from_tensorflow() -> None:
    """Install the guard (once per process): from now on, triton is missing whenever TensorFlow is loaded."""
    if not any(isinstance(finder, _NoTritonAfterTensorFlow) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoTritonAfterTensorFlow())
