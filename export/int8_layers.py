"""Which layers lose the accuracy of a full-int8 file: each quantized layer's error against the float layer, from
LiteRT's quantization debugger run with the converter the published file came from; and the same file with chosen
layers kept in float (the int8 fallback, pipelines/stages/int8.py).

For every quantized op the debugger runs the float op beside it on the same inputs and compares the outputs.
Two figures per layer:

- ``rmse_over_scale``: the error's root mean square in quantization steps, as LiteRT's debugger guide reports it.
  Rounding alone gives 1/√12 ≈ 0.29; more means saturation or badly quantized weights. It cannot see a range
  stretched by one outlying channel: every value is then rounded to a huge step, which is still "rounding".
- ``typical_relative_error`` (what the layers are ranked by): the median, over the layer's non-zero float outputs,
  of the fraction of each value lost, min(|dequantized − float| / |float|, 1), averaged over the samples. A healthy
  layer keeps its typical value to a few percent; a layer whose values mostly sit under one step (an outlying
  channel stretched the range, or values that are all tiny) loses them, and it approaches 1. The scores' Softmax
  is ranked last whatever its figure: its small probabilities always round to zero and never change the top class.
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

ROUNDING_ONLY = 1 / math.sqrt(12)  # rmse / scale of a uniform rounding error: a layer that loses nothing else


class Int8Quantization:
    """One calibration of the full-int8 converter (the very converter the published file came from), asked for each
    layer's error on ``samples`` and for files that keep chosen layers in float (LiteRT's quantization debugger
    quantizes its calibrated model again for each, without calibrating again)."""

    def __init__(self, saved_model_dir: Path, calibration: np.ndarray, samples: np.ndarray) -> None:
        import tensorflow as tf

        from export.tflite import tflite_converter

        rows = np.asarray(samples, dtype=np.float32)

        def dataset():
            for index in range(len(rows)):
                yield [rows[index : index + 1]]

        with _converting():
            self._debugger = tf.lite.experimental.QuantizationDebugger(
                converter=tflite_converter(saved_model_dir, "int8_full", calibration), debug_dataset=dataset,
                debug_options=tf.lite.experimental.QuantizationDebugOptions(
                    layer_direct_compare_metrics={"typical_relative_error": typical_relative_error}))

    def layer_errors(self) -> list[dict]:
        """Per quantized layer: its op, output tensor, quantization step, rmse, rmse / step, typical relative error
        and max |error|, worst first (by typical relative error)."""
        with _converting():
            self._debugger.run()
        dump = io.StringIO()
        self._debugger.layer_statistics_dump(dump)
        layers = []
        for order, row in enumerate(csv.DictReader(dump.getvalue().splitlines())):  # in graph order
            scale = float(row["scale"])
            rmse = math.sqrt(max(float(row["mean_squared_error"]), 0.0))
            typical = float(row["typical_relative_error"])
            layers.append({"layer": row["tensor_name"], "op": row["op_name"], "order": order, "scale": scale,
                           "rmse": rmse, "rmse_over_scale": rmse / scale if scale > 0 else math.inf,
                           "typical_relative_error": typical if math.isfinite(typical) else None,
                           "max_abs_error": float(row["max_abs_error"])})
        # the scores' own Softmax comes last: its tiny probabilities round to zero in 1/256 steps (a relative error
        # of 1) in any int8 file, confident or not, and never change which class is on top
        layers.sort(key=lambda layer: (layer["op"] == "SOFTMAX", -(layer["typical_relative_error"] or 0.0)))
        return layers

    def readers(self) -> dict[str, list[str]]:
        """Each layer's output tensor → the layers that read it (by their output tensors), in the calibrated model:
        a tensor stays float only when the layer making it and every layer reading it run in float."""
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_content=self._debugger.calibrated_model)
        names = {tensor["index"]: tensor["name"] for tensor in interpreter.get_tensor_details()}
        ops = interpreter._get_ops_details()
        made_by = {index: op for op in ops for index in op["outputs"]}
        found: dict[str, list[str]] = {}
        for op in ops:
            for index in op["inputs"]:
                if index in made_by and op["outputs"]:
                    found.setdefault(names[index], []).append(names[op["outputs"][0]])
        return found

    def with_float(self, layers: list[str]) -> bytes:
        """The full-int8 file with ``layers`` (output tensor names) left in float32."""
        import tensorflow as tf

        # get_nondebug_quantized_model() quantizes the calibrated model again under the debugger's options. The
        # public ``options`` setter would also build an instrumented model, which needs no layer for it, and
        # refuses to exist ("not in debug mode") when no quantized layer is left to instrument.
        with _converting():
            self._debugger._debug_options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(layers))
            return self._debugger.get_nondebug_quantized_model()


def layer_errors(saved_model_dir: Path, calibration: np.ndarray, samples: np.ndarray) -> list[dict]:
    """:meth:`Int8Quantization.layer_errors` of one calibration."""
    return Int8Quantization(saved_model_dir, calibration, samples).layer_errors()


@contextmanager
def _converting():
    """The TFLite converter at work (:func:`export.tflite.converting`), a layer all zero on every image not reported as
    a mean of nothing."""
    from export.tflite import converting

    with converting(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mean of empty slice")
        yield


def typical_relative_error(float_values: np.ndarray, quantized: np.ndarray, scale: float, zero_point: int) -> float:
    """The median over the non-zero float values of one sample of the fraction of each value lost,
    min(|dequantized − float| / |float|, 1) (NaN when there are none: the debugger averages with nanmean).

    A value that is not a number is left out: the debugger's float tensor of the full-size MLP's first layer held one
    signalling NaN in 6 of its samples, which made the whole sample's median NaN (and NumPy warn on the cast)."""
    with np.errstate(invalid="ignore"):  # casting a signalling NaN raises the invalid flag
        exact = np.asarray(float_values, dtype=np.float64).ravel()
    approximate = (np.asarray(quantized, dtype=np.float64).ravel() - zero_point) * scale
    known = ~np.isnan(exact)
    lost = fraction_lost(exact[known], approximate[known])
    return float(np.median(lost)) if lost.size else math.nan


