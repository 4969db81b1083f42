import json

import numpy as np
import onnx
import pytest

from crossport.errors import ExportError
from crossport.files import sha256_file
from crossport.parity import compare
from crossport.runtimes import load_onnx
from pipelines.gate import ONNX, REFERENCE, hop_spec
from training.checkpoint import load_torch
from translation.onnx_export import META_CHECKPOINT, META_LABELS, META_PRODUCER, check_onnx, read_metadata


def test_onnx_is_one_checked_file_with_the_contract(tiny):
    assert not list(tiny.root.glob("*.onnx.data")), "weights must be inside model.onnx"
    check_onnx(tiny.onnx)  # full onnx.checker + contract, from disk
    model = onnx.load(str(tiny.onnx))
    (images,) = model.graph.input
    dims = images.type.tensor_type.shape.dim
    assert images.name == "images" and images.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[0].dim_param and not dims[0].HasField("dim_value")  # dynamic batch
    assert dims[1].dim_value == 784
    assert [output.name for output in model.graph.output] == ["scores", "logits"]


def test_the_file_names_nothing_of_the_machine_that_made_it(tiny):
    """The exporter records each node's Python stack (paths, line numbers): the same checkpoint exported from
    another checkout, or after an edit elsewhere in a source file, must give the same bytes."""
    from tests.helpers import ROOT

    data = tiny.onnx.read_bytes()
    assert str(ROOT).encode() not in data and b"site-packages" not in data
    assert not any(node.metadata_props for node in onnx.load(str(tiny.onnx)).graph.node)


def test_metadata_carries_labels_checkpoint_hash_and_producer(tiny):
    metadata = read_metadata(tiny.onnx)
    assert json.loads(metadata[META_LABELS]) == list(tiny.labels)
    assert metadata[META_CHECKPOINT] == sha256_file(tiny.checkpoint)
    assert metadata[META_PRODUCER].startswith("crossport ")


@pytest.mark.parametrize("batch", [1, 7, 37])
def test_onnx_runtime_matches_pytorch_at_any_batch(tiny, tiny_exact, batch):
    images = tiny.images[:batch]
    reference, candidate = load_torch(tiny.checkpoint)(images), load_onnx(tiny.onnx)(images)
    result = compare(hop_spec(REFERENCE, ONNX), reference, candidate, bounds=tiny_exact.rows(slice(batch)).bounds)
    assert result.passed, result.failures
    assert np.allclose(candidate["scores"].sum(axis=1), 1.0, atol=1e-5)  # softmax is in the graph


def test_broken_onnx_files_are_refused(tmp_path, tiny):
    with pytest.raises(ExportError, match="does not exist. Run the export stage first."):
        check_onnx(tmp_path / "absent.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny.onnx.read_bytes()[:1000])
    with pytest.raises(ExportError, match="does not pass onnx.checker"):
        check_onnx(truncated)


def test_onnx_breaking_the_input_contract_is_refused(tmp_path, tiny):
    model = onnx.load(str(tiny.onnx))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 785
    path = tmp_path / "wide.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match=r"must be FLOAT\[batch, 784\].*found FLOAT\[None, 785\]"):
        check_onnx(path)
