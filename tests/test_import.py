"""Models brought as ONNX files: normalization, the exact reference read from the graph, labels, data, orientation.

Every model here is built with onnx.helper (tests/onnx_models.py): the legacy shapes of a
2018 PyTorch 0.3 export, a channels-first CNN, and the refusals. The end-to-end runs are in
tests/test_import_e2e.py.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from crossport.errors import CrossportError, DataError, ImportModelError, TranslationError
from crossport.exact import exact_outputs
from crossport.exact.graph import check_network, network_from_onnx
from crossport.interface import INPUT, INPUT_SIZE, LOGITS, SCORES, transposed
from tests.onnx_models import legacy_mlp, nchw_cnn, pooled_cnn, two_inputs, upright_digits_weights, with_op
from translation.onnx_export import EXPORT_OPSET
from translation.onnx_import import normalize


def normalized(model, orientation="emnist"):
    return normalize(model, orientation=orientation, target_opset=EXPORT_OPSET)


def run(model, images: np.ndarray, names=(SCORES, LOGITS)) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(list(names), {INPUT: images}), strict=True))


def run_original(model, images: np.ndarray) -> np.ndarray:
    """The file as it came, one image at a time when its batch is fixed at 1, fed in its own input shape."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else -1 for d in feed.shape]
    rows = [session.run(None, {feed.name: image.reshape([1, *shape[1:]])})[0] for image in images]
    return np.concatenate(rows)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(7).random((24, INPUT_SIZE), dtype=np.float32)


def within_exact_bounds(outputs: dict[str, np.ndarray], exact) -> None:
    """The gate's own rule: a correct float32 evaluation is within B of the exact value, element by element."""
    for name, values in outputs.items():
        assert np.all(np.abs(values - exact.values[name]) <= exact.bounds[name]), name


@pytest.mark.parametrize("opset", [6, 7, 9, 11, 13])
@pytest.mark.parametrize("shape", [(784,), (1, 28, 28), (28, 28)])
def test_legacy_models_normalize_to_the_contract_and_compute_the_same(opset, shape, images):
    original = legacy_mlp(opset=opset, input_shape=shape)  # weights as inputs, IR 3, batch 1, Elu, Softmax only
    result = normalized(legacy_mlp(opset=opset, input_shape=shape))
    graph = result.model.graph
    assert [v.name for v in graph.input] == [INPUT] and [v.name for v in graph.output] == [SCORES, LOGITS]
    assert result.model.ir_version >= 8 and max(e.version for e in result.model.opset_import) == EXPORT_OPSET
    onnx.checker.check_model(result.model, full_check=True)
    steps = "\n".join(result.steps)
    assert "initializer(s) listed as graph inputs removed" in steps
    assert "IR version 3 raised to 8" in steps
    assert f"opset {opset} upgraded to {EXPORT_OPSET}" in steps
    assert "fixed batch dimension made dynamic" in steps
    assert "Softmax's input is exposed as 'logits'" in steps and result.logits == "exposed"
    outputs = run(result.model, images)  # a batch of 24 through a model that was fixed at batch 1
    exact = exact_outputs(network_from_onnx(result.model), images)
    within_exact_bounds(outputs, exact)
    if opset >= 7:
        within_exact_bounds({SCORES: run_original(original, images)}, exact)  # the file as given agrees
    else:  # today's ONNX Runtime cannot run the 2018 file at all: normalization is what makes it usable
        from onnxruntime.capi.onnxruntime_pybind11_state import NotImplemented as OrtNotImplemented

        with pytest.raises(OrtNotImplemented, match=r"Gemm\(6\)"):
            run_original(original, images)


def test_opsets_before_6_are_refused_with_the_converters_reason():
    with pytest.raises(ImportModelError, match=r"version converter could not upgrade the model from opset 5 to 18"):
        normalized(legacy_mlp(opset=5))


