import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from crossport.errors import TranslationError
from crossport.parity import compare
from crossport.runtimes import load_onnx, load_saved_model
from pipelines.gate import ONNX, SM_PREDICT, hop_spec
from translation import compat
from translation.onnx_to_tf import translate, unsupported_ops


def test_translated_graph_matches_onnx_runtime(tiny, tiny_exact):
    reference, candidate = load_onnx(tiny.onnx)(tiny.images), load_saved_model(tiny.tf_graph)(tiny.images)
    result = compare(hop_spec(ONNX, SM_PREDICT), reference, candidate, bounds=tiny_exact.bounds)
    assert result.passed, result.failures


def test_addons_shim_stands_in_for_tensorflow_addons():
    import sys

    compat.import_onnx_tf()
    shim = sys.modules["tensorflow_addons"]
    assert getattr(shim, "__crossport_shim__", False), "the real tensorflow_addons must never be imported"
    assert compat.install_addons_shim() is shim  # idempotent


def one_op_model(tmp_path, node, shape: list, opset: int):
    """An ONNX file of ``node`` alone, x -> y, float32 of ``shape``."""
    graph = helper.make_graph([node], node.op_type.lower(),
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / f"{node.op_type.lower()}.onnx"
    onnx.save(model, str(path))
    return path


def translated_y(path, out, x: np.ndarray) -> np.ndarray:
    """``translate`` the one-op file, then run its SavedModel's serving_default on ``x``."""
    translate(path, out)
    import tensorflow as tf

    return tf.saved_model.load(str(out)).signatures["serving_default"](x=tf.constant(x))["y"].numpy()


def test_hardmax_through_onnx_tf_matches_onnx_runtime(tmp_path):
    """The only op onnx-tf takes from tensorflow_addons; the shim must reproduce ONNX Hardmax."""
    path = one_op_model(tmp_path, helper.make_node("Hardmax", ["x"], ["y"], axis=-1), [None, 6], 13)
    x = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float32)
    x[0] = [1, 3, 3, 0, 0, 0]  # ties: ONNX picks the first maximum
    import onnxruntime as ort

    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(translated_y(path, tmp_path / "tf", x), expected)


def test_unsupported_op_is_named(tmp_path, tiny):
    model = onnx.load(str(tiny.onnx))
    model.graph.node[-1].op_type = "NotARealOp"
    assert unsupported_ops(model) == {"NotARealOp": model.graph.node[-1].name or model.graph.node[-1].output[0]}
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    with pytest.raises(TranslationError, match=r"op\(s\) onnx-tf cannot translate: NotARealOp \(node '.+'\)"):
        translate(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensorflow_probability_is_a_stand_in_only_while_onnx_tf_imports(monkeypatch):
    """onnx-tf imports tensorflow_probability for its Bernoulli handler alone (about a second of every translation):
    while onnx-tf imports, the name is a stand-in; afterwards it is the real package's again."""
    import sys

    monkeypatch.delitem(sys.modules, compat.PROBABILITY, raising=False)
    with compat.deferred_probability():
        stand_in = sys.modules[compat.PROBABILITY]
        assert isinstance(stand_in.distributions, compat._Distributions)
        assert not hasattr(stand_in.distributions, "__path__")  # introspection imports nothing
    assert compat.PROBABILITY not in sys.modules


def test_a_tensorflow_probability_that_cannot_import_is_explained_when_bernoulli_needs_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, compat.PROBABILITY, None)  # what Python does with a package that failed
    with pytest.raises(TranslationError, match=r"Bernoulli with tensorflow_probability.*make install"):
        compat._Distributions("distributions").Bernoulli  # noqa: B018


