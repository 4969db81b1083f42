"""ONNX files as other tools made them, built with onnx.helper (no downloads): seeded, tiny, legacy shapes."""

from __future__ import annotations

import itertools

import numpy as np

from crossport.interface import transposed


def _weights(rng, fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
    bound = 1.0 / np.sqrt(fan_in)
    return (rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32),
            rng.uniform(-bound, bound, fan_out).astype(np.float32))


def legacy_mlp(*, opset: int = 7, classes: int = 10, hidden: tuple[int, ...] = (32,), batch: int | str = 1,
               input_shape: tuple[int, ...] = (784,), input_name: str = "0", activation: str = "Elu",
               head: str = "Softmax", initializers_as_inputs: bool = True, ir_version: int = 3, seed: int = 0,
               weights: list | None = None):
    """An MLP as PyTorch 0.3 exported it: Gemm/Elu/Softmax, weights also graph inputs, batch fixed at 1.

    ``head``: "Softmax" (probabilities only), "none" (logits only) or "LogSoftmax". A model whose input is
    [N, 1, 28, 28] or [N, 28, 28] starts with a Flatten. ``weights`` replaces the random (W, b) pairs.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    sizes = (784, *hidden, classes)
    pairs = weights or [_weights(rng, a, b) for a, b in itertools.pairwise(sizes)]
    nodes, inits, current = [], [], input_name
    if len(input_shape) > 1:
        nodes.append(helper.make_node("Flatten", [current], ["flat"], axis=1, name="flatten"))
        current = "flat"
    for i, (w, b) in enumerate(pairs):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        out = f"gemm{i}"
        attrs = {"transB": 1} if opset >= 7 else {"transB": 1, "broadcast": 1}
        nodes.append(helper.make_node("Gemm", [current, f"W{i}", f"b{i}"], [out], name=f"Gemm_{i}", **attrs))
        current = out
        if i < len(pairs) - 1:
            nodes.append(helper.make_node(activation, [current], [f"act{i}"], name=f"{activation}_{i}"))
            current = f"act{i}"
    output = "probs"
    if head == "none":
        output = current
    else:
        nodes.append(helper.make_node(head, [current], [output], axis=1, name=head))
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, *input_shape])]
    if initializers_as_inputs:
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(nodes, "legacy_mlp", inputs,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="pytorch",
                              producer_version="0.3")
    model.ir_version = ir_version
    return model


def nchw_cnn(*, opset: int = 11, classes: int = 10, channels: int = 4, seed: int = 0):
    """A channels-first CNN: input [N, 1, 28, 28], Conv 3x3 → BatchNorm → Relu → MaxPool → Flatten → Gemm → Softmax."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = rng.normal(0, 1 / 3, (channels, 1, 3, 3)).astype(np.float32)
    gemm_w, gemm_b = _weights(rng, channels * 14 * 14, classes)
    inits = [numpy_helper.from_array(conv, "conv_w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "bn_scale"),
             numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "bn_bias"),
             numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "bn_mean"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, channels).astype(np.float32), "bn_var"),
             numpy_helper.from_array(gemm_w, "fc_w"), numpy_helper.from_array(gemm_b, "fc_b")]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"],
                         epsilon=1e-5, name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits_out"], transB=1, name="fc"),
        helper.make_node("Softmax", ["logits_out"], ["prob"], axis=1, name="softmax"),
    ]
    graph = helper.make_graph(nodes, "nchw_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def with_op(op_type: str, *, opset: int = 18, domain: str = ""):
    """An MLP with one ``op_type`` node (an op onnx-tf cannot translate) before its Softmax."""
    from onnx import helper

    model = legacy_mlp(opset=opset, batch="N", input_name="images", activation="Relu", initializers_as_inputs=False,
                       ir_version=8)
    graph = model.graph
    softmax = next(node for node in graph.node if node.op_type == "Softmax")
    graph.node.insert(len(graph.node) - 1, helper.make_node(op_type, [softmax.input[0]], ["odd"], name="odd_node",
                                                            domain=domain))
    softmax.input[0] = "odd"
    return model


def two_inputs():
    """A model with a second input beside the image."""
    from onnx import TensorProto, helper

    model = legacy_mlp(opset=13, batch="N", input_name="images", activation="Relu", initializers_as_inputs=False,
                       ir_version=7)
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("temperature", TensorProto.FLOAT, [1]))
    softmax = next(node for node in graph.node if node.op_type == "Softmax")
    graph.node.insert(len(graph.node) - 1, helper.make_node("Div", [softmax.input[0], "temperature"], ["scaled"],
                                                            name="scale"))
    softmax.input[0] = "scaled"
    return model


