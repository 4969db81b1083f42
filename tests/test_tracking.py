"""What the pipeline recorded on a real MLflow server, checked through MlflowClient."""

from pathlib import Path

import pytest

STAGES = {"data", "train", "export", "translate", "package", "tflite", "validate", "publish", "register"}


@pytest.fixture(scope="module")
def measured(pipeline_run):
    """The accuracies measured again here, outside the pipeline: the run's checkpoint in PyTorch and its published
    full-int8 file in LiteRT, on the run's own test split. The tracked figures must be these numbers."""
    import numpy as np

    from crossport.interface import SCORES, to_inputs
    from crossport.runtimes import load_tflite
    from training.checkpoint import load_checkpoint
    from training.train import logits_of

    with np.load(pipeline_run.run_dir / "data.npz") as arrays:
        images, labels = arrays["x_test"], arrays["y_test"]
    pytorch = np.argmax(logits_of(load_checkpoint(pipeline_run.run_dir / "model.pt").model, images), axis=1)
    int8 = load_tflite(pipeline_run.models_dir / "emnist_mlp" / "1" / "assets.extra" / "model_int8_full.tflite")
    int8_top1 = np.argmax(int8(to_inputs(images.reshape(len(images), -1)))[SCORES], axis=1)
    return {"pytorch": float(np.mean(pytorch == labels)), "tflite_int8_full": float(np.mean(int8_top1 == labels))}


@pytest.fixture(scope="module")
def client(pipeline_run):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=pipeline_run.tracking_uri)


@pytest.fixture(scope="module")
def runs(client, pipeline_run):
    experiment = client.get_experiment_by_name("emnist_mlp")
    everything = client.search_runs([experiment.experiment_id])
    parents = [r for r in everything if "mlflow.parentRunId" not in r.data.tags
               and r.data.tags.get("crossport.run_dir") == str(pipeline_run.run_dir.resolve())]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in everything
                if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    return parents[0], children


def test_one_parent_run_with_a_child_per_stage(runs, measured):
    parent, children = runs
    assert set(children) == STAGES
    assert all({"wall_s", "peak_rss_gib"} <= set(child.data.metrics) for child in children.values())
    assert children["train"].data.metrics["test_accuracy"] == pytest.approx(measured["pytorch"], abs=1e-12)
    assert children["data"].data.params["dataset"] == "digits"
    assert parent.data.params["dataset"] == "digits" and parent.data.params["epochs"] == "3"


def test_the_experiment_opens_in_model_training_mode(client):
    experiment = client.get_experiment_by_name("emnist_mlp")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not the UI's GenAI mode


def test_provenance_is_on_the_parent_run(client, runs):
    parent, _ = runs
    tags = parent.data.tags
    assert tags["crossport.code_dirty"] in {"True", "False", "None"}
    assert len(tags["crossport.code_commit"]) in (40, 4)  # a sha, or None outside git
    import json
    from pathlib import Path

    environment = client.download_artifacts(parent.info.run_id, "environment.json")
    packages = json.loads(Path(environment).read_text())["packages"]
    assert packages["tensorflow"] == "2.21.0" and packages["onnx"] == "1.18.0"


def test_dataset_is_a_run_input_with_digest_and_source(runs, pipeline_run):
    import json

    _, children = runs
    inputs = children["data"].inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    digest = json.loads((pipeline_run.run_dir / "manifest.json").read_text())["facts"]["dataset"]["digest"]
    assert dataset.name == "digits" and digest.startswith(dataset.digest)
    assert {tag.key: tag.value for tag in inputs[0].tags}["sha256"] == digest


def test_plots_and_reports_are_run_artifacts(client, runs):
    _, children = runs
    validate = {a.path for a in client.list_artifacts(children["validate"].info.run_id)}
    assert {"parity.json", "parity_errors.png", "confusion_matrix.png"} <= validate
    train = {a.path for a in client.list_artifacts(children["train"].info.run_id)}
    assert "training_curves.png" in train


def test_checkpoint_onnx_and_saved_model_are_logged_models(client, runs):
    import mlflow
    import numpy as np

    _, children = runs
    experiment_id = children["train"].info.experiment_id
    logged = client.search_logged_models(experiment_ids=[experiment_id])
    by_stage = {}
    for model in logged:
        for stage in ("train", "export", "package"):
            if model.source_run_id == children[stage].info.run_id:
                by_stage[stage] = model
    assert {stage: model.name for stage, model in by_stage.items()} == {
        "train": "pytorch_model", "export": "onnx_model", "package": "saved_model"}
    mlflow.set_tracking_uri(client.tracking_uri)
    for stage, flavor in (("train", "pytorch"), ("export", "onnx"), ("package", "tensorflow")):
        info = mlflow.models.get_model_info(by_stage[stage].model_uri)
        assert flavor in info.flavors
        assert info.signature is not None
        assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 784)
        assert info.saved_input_example_info is not None
    onnx_model = mlflow.pyfunc.load_model(by_stage["export"].model_uri)
    out = onnx_model.predict(np.zeros((2, 784), np.float32))
    assert out["scores"].shape == (2, 10)


