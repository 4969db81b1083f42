"""The second architecture: a tiny seeded CNN through every converter, its layout, the model
registry, and the divergence finder on a convolutional graph."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from crossport.formats import TFLITE_CONVERTED
from crossport.parity import compare, compare_exact
from crossport.runtimes import load_onnx, load_saved_model, load_tflite
from pipelines.gate import ONNX, REFERENCE, SM_CLASSIFY, SM_PREDICT, TF_GRAPH, TFLITE_FP32, hop_spec

LABELS = ("a", "b", "c", "d", "e")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A tiny seeded CNN (4 and 8 channels) exported, translated, packaged and converted by the library."""
    import torch

    from crossport.exact import exact_outputs
    from crossport.files import sha256_file
    from export.servable import build_saved_model
    from export.tflite import convert_tflite
    from training.checkpoint import save_checkpoint
    from training.model import ModelConfig, build_model
    from training.train import TrainConfig
    from translation.onnx_export import export_onnx
    from translation.onnx_to_tf import translate

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="cnn", channels=(4, 8), num_classes=len(LABELS), dropout=0.0))
    with torch.no_grad():  # batch-norm statistics that are not the identity, so folding them is exercised
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 2.0)
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.1, 0.1)
    model.eval()
    root = tmp_path_factory.mktemp("cnn")
    save_checkpoint(root / "model.pt", model, LABELS, "0" * 64, {}, TrainConfig())
    export_onnx(model, LABELS, sha256_file(root / "model.pt"), root / "model.onnx")
    translate(root / "model.onnx", root / "tf_graph")
    build_saved_model(root / "tf_graph", LABELS, root / "saved_model")
    images = np.random.default_rng(7).random((37, 784), dtype=np.float32)
    calibration = np.random.default_rng(3).random((256, 784), dtype=np.float32)
    for fmt in TFLITE_CONVERTED:
        convert_tflite(root / "saved_model", root / f"model_{fmt.variant}.tflite", fmt.variant,
                       calibration=calibration)
    return root, model, images, exact_outputs(model, images)


def test_export_folds_batch_norm_into_the_convolutions(cnn):
    root, _, _, _ = cnn
    ops = [node.op_type for node in onnx.load(str(root / "model.onnx")).graph.node]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2


def test_every_fp32_converter_keeps_parity_with_the_exact_values(cnn):
    """Within 2·B of ONNX Runtime, and within B of, and with no drift against, the exported graph's exact values (the
    graph holds BatchNorm folded into the convolutions: its own float32 weights)."""
    from crossport.exact import sign_threshold
    from crossport.exact.graph import exact_from_onnx
    from pipelines.stages.validate import dithered

    root, _, images, _ = cnn
    images = dithered(images)
    graph = exact_from_onnx(root / "model.onnx", images)
    onnx_out = load_onnx(root / "model.onnx")(images)
    candidates = {
        ONNX: onnx_out,
        TF_GRAPH: load_saved_model(root / "tf_graph")(images),
        SM_PREDICT: load_saved_model(root / "saved_model")(images),
        SM_CLASSIFY: load_saved_model(root / "saved_model", "classify")(images),
        TFLITE_FP32: load_tflite(root / "model_fp32.tflite")(images),
    }
    for name, outputs in candidates.items():
        outputs = {key: value for key, value in outputs.items() if key in ("scores", "logits")}
        hop = compare(hop_spec(ONNX, name), onnx_out, outputs, bounds=graph.bounds) if name != ONNX else None
        assert hop is None or hop.passed, (name, hop.failures)
        against = compare_exact(name, outputs, graph, sign_threshold(10 * len(LABELS)))
        assert against.passed, (name, against.failures)


