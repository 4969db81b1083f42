"""The ONNX graph rewritten to carry its images channels last (NHWC) between the ops onnx-tf wraps in transposes.

onnx-tf computes each Conv, MaxPool and AveragePool channels last and wraps it in a
Transpose pair (NCHW → NHWC, the op, NHWC → NCHW); everything between two such ops runs
channels first. TFLite's converter cancels a Transpose against the next one only when
nothing stands between them, so a Pad (a stride-2 convolution's explicit padding), a
global average pool, HardSwish or a squeeze-excitation Mul between two convolutions
keeps both: 9 transposes in a resnet18 file, 57 in a mobilenet_v3_small one.

Here every 4-D image tensor gets a channels-last twin (``<name>.nhwc``) where one can be
had without computing anything else:

- at the input: the import's Transpose from the published [N, H, W, C] images, or the
  reshape of a flat [N, 784] into [N, 1, 28, 28] (one channel: the same values as
  [N, 28, 28, 1]);
- after a Conv, MaxPool or AveragePool: its input twin is transposed to NCHW right before
  it and its output transposed back right after it, the pairs TFLite cancels against
  onnx-tf's own; an explicit padding becomes a Pad on the channels-last twin;
- after a global average pool: the mean over the twin's spatial axes (ReduceMean);
- after an elementwise op (Relu, Clip, HardSwish, Add, Mul, ...): the same op on the
  twins, a per-channel constant permuted to broadcast over the last axis;
- after a Concat over channels: the same Concat over the last axis;
- a Flatten (or its Reshape) into a Gemm reads the twin, the Gemm's weight columns
  permuted to the (h, w, c) order.

Every other op reads the original NCHW tensor, which is still computed where something
needs it; nodes nothing reads any more are dropped. The products and sums are the same
ones, the zeros a Pad adds are the ones the padding added, so the arithmetic is the
original model's; parity is checked on the result like on any translation. Twins carry
their own names, so the divergence finder never compares one with an NCHW tensor.
"""

from __future__ import annotations

