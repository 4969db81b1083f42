"""``pipelines.serve`` on a model repository, as a deployer rolls out versions against it: under load, from a
models.config with policies and labels, and with --workers (every worker follows)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import Server

pytestmark = pytest.mark.slow


def test_a_rollout_under_load_fails_no_request_and_every_worker_follows(pipeline_run, tmp_path):
    """Four clients (REST and gRPC) against two --workers while the run is published again and a tampered copy of
    that version is renamed into place: no request fails, every new version answers and is loaded by each worker
    (each polls on its own), the tampered one never answers and each worker refuses it. `pipelines.bench
    --rollout` runs the same for 60 s with three publishes and reports the pick-up times and memory
    (docs/serving.md)."""
    from pipelines.tools.bench.rollout import rollout

    result = rollout(pipeline_run.models_dir / "emnist_mlp" / "1", tmp_path, seconds=6, clients=4, publishes=1,
                     steady=0, workers=2, backend="tflite_fp32")
    assert result["failed"] == 0, result["failures"]
    assert result["requests"] > 100
    assert [entry["version"] for entry in result["versions"]] == [2]  # 3 is the tampered copy of it
    for entry in result["versions"]:
        assert entry["first_answer_after_s"] is not None, entry  # it answered a client
        assert entry["loaded_by_workers"] == [1, 2], entry  # and each worker loaded it
    tampered = result["tampered"]
    assert tampered["version"] == 3 and not tampered["answered"] and tampered["refused_by_workers"] == [1, 2]
    assert tampered["state"]["state"] == "END" and tampered["state"]["status"]["error_code"] == "DATA_LOSS"


def copy_version(source: Path, base: Path, number: int) -> None:
    """A published version renamed into place as ``number``, as a publish renames its staging directory."""
    staging = base / f".staging-{number}"
    shutil.copytree(source, staging)
    staging.rename(base / str(number))


@pytest.fixture(scope="module")
def grpc_stubs():
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    def stubs(port: int):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        grpc.channel_ready_future(channel).result(timeout=60)
        return (channel, prediction_service_pb2_grpc.PredictionServiceStub(channel),
                model_service_pb2_grpc.ModelServiceStub(channel))

    return stubs


def grpc_version(prediction, name: str = "emnist_mlp", label: str = "") -> int:
    from tests.helpers import images, predict_request

    request = predict_request(images(1), name=name)
    if label:
        request.model_spec.version_label = label
    return prediction.Predict(request, timeout=60).model_spec.version.value


def test_a_models_config_serves_every_model_with_its_policy_and_labels(pipeline_run, tmp_path, grpc_stubs):
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2

    from pipelines.tools.bench.load import _free_ports

    published = pipeline_run.models_dir / "emnist_mlp" / "1"
    for name, numbers in (("emnist_mlp", (1, 2, 3)), ("second", (1,))):
        (tmp_path / name).mkdir()
        for number in numbers:
            copy_version(published, tmp_path / name, number)
    (tmp_path / "models.config").write_text("""model_config_list {
      config { name: "emnist_mlp" base_path: "/models/emnist_mlp" model_platform: "tensorflow"
               model_version_policy { specific { versions: 1 versions: 3 } }
               version_labels { key: "stable" value: 1 } version_labels { key: "canary" value: 3 } }
      config { name: "second" base_path: "/models/second" model_platform: "tensorflow" }
    }""")
    rest_port, port = _free_ports(2)
    server = Server(None, "tflite_fp32", "--model-config-file", str(tmp_path / "models.config"), "--grpc-port",
                    str(port), port=rest_port)
    channel, prediction, models = grpc_stubs(port)
    try:
        status, body = server.get("/v1/models/emnist_mlp")
        assert status == 200
        assert [(e["version"], e["state"]) for e in body["model_version_status"]] == [("3", "AVAILABLE"),
                                                                                      ("1", "AVAILABLE")]
        row = {"instances": np.zeros((1, 784)).tolist()}
        for path in ("/v1/models/emnist_mlp/labels/canary:predict", "/v1/models/emnist_mlp/versions/1:predict",
                     "/v1/models/second:predict"):
            assert server.post(path, row)[0] == 200, path
        status, body = server.post("/v1/models/emnist_mlp/versions/2:predict", row)
        assert (status, "Specific(emnist_mlp, 2)" in body["error"]) == (404, True)  # outside the policy
        status, body = server.post("/v1/models/emnist_mlp/labels/nightly:predict", row)
        assert (status, body["error"]) == (400, "Unrecognized servable version label: nightly")

        assert [grpc_version(prediction, label=label) for label in ("stable", "canary", "")] == [1, 3, 3]
        assert grpc_version(prediction, name="second") == 1
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "emnist_mlp"
        answer = models.GetModelStatus(request, timeout=60)
        available = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert sorted((s.version, s.state) for s in answer.model_version_status) == [(1, available), (3, available)]
        request.model_spec.name = "absent"
        with pytest.raises(grpc.RpcError) as raised:
            models.GetModelStatus(request, timeout=60)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
        server.stop()