@pytest.mark.parametrize("variant", [fmt.variant for fmt in TFLITE_CONVERTED if fmt.lossy])
def test_lossy_variants_of_the_cnn_pass_the_gates_own_statistics(cnn, variant):
    root, _, images, exact = cnn
    scores = load_tflite(root / f"model_{variant}.tflite")(images)["scores"]
    assert scores.shape == (len(images), len(LABELS)) and np.all(np.isfinite(scores))
    # the gate's own statistics, not a cut-off of the test's: the variant against the exact values (rounded once
    # to float32) under its lossy policy, with the model's own answers as labels (the reference is right on each
    # image, so any changed answer is an accuracy drop, near-ties included). 37 images may be too few to pass it;
    # a file whose every answer moved fails it, as the second check shows.
    reference = {"scores": exact.values["scores"].astype(np.float32)}
    labels = np.argmax(exact.values["scores"], axis=1)
    spec = hop_spec(REFERENCE, f"tflite_{variant}")
    hop = compare(spec, reference, {"scores": scores}, labels=labels)
    assert hop.verdict != "fail", hop.failures
    assert compare(spec, reference, {"scores": np.roll(scores, 1, axis=1)}, labels=labels).verdict == "fail"


@pytest.mark.parametrize("variant", [fmt.variant for fmt in TFLITE_CONVERTED])
def test_no_transpose_between_the_convolutions_of_any_tflite_file(cnn, variant):
    from export.layout import placement, tflite_ops

    root, _, _, _ = cnn
    layout = placement(tflite_ops(root / f"model_{variant}.tflite"))
    assert layout["convolutions"] == 2
    assert layout["between_convs"] == 0, layout
    assert layout["before_first_conv"] <= 1 and layout["after_last_conv"] == 0, layout


def test_without_the_channels_last_rewrite_the_transposes_stay(cnn, tmp_path, monkeypatch):
    """The channels-last rewrite is what removes them: without it the flatten before the classifier keeps one."""
    from export.layout import placement, tflite_ops
    from export.servable import build_saved_model
    from export.tflite import convert_tflite
    from translation.onnx_to_tf import translate

    root, _, _, _ = cnn
    monkeypatch.setattr("translation.channels_last.channels_last", lambda model: [])  # translate() imports it per call
    translate(root / "model.onnx", tmp_path / "tf_graph")
    build_saved_model(tmp_path / "tf_graph", LABELS, tmp_path / "saved_model")
    convert_tflite(tmp_path / "saved_model", tmp_path / "model.tflite")
    assert placement(tflite_ops(tmp_path / "model.tflite"))["transposes"] >= 1


def test_the_channels_last_graph_permutes_the_classifier_exactly(cnn, tmp_path):
    """The rewritten ONNX graph alone (before onnx-tf) gives the same logits in ONNX Runtime: the flatten reads the
    channels-last twin and the classifier's weight columns are permuted to match."""
    from translation.channels_last import channels_last

    root, _, images, exact = cnn
    model = onnx.load(str(root / "model.onnx"))
    moved = channels_last(model)
    flatten = next(n for n in model.graph.node if n.name in moved and n.op_type in ("Reshape", "Flatten"))
    assert flatten.output[0].endswith(".nhwc") and flatten.input[0].endswith(".nhwc")
    onnx.save(model, str(tmp_path / "nhwc.onnx"))
    before, after = load_onnx(root / "model.onnx")(images), load_onnx(tmp_path / "nhwc.onnx")(images)
    # two correct float32 evaluations of one network: each within B of the exact value
    assert np.all(np.abs(after["logits"] - before["logits"]) <= 2 * exact.bounds["logits"])


def test_same_padding_rewrite_touches_only_stride_1_symmetric_pads():
    from onnx import helper

    from translation.layout import same_padding

    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="same", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["a", "w"], ["b"], name="valid", kernel_shape=[3, 3], pads=[0, 0, 0, 0]),
             helper.make_node("Conv", ["b", "w"], ["c"], name="strided", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              strides=[2, 2]),
             helper.make_node("Conv", ["c", "w"], ["d"], name="uneven", kernel_shape=[3, 3], pads=[1, 1, 0, 0])]
    model = helper.make_model(helper.make_graph(nodes, "g", [], []))
    assert same_padding(model) == ["same"]
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    assert attrs["auto_pad"] == b"SAME_UPPER" and "pads" not in attrs