# Ops onnx-tf computes channels last, wrapped in a Transpose pair.
WINDOWED = frozenset({"Conv", "MaxPool", "AveragePool"})
# Ops that compute each element from the same element of their data input(s), in any layout; the inputs after
# the first are attributes as tensors (Clip's bounds) for the unary ones.
UNARY = frozenset({"Relu", "Clip", "LeakyRelu", "Elu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Identity"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
NONNEGATIVE = frozenset({"Relu", "Sigmoid", "HardSigmoid"})  # outputs ≥ 0: a max pool may pad them with zeros
TO_NCHW, TO_NHWC = [0, 3, 1, 2], [0, 2, 3, 1]


def channels_last(model) -> list[str]:
    """Rewrite ``model`` in place (see the module's docstring); the names of the nodes now computed channels last."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    rewrite = _Rewrite(model, {value.name: [d.dim_value if d.HasField("dim_value") else None
                                            for d in value.type.tensor_type.shape.dim]
                               for value in (*inferred.graph.value_info, *inferred.graph.input,
                                             *inferred.graph.output)})
    for node in list(model.graph.node):
        rewrite.visit(node)
    if not rewrite.done:
        return []
    del model.graph.node[:]
    model.graph.node.extend(rewrite.nodes)
    _drop_unused(model)
    return rewrite.done


class _Rewrite:
    def __init__(self, model, shapes: dict) -> None:
        from onnx import numpy_helper

        self.graph = model.graph
        self.shapes = shapes
        self.constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.producer = {output: node for node in model.graph.node for output in node.output}
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.twin: dict[str, str] = {}  # NCHW tensor → its NHWC twin
        self.made: set[str] = set()  # NCHW copies of twins, made once each
        self.nodes: list = []
        self.done: list[str] = []

    # --- helpers --------------------------------------------------------------------------

    def image(self, name: str) -> list | None:
        """[N, C, H, W] with C, H, W known, or None."""
        shape = self.shapes.get(name)
        return shape if shape and len(shape) == 4 and None not in shape[1:] else None

    def add(self, op: str, inputs: list[str], output: str, name: str, **attrs):
        from onnx import helper

        node = helper.make_node(op, inputs, [output], name=name, **attrs)
        self.nodes.append(node)
        return node

    def constant(self, name: str, array) -> str:
        from onnx import numpy_helper

        if name not in self.constants:
            self.graph.initializer.append(numpy_helper.from_array(array, name))
            self.constants[name] = array
        return name

    def permuted(self, name: str) -> str | None:
        """A constant operand of an elementwise op, broadcast in NCHW, as it broadcasts in NHWC."""
        import numpy as np

        array = self.constants.get(name)
        if array is None or array.ndim > 4:
            return None
        if array.size == 1:
            return name
        wide = array.reshape((1,) * (4 - array.ndim) + array.shape)
        return self.constant(f"{name}.nhwc", np.ascontiguousarray(wide.transpose(TO_NHWC)))

    # --- the rewrite, one node at a time ------------------------------------------------------

    def visit(self, node) -> None:
        twinned = node.domain in ("", "ai.onnx") and any(name in self.twin for name in node.input)
        handler = {"Transpose": self.transpose, "Reshape": self.reshape, "Flatten": self.flatten,
                   "Concat": self.concat, "GlobalAveragePool": self.mean}.get(node.op_type)
        if handler is None:
            handler = (self.windowed if node.op_type in WINDOWED else self.unary if node.op_type in UNARY
                       else self.binary if node.op_type in BINARY else None)
        if handler is None or not (twinned or node.op_type in ("Transpose", "Reshape")) or not handler(node):
            self.nodes.append(node)

    def transpose(self, node) -> bool:
        """A transpose of channels-last images to NCHW (the import's, a Keras export's): its input is the twin."""
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm == TO_NCHW and self.image(node.output[0]) and node.input[0] not in self.twin:
            self.twin[node.output[0]] = node.input[0]
        self.nodes.append(node)
        return True

    def reshape(self, node) -> bool:
        """A flat batch reshaped to [N, 1, H, W]: one channel, so [N, H, W, 1] holds the same values."""
        if node.input[0] in self.twin:
            return self.flatten(node)
        shape = self.image(node.output[0])
        source = self.shapes.get(node.input[0])
        self.nodes.append(node)
        if shape and shape[1] == 1 and source and len(source) == 2:
            import numpy as np

            _, _, height, width = shape
            target = self.constant(f"{node.output[0]}.nhwc_shape", np.array([-1, height, width, 1], np.int64))
            self.twin[node.output[0]] = f"{node.output[0]}.nhwc"
            self.add("Reshape", [node.input[0], target], f"{node.output[0]}.nhwc", f"{node.name}.nhwc")
            self.done.append(node.name)
        return True

    def windowed(self, node) -> bool:
        from onnx import helper

        source = node.input[0]
        shape = self.image(source)
        if source not in self.twin or not shape or node.domain not in ("", "ai.onnx"):
            return False
        attrs = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        if len(attrs.get("kernel_shape", ())) != 2 or attrs.get("ceil_mode", 0):
            return False
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        padded = any(pads) and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET")
        if padded and not (node.op_type == "Conv" or (node.op_type == "MaxPool" and self.nonnegative(source))
                           or (node.op_type == "AveragePool" and attrs.get("count_include_pad", 0))):
            return False  # only zeros may pad it here: a max pool's -inf or an average that leaves them out stay
        if padded:
            kept = [attr for attr in node.attribute if attr.name != "pads"]
            del node.attribute[:]
            node.attribute.extend(kept)
        node.input[0] = self.channels_first(source, pads if padded else [0, 0, 0, 0])
        self.nodes.append(node)
        output = node.output[0]
        self.add("Transpose", [output], f"{output}.nhwc", f"{node.name}.to_nhwc", perm=TO_NHWC)
        self.twin[output] = f"{output}.nhwc"
        self.done.append(node.name)
        return True

    def mean(self, node) -> bool:
        """A global average pool: the same mean over the twin's spatial axes, TensorFlow's ``reduce_mean`` as
        onnx-tf computes the pool itself. (Not an AveragePool of the map's size: TensorFlow's pooling kernel rounds
        its mean one way, which the gate's sign test finds.)"""
        import numpy as np

        if node.input[0] not in self.twin or not self.image(node.input[0]):
            return False
        self.nodes.append(node)
        axes = self.constant("crossport.spatial_axes", np.array([1, 2], np.int64))
        self.add("ReduceMean", [self.twin[node.input[0]], axes], f"{node.output[0]}.nhwc", f"{node.name}.nhwc",
                 keepdims=1)
        self.twin[node.output[0]] = f"{node.output[0]}.nhwc"
        self.done.append(node.name)
        return True

    def channels_first(self, source: str, pads: list[int]) -> str:
        """The twin of ``source``, zero-padded by ``pads`` (top, left, bottom, right), transposed to NCHW for an op
        onnx-tf wraps: made once, however many ops read it (a ResNet's block and its shortcut)."""
        import numpy as np

        suffix = "" if not any(pads) else "_pad" + "_".join(map(str, pads))
        name = f"{source}.nchw{suffix}"
        if name in self.made:
            return name
        current = self.twin[source]
        if any(pads):
            top, left, bottom, right = pads
            shape = self.constant(f"{source}.nhwc_pads{suffix}",
                                  np.array([0, top, left, 0, 0, bottom, right, 0], np.int64))
            self.add("Pad", [current, shape], f"{source}.nhwc{suffix}", f"{source}.nhwc{suffix}")
            current = f"{source}.nhwc{suffix}"
        self.add("Transpose", [current], name, f"{name}.transpose", perm=TO_NCHW)
        self.made.add(name)
        return name

    def nonnegative(self, name: str) -> bool:
        """Whether every value of ``name`` is ≥ 0 by the op that wrote it (a ReLU, or a Clip from 0 up)."""
        node = self.producer.get(name)
        if node is None:
            return False
        if node.op_type in NONNEGATIVE:
            return True
        if node.op_type == "Clip":
            low = self.constants.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            return low is not None and float(low) >= 0
        return False

    def unary(self, node) -> bool:
        if node.input[0] not in self.twin or len(node.output) != 1:
            return False
        self.nodes.append(node)
        output = f"{node.output[0]}.nhwc"
        clone = self.add(node.op_type, [self.twin[node.input[0]], *node.input[1:]], output, f"{node.name}.nhwc")
        clone.attribute.extend(node.attribute)
        self.twin[node.output[0]] = output
        self.done.append(node.name)
        return True

    def binary(self, node) -> bool:
        inputs = []
        for name in node.input:
            operand = self.twin.get(name) or self.permuted(name)
            if operand is None:  # a data tensor with no twin: this op stays channels first
                return False
            inputs.append(operand)
        self.nodes.append(node)
        output = f"{node.output[0]}.nhwc"
        clone = self.add(node.op_type, inputs, output, f"{node.name}.nhwc")
        clone.attribute.extend(node.attribute)
        self.twin[node.output[0]] = output
        self.done.append(node.name)
        return True

    def concat(self, node) -> bool:
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if axis not in (1, -3) or not all(name in self.twin for name in node.input):
            return False
        self.nodes.append(node)
        output = f"{node.output[0]}.nhwc"
        self.add("Concat", [self.twin[name] for name in node.input], output, f"{node.name}.nhwc", axis=3)
        self.twin[node.output[0]] = output
        self.done.append(node.name)
        return True

    def flatten(self, node) -> bool:
        """[N, C, H, W] flattened for a Gemm: the twin flattened in (h, w, c) order, the Gemm's weights permuted to
        match (a map of one pixel needs no permutation: the values are the same)."""
        import numpy as np
        from onnx import numpy_helper

        source = node.input[0]
        shape = self.image(source)
        if not shape:
            return False
        _, channels, height, width = shape
        if node.op_type == "Reshape":
            target = self.constants.get(node.input[1])
            if target is None or target.tolist() not in ([-1, channels * height * width], [0, -1]):
                return False
        elif any(a.i != 1 for a in node.attribute if a.name == "axis"):
            return False
        users = self.consumers.get(node.output[0], [])
        if height * width == 1:
            node.input[0] = self.twin[source]
            self.nodes.append(node)
            self.done.append(node.name)
            return True
        if (len(users) != 1 or users[0].op_type != "Gemm" or users[0].input[0] != node.output[0]
                or users[0].input[1] not in self.constants or len(self.consumers.get(users[0].input[1], [])) != 1):
            return False
        gemm = users[0]
        weight = self.constants[gemm.input[1]]
        if next((a.i for a in gemm.attribute if a.name == "transB"), 0):  # [out, C·H·W] → columns in (h, w, c) order
            permuted = weight.reshape(-1, channels, height, width).transpose(0, 2, 3, 1).reshape(weight.shape)
        else:  # [C·H·W, out] → rows in (h, w, c) order
            permuted = weight.reshape(channels, height, width, -1).transpose(1, 2, 0, 3).reshape(weight.shape)
        init = next(init for init in self.graph.initializer if init.name == gemm.input[1])
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(permuted), gemm.input[1]))
        node.input[0] = self.twin[source]
        flat = f"{node.output[0]}.nhwc"  # another element order than the original's: its own name
        node.output[0] = flat
        gemm.input[0] = flat
        self.nodes.append(node)
        self.done.append(node.name)
        return True


def _drop_unused(model) -> None:
    """Nodes whose outputs nothing reads (the NCHW originals of what now runs channels last), then constants no
    node reads."""
    wanted = {value.name for value in model.graph.output}
    kept = []
    for node in reversed(list(model.graph.node)):
        if any(name in wanted for name in node.output):
            kept.append(node)
            wanted.update(name for name in node.input if name)
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept))
    read = {name for node in model.graph.node for name in node.input}
    unused = [init for init in model.graph.initializer if init.name not in read]
    for init in unused:
        model.graph.initializer.remove(init)
