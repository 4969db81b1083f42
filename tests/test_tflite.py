import pytest

from crossport.errors import PackageError
from crossport.formats import TFLITE_CONVERTED
from crossport.parity import compare
from crossport.runtimes import load_saved_model, load_tflite
from export.tflite import convert_tflite, tflite_converter
from pipelines.gate import SM_PREDICT, TFLITE_FP32, hop_spec


@pytest.mark.parametrize("batch", [1, 37])
def test_tflite_fp32_runs_in_litert_and_matches_saved_model(tiny, tiny_exact, batch):
    images = tiny.images[:batch]
    result = compare(hop_spec(SM_PREDICT, TFLITE_FP32), load_saved_model(tiny.saved_model)(images),
                     load_tflite(tiny.tflite)(images), bounds=tiny_exact.rows(slice(batch)).bounds)
    assert result.passed, result.failures
    assert result.examples == batch


def test_tflite_has_only_the_predict_signature(tiny):
    from ai_edge_litert.interpreter import Interpreter

    signatures = Interpreter(model_path=str(tiny.tflite)).get_signature_list()
    assert signatures == {"serving_default": {"inputs": ["images"], "outputs": ["scores"]}}


@pytest.fixture(scope="module")
def calibration():
    import numpy as np

    return np.random.default_rng(3).random((256, 784), dtype=np.float32)


@pytest.mark.parametrize("variant", [fmt.variant for fmt in TFLITE_CONVERTED if fmt.lossy])
def test_quantized_variants_keep_float_interface_and_shrink(tiny, tmp_path, calibration, variant):
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    path = tmp_path / f"model_{variant}.tflite"
    convert_tflite(tiny.saved_model, path, variant, calibration=calibration)
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_input_details()[0]["dtype"] == np.float32
    assert interpreter.get_output_details()[0]["dtype"] == np.float32
    assert path.stat().st_size < tiny.tflite.stat().st_size
    reference = load_saved_model(tiny.saved_model)(tiny.images)["scores"]
    scores = load_tflite(path)(tiny.images)["scores"]
    assert np.all(np.isfinite(scores)) and scores.shape == reference.shape
    # quantized, but the same model: the gate's own verdict (the variant's lossy policy, the SavedModel's answers
    # as labels, so every changed answer counts), not a cut-off of the test's; a file whose answers all moved fails
    spec, labels = hop_spec(SM_PREDICT, f"tflite_{variant}"), np.argmax(reference, axis=1)
    hop = compare(spec, {"scores": reference}, {"scores": scores}, labels=labels)
    assert hop.verdict != "fail", hop.failures
    assert compare(spec, {"scores": reference}, {"scores": np.roll(scores, 1, axis=1)}, labels=labels).verdict == "fail"
    if variant == "int8_full":  # int8 kernels inside, float at the edges
        types = {detail["dtype"] for detail in interpreter.get_tensor_details()}
        assert np.int8 in types


def test_full_int8_needs_enough_calibration_images(tiny, tmp_path, calibration):
    with pytest.raises(PackageError, match="full int8 needs at least 200 calibration images, found 50"):
        convert_tflite(tiny.saved_model, tmp_path / "x.tflite", "int8_full", calibration=calibration[:50])


def test_unknown_variant_is_refused(tmp_path, tiny):
    with pytest.raises(PackageError, match="unknown TFLite variant 'int3'"):
        convert_tflite(tiny.saved_model, tmp_path / "x.tflite", "int3")