def test_upright_models_get_the_transpose_inside_the_graph(images):
    for shape in ((784,), (1, 28, 28), (28, 28)):
        original = legacy_mlp(opset=9, input_shape=shape)
        result = normalized(legacy_mlp(opset=9, input_shape=shape), "upright")
        assert any("transposed inside the graph" in step for step in result.steps)
        # the published input is EMNIST orientation; the model sees it upright
        np.testing.assert_allclose(run(result.model, images)[SCORES], run_original(original, transposed(images)),
                                   rtol=0, atol=1e-6)


def test_logits_only_and_log_softmax_heads_get_scores_computed(images):
    for head, logits in (("none", "computed"), ("LogSoftmax", "exposed")):
        result = normalized(legacy_mlp(opset=13, head=head, activation="Relu"))
        assert result.logits == logits
        outputs = run(result.model, images)
        np.testing.assert_allclose(outputs[SCORES].sum(axis=1), 1.0, atol=1e-6)
        within_exact_bounds(outputs, exact_outputs(network_from_onnx(result.model), images))


def test_names_are_mapped_even_when_the_model_uses_ours_for_something_else(images):
    model = legacy_mlp(opset=13, input_name=INPUT, input_shape=(1, 28, 28), batch="N", activation="Relu")
    result = normalized(model)
    assert [v.name for v in result.model.graph.input] == [INPUT]
    assert run(result.model, images)[SCORES].shape == (24, 10)


def test_a_constant_reshape_to_batch_1_is_made_dynamic(images):
    from onnx import helper, numpy_helper

    model = legacy_mlp(opset=9, input_shape=(1, 28, 28), activation="Relu")
    flatten = next(node for node in model.graph.node if node.op_type == "Flatten")
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 784], np.int64), "fixed_shape"))
    model.graph.node.remove(flatten)
    model.graph.node.insert(0, helper.make_node("Reshape", ["0", "fixed_shape"], ["flat"], name="view"))
    result = normalized(model)
    assert any("Reshape 'view': constant batch 1" in step for step in result.steps)
    assert run(result.model, images)[SCORES].shape == (24, 10)


