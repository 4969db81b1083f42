import pytest

from crossport.errors import PackageError
from crossport.parity import compare
from crossport.runtimes import load_saved_model, load_tflite
from pipelines.config import SM_PREDICT, TFLITE_FP32, hop_spec
from translation.tflite import convert_tflite


@pytest.mark.parametrize("batch", [1, 37])
def test_tflite_fp32_runs_in_litert_and_matches_saved_model(tiny, batch):
    images = tiny.images[:batch]
    result = compare(hop_spec(SM_PREDICT, TFLITE_FP32), load_saved_model(tiny.saved_model)(images),
                     load_tflite(tiny.tflite)(images))
    assert result.passed, result.failures
    assert result.examples == batch


def test_tflite_has_only_the_predict_signature(tiny):
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(tiny.tflite)).get_signature_list()
    assert signatures == {"serving_default": {"inputs": ["images"], "outputs": ["scores"]}}


def test_unknown_variant_is_refused(tmp_path, tiny):
    with pytest.raises(PackageError, match="unknown TFLite variant 'int3'"):
        convert_tflite(tiny.saved_model, tmp_path / "x.tflite", "int3")
