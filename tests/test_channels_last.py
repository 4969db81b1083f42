"""The channels-last rewrite before onnx-tf: the same function, and no Transpose left in the TFLite file."""

import numpy as np
import onnx
import pytest


def blocks_model(path):
    """A PyTorch network with each block the rewrite must carry channels last, exported by torch.onnx at opset 13 and
    normalized as an import is: a stride-2 conv with explicit padding, a padded max pool after a ReLU, a residual
    Add, squeeze-excitation (global pool, 1×1 convs, HardSigmoid, Mul), HardSwish, a channel Concat, a per-channel
    scale, and a classifier on a flattened 3×3 map (its weights permuted)."""
    import torch
    from torch import nn

    from translation.onnx_export import EXPORT_OPSET
    from translation.onnx_import import normalize

    class Blocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
            self.body = nn.Conv2d(8, 8, 3, padding=1)
            self.squeeze, self.excite = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 16).reshape(1, 16, 1, 1))
            self.head = nn.Linear(16 * 3 * 3, 5)

        def forward(self, x):
            x = self.pool(torch.relu(self.stem(x)))
            y = nn.functional.hardswish(self.body(x)) + x
            gate = nn.functional.hardsigmoid(self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True)))))
            y = torch.cat([y * gate, y], dim=1) * self.scale
            return self.head(nn.functional.adaptive_max_pool2d(y, 3).flatten(1))

    torch.manual_seed(0)
    torch.onnx.export(Blocks().eval(), torch.zeros(1, 3, 24, 24), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=13, dynamo=False)
    return normalize(onnx.load(str(path)), orientation="emnist", target_opset=EXPORT_OPSET).model


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    root = tmp_path_factory.mktemp("blocks")
    model = blocks_model(root / "source.onnx")
    onnx.save(model, str(root / "model.onnx"))
    return root, model


def test_the_rewritten_graph_computes_the_same_function(blocks):
    """ONNX Runtime on the rewritten graph: both within the exact reference's bound of the float64 value."""
    from crossport.exact import exact_outputs
    from crossport.exact.graph import network_from_onnx
    from crossport.runtimes import load_onnx
    from translation.channels_last import channels_last
    from translation.compat import spatial_means_as_pools

    root, model = blocks
    rewritten = onnx.load(str(root / "model.onnx"))
    spatial_means_as_pools(rewritten)
    moved = channels_last(rewritten)
    ops = [node.op_type for node in rewritten.graph.node]
    assert {"Pad", "ReduceMean"} <= set(ops) and "GlobalAveragePool" not in ops and len(moved) >= 12, (ops, moved)
    # every Transpose left is one of a pair around an op onnx-tf wraps: TFLite cancels them against onnx-tf's own
    for index, node in enumerate(rewritten.graph.node):
        if node.op_type == "Transpose":
            neighbour = rewritten.graph.node[index + 1] if node.name.endswith(".transpose") else None
            assert (neighbour is not None and neighbour.op_type in ("Conv", "MaxPool", "AveragePool")) or \
                node.name.endswith(".to_nhwc"), node.name
    onnx.save(rewritten, str(root / "rewritten.onnx"))
    images = np.random.default_rng(0).random((32, 24, 24, 3), dtype=np.float32)
    exact = exact_outputs(network_from_onnx(model), images)
    for path in (root / "model.onnx", root / "rewritten.onnx"):
        logits = load_onnx(path)(images)["logits"]
        assert np.all(np.abs(logits - exact.values["logits"]) <= exact.bounds["logits"]), path.name


@pytest.mark.slow
def test_no_transpose_is_left_in_the_tflite_file(blocks, tmp_path):
    from export.layout import placement, tflite_ops
    from export.servable import build_saved_model
    from export.tflite import convert_tflite
    from translation.onnx_to_tf import translate

    root, _ = blocks
    translate(root / "model.onnx", tmp_path / "tf_graph")
    build_saved_model(tmp_path / "tf_graph", tuple("abcde"), tmp_path / "saved_model")
    convert_tflite(tmp_path / "saved_model", tmp_path / "model.tflite")
    layout = placement(tflite_ops(tmp_path / "model.tflite"))
    assert layout["convolutions"] == 4 and layout["transposes"] == 0, layout