def test_a_reshape_computed_from_the_input_shape_and_a_weight_shared_by_identity_are_read(images):
    """The legacy exporter's Unflatten with a dynamic batch computes its shape (Shape, Slice, Concat), which shape
    inference cannot follow, and shares equal weights under a second name through Identity: import writes the shape
    as a constant, and the exact reference reads the Identity as the weight it names."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.05, (10, 784)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array([0], np.int64), "start"),
             numpy_helper.from_array(np.array([1], np.int64), "stop"),
             numpy_helper.from_array(np.array([1, 28, 28], np.int64), "image"),
             numpy_helper.from_array(weight, "w"), numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32),
                                                                          "b")]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Slice", ["shape", "start", "stop"], ["n"]),
             helper.make_node("Concat", ["n", "image"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["unflat"], name="unflatten"),
             helper.make_node("Flatten", ["unflat"], ["flat"], axis=1),
             helper.make_node("Identity", ["b"], ["b_shared"]),
             helper.make_node("Gemm", ["flat", "w", "b_shared"], ["out"], transB=1)]
    graph = helper.make_graph(nodes, "computed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 784])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 10])], inits)
    result = normalized(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    assert any(step == "Reshape 'unflatten': its shape, computed from the input's, written as the constant "
               "[-1, 1, 28, 28]" for step in result.steps)
    exact = exact_outputs(network_from_onnx(result.model), images)
    assert check_network(result.model, images, exact) <= 1.0
    within_exact_bounds(run(result.model, images), exact)


@pytest.mark.parametrize(("model", "message"), [
    (two_inputs(), r"the model has 2 inputs \(images, temperature\); crossport supports one image input"),
    (legacy_mlp(opset=13, input_shape=(100,), batch="N"), r"input '0' is FLOAT\['N', 100\]; crossport supports"),
    (legacy_mlp(opset=13, input_shape=(2, 28, 28), batch="N"), r"input '0' is FLOAT\['N', 2, 28, 28\]"),
    (legacy_mlp(opset=13, input_shape=(3, "H", "W"), batch="N"), r"input '0' is FLOAT\['N', 3, 'H', 'W'\]"),
])
def test_inputs_crossport_cannot_take_are_refused_in_one_line(model, message):
    with pytest.raises(ImportModelError, match=message):
        normalized(model)


def test_outputs_that_are_not_a_class_distribution_are_refused():
    from onnx import TensorProto, helper

    several = legacy_mlp(opset=13, batch="N")
    several.graph.output.append(helper.make_tensor_value_info("gemm0", TensorProto.FLOAT, ["N", 32]))
    with pytest.raises(ImportModelError, match=r"the model has 2 outputs \(probs, gemm0\); crossport supports one"):
        normalized(several)
    image_out = legacy_mlp(opset=13, batch="N")
    image_out.graph.output[0].type.tensor_type.shape.dim.add().dim_value = 1
    with pytest.raises(ImportModelError, match=r"output 'probs' is FLOAT\['N', 10, 1\]; crossport supports a class"):
        normalized(image_out)


def test_an_op_onnx_tf_lacks_is_named_with_its_node():
    from translation.onnx_to_tf import refuse_unsupported

    result = normalized(with_op("Mish"))
    with pytest.raises(TranslationError, match=r"onnx-tf cannot translate: Mish \(node 'odd_node'\); the model "
                                               r"declares opset 18"):
        refuse_unsupported(result.model, "mish.onnx")


def test_an_op_version_onnx_tf_lacks_is_named_with_its_version():
    from onnx import helper, numpy_helper

    from translation.onnx_to_tf import refuse_unsupported

    model = legacy_mlp(opset=19, input_shape=(1, 28, 28), batch="N", activation="Relu", initializers_as_inputs=False,
                       ir_version=9)
    flatten = next(node for node in model.graph.node if node.op_type == "Flatten")
    model.graph.node.remove(flatten)
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 784], np.int64), "flat_shape"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["0", "flat_shape"], ["flat"], name="view"))
    result = normalized(model)  # opset 19 is newer than crossport's export opset: kept as it is
    with pytest.raises(TranslationError, match=r"Reshape version 19 \(node 'view'\)"):
        refuse_unsupported(result.model, "new.onnx")


def test_the_exact_network_reads_the_graph_as_onnx_reference_does(images):
    for model in (legacy_mlp(opset=7, hidden=(64, 32)), legacy_mlp(opset=11, activation="Relu"), nchw_cnn()):
        result = normalized(model, "upright")
        exact = exact_outputs(network_from_onnx(result.model), images)
        assert check_network(result.model, images, exact) <= 1.0
        within_exact_bounds(run(result.model, images), exact)


def test_the_exact_network_notices_a_misread_graph(images):
    """check_network must fail when the network computes something else than the graph: here a weight read wrong."""
    result = normalized(legacy_mlp(opset=13, activation="Relu"))
    exact = exact_outputs(network_from_onnx(result.model), images)
    weight = next(init for init in result.model.graph.initializer if init.name == "W0")
    changed = onnx.numpy_helper.to_array(weight).copy()
    changed[0, 0] += 1e-3
    weight.CopyFrom(onnx.numpy_helper.from_array(changed, "W0"))
    with pytest.raises(CrossportError, match="disagrees with onnx.reference in float64"):
        check_network(result.model, images, exact)


def test_the_gate_refuses_drift_against_the_graphs_exact_values():
    """The derived bounds keep their power with an ONNX reference: one weight off by 1e-4 relative is caught.

    On 256 images: the sign test's T is at most √(inputs), so it needs more than t² (about 35) to refuse anything."""
    images = np.random.default_rng(8).random((256, INPUT_SIZE), dtype=np.float32)
    from crossport.exact import sign_threshold
    from crossport.parity import compare_exact

    result = normalized(legacy_mlp(opset=13, activation="Relu"))
    exact = exact_outputs(network_from_onnx(result.model), images)
    reference = run(result.model, images)
    drifted = onnx.ModelProto()
    drifted.CopyFrom(result.model)
    weight = next(init for init in drifted.graph.initializer if init.name == "W1")
    values = onnx.numpy_helper.to_array(weight).copy()
    values[3, :] *= 1 + 1e-4
    weight.CopyFrom(onnx.numpy_helper.from_array(values, "W1"))
    threshold = sign_threshold(2 * exact.values["logits"].shape[1])
    honest = compare_exact("onnxruntime", reference, exact, threshold)
    caught = compare_exact("drifted", run(drifted, images), exact, threshold)
    assert honest.passed and not caught.passed, (honest.failures, caught.failures)