def test_published_version_is_a_registry_version_with_alias(client, pipeline_run, runs):
    import json

    versions = client.search_model_versions("name = 'emnist_mlp'")
    path = str((pipeline_run.models_dir / "emnist_mlp" / "1").resolve())
    mine = [v for v in versions if v.tags.get("crossport.servable_path") == path]
    assert len(mine) == 1
    version = mine[0]
    assert version.tags["crossport.servable_version"] == "1"
    assert version.tags["crossport.parity_verdict"] == "pass"
    from crossport.files import sha256_file

    assert version.tags["crossport.saved_model_sha256"] == sha256_file(pipeline_run.models_dir / "emnist_mlp" / "1"
                                                                      / "saved_model.pb")
    # the alias is on the newest passing registration (other tests may register later ones)
    passing = [v for v in client.search_model_versions("name = 'emnist_mlp'")
               if v.tags.get("crossport.parity_verdict") == "pass"]
    newest = max(passing, key=lambda v: int(v.version))
    assert client.get_model_version_by_alias("emnist_mlp", "validated").version == newest.version
    facts = json.loads((pipeline_run.run_dir / "manifest.json").read_text())["facts"]
    assert facts["registry"]["version"] == int(version.version)  # recorded both ways
    assert facts["registry"]["servable_version"] == 1
    assert version.run_id == runs[0].info.run_id  # the version page's run is the parent, with the headline


def _mine(client, pipeline_run):
    path = str((pipeline_run.models_dir / "emnist_mlp" / "1").resolve())
    return next(v for v in client.search_model_versions("name = 'emnist_mlp'")
                if v.tags.get("crossport.servable_path") == path)


def test_the_registry_version_is_an_mlflow_model_with_the_published_scores(client, pipeline_run, tmp_path):
    """``mlflow.pyfunc.load_model`` of the registry version predicts what the published servable predicts, from a
    byte-identical copy of it, with a named signature and an input example."""
    import mlflow
    import numpy as np

    from crossport.files import sha256_file
    from crossport.runtimes import load_saved_model

    mlflow.set_tracking_uri(client.tracking_uri)
    version = _mine(client, pipeline_run)
    published = pipeline_run.models_dir / "emnist_mlp" / "1"
    uri = f"models:/emnist_mlp/{version.version}"
    info = mlflow.models.get_model_info(uri)
    assert [spec["name"] for spec in info.signature.inputs.to_dict()] == ["images"]
    assert [spec["name"] for spec in info.signature.outputs.to_dict()] == ["scores"]
    assert tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 10)
    assert info.saved_input_example_info is not None
    logged = client.get_logged_model(info.model_id)  # its own metrics, on the dataset they were measured on
    linked = {metric.key: metric.dataset_name for metric in logged.metrics or []}
    assert linked["accuracy_saved_model_serving_default"] == linked["accuracy_tflite_int8_full"] == "digits"
    with np.load(pipeline_run.run_dir / "golden.npz") as arrays:
        images = arrays["images"][:16].reshape(16, 784).astype(np.float32)
    scores = mlflow.pyfunc.load_model(uri).predict({"images": images})["scores"]
    np.testing.assert_array_equal(scores, load_saved_model(published)(images)["scores"])
    alias = client.get_model_version_by_alias("emnist_mlp", "validated")
    assert mlflow.pyfunc.load_model("models:/emnist_mlp@validated").predict(images)["scores"].shape == (16, 10), alias
    copy = Path(mlflow.artifacts.download_artifacts(f"{uri}", dst_path=str(tmp_path / "model")))
    servable = copy / "artifacts" / "1"  # the version directory as published: artifacts/ is a TF Serving base path
    listed = sorted(p.relative_to(published) for p in published.rglob("*") if p.is_file())
    assert sorted(p.relative_to(servable) for p in servable.rglob("*") if p.is_file()) == listed
    assert all(sha256_file(servable / name) == sha256_file(published / name) for name in listed)  # byte-identical
    (servable / "saved_model.pb").write_bytes((servable / "saved_model.pb").read_bytes() + b"\0")
    with pytest.raises(Exception, match="changed after registration"):
        mlflow.pyfunc.load_model(str(copy))


def test_the_parent_run_carries_headline_metrics_dataset_and_parity_report(client, runs, measured):
    parent, _ = runs
    parent = client.get_run(parent.info.run_id)
    metrics = parent.data.metrics
    assert metrics["accuracy_pytorch"] == pytest.approx(measured["pytorch"], abs=1e-12)
    assert metrics["accuracy_tflite_int8_full"] == pytest.approx(measured["tflite_int8_full"], abs=1e-12)
    assert metrics["tflite_fp32_bytes"] > metrics["tflite_int8_full_bytes"] > 0
    assert parent.data.tags["crossport.parity_verdict"] == "pass"
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["digits"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "parity")} >= {
        "parity/parity.json", "parity/parity_errors.png", "parity/confusion_matrix.png"}