def fraction_lost(exact: np.ndarray, approximate: np.ndarray) -> np.ndarray:
    """Per non-zero exact value, the fraction of it lost: min(|approximate − exact| / |exact|, 1)."""
    nonzero = exact != 0
    return np.minimum(np.abs(approximate[nonzero] - exact[nonzero]) / np.abs(exact[nonzero]), 1.0)


WEIGHTED_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D")


def weight_errors(float_file: Path, quantized_file: Path) -> list[dict]:
    """Per layer whose weights ``quantized_file`` holds in int8 (a dynamic-range file: its activations stay float,
    so the weights are all it loses): the same layer's float weights in ``float_file`` against their dequantized
    int8 values. Figures as :meth:`Int8Quantization.layer_errors` gives for outputs (typical relative error, rms
    error in quantization steps, max |error|), worst first; layers are matched by their output tensor's name."""
    floats = {name: weights for name, _, weights, _ in _weighted_layers(float_file)}
    layers = []
    for order, (name, op, quantized, (scales, zero_points, axis)) in enumerate(_weighted_layers(quantized_file)):
        if quantized.dtype != np.int8 or not len(scales) or np.shape(floats.get(name)) != quantized.shape:
            continue  # float weights, or no such layer in the fp32 file (another model's file: its hops say so)
        exact = np.asarray(floats[name], dtype=np.float64)
        step = np.broadcast_to(_along(scales, quantized.ndim, axis), exact.shape)
        dequantized = (quantized.astype(np.float64) - _along(zero_points, quantized.ndim, axis)) * step
        error = dequantized - exact
        lost = fraction_lost(exact, dequantized)
        layers.append({"layer": name, "op": op, "order": order, "scale": float(np.max(scales)),
                       "rmse": float(np.sqrt(np.mean(error**2))),
                       "rmse_over_scale": float(np.sqrt(np.mean((error / step) ** 2))),
                       "typical_relative_error": float(np.median(lost)) if lost.size else None,
                       "max_abs_error": float(np.max(np.abs(error)))})
    layers.sort(key=lambda layer: -(layer["typical_relative_error"] or 0.0))
    return layers


def _along(values, ndim: int, axis: int) -> np.ndarray:
    """Quantization parameters shaped to broadcast over a tensor: one per channel along ``axis``, or one for all."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(values, np.float64).reshape(shape if len(values) > 1 else [1])


def _weighted_layers(path: Path):
    """(output tensor name, op, weights, (scales, zero points, quantized axis)) of each weighted op, in graph order."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    tensors = {tensor["index"]: tensor for tensor in interpreter.get_tensor_details()}
    for op in interpreter._get_ops_details():
        if op["op_name"] in WEIGHTED_OPS and len(op["inputs"]) > 1:
            weights = tensors[op["inputs"][1]]
            quantization = weights["quantization_parameters"]
            try:
                values = interpreter.get_tensor(weights["index"])
            except ValueError:  # computed, not stored (e.g. float16 weights behind a DEQUANTIZE op)
                continue
            yield (tensors[op["outputs"][0]]["name"], op["op_name"], values,
                   (quantization["scales"], quantization["zero_points"], quantization["quantized_dimension"]))