def test_bernoulli_imports_tensorflow_probability_when_it_is_translated(tmp_path):
    """The one op that needs tensorflow_probability still translates, and samples 0s and 1s."""
    path = one_op_model(tmp_path, helper.make_node("Bernoulli", ["x"], ["y"], seed=3.0), [4, 6], 15)
    x = np.full((4, 6), 0.5, np.float32)
    x[0] = 0.0
    x[1] = 1.0
    got = translated_y(path, tmp_path / "tf", x)
    assert set(np.unique(got)) <= {0.0, 1.0}
    assert not got[0].any() and got[1].all()


def test_onnx_without_mapping_is_explained(monkeypatch):
    monkeypatch.delattr(onnx, "mapping", raising=False)
    with pytest.raises(TranslationError, match=r"needs onnx.mapping.*make install \(onnx==1.18.0\)"):
        compat.import_onnx_tf()


@pytest.mark.slow  # a MobileNetV3 translated twice (about 10 s)
def test_tracing_without_autograph_gives_the_same_graph(tmp_path):
    """translate traces onnx-tf's module without autograph (compat.traced_without_autograph): on a MobileNetV3
    (depthwise convolutions, HardSwish, HardSigmoid, squeeze-excitation Mul, Add, GlobalAveragePool) the graph
    computes the same bits as onnx-tf's own tracing, with autograph."""
    import tensorflow as tf
    import torch

    from training.model import ModelConfig, build_model
    from translation.onnx_export import EXPORT_OPSET
    from translation.onnx_import import normalize

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="mobilenet_v3_small", num_classes=5)).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (torch.zeros(1, 784),), str(path), dynamo=False, opset_version=13,
                      input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    onnx.save(normalize(onnx.load(str(path)), orientation="emnist", target_opset=EXPORT_OPSET).model, str(path))
    translate(path, tmp_path / "plain", expose_intermediates=False)
    compat.import_onnx_tf()
    from onnx_tf.backend import prepare

    from translation.channels_last import channels_last
    from translation.layout import same_padding

    graph = onnx.load(str(path))
    for rewrite in (compat.spatial_means_as_pools, same_padding, channels_last):  # as translate rewrites it
        rewrite(graph)
    prepare(graph).export_graph(str(tmp_path / "autograph"))
    images = tf.constant(np.random.default_rng(0).random((16, 784), dtype=np.float32))
    plain, autograph = (tf.saved_model.load(str(tmp_path / name)).signatures["serving_default"](images=images)
                        for name in ("plain", "autograph"))
    assert set(plain) == set(autograph)
    for name in plain:
        np.testing.assert_array_equal(plain[name].numpy(), autograph[name].numpy(), err_msg=name)

    # translate saves the signature alone (translation.onnx_to_tf.export_graph): onnx-tf's module, whose two
    # functions the saver traces again, stays out of the SavedModel, and so out of every later load
    from tensorflow.core.protobuf import saved_model_pb2

    def saved(name):
        meta = saved_model_pb2.SavedModel.FromString((tmp_path / name / "saved_model.pb").read_bytes()).meta_graphs[0]
        traced = [f.signature.name for f in meta.graph_def.library.function if "___call___" in f.signature.name]
        return len(traced), {child.local_name for child in meta.object_graph_def.nodes[0].children}

    assert saved("plain") == (1, {"handler_variables", "signatures"})
    assert saved("autograph")[0] == 2 and "__call__" in saved("autograph")[1]  # what onnx-tf's own export saves


# every elementwise op with a rule of its own: its attributes as exporters write them, and its constant inputs
ELEMENTWISE = (("Relu", {}, ()), ("LeakyRelu", {"alpha": 0.01}, ()), ("Elu", {"alpha": 1.0}, ()),
               ("Clip", {}, ("zero", "six")), ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, ()),
               ("HardSwish", {}, ()), ("Sigmoid", {}, ()), ("Tanh", {}, ()))
KINKS = (0.0, -2.5, 2.5, -3.0, 3.0, 6.0)


