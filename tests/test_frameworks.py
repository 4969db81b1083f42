"""triton is never loaded after TensorFlow: the two native libraries crash the process together (exit -11). Keras'
extras are not loaded into a crossport command's TensorFlow import."""

import gc
import importlib.metadata
import os
import subprocess
import sys
import weakref

import pytest

from crossport.frameworks import (
    FULL_COLLECTION_EVERY,
    KERAS_EXTRAS,
    _NoKerasExtras,
    _NoTritonAfterTensorFlow,
    give_back_memory,
    heap_left_to_itself,
)
from tests.helpers import ROOT, make_emnist_archive


def test_the_guard_reports_triton_missing_only_once_tensorflow_is_loaded(monkeypatch):
    guard = _NoTritonAfterTensorFlow()
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    assert guard.find_spec("triton") is None  # no TensorFlow: the normal finders decide
    monkeypatch.setitem(sys.modules, "tensorflow", object())
    assert guard.find_spec("numpy") is None
    with pytest.raises(ModuleNotFoundError, match="triton"):
        guard.find_spec("triton")
    assert sys.modules["triton"] is None  # later imports and importlib.util.find_spec see it as absent
    assert any(isinstance(finder, _NoTritonAfterTensorFlow) for finder in sys.meta_path)  # importing crossport did it


@pytest.mark.slow
def test_every_torch_path_to_triton_survives_a_process_that_loaded_tensorflow_first(tmp_path):
    """One process that loaded TensorFlow first runs every path by which torch reaches triton: the float64
    reference's derivative through clamp (a MobileNetV3's HardSigmoid brought with --onnx crashed here), the ONNX
    export, training with deterministic algorithms, and torchvision reading EMNIST. torch asks for triton once per
    process, so the first path to ask meets the guard; the others then run in the process it protected."""
    try:
        importlib.metadata.distribution("triton")  # asked of the package metadata, not an import
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("triton is not installed: nothing can load it after TensorFlow")
    make_emnist_archive(tmp_path / "data" / "gzip.zip", split="digits", num_classes=10)
    code = (
        "import sys, tensorflow, numpy as np, torch\n"
        "from pathlib import Path\n"
        "from crossport.exact.layers import HardSigmoid\n"
        "x = torch.linspace(-4, 4, 9, dtype=torch.float64)\n"
        "torch.func.jvp(HardSigmoid(), (x,), (torch.ones_like(x),))\n"
        "assert sys.modules.get('triton', 'absent') is None, 'the guard did not meet the first path'\n"
        "from training.model import MLP, ModelConfig\n"
        "from translation.onnx_export import check_onnx, export_onnx\n"
        "model = MLP(ModelConfig(hidden_sizes=(8,), num_classes=3)).eval()\n"
        f"export_onnx(model, ('a', 'b', 'c'), '0' * 64, Path({str(tmp_path / 'm.onnx')!r}))\n"
        f"check_onnx(Path({str(tmp_path / 'm.onnx')!r}))\n"
        "from training.train import TrainConfig, train\n"
        "x = np.random.default_rng(0).integers(0, 256, (20, 784), dtype=np.uint8)\n"
        "train(x[:15], np.arange(15) % 3, x[15:], np.arange(5) % 3, ModelConfig(hidden_sizes=(8,), num_classes=3),\n"
        "      TrainConfig(epochs=1, batch_size=5), progress=False)\n"
        "from training.data import load_dataset\n"
        f"assert len(load_dataset('emnist-digits', Path({str(tmp_path / 'data')!r}), "
        "allow_download=False).x_train) == 40\n"
        "print('survived')\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("survived")


def test_keras_alone_is_told_its_extras_are_missing():
    guard = _NoKerasExtras()
    for name in KERAS_EXTRAS:
        assert guard.find_spec(name) is None  # asked by anyone but Keras: the normal finders decide
        with pytest.raises(ModuleNotFoundError, match=name):
            exec("guard.find_spec(name + '.sub')", {"__name__": "keras.src.wrappers.fixes", "guard": guard,
                                                     "name": name})
    scope = {"__name__": "keras.src", "guard": guard}
    exec("result = guard.find_spec('numpy')", scope)  # Keras asking for anything else: the normal finders decide
    assert scope["result"] is None


@pytest.mark.slow
def test_a_command_imports_tensorflow_without_keras_extras_and_then_uses_them(tmp_path):
    """Under run_command, TensorFlow's eager import of Keras loads none of scikit-learn, pandas and matplotlib;
    the command itself then imports each of them, and tf.keras still works. Its full collections are seldom."""
    code = (
        "import gc, json, sys\n"
        "from crossport.console import run_command\n"
        "def body():\n"
        "    import tensorflow as tf\n"
        f"    loaded = sorted(m for m in {sorted(KERAS_EXTRAS)!r} if m in sys.modules)\n"
        "    import matplotlib.pyplot, pandas, sklearn.datasets\n"
        "    flat = tf.keras.layers.Flatten()(tf.zeros((2, 3, 4)))\n"
        "    print(json.dumps({'loaded': loaded, 'digits': len(sklearn.datasets.load_digits().target),\n"
        "                      'frame': len(pandas.DataFrame({'a': [1, 2]})), 'flat': list(flat.shape),\n"
        "                      'full_collection_every': gc.get_threshold()[2]}))\n"
        "    return 0\n"
        "sys.exit(run_command(body))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HOME": str(tmp_path / "home")})
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"loaded": [], "digits": 1797, "frame": 2,
                                                                   "flat": [2, 12],
                                                                   "full_collection_every": FULL_COLLECTION_EVERY}


class Cycle:
    """Garbage only the cyclic collector frees: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


def test_the_heap_left_to_itself_is_not_walked_and_what_the_body_makes_is_still_freed():
    gc.disable()  # no automatic pass may free the cycles before the collections this test makes
    try:
        old = Cycle()
        old_ref = weakref.ref(old)
        del old
        with heap_left_to_itself():
            new = Cycle()
            new_ref = weakref.ref(new)
            del new
            gc.collect()  # what the TFLite converter does after each conversion
            assert new_ref() is None  # made inside: freed
            assert old_ref() is not None  # alive at entry: left out of the pass
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert old_ref() is None  # given back to the collector on the way out
    finally:
        gc.enable()


def test_memory_given_back_includes_old_cycles_that_only_a_full_collection_frees():
    class Node:
        pass

    old = Node()
    old.self = old  # a cycle, as a loaded SavedModel's objects are
    gc.collect()  # survived a full pass: now in the oldest generation, which young collections never walk
    alive = weakref.ref(old)
    del old
    give_back_memory()
    assert alive() is None
