"""The run's plots: written for any errors a correct run can produce."""

import numpy as np
import pytest


@pytest.mark.parametrize("errors", [
    np.float32(1.2e-7) * (1 + np.linspace(0, 8e-6, 359, dtype=np.float32)),  # logs a hair apart: 60 float32 bins fail
    np.full(359, 3e-8, np.float32),  # an untrained model's equal scores: one bar
    np.zeros(359, np.float32),  # exact agreement
    np.geomspace(1e-9, 1e-3, 359).astype(np.float32),
    np.where(np.arange(359) % 7, np.float32(2e-3), np.float32(np.inf)),  # a variant's overflowed scores
    np.full(359, np.nan, np.float32),  # and one whose every score is NaN
])
def test_the_error_histogram_draws_any_errors(tmp_path, errors):
    from pipelines.reports import error_distribution_png

    path = tmp_path / "errors.png"
    error_distribution_png(path, {"tflite_fp16": errors, "onnxruntime": errors[::-1].copy()},
                           {"tflite_fp16": 1e-3, "onnxruntime": None}, "pytorch")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