def test_divergence_finder_names_a_nudged_convolution(cnn, tmp_path):
    from translation.divergence import find_divergence
    from translation.onnx_to_tf import translate

    root, _, images, exact = cnn
    model = onnx.load(str(root / "model.onnx"))
    broken = onnx.load(str(root / "model.onnx"))
    conv = next(node for node in broken.graph.node if node.op_type == "Conv")
    init = next(i for i in broken.graph.initializer if i.name == conv.input[1])
    weight = numpy_helper.to_array(init).copy()
    weight.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    translate(tmp_path / "broken.onnx", tmp_path / "tf")
    divergence = find_divergence(model, tmp_path / "tf", {"images": images}, exact.network_gamma)
    assert divergence.first is not None and divergence.first.node == conv.name
    assert divergence.first.op_type == "Conv"


def test_registry_counts_macs_and_products_from_the_network():
    from pipelines.config import ARCHITECTURE_NAMES
    from training.model import ARCHITECTURES, ModelConfig, build_model, gemm_shapes, macs_per_example

    assert tuple(ARCHITECTURES) == ARCHITECTURE_NAMES
    mlp = build_model(ModelConfig(arch="mlp", num_classes=62))
    assert macs_per_example(mlp) == 784 * 512 + 512 * 256 + 256 * 62
    cnn = build_model(ModelConfig(arch="cnn", num_classes=62))
    # conv 1: 28·28 outputs × 32 channels × 9 taps; conv 2: 14·14 × 64 × (9·32); head: (64·7·7) × 62
    assert macs_per_example(cnn) == 28 * 28 * 32 * 9 + 14 * 14 * 64 * 9 * 32 + 64 * 7 * 7 * 62
    assert gemm_shapes(cnn, 128)[1] == (128 * 14 * 14, 9 * 32, 64)


def test_checkpoints_record_the_architecture_and_old_ones_load_as_mlp(cnn, tmp_path):
    import torch

    from training.checkpoint import load_checkpoint

    root, model, images, _ = cnn
    loaded = load_checkpoint(root / "model.pt")
    assert loaded.model_config.arch == "cnn" and loaded.model_config.channels == (4, 8)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.model(torch.from_numpy(images)).numpy(),
                                      model(torch.from_numpy(images)).numpy())
    from training.model import MLP, ModelConfig

    legacy = MLP(ModelConfig(hidden_sizes=(8,), num_classes=5, dropout=0.0))
    payload = {"format": "crossport-checkpoint", "format_version": 1, "state_dict": legacy.state_dict(),
               "model_config": {"input_size": 784, "hidden_sizes": [8], "num_classes": 5, "dropout": 0.0},
               "train_config": {}, "labels": list(LABELS), "dataset_digest": "0" * 64, "metrics": {}}
    torch.save(payload, tmp_path / "legacy.pt")
    assert load_checkpoint(tmp_path / "legacy.pt").model_config.arch == "mlp"


@pytest.mark.slow
def test_model_cnn_end_to_end_on_digits(tmp_path, capfd):
    from tests.helpers import pipeline_here

    result = pipeline_here("--stage", "all", "--dataset", "digits", "--model", "cnn", "--epochs", "2", "--run-dir",
                           str(tmp_path / "run"), "--models-dir", str(tmp_path / "models"), "--no-tracking",
                           capsys=capfd)
    assert result.returncode == 0, result.stderr[-3000:]
    version = tmp_path / "models" / "emnist_cnn" / "1"
    card = json.loads((version / "assets.extra" / "servable.json").read_text())
    assert card["model"]["arch"] == "cnn"
    assert card["model"]["macs_per_example"] == 28 * 28 * 32 * 9 + 14 * 14 * 64 * 9 * 32 + 64 * 7 * 7 * 10
    assert card["formats"]["tflite_fp32"]["transposes"] == 0  # translation.channels_last: none left
    manifest = json.loads((version / "assets.extra" / "manifest.json").read_text())
    assert manifest["config"]["model"] == "cnn"
    report = json.loads((version / "assets.extra" / "parity.json").read_text())
    assert report["verdict"] == "pass" and report["error_model"]["fan_ins"] == [9, 2, 288, 2, 3137]
    assert report["export_function"]["verdict"] == "pass" and report["export_function"]["allowance"].startswith("B")
    facts = json.loads((tmp_path / "run" / "manifest.json").read_text())["facts"]
    assert facts["layout"]["tflite_fp32"]["between_convs"] == 0