def test_a_graph_the_exact_reference_cannot_follow_is_named(images):
    from onnx import helper

    model = normalized(legacy_mlp(opset=13, activation="Relu")).model
    relu = next(node for node in model.graph.node if node.op_type == "Relu")
    relu.op_type = "Softplus"
    relu.name = "squash"
    with pytest.raises(CrossportError, match=r"no float32 error model for node 'squash' \(Softplus\)"):
        network_from_onnx(model)
    plain = normalized(legacy_mlp(opset=13, activation="Relu")).model
    branched = normalized(legacy_mlp(opset=13, activation="Relu")).model
    branched.graph.node.append(helper.make_node("Softplus", ["gemm0"], ["side"], name="side"))
    # a branch the output does not depend on is not part of the function: dropped, even with an op without a rule
    assert len(network_from_onnx(branched).steps) == len(network_from_onnx(plain).steps)


# --- labels, evaluation data, orientation --------------------------------------------------


def test_labels_come_from_metadata_then_file_then_builtin_then_ids(tmp_path):
    from pipelines.eval_data import resolve_labels

    letters = [chr(ord("A") + i) for i in range(10)]
    assert resolve_labels({"crossport.labels": json.dumps(letters)}, None, 10) == (
        tuple(letters), "the ONNX file's metadata_props 'crossport.labels'")
    file = tmp_path / "labels.txt"
    file.write_text("\n".join(letters[::-1]) + "\n")
    assert resolve_labels({}, str(file), 10)[0] == tuple(letters[::-1])
    labels, where = resolve_labels({}, None, 62)
    assert len(labels) == 62 and labels[:3] == ("0", "1", "2") and labels[-1] == "z" and "emnist-byclass" in where
    assert resolve_labels({}, None, 7) == (tuple("0123456"), "class ids 0..6 (no label map given)")
    with pytest.raises(DataError, match="lists 10 labels; the model outputs 12 classes"):
        resolve_labels({}, str(file), 12)
    with pytest.raises(DataError, match="is not a JSON list of labels"):
        resolve_labels({"labels": "a,b"}, None, 2)


@pytest.mark.parametrize(("labels", "found"), [
    (["0", "1", "2\nEVIL"], r"label 2 \('2\\nEVIL'\) holds the control character '\\n'"),
    (["0", "1", "a\u2028b"], r"label 2 .* holds the control character '\\u2028'"),
    (["0", "", "2"], r"label 1 is '', not a non-empty string"),
    (["0", " 1", "2"], r"label 1 \(' 1'\) starts or ends with white space"),
    (["0", None, "2"], r"label 1 is None, not a non-empty string"),
    (["0", "1", "0"], r"lists the label '0' twice"),
    (["0", "1"], r"lists 2 labels; the model outputs 3 classes"),
])
def test_labels_that_cannot_be_labels_are_refused_where_they_enter(labels, found):
    from pipelines.eval_data import resolve_labels

    with pytest.raises(DataError, match=f"the ONNX file's metadata_props 'labels' {found}"):
        resolve_labels({"labels": json.dumps(labels)}, None, 3)


def test_numbered_labels_name_classes_and_a_label_file_must_be_utf8(tmp_path):
    from pipelines.eval_data import resolve_labels

    assert resolve_labels({"labels": "[0, 1, 2]"}, None, 3)[0] == ("0", "1", "2")
    with pytest.raises(DataError, match=r"is not a JSON list of labels: found dict"):
        resolve_labels({"labels": '{"a": 1}'}, None, 3)
    latin = tmp_path / "labels.txt"
    latin.write_bytes("zéro\nun\ndeux\n".encode("latin-1"))
    with pytest.raises(DataError) as error:
        resolve_labels({}, str(latin), 3)
    assert str(error.value) == (f"--labels {latin} is not UTF-8 text: byte 0xe9 at offset 1. Save the file as "
                                "UTF-8, one label per line.")
    latin.write_text("zéro\nun\ndeux\n", encoding="utf-8")
    assert resolve_labels({}, str(latin), 3)[0] == ("zéro", "un", "deux")
    for path, found in ((tmp_path, "is a folder"), ("/dev/null", "is not a regular file"),
                        (tmp_path / "none.txt", "does not exist")):
        with pytest.raises(DataError) as error:
            resolve_labels({}, str(path), 3)
        assert str(error.value) == f"--labels {path} {found}. Pass a text file with one label per line."