@pytest.mark.parametrize("instances", [1, 2])
def test_tflite_answers_concurrent_callers_each_with_its_own_batch(tiny, instances):
    """An interpreter holds its own input and output buffers: callers in several threads (the web service's and
    gRPC's workers) must each get their own batch's scores, never a neighbour's, never an XNNPACK error."""
    import threading

    import numpy as np

    run = load_tflite(tiny.tflite, threads=1, instances=instances)
    rng = np.random.default_rng(5)
    batches = [rng.random((size, 784), dtype=np.float32) for size in (1, 3, 700, 1500)]
    expected = [run(batch)["scores"] for batch in batches]
    wrong: list[str] = []

    def caller(index: int) -> None:
        for _ in range(60):
            try:
                scores = run(batches[index])["scores"]
            except RuntimeError as error:
                wrong.append(f"batch {index}: {error}")
                return
            if scores.shape != expected[index].shape or not np.array_equal(scores, expected[index]):
                wrong.append(f"batch {index}: another caller's scores")

    threads = [threading.Thread(target=caller, args=(index,)) for index in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, wrong[:3]


def test_converting_reads_the_saved_model_without_loading_it(tiny, tmp_path, monkeypatch):
    """TensorFlow's converter loads the SavedModel twice for each file (its signatures' names, its debug
    information) and imports its graph once (for the GraphDef it read): crossport reads those from the files
    instead, and the files come out byte for byte the same."""
    import shutil
    from pathlib import Path

    import tensorflow as tf
    from tensorflow.lite.python import lite
    from tensorflow.python.saved_model import loader_impl

    source = tmp_path / "saved_model"
    shutil.copytree(tiny.saved_model, source)  # a copy no earlier test has loaded in this process
    loads = []

    def counted(load):
        def loading(export_dir, *args, **kwargs):
            loads.append(str(export_dir))
            return load(export_dir, *args, **kwargs)
        return loading

    from export.tflite import SavedSignatures

    reads = []
    read = SavedSignatures.read.__func__

    def reading(cls, saved_model_dir):
        reads.append(Path(saved_model_dir).name)
        return read(cls, saved_model_dir)

    monkeypatch.setattr(tf.saved_model, "load", counted(tf.saved_model.load))  # crossport's own loads
    monkeypatch.setattr(lite, "_load", counted(lite._load))  # the converter's
    imports = []
    import_graph = loader_impl.SavedModelLoader.load_graph

    def importing(loader, graph, tags, *args, **kwargs):
        imports.append(Path(loader._export_dir).name)
        return import_graph(loader, graph, tags, *args, **kwargs)

    monkeypatch.setattr(loader_impl.SavedModelLoader, "load_graph", importing)  # the converter's graph import
    monkeypatch.setattr(SavedSignatures, "read", classmethod(reading))
    convert_tflite(source, tmp_path / "fp32.tflite")
    convert_tflite(source, tmp_path / "fp16.tflite", "fp16")
    # read once for each file, which asks for it three times
    assert loads == [] and imports == [] and reads == ["saved_model"] * 2
    alone = tflite_converter(source, "fp32").convert()  # the converter left to load it as it does
    assert len(loads) == 2 and imports == ["saved_model"] and (tmp_path / "fp32.tflite").read_bytes() == alone
    loads.clear()
    imports.clear()

    # a SavedModel saved with its debug information is loaded, as TensorFlow does: a load rewrites it
    class Scores(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="images")])
        def predict(self, images):
            return {"scores": tf.nn.softmax(images)}

    traced = tmp_path / "with_debug_info"
    module = Scores()
    tf.saved_model.save(module, str(traced), signatures={"serving_default": module.predict},
                        options=tf.saved_model.SaveOptions(save_debug_info=True))
    assert (traced / "debug" / "saved_model_debug_info.pb").stat().st_size > 0
    convert_tflite(traced, tmp_path / "traced.tflite")
    assert [Path(path).name for path in loads] == ["with_debug_info"] * 2 and imports == ["with_debug_info"]


