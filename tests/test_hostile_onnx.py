"""Hostile ONNX files: a tensor whose data lives outside the file is refused wherever the file keeps it (initializer,
sparse initializer, a Constant's or any node's attribute, a subgraph, a function) before any runtime or checker reads
it; and no hint names a stage the route does not have."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from crossport.errors import ExportError, ImportModelError
from tests.helpers import one_line_error, pipeline_here
from tests.onnx_models import legacy_mlp
from translation.onnx_export import check_onnx, external_tensors, onnx_hints, read_onnx

TARGET = "README.md"  # a file an ONNX Runtime run from the project's directory would find


def pointing_outside(tensor: TensorProto, location: str = TARGET) -> TensorProto:
    """``tensor`` with its bytes moved out to ``location`` (as onnx.save(save_as_external_data=True) writes it)."""
    moved = TensorProto()
    moved.CopyFrom(tensor)
    moved.ClearField("raw_data")
    moved.ClearField("float_data")
    moved.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(4 * int(np.prod(tensor.dims))))):
        entry = moved.external_data.add()
        entry.key, entry.value = key, value
    return moved


def constant(name: str, values: np.ndarray, *, outside: bool) -> onnx.NodeProto:
    tensor = numpy_helper.from_array(values, name)
    return helper.make_node("Constant", [], [name], name=f"{name}_node",
                            value=pointing_outside(tensor) if outside else tensor)


def with_bias_from(node: onnx.NodeProto, model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` whose output logits gain ``node``'s output (a [classes] bias) before the Softmax."""
    graph = model.graph
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    graph.node.insert(list(graph.node).index(softmax), node)
    add = helper.make_node("Add", [softmax.input[0], node.output[0]], ["biased"], name="bias_add")
    graph.node.insert(list(graph.node).index(softmax), add)
    softmax.input[0] = "biased"
    return model


def external_initializer():
    model = legacy_mlp(opset=13, initializers_as_inputs=False, ir_version=8, batch="N")
    model.graph.initializer[0].CopyFrom(pointing_outside(model.graph.initializer[0]))
    return model, "initializer"


def external_constant():
    node = constant("shift", np.zeros(10, np.float32), outside=True)
    return with_bias_from(node, legacy_mlp(opset=13, initializers_as_inputs=False, ir_version=8, batch="N")), \
        "Constant node 'shift_node' attribute 'value'"


def external_sparse_initializer():
    model = legacy_mlp(opset=13, initializers_as_inputs=False, ir_version=8, batch="N")
    values = pointing_outside(numpy_helper.from_array(np.zeros(1, np.float32), "sparse_shift"))
    indices = numpy_helper.from_array(np.array([0], np.int64), "sparse_shift_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [10]))
    return model, "sparse initializer 'sparse_shift' values"


def external_in_a_subgraph():
    branch = helper.make_graph([constant("then_shift", np.zeros(10, np.float32), outside=True)], "then", [],
                               [helper.make_tensor_value_info("then_shift", TensorProto.FLOAT, [10])])
    other = helper.make_graph([constant("else_shift", np.zeros(10, np.float32), outside=False)], "else", [],
                              [helper.make_tensor_value_info("else_shift", TensorProto.FLOAT, [10])])
    model = legacy_mlp(opset=13, initializers_as_inputs=False, ir_version=8, batch="N")
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "always"))
    node = helper.make_node("If", ["always"], ["shift"], name="choose", then_branch=branch, else_branch=other)
    return with_bias_from(node, model), "Constant node 'then_shift_node' attribute 'value' (in If node 'choose'"


def external_in_a_function():
    function = helper.make_function("local", "Shift", [], ["out"],
                                    [constant("out", np.zeros(10, np.float32), outside=True)],
                                    [helper.make_opsetid("", 13)])
    model = legacy_mlp(opset=13, initializers_as_inputs=False, ir_version=8, batch="N")
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(function)
    return with_bias_from(helper.make_node("Shift", [], ["shift"], name="shift", domain="local"), model), \
        "(in function 'Shift')"


PLACES = [external_initializer, external_constant, external_sparse_initializer, external_in_a_subgraph,
          external_in_a_function]


@pytest.mark.parametrize("build", PLACES, ids=lambda build: build.__name__)
def test_external_data_anywhere_in_the_file_is_found_and_named(build):
    model, where = build()
    found = external_tensors(model)
    assert len(found) == 1 and where in found[0] and f"at location {TARGET!r}" in found[0]