def test_eval_data_from_npz_in_every_accepted_form(tmp_path):
    from pipelines.eval_data import load_eval_data

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    targets = rng.integers(0, 10, 12)
    labels = tuple(str(i) for i in range(10))
    for name, arrays in (("u8.npz", {"images": pixels, "labels": targets}),
                         ("float.npz", {"images": pixels.astype(np.float32) / 255, "labels": targets}),
                         ("ours.npz", {"x_test": pixels.reshape(12, 784), "y_test": targets})):
        np.savez(tmp_path / name, **arrays)
        data = load_eval_data(str(tmp_path / name), labels=labels, data_dir=tmp_path, seed=0)
        np.testing.assert_array_equal(data.x_test, pixels.reshape(12, 784))
        np.testing.assert_array_equal(data.y_test, targets)
    np.savez(tmp_path / "bad.npz", images=pixels, labels=targets + 5)
    with pytest.raises(DataError, match=r"has class ids \d+\.\.1[0-4]; the model outputs 10 classes"):
        load_eval_data(str(tmp_path / "bad.npz"), labels=labels, data_dir=tmp_path, seed=0)
    np.savez(tmp_path / "odd.npz", pictures=pixels)
    with pytest.raises(DataError, match=r"holds \['pictures'\]; expected 'images' and 'labels'"):
        load_eval_data(str(tmp_path / "odd.npz"), labels=labels, data_dir=tmp_path, seed=0)
    with pytest.raises(DataError, match="is neither a file, a folder nor a dataset"):
        load_eval_data(str(tmp_path / "absent"), labels=labels, data_dir=tmp_path, seed=0)


def test_eval_data_from_a_folder_of_upright_images_per_label(tmp_path):
    from PIL import Image

    from pipelines.eval_data import load_eval_data

    glyph = np.zeros((28, 28), np.uint8)
    glyph[4:24, 12:16] = 255  # a vertical bar, upright
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.fromarray(255 - glyph).save(tmp_path / "data" / label / "one.png")  # dark ink on white, as drawn
    data = load_eval_data(str(tmp_path / "data"), labels=("a", "b", "c"), data_dir=tmp_path, seed=0)
    assert data.y_test.tolist() == [0, 1] and data.x_test.shape == (2, 784)
    stored = data.x_test[0].reshape(28, 28)
    assert stored[14, 4:24].mean() > 128 > stored[4:24, 14].mean()  # transposed: EMNIST orientation
    (tmp_path / "data" / "zz").mkdir()
    with pytest.raises(DataError, match="must hold one sub-folder per label named as the labels .*unknown: zz"):
        load_eval_data(str(tmp_path / "data"), labels=("a", "b", "c"), data_dir=tmp_path, seed=0)


@pytest.fixture(scope="module")
def upright_weights():
    return upright_digits_weights()


def test_orientation_is_detected_from_accuracy_and_refused_when_unclear(upright_weights):
    from pipelines.stages.importing import detect_orientation

    weights, data = upright_weights
    upright = legacy_mlp(opset=7, hidden=(64,), weights=weights, activation="Relu").SerializeToString()
    found = detect_orientation(upright, data.x_test, data.y_test)
    assert found["chosen"] == "upright" and found["accuracy_upright"] > found["accuracy_emnist"]
    # the same model fed upright data is one that expects crossport's orientation
    assert detect_orientation(upright, transposed(data.x_test), data.y_test)["chosen"] == "emnist"
    untrained = legacy_mlp(opset=7, hidden=(64,), activation="Relu", seed=3).SerializeToString()
    with pytest.raises(ImportModelError, match=r"cannot tell which way up the model wants its images: on 40 "
                                               r"evaluation images it is .* \(sign test p = .*\)"):
        detect_orientation(untrained, data.x_test[:40], data.y_test[:40])