def test_every_elementwise_rule_bounds_every_runtime_on_exact_inputs(tmp_path):
    """Each op's rule (crossport.exact.rules) holds for ONNX Runtime, the translated graph and its TFLite file, on
    exact inputs (tests.helpers.around_kinks: the neighbours of every kink and wide uniform ranges). Exact
    inputs matter: behind another op the input's own allowance can hide a rule's gap (HardSwish's, docs/parity.md)."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    from onnx import numpy_helper

    from crossport.exact import exact_outputs
    from crossport.exact.graph import network_from_onnx
    from tests.helpers import around_kinks

    width = 16
    nodes = [helper.make_node(op, ["images", *extra], [op], **attrs) for op, attrs, extra in ELEMENTWISE]
    nodes.append(helper.make_node("Concat", [op for op, _, _ in ELEMENTWISE], ["logits"], axis=1))
    graph = helper.make_graph(
        nodes, "elementwise", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width * len(ELEMENTWISE)])],
        [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(6.0, np.float32), "six")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.save(model, str(tmp_path / "elementwise.onnx"))
    x = around_kinks(KINKS, width)
    exact = exact_outputs(network_from_onnx(model), x)
    values, bound = exact.values["logits"], exact.bounds["logits"]

    translate(tmp_path / "elementwise.onnx", tmp_path / "tf_graph", expose_intermediates=False)
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "tf_graph"))
    (tmp_path / "m.tflite").write_bytes(converter.convert())
    runs = {"onnxruntime": load_onnx(model)(x)["logits"],
            "tf_graph": load_saved_model(tmp_path / "tf_graph", outputs=("logits",))(x)["logits"],
            "tflite": Interpreter(model_path=str(tmp_path / "m.tflite")).get_signature_runner()(images=x)["logits"]}
    for runtime, y in runs.items():
        over = np.abs(y - values) > bound
        where = [ELEMENTWISE[column // width][0] for column in np.unique(np.nonzero(over)[1])]
        assert not over.any(), f"{runtime}: outside the rule's bound for {sorted(set(where))}"


def test_hard_swish_is_translated_to_the_form_tflite_runs_as_one_kernel(tmp_path):
    """onnx-tf's HardSwish, x·max(0, min(1, x/6 + 1/2)), became four TFLite ops; translated as x·relu6(x + 3)·1/6
    (translation.compat, item 7) it is TFLite's one HARD_SWISH kernel. Both the translated graph and TFLite's
    kernel (which computes x/6 + 1/2) are within the gate's HardSwish bound (crossport.exact.rules._hard_swish)
    of the float64 function, kinks included."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from crossport.exact import exact_outputs
    from crossport.exact.graph import network_from_onnx
    from export.layout import tflite_ops
    from tests.helpers import around_kinks

    graph = helper.make_graph(
        [helper.make_node("HardSwish", ["images"], ["logits"], name="swish")], "hard_swish",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    onnx.save(model, str(tmp_path / "hard_swish.onnx"))
    translate(tmp_path / "hard_swish.onnx", tmp_path / "tf_graph", expose_intermediates=False)

    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "tf_graph"))
    (tmp_path / "m.tflite").write_bytes(converter.convert())
    assert tflite_ops(tmp_path / "m.tflite") == ["HARD_SWISH"]

    x = around_kinks((-3.0, 3.0), width=64)
    exact = exact_outputs(network_from_onnx(model), x)
    values, bound = exact.values["logits"], exact.bounds["logits"]
    translated = tf.saved_model.load(str(tmp_path / "tf_graph")).signatures["serving_default"](images=tf.constant(x))
    assert np.all(np.abs(translated["logits"].numpy() - values) <= bound)
    runner = Interpreter(model_path=str(tmp_path / "m.tflite")).get_signature_runner()
    assert np.all(np.abs(runner(images=x)["logits"] - values) <= bound)