def test_a_file_that_keeps_everything_inside_has_no_external_tensor():
    model, _ = external_in_a_subgraph()
    choose = next(node for node in model.graph.node if node.name == "choose")
    then_branch = next(attribute.g for attribute in choose.attribute if attribute.name == "then_branch")
    then_branch.node[0].attribute[0].t.CopyFrom(numpy_helper.from_array(np.zeros(10, np.float32), "then_shift"))
    assert external_tensors(model) == []


@pytest.mark.slow  # the run loads its frameworks, which ask ldconfig where their libraries are
@pytest.mark.parametrize("build", PLACES, ids=lambda build: build.__name__)
def test_onnx_brought_with_external_data_is_refused_before_anything_reads_it(build, tmp_path, capfd, monkeypatch):
    """ONNX Runtime resolves an external location against the working directory for a model given as bytes: the
    run starts in a directory whose README.md such a tensor names, and must refuse the file before reading it."""
    model, where = build()
    path = tmp_path / "brought.onnx"
    onnx.save(model, str(path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / TARGET).write_bytes(np.ones(64, np.float32).tobytes())
    run = tmp_path / "run"
    result = pipeline_here("--onnx", str(path), "--run-dir", str(run), "--models-dir", str(tmp_path / "models"),
                           "--no-tracking", capsys=capfd)
    one_line_error(result, 1, f"ONNX model {path} keeps 1 tensor(s) in external data files (first: ", where,
                   "reads no file it names", "save_as_external_data=False")
    assert not (run / "source.onnx").exists() and not (tmp_path / "models").exists()


def test_read_onnx_refuses_with_the_callers_error():
    model, _ = external_constant()
    with pytest.raises(ImportModelError, match="external data files"):
        read_onnx_from(model, ImportModelError)


@pytest.mark.parametrize(("where", "found"), [("folder", "is a folder"), ("/dev/null", "is not a regular file"),
                                             ("absent.onnx", "does not exist")])
def test_an_onnx_path_that_is_no_file_says_what_is_there(tmp_path, where, found):
    path = tmp_path if where == "folder" else tmp_path / where  # tmp_path / "/dev/null" is /dev/null itself
    with pytest.raises(ImportModelError) as error:
        read_onnx(path, ImportModelError, missing="Pass --onnx with the path of an ONNX file.", redo="-")
    assert str(error.value) == f"ONNX model {path} {found}. Pass --onnx with the path of an ONNX file."


def read_onnx_from(model, error):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        onnx.save(model, str(path))
        return read_onnx(path, error, missing="-", redo="-")


def test_hints_name_only_stages_the_route_has(tmp_path):
    """A model.onnx that fails onnx.checker: on the export route re-run export; on the import route (which has no
    export stage) re-run import with the file brought."""
    model = legacy_mlp(opset=13, initializers_as_inputs=False, ir_version=8, batch="N", input_name="images")
    model.graph.output[0].name = "scores"
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])
    model.graph.output.append(logits)  # declared but made by no node: onnx.checker refuses the graph
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError) as exported:
        check_onnx(path)
    assert exported.value.hint == "Re-run the export stage."
    with pytest.raises(ExportError) as imported:
        check_onnx(path, **onnx_hints("brought.onnx"))
    assert "does not pass onnx.checker" in str(imported.value)
    assert imported.value.hint.startswith("Re-run the import stage (--onnx brought.onnx)")
    assert "export" not in imported.value.hint


@pytest.mark.slow  # the run loads its frameworks
@pytest.mark.parametrize("case", ["newline in metadata", "latin-1 label file"])
def test_labels_that_cannot_be_labels_stop_the_import_in_one_line(case, tmp_path, capfd):
    model = legacy_mlp(opset=13, initializers_as_inputs=False, ir_version=8, batch="N")
    extra = []
    if case == "newline in metadata":
        labels = [str(digit) for digit in range(9)] + ["9\nEVIL"]
        model.metadata_props.add(key="labels", value=json.dumps(labels))
        fragments = ["the ONNX file's metadata_props 'labels' label 9 ('9\\nEVIL') holds the control character"]
    else:
        (tmp_path / "labels.txt").write_bytes("\n".join(["zéro", *map(str, range(1, 10))]).encode("latin-1"))
        extra = ["--labels", str(tmp_path / "labels.txt")]
        fragments = [f"--labels {tmp_path / 'labels.txt'} is not UTF-8 text: byte 0xe9 at offset 1"]
    path = tmp_path / "brought.onnx"
    onnx.save(model, str(path))
    result = pipeline_here("--onnx", str(path), *extra, "--run-dir", str(tmp_path / "run"), "--models-dir",
                           str(tmp_path / "models"), "--no-tracking", capsys=capfd)
    one_line_error(result, 1, *fragments)
    assert not (tmp_path / "run" / "labels.txt").exists() and not (tmp_path / "models").exists()