def test_a_model_expecting_normalised_images_gets_them_inside_the_graph(upright_weights):
    """--mean/--std: a model that wants (x − 0.1307) / 0.3081 (MNIST's normalisation) is published taking images in
    [0, 1]; the scaling is two nodes in the graph, read exactly by the reference. Built from a model f trained on
    [0, 1]: g(z) = f(z·std + mean) has the normalisation folded out of its first layer, so g behind the scaling
    computes f."""
    from crossport.exact.graph import check_network, network_from_onnx
    from crossport.interface import to_inputs

    mean, std = 0.1307, 0.3081
    (w0, b0), *rest = upright_weights[0]
    data = upright_weights[1]
    folded = [((w0 * std).astype(np.float32), (b0 + w0 @ np.full(784, mean)).astype(np.float32)), *rest]
    plain = normalized(legacy_mlp(opset=7, hidden=(64,), weights=upright_weights[0], activation="Relu"), "upright")
    scaled = normalize(legacy_mlp(opset=7, hidden=(64,), weights=folded, activation="Relu"), orientation="upright",
                       target_opset=EXPORT_OPSET, scaling=(mean, std))
    assert any("(x − 0.1307) / 0.3081" in step for step in scaled.steps)
    assert {"Sub", "Div"} <= {node.op_type for node in scaled.model.graph.node}
    x = to_inputs(data.x_test)
    want, got = run(plain.model, x)[SCORES], run(scaled.model, x)[SCORES]
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # far above float32 rounding of scores of two 2-layer MLPs
    assert clear.mean() > 0.9 and np.array_equal(want[clear].argmax(1), got[clear].argmax(1))
    exact = exact_outputs(network_from_onnx(scaled.model), x[:64])
    assert check_network(scaled.model, x[:64], exact) <= 1.0


def test_an_upright_npz_says_so_and_the_orientation_comes_out_right(upright_weights, tmp_path):
    """An .npz is in EMNIST orientation unless --eval-orientation upright says otherwise: the same images saved
    upright, loaded as upright, are crossport's arrays again, and the upright model is found to want upright images
    (loaded as EMNIST orientation they would be transposed, and the detected orientation flipped)."""
    from pipelines.eval_data import load_eval_data
    from pipelines.stages.importing import detect_orientation

    weights, data = upright_weights
    labels = tuple(str(i) for i in range(10))
    np.savez(tmp_path / "upright.npz", images=transposed(data.x_test), labels=data.y_test)
    read = load_eval_data(str(tmp_path / "upright.npz"), labels=labels, data_dir=tmp_path, seed=0,
                          orientation="upright")
    np.testing.assert_array_equal(read.x_test, data.x_test)
    model = legacy_mlp(opset=7, hidden=(64,), weights=weights, activation="Relu").SerializeToString()
    assert detect_orientation(model, read.x_test, read.y_test)["chosen"] == "upright"
    as_emnist = load_eval_data(str(tmp_path / "upright.npz"), labels=labels, data_dir=tmp_path, seed=0)
    assert detect_orientation(model, as_emnist.x_test, as_emnist.y_test)["chosen"] == "emnist"
    with pytest.raises(DataError, match=r"--eval-orientation upright applies to an \.npz, and --eval-data is digits"):
        load_eval_data("digits", labels=labels, data_dir=tmp_path, seed=0, orientation="upright")


@pytest.mark.parametrize(("opset", "head"), [(13, "GlobalAveragePool"), (13, "ReduceMean"), (18, "ReduceMean"),
                                             (18, "ReduceMean-flat")])