def upright_digits_weights(hidden: int = 64, epochs: int = 3):
    """(W, b) pairs of an MLP trained on upright digits, as the 2018 model was on upright EMNIST; and the data."""
    import torch

    from training.data import load_digits
    from training.model import ModelConfig
    from training.train import TrainConfig, train

    data = load_digits(seed=0)
    model, _ = train(transposed(data.x_train), data.y_train, transposed(data.x_test), data.y_test,
                     ModelConfig(arch="mlp", num_classes=10, hidden_sizes=(hidden,)),
                     TrainConfig(epochs=epochs, batch_size=64, learning_rate=1e-3, seed=0))
    weights = [(layer.weight.detach().numpy(), layer.bias.detach().numpy())
               for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    return weights, data


def pooled_cnn(*, opset: int = 13, head: str = "GlobalAveragePool", classes: int = 10, channels: int = 4,
               seed: int = 0):
    """A CNN with a global-average-pool head, as ResNets and MobileNets end: input [N, 1, 28, 28], Conv 3x3 → Relu →
    ``head`` → Gemm → Softmax. ``head``: "GlobalAveragePool", "ReduceMean" (keepdims, then Flatten) or
    "ReduceMean-flat" (keepdims=0); at opset 18 ReduceMean takes its axes as an input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = rng.normal(0, 1 / 3, (channels, 1, 3, 3)).astype(np.float32)
    gemm_w, gemm_b = _weights(rng, channels, classes)
    inits = [numpy_helper.from_array(conv, "conv_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, channels).astype(np.float32), "conv_b"),
             numpy_helper.from_array(gemm_w, "fc_w"), numpy_helper.from_array(gemm_b, "fc_b")]
    nodes = [helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                              name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    if head == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"))
    else:
        keep = int(head == "ReduceMean")
        if opset >= 18:
            inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
            nodes.append(helper.make_node("ReduceMean", ["r", "axes"], ["p"], keepdims=keep, name="pool"))
        else:
            nodes.append(helper.make_node("ReduceMean", ["r"], ["p"], axes=[2, 3], keepdims=keep, name="pool"))
    flat = "p"
    if head != "ReduceMean-flat":
        nodes.append(helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"))
        flat = "f"
    nodes += [helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits_out"], transB=1, name="fc"),
              helper.make_node("Softmax", ["logits_out"], ["prob"], axis=1, name="softmax")]
    graph = helper.make_graph(nodes, "pooled_cnn",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


COLOURS = {"blue": (40, 60, 200), "gray": (128, 128, 128), "green": (40, 180, 60), "red": (200, 40, 40)}


def colour_folder(root, per_class: int = 60, size: tuple[int, int] = (48, 40), seed: int = 0):
    """An ImageFolder of RGB PNGs, one sub-folder per colour (sorted names: the classes' order), each picture
    ``size`` (width, height) of its colour with noise: a task a small CNN learns in a second."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for label, colour in COLOURS.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            noise = rng.normal(0, 40, (size[1], size[0], 3))
            Image.fromarray(np.clip(np.array(colour, float) + noise, 0, 255).astype(np.uint8)).save(
                folder / f"{index:03d}.png")
    return root


def rgb_cnn(path, folder, *, side: int = 32, seed: int = 0):
    """A MobileNet-shaped PyTorch CNN on RGB ``side``×``side`` images (a stride-2 conv, BatchNorm, ReLU6, a depthwise
    conv, HardSwish, global average pool, Linear), trained briefly on ``folder`` (:func:`colour_folder`) and
    exported by torch.onnx's TorchScript exporter at opset 13 with its input named ``input.1``, channels first and a
    dynamic batch. Returns the model (eval mode) and the training images [N, 3, side, side] with their classes."""
    import torch
    from PIL import Image
    from torch import nn

    torch.manual_seed(seed)
    labels = sorted(child.name for child in folder.iterdir())
    files = [(file, index) for index, label in enumerate(labels) for file in sorted((folder / label).iterdir())]
    pixels = np.stack([np.asarray(Image.open(file).convert("RGB").resize((side, side), Image.BILINEAR))
                       for file, _ in files])
    x = torch.tensor(pixels, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    y = torch.tensor([index for _, index in files])
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Hardswish(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(labels)))
    optimizer = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(40):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    torch.onnx.export(model, torch.zeros(1, 3, side, side), str(path), input_names=["input.1"], output_names=["out"],
                      dynamic_axes={"input.1": {0: "N"}, "out": {0: "N"}}, opset_version=13, dynamo=False)
    return model, x.numpy(), y.numpy()


def image_cnn(*, layout: str = "nchw", height: int = 8, width: int = 6, channels: int = 3, classes: int = 5,
              opset: int = 13, seed: int = 0):
    """A CNN on ``height``×``width`` images of ``channels``: Conv 3x3 → Relu → GlobalAveragePool → Flatten → Gemm →
    Softmax. ``layout`` "nchw" takes [N, C, H, W]; "nhwc" takes [N, H, W, C] and transposes it first, as
    tf2onnx and Keras exports do."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    gemm_w, gemm_b = _weights(rng, 4, classes)
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (4, channels, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "conv_b"),
             numpy_helper.from_array(gemm_w, "fc_w"), numpy_helper.from_array(gemm_b, "fc_b")]
    nodes, first = [], "input"
    if layout == "nhwc":
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        first = "nchw"
    nodes += [helper.make_node("Conv", [first, "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                               name="conv"),
              helper.make_node("Relu", ["c"], ["r"], name="relu"),
              helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
              helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
              helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["z"], transB=1, name="fc"),
              helper.make_node("Softmax", ["z"], ["prob"], axis=1, name="softmax")]
    shape = ["N", channels, height, width] if layout == "nchw" else ["N", height, width, channels]
    graph = helper.make_graph(nodes, "image_cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", classes])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def int8_breaker(*, classes: int = 4, per_class: int = 100, seed: int = 0):
    """An MLP (784 → 32 → 16 → classes, ReLU) that full int8 breaks in one place, and images it classifies right.

    Each class is a random binary 28×28 pattern; images are their patterns with 5 % of pixels flipped. Units 1..C of
    the first layer detect the patterns (about 4 on their own class, about 0 on the others) and the next layers pass
    them on. Unit 0 reads nothing and outputs 10⁵ on every image: a huge range in one channel, which int8 gives one
    scale for the whole tensor, so every detector rounds to zero and the answers collapse — unless that tensor stays
    in float, which needs the first layer (making it) and the second (reading it) in float.
    Returns the ONNX model and ``(images uint8 [N, 28, 28] in EMNIST orientation, labels)``.
    """
    rng = np.random.default_rng(seed)
    patterns = rng.random((classes, 784)) < 0.5
    labels = np.repeat(np.arange(classes), per_class)
    flips = rng.random((len(labels), 784)) < 0.05
    images = (patterns[labels] ^ flips).astype(np.uint8) * 255
    w1, b1 = np.zeros((32, 784), np.float32), np.zeros(32, np.float32)
    w1[1 : classes + 1] = (2 * patterns - 1) * 8 / 784
    w1[classes + 1 :] = rng.normal(0, 1e-3, (32 - classes - 1, 784))
    b1[0] = 1e5
    w2, b2 = np.zeros((16, 32), np.float32), np.zeros(16, np.float32)
    w2[np.arange(classes), np.arange(1, classes + 1)] = 1.0  # unit 0 feeds nothing
    w3, b3 = 3 * np.eye(classes, 16, dtype=np.float32), np.zeros(classes, np.float32)
    model = legacy_mlp(opset=13, classes=classes, hidden=(32, 16), batch="N", input_name="images",
                       activation="Relu", initializers_as_inputs=False, ir_version=8,
                       weights=[(w1, b1), (w2, b2), (w3, b3)])
    return model, (images.reshape(-1, 28, 28), labels)