def _conv_chain(path, *, first=None, grouped=False, twice=False):
    """images [N, 12, 12, 4] channels last → Transpose to channels first → a depthwise 3×3 Conv (padding 1, or
    ``first``'s attributes) → a 3×3 Conv of stride 2 with a bias (one group, or two with ``grouped``) → Transpose
    back to channels last (with ``twice``, by a second [0, 3, 1, 2], which does not undo the first) → Flatten → Gemm:
    the layout the channels-last rewrite gives onnx-tf (translation/channels_last.py)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(7)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32), name)

    back = [0, 3, 1, 2] if twice else [0, 2, 3, 1]
    nodes = [
        helper.make_node("Transpose", ["images"], ["x"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x", "w1"], ["y1"], group=4, kernel_shape=[3, 3],
                         **(first or {"pads": [1, 1, 1, 1]})),
        helper.make_node("Conv", ["y1", "w2", "b2"], ["y2"], group=2 if grouped else 1, kernel_shape=[3, 3],
                         strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Transpose", ["y2"], ["z"], perm=back),
        helper.make_node("Flatten", ["z"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w3"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "conv_chain",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 12, 12, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5])],
                              [weight("w1", 4, 1, 3, 3), weight("w2", 6, 2 if grouped else 4, 3, 3),
                               weight("b2", 6), weight("w3", 216, 5)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return model


def _live_ops(tf_graph) -> dict:
    """The op types of the translated function (onnx-tf's module's ``__call__``) that its outputs depend on, with
    their counts."""
    from collections import Counter

    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel.FromString((tf_graph / "saved_model.pb").read_bytes())
    function = next(f for f in proto.meta_graphs[0].graph_def.library.function if "___call___" in f.signature.name)
    nodes = {node.name: node for node in function.node_def}
    live, stack = set(), [value.split(":")[0] for value in function.ret.values()]
    while stack:
        name = stack.pop()
        if name in nodes and name not in live:
            live.add(name)
            stack += [source.lstrip("^").split(":")[0] for source in nodes[name].input]
    return Counter(nodes[name].op for name in live)


@pytest.mark.parametrize("case", ["explicit pads", "auto_pad", "two groups", "no inverse"])
def test_convolutions_carry_no_layout_work_and_stay_within_the_bound(tmp_path, case):
    """crossport's Conv and Transpose handlers (translation.compat, item 8): a Conv of one group or depthwise gets
    its weights laid out before the trace and reads a channels-last input as it is, and a Transpose that undoes
    the one before it is no op, so nothing between the images and the Gemm moves data; a Conv of two groups is one
    convolution per group, also where the trace does not know its input's channels (here after onnx-tf's opset-13
    Pad, a tf.cond), where onnx-tf took it for a depthwise one and failed on its shape; and a Transpose that does not
    undo the one before it is computed. Each translation
    is within the exact reference's bound B of the float64 function (for auto_pad SAME_UPPER, that of the same
    convolution with its padding of 1 written out)."""
    import tensorflow as tf

    from crossport.exact import exact_outputs
    from crossport.exact.graph import network_from_onnx

    attributes = {"auto_pad": {"auto_pad": "SAME_UPPER"}}.get(case)
    _conv_chain(tmp_path / "model.onnx", first=attributes, grouped=case == "two groups", twice=case == "no inverse")
    reference = _conv_chain(tmp_path / "reference.onnx", grouped=case == "two groups", twice=case == "no inverse")
    translate(tmp_path / "model.onnx", tmp_path / "tf_graph", expose_intermediates=False)
    ops = _live_ops(tmp_path / "tf_graph")
    if case in ("explicit pads", "auto_pad"):
        assert ops["Transpose"] == 0 and not {"Split", "ConcatV2"} & set(ops), ops
        assert ops["Conv2D"] == 1 and ops["DepthwiseConv2dNative"] == 1, ops
    elif case == "two groups":
        assert ops["Conv2D"] == 2 and ops["DepthwiseConv2dNative"] == 1 and ops["Transpose"] == 0, ops
    else:
        assert ops["Transpose"] >= 1, ops

    images = np.random.default_rng(0).random((16, 12, 12, 4), dtype=np.float32)
    exact = exact_outputs(network_from_onnx(reference), images)
    translated = tf.saved_model.load(str(tmp_path / "tf_graph")).signatures["serving_default"](images=images)
    error = np.abs(translated["logits"].numpy().astype(np.float64) - exact.values["logits"])
    assert np.all(error <= exact.bounds["logits"]), float(np.max(error / exact.bounds["logits"]))


def _gemm(path, weights, bias, **attributes):
    """images [N, 30] → Gemm (with ``transA``, of their transpose) → logits [N, 7]."""
    from onnx import numpy_helper

    transposed = attributes.get("transA", 0)
    nodes = [helper.make_node("Transpose" if transposed else "Identity", ["images"], ["a"],
                              **({"perm": [1, 0]} if transposed else {})),
             helper.make_node("Gemm", ["a", "w"] + ([] if bias is None else ["b"]), ["logits"], **attributes)]
    initializers = [numpy_helper.from_array(weights, "w")] + ([] if bias is None else [
        numpy_helper.from_array(bias, "b")])
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 30])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 7])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return model


@pytest.mark.parametrize("case", ["transB", "no bias", "alpha and beta", "transA"])
def test_a_gemm_of_constant_weights_is_one_matmul(tmp_path, monkeypatch, case):
    """crossport's Gemm handler (translation.compat, item 8): constant weights transposed and beta·C computed
    before the trace, multiplications by 1 left out, so the graph reads each weight as it is (onnx-tf transposed
    them on every call); within the exact reference's bound B of the same function, and for alpha and beta other
    than 1 (which the exact reference does not read) onnx-tf's own translation bit for bit. transA stays onnx-tf's."""
    import tensorflow as tf

    from crossport.exact import exact_outputs
    from crossport.exact.graph import network_from_onnx

    rng = np.random.default_rng(3)
    weights = rng.normal(0, 0.3, (30, 7)).astype(np.float32)
    bias = None if case == "no bias" else rng.normal(0, 1, 7).astype(np.float32)
    attributes = {"transB": {"transB": 1}, "alpha and beta": {"transB": 1, "alpha": 0.75, "beta": 2.5},
                  "transA": {"transA": 1}}.get(case, {})
    _gemm(tmp_path / "gemm.onnx", weights.T.copy() if attributes.get("transB") else weights, bias, **attributes)
    translate(tmp_path / "gemm.onnx", tmp_path / "tf_graph", expose_intermediates=False)
    ops = _live_ops(tmp_path / "tf_graph")
    if case == "transA":
        assert ops["Transpose"] >= 1, ops  # onnx-tf's own
    else:
        assert ops["Transpose"] == 0 and ops["MatMul"] == 1 and ops["Mul"] == (case == "alpha and beta"), ops

    images = rng.random((32, 30), dtype=np.float32)
    logits = tf.saved_model.load(str(tmp_path / "tf_graph")).signatures["serving_default"](images=images)["logits"]
    if case == "alpha and beta":
        # every translation registers the handlers again (compat.import_onnx_tf), so onnx-tf's own goes in there
        monkeypatch.setattr(compat, "_gemm", lambda cls, node, **kwargs: cls._common(node, **kwargs))
        translate(tmp_path / "gemm.onnx", tmp_path / "onnx_tf_graph", expose_intermediates=False)
        assert _live_ops(tmp_path / "onnx_tf_graph")["Transpose"] == 1  # onnx-tf's: the weights transposed per call
        own = tf.saved_model.load(str(tmp_path / "onnx_tf_graph")).signatures["serving_default"](images=images)
        assert np.array_equal(logits.numpy(), own["logits"].numpy())
        return
    exact = exact_outputs(network_from_onnx(_gemm(tmp_path / "reference.onnx", weights, bias)), images)
    error = np.abs(logits.numpy().astype(np.float64) - exact.values["logits"])
    assert np.all(error <= exact.bounds["logits"]), float(np.max(error / exact.bounds["logits"]))