def test_a_global_average_pool_head_is_read_exactly_and_translated(opset, head, images, tmp_path):
    """The head ResNets and MobileNets end with, as exporters write it (ReduceMean's axes became an input at opset
    18, which onnx-tf has no handler for): read into the exact reference, proved by onnx.reference in float64,
    within B in ONNX Runtime, and translated by onnx-tf within 2·B of it."""
    from crossport.exact.layers import GlobalAveragePool
    from crossport.runtimes import load_saved_model
    from translation.onnx_to_tf import translate, unsupported_ops

    result = normalized(pooled_cnn(opset=opset, head=head))
    network = network_from_onnx(result.model)
    assert any(isinstance(layer, GlobalAveragePool) and layer.size == 28 * 28 for layer in network.modules())
    x = transposed(images)
    exact = exact_outputs(network, x)
    assert check_network(result.model, x, exact) <= 1.0
    reference = run(result.model, x)
    within_exact_bounds(reference, exact)
    assert unsupported_ops(result.model) == {}
    onnx.save(result.model, tmp_path / "model.onnx")
    translate(tmp_path / "model.onnx", tmp_path / "tf_graph")
    translated = load_saved_model(tmp_path / "tf_graph")(x)
    for name in (SCORES, LOGITS):
        assert np.all(np.abs(translated[name] - reference[name]) <= 2 * exact.bounds[name]), name


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_any_image_size_is_published_channels_last_and_computes_what_the_file_does(layout):
    """[N, 3, 8, 6] (or [N, 8, 6, 3]) becomes ``images`` [N, 8, 6, 3], upright: a channels-first model gets the one
    transpose inside the graph, and the published graph answers bit for bit as the file on the same pixels."""
    from tests.onnx_models import image_cnn

    result = normalized(image_cnn(layout=layout))
    assert result.image.shape == (8, 6, 3) and result.layout == layout
    dims = [d.dim_value or d.dim_param for d in result.model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 8, 6, 3]
    assert (["Transpose"] if layout == "nchw" else []) == [
        node.op_type for node in result.model.graph.node if node.name.startswith("crossport_")]
    x = np.random.default_rng(1).random((5, 8, 6, 3), dtype=np.float32)
    own = np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nchw" else x
    assert np.array_equal(run(result.model, x)[SCORES], run_original(image_cnn(layout=layout), own))
    exact = exact_outputs(network_from_onnx(result.model), x)
    assert check_network(result.model, x, exact) <= 1.0
    within_exact_bounds(run(result.model, x), exact)


def test_per_channel_normalisation_is_computed_on_the_channels_last_input():
    """--mean/--std with one value per channel (ImageNet's, say): (x − mean[c]) / std[c] on the published
    [N, H, W, C] values, before the transpose into the model's channels-first input."""
    from tests.onnx_models import image_cnn

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    result = normalize(image_cnn(), orientation="emnist", target_opset=EXPORT_OPSET, scaling=(mean, std))
    assert any("(x − [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]" in step for step in result.steps)
    x = np.random.default_rng(2).random((4, 8, 6, 3), dtype=np.float32)
    scaled = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    assert np.array_equal(run(result.model, x)[SCORES],
                          run_original(image_cnn(), np.ascontiguousarray(scaled.transpose(0, 3, 1, 2))))
    with pytest.raises(ImportModelError, match=r"--mean and --std give 2 and 2 value\(s\); the model's images have "
                                               r"3 channel\(s\)"):
        normalize(image_cnn(), orientation="emnist", target_opset=EXPORT_OPSET, scaling=((0.1, 0.2), (0.3, 0.3)))


def test_a_28x28_grayscale_model_keeps_the_flat_contract_in_any_layout():
    """[N, 28, 28, 1] channels last is a 28×28 grayscale model like [N, 1, 28, 28]: published [N, 784]."""
    from crossport.interface import EMNIST_IMAGE
    from tests.onnx_models import image_cnn

    for layout in ("nchw", "nhwc"):
        result = normalized(image_cnn(layout=layout, height=28, width=28, channels=1))
        assert result.image == EMNIST_IMAGE and result.layout == "flat"
        assert [d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim[1:]] == [INPUT_SIZE]