def test_a_signature_is_sized_once_per_batch_shape_and_answers_as_the_runner_does(tiny, tmp_path):
    """crossport.runtimes.signature_call resizes and allocates only when the batch's shape changes (LiteRT's runner
    does it on every call) and answers exactly what the runner answers, batch after batch; a signature outside the
    first subgraph (a file converted with two signatures has two) keeps the runner, and answers the same."""
    import numpy as np
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from crossport.interface import PREDICT_KEY, PREDICT_UINT8_KEY
    from crossport.runtimes import signature_call

    interpreter = Interpreter(model_path=str(tiny.tflite), num_threads=1)
    allocations = []
    allocate = interpreter.allocate_tensors
    interpreter.allocate_tensors = lambda: allocations.append(1) or allocate()
    call, feed, outputs = signature_call(interpreter, PREDICT_KEY)
    runner = Interpreter(model_path=str(tiny.tflite), num_threads=1).get_signature_runner(PREDICT_KEY)
    rng = np.random.default_rng(9)
    for size in (1, 1, 5, 5, 5, 1, 128, 128):
        batch = rng.random((size, 784), dtype=np.float32)
        answer = call(batch)
        assert answer.keys() == outputs.keys() == {"scores"}
        assert np.array_equal(answer["scores"], runner(images=batch)["scores"])
    assert len(allocations) == 4  # 1, 5, 1, 128: once per change of shape
    assert feed["index"] == runner.get_input_details()["images"]["index"]

    converter = tf.lite.TFLiteConverter.from_saved_model(str(tiny.saved_model),
                                                         signature_keys=[PREDICT_KEY, PREDICT_UINT8_KEY])
    two = tmp_path / "two.tflite"
    two.write_bytes(converter.convert())
    pixels = rng.integers(0, 256, (3, 784), dtype=np.uint8)
    subgraphs = set()
    for key, batch in ((PREDICT_KEY, pixels.astype(np.float32) / 255), (PREDICT_UINT8_KEY, pixels)):
        runner = Interpreter(model_path=str(two), num_threads=1).get_signature_runner(key)
        subgraphs.add(runner._subgraph_index)
        expected = runner(images=batch)["scores"]
        call = signature_call(Interpreter(model_path=str(two), num_threads=1), key)[0]
        assert np.array_equal(call(batch)["scores"], expected) and np.array_equal(call(batch)["scores"], expected)
    assert subgraphs == {0, 1}


def test_a_file_without_signatures_is_sized_from_the_shape_it_was_allocated_for(tiny, tmp_path):
    """A file with no SignatureDef (another converter's, read by crossport.foreign) goes through the same sized call,
    starting from the shape it was allocated for: no allocation until the batch's shape changes."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.tools import flatbuffer_utils

    from crossport.interface import PREDICT_KEY
    from crossport.runtimes import sized_call

    model = flatbuffer_utils.read_model(str(tiny.tflite))
    model.signatureDefs = []
    flatbuffer_utils.write_model(model, str(tmp_path / "bare.tflite"))
    interpreter = Interpreter(model_path=str(tmp_path / "bare.tflite"), num_threads=1)
    assert interpreter.get_signature_list() == {}
    interpreter.allocate_tensors()
    (feed,), (scores,) = interpreter.get_input_details(), interpreter.get_output_details()
    allocations = []
    allocate = interpreter.allocate_tensors
    interpreter.allocate_tensors = lambda: allocations.append(1) or allocate()
    call = sized_call(interpreter, feed, {"scores": scores}, allocated=tuple(feed["shape"]))
    runner = Interpreter(model_path=str(tiny.tflite), num_threads=1).get_signature_runner(PREDICT_KEY)
    rng = np.random.default_rng(4)
    for size in (1, 1, 7, 7):
        batch = rng.random((size, 784), dtype=np.float32)
        assert np.array_equal(call(batch)["scores"], runner(images=batch)["scores"])
    assert tuple(feed["shape"]) == (1, 784) and len(allocations) == 1  # only the change to 7


def test_a_foreign_files_outputs_are_named_once_from_the_first_batch(tiny, monkeypatch):
    """Which output holds the scores is read from the first batch a Predict runs and kept: a timed call of another
    converter's file (pipelines.bench --peers) costs the file, not a look at its values (a file answering
    probabilities paid 0.013 ms a batch-1 call for it, a file answering logits less)."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from crossport import foreign
    from crossport.interface import PREDICT_KEY

    looked, real = [], foreign._roles
    monkeypatch.setattr(foreign, "_roles", lambda outputs, path: looked.append(path) or real(outputs, path))
    predict = foreign.load(foreign.inspect(tiny.tflite), (784,), threads=1)
    runner = Interpreter(model_path=str(tiny.tflite), num_threads=1).get_signature_runner(PREDICT_KEY)
    rng = np.random.default_rng(5)
    for size in (9, 1, 1):
        batch = rng.random((size, 784), dtype=np.float32)
        found = predict(batch)
        assert list(found) == ["scores"] and np.array_equal(found["scores"], runner(images=batch)["scores"])
    assert looked == [tiny.tflite]
