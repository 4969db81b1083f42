"""The int8 diagnosis finds the layer that breaks full-int8 quantization (export/int8_layers.py): a model built so
that one layer does, against the same model without the flaw."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two models through the converters and LiteRT's debugger: seconds, not a unit test


def saved_model_of(model, root):
    from crossport.files import sha256_file
    from export.servable import build_saved_model
    from training.checkpoint import save_checkpoint
    from training.train import TrainConfig
    from translation.onnx_export import export_onnx
    from translation.onnx_to_tf import translate

    labels = tuple("abcd")
    root.mkdir()
    save_checkpoint(root / "model.pt", model, labels, "0" * 64, {"test_accuracy": 0.0}, TrainConfig())
    export_onnx(model, labels, sha256_file(root / "model.pt"), root / "model.onnx")
    translate(root / "model.onnx", root / "tf_graph")
    build_saved_model(root / "tf_graph", labels, root / "saved_model")
    return root / "saved_model"


def mlp(outlier: float):
    """784 → 32 → 16 → 4; ``outlier`` scales one unit of the first layer, whose output range it stretches."""
    import torch

    from training.model import MLP, ModelConfig

    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden_sizes=(32, 16), num_classes=4, dropout=0.0)).eval()
    with torch.no_grad():
        model.layers[0].weight[0] *= outlier
        model.layers[0].bias[0] = abs(model.layers[0].bias[0]) * outlier + outlier  # the unit is on: ReLU keeps it
    return model


def test_the_layer_whose_range_one_unit_stretches_is_ranked_first(tmp_path):
    from export.int8_layers import layer_errors

    rng = np.random.default_rng(0)
    calibration, samples = rng.random((200, 784), dtype=np.float32), rng.random((48, 784), dtype=np.float32)
    clean = layer_errors(saved_model_of(mlp(1.0), tmp_path / "clean"), calibration, samples)
    broken = layer_errors(saved_model_of(mlp(1000.0), tmp_path / "broken"), calibration, samples)
    first = min(broken, key=lambda layer: layer["order"])  # the first layer's output, in graph order
    assert broken[0]["layer"] == first["layer"] and broken[0]["op"] == "FULLY_CONNECTED", broken[:3]
    assert broken[0]["typical_relative_error"] > 0.5, broken[0]  # its typical value is lost to the stretched step
    assert max(layer["typical_relative_error"] or 0 for layer in clean) < 0.1, clean  # nothing lost without it
    assert broken[-1]["op"] == "SOFTMAX"  # the scores' own rounding is listed last, whatever its figure
    assert all(0 < layer["rmse_over_scale"] < 1 for layer in broken[:1])  # LiteRT's own figure sees only rounding


def test_dynamic_range_weights_are_diagnosed_layer_by_layer(tmp_path):
    """int8_dynamic keeps activations in float, so its weights are all it loses: each layer's int8 weights against
    the fp32 file's. A layer whose every output unit has one weight 1000× the rest gets a step that rounds the rest
    to zero (a typical relative error of exactly 1); a PyTorch-initialised layer, uniform in ±b, loses at most
    step/2 ≤ (b/127)/2 of every weight at least b/2 in size, which is half of them: its median is at most 1/127."""
    import torch

    from export.int8_layers import ROUNDING_ONLY, weight_errors
    from export.tflite import convert_tflite
    from training.model import MLP, ModelConfig

    torch.manual_seed(0)  # 784 → 64 → 32 → 4: the converter quantizes weights of 1,024 values or more, the first two
    model = MLP(ModelConfig(hidden_sizes=(64, 32), num_classes=4, dropout=0.0)).eval()
    with torch.no_grad():
        model.layers[3].weight[:, 0] *= 1000  # the second layer: one weight per output unit
    saved_model = saved_model_of(model, tmp_path / "model")
    for variant in ("fp32", "int8_dynamic"):
        convert_tflite(saved_model, tmp_path / f"{variant}.tflite", variant)
    layers = weight_errors(tmp_path / "fp32.tflite", tmp_path / "int8_dynamic.tflite")
    first, second = sorted(layers, key=lambda layer: layer["order"])
    assert first["op"] == second["op"] == "FULLY_CONNECTED" and layers[0] == second
    assert second["typical_relative_error"] == 1.0 and first["typical_relative_error"] <= 1 / 127, layers
    # rms error in steps (LiteRT's figure) is rounding's 1/√12 for the healthy layer: 50,176 weights each off by a
    # uniform fraction of a step put it within ±0.0006 (one standard deviation) of 0.2887; 0.01 is 17 of them
    assert abs(first["rmse_over_scale"] - ROUNDING_ONLY) < 0.01, first


def test_a_value_that_is_not_a_number_is_left_out_of_a_samples_typical_error():
    """LiteRT's debugger handed the metric a float tensor holding a signalling NaN (the full-size MLP's first layer, 6
    samples): that value is left out, not the whole sample, and no warning is raised."""
    import warnings

    from export.int8_layers import typical_relative_error

    scale, zero_point = 0.5, 3
    exact, quantized = np.array([1.0, 2.0, 3.0], np.float32), np.array([5, 8, 10], np.int8)  # 1.0, 2.5, 3.5
    lost = np.median([0.0, 0.5 / 2.0, 0.5 / 3.0])
    signalling = np.array([0x7FA00000], np.uint32).view(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert typical_relative_error(exact, quantized, scale, zero_point) == pytest.approx(lost, rel=1e-12)
        assert typical_relative_error(np.concatenate([exact, signalling]), np.append(quantized, np.int8(0)), scale,
                                      zero_point) == pytest.approx(lost, rel=1e-12)
        assert np.isnan(typical_relative_error(signalling, np.int8([0]), scale, zero_point))