def test_an_image_folder_is_resized_to_the_model_and_names_its_classes(tmp_path):
    """PNGs of 48×40 become the model's 32×32 RGB examples, exactly as the servables prepare an upload; with no
    label map the sorted sub-folder names are the labels (torchvision's ImageFolder order)."""
    from crossport.interface import ImageContract
    from pipelines.eval_data import load_eval_data, resolve_labels
    from serving.serverless_handler import resized_image
    from tests.onnx_models import colour_folder

    folder = colour_folder(tmp_path / "images", per_class=3)
    labels, where = resolve_labels({}, None, 4, str(folder))
    assert labels == ("blue", "gray", "green", "red") and "sub-folders" in where
    data = load_eval_data(str(folder), labels=labels, data_dir=tmp_path, seed=0, image=ImageContract((32, 32, 3)))
    assert data.x_test.shape == (12, 32, 32, 3) and data.x_test.dtype == np.uint8
    assert data.y_test.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    first = resized_image((folder / "blue" / "000.png").read_bytes(), 32, 32, 3)
    assert np.array_equal(data.x_test[0], np.round(first * 255).astype(np.uint8))
    assert data.x_test[0, ..., 2].mean() > data.x_test[0, ..., 0].mean()  # blue is blue: the channels are in order
    # four sub-folders cannot name five classes: the class ids are the labels, and the folders are refused
    assert resolve_labels({}, None, 5, str(folder))[0] == ("0", "1", "2", "3", "4")


def test_built_in_digits_and_npz_arrays_take_the_models_shape(tmp_path):
    """The built-in 28×28 digits, for a 16×20 RGB model: upright, resized, the gray level in each channel. An .npz
    may hold [N, H, W, C] or PyTorch's [N, C, H, W]; any other shape, or an EMNIST orientation, is refused."""
    from PIL import Image

    from crossport.interface import ImageContract
    from pipelines.eval_data import load_eval_data
    from training.data import load_digits

    image = ImageContract((16, 20, 3))
    labels = tuple(str(i) for i in range(10))
    data = load_eval_data("digits", labels=labels, data_dir=tmp_path, seed=0, image=image)
    digits = load_digits(seed=0)
    assert data.x_test.shape == (len(digits.x_test), 16, 20, 3)
    upright = Image.fromarray(digits.x_test[0].reshape(28, 28).T).resize((20, 16), Image.BILINEAR)
    assert all(np.array_equal(data.x_test[0][..., c], np.asarray(upright)) for c in range(3))
    pixels = np.random.default_rng(0).integers(0, 256, (6, 3, 16, 20), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", images=pixels, labels=np.arange(6) % 10)
    read = load_eval_data(str(tmp_path / "nchw.npz"), labels=labels, data_dir=tmp_path, seed=0, image=image)
    assert np.array_equal(read.x_test, pixels.transpose(0, 2, 3, 1))
    np.savez(tmp_path / "wrong.npz", images=pixels[:, :, :8], labels=np.arange(6) % 10)
    with pytest.raises(DataError, match=r"has shape \[6, 3, 8, 20\]; the model takes 16×20 RGB"):
        load_eval_data(str(tmp_path / "wrong.npz"), labels=labels, data_dir=tmp_path, seed=0, image=image)
    with pytest.raises(DataError, match="--eval-orientation emnist applies to 28x28 grayscale images"):
        load_eval_data(str(tmp_path / "nchw.npz"), labels=labels, data_dir=tmp_path, seed=0, image=image,
                       orientation="emnist")


def test_orientation_is_refused_in_one_line_for_an_image_that_is_not_28x28(tmp_path, capfd):
    """--orientation (and --eval-orientation) say which way up a 28×28 grayscale image is; any other image is
    upright, and the flag is refused before anything is translated or published."""
    from tests.helpers import one_line_error, pipeline_here
    from tests.onnx_models import image_cnn

    onnx.save(image_cnn(), str(tmp_path / "rgb.onnx"))
    result = pipeline_here("--onnx", str(tmp_path / "rgb.onnx"), "--orientation", "upright", "--eval-data", "digits",
                           "--run-dir", str(tmp_path / "run"), "--models-dir", str(tmp_path / "models"),
                           "--no-tracking", capsys=capfd)
    one_line_error(result, 1, "--orientation upright applies to 28x28 grayscale models",
                   "8×6 RGB, [N, 8, 6, 3] channels last, upright")
    assert not (tmp_path / "models").exists()
