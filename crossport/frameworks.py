"""Process-wide workarounds for clashes between the ML frameworks crossport loads together."""

from __future__ import annotations

import contextlib
import gc
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


# What Keras 3 imports, when it is installed, for integrations crossport never uses (the scikit-learn wrapper, pandas
# data adapters, image-gallery plots), each guarded by ``except ImportError``. TensorFlow imports Keras eagerly, so
# every process that imports TensorFlow paid for them: 1.4 s of its 4.7 s import on TF 2.21 / Keras 3.15 (sklearn
# 0.73 s with scipy.stats, pandas 0.36 s, matplotlib.pyplot 0.35 s; python -X importtime).
KERAS_EXTRAS = frozenset({"sklearn", "pandas", "matplotlib"})
IMPORT_MACHINERY = ("importlib", "_frozen_importlib")


class _NoKerasExtras(importlib.abc.MetaPathFinder):
    """Reports :data:`KERAS_EXTRAS` missing to Keras' own modules, and only to them, while they are not loaded: Keras
    goes without its integrations, and anyone else (crossport's plots, the digits dataset, MLflow) imports them as
    usual. Installed by crossport's commands only (:func:`crossport.console.run_command`), which own their process:
    a program that imports crossport as a library keeps Keras whole."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in KERAS_EXTRAS:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(IMPORT_MACHINERY):
            frame = frame.f_back
        if frame is None or not frame.f_globals.get("__name__", "").startswith("keras."):
            return None
        raise ModuleNotFoundError(f"{name} is not loaded for Keras in a crossport command", name=name)


def keep_keras_extras_out() -> None:
    """Install the guard (once per process): Keras' optional imports of :data:`KERAS_EXTRAS` fail from now on."""
    if not any(isinstance(finder, _NoKerasExtras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _NoKerasExtras())


# Python's default runs a full collection after every 10 collections of the middle generation, once the objects that
# survived since the last full one are a quarter of the heap. While TensorFlow, PyTorch and scikit-learn import, the
# heap grows by a quarter again and again: a digits run made ten full passes over it during its imports, 1.1 s of a
# 13 s run, and freed almost nothing (gc.callbacks, 2026-12-06). Every 100: 5 passes, 0.2 s, and the same peak memory
# (1.75 GB on digits; 2.85 against 2.83 GB on the full-size byclass stand-in, one epoch).
# Young objects are collected as often as before.
FULL_COLLECTION_EVERY = 100


def collect_the_old_heap_seldom() -> None:
    """Full collections every :data:`FULL_COLLECTION_EVERY` middle-generation collections, not every 10."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def own_the_process() -> None:
    """What a crossport command sets in the process it owns (:func:`crossport.console.run_command`; the test processes
    and the peers' timed conversion do the same): Keras without its extras, full collections seldom."""
    keep_keras_extras_out()
    collect_the_old_heap_seldom()


def give_back_memory() -> None:
    """Collect what reference cycles hold and hand the C heap's free pages back to the kernel (glibc's
    ``malloc_trim``; elsewhere the collection alone). A dropped SavedModel is thousands of objects in cycles: resnet18's
    two held 0.63 GB that neither dropping them (0.17 GB back) nor a collection alone (nothing back) returned, and the
    next stage's peak stood on it. One full collection in a process holding TensorFlow and PyTorch is about 0.25 s."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: a C library without malloc_trim
        ctypes.CDLL(None).malloc_trim(0)


@contextlib.contextmanager
def heap_left_to_itself():
    """Runs its body with every object alive now left out of the garbage collector's passes (``gc.freeze``).

    TensorFlow's TFLite converter runs a full collection after each conversion to free the SavedModel it loaded. In a
    process holding TensorFlow, PyTorch and ONNX that pass walks millions of objects: 0.37 s a conversion, 1.5 s of the
    tflite stage's four (TF 2.21, cProfile, 2026-12-06). What the converter means to free is made inside the body and
    is still collected; the objects frozen here go back to the collector's oldest generation on the way out.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
