"""A model repository served as TF Serving serves one: version policies, labels, polling, refusals, unloading after
the last request (serving/repository.py), in process; the server itself in test_rollout.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serving.repository import AVAILABLE, END, UNLOADING, Policy, Repository, ServingError, read_model_config


@pytest.mark.parametrize(("policy", "chosen"), [
    (Policy(), [5]), (Policy(latest=2), [3, 5]), (Policy(latest=9), [1, 3, 5]),
    (Policy(specific=(1, 5, 7)), [1, 5]), (Policy(all=True), [1, 3, 5]),
])
def test_a_policy_chooses_as_tf_serving_does(policy, chosen):
    assert policy.choose([1, 3, 5]) == chosen


CONFIG = """
model_config_list {
  config { name: "a" base_path: "/models/a" model_platform: "tensorflow"
           model_version_policy { latest { num_versions: 2 } } version_labels { key: "stable" value: 1 } }
  config { name: "b" base_path: "%s" model_version_policy { specific { versions: 3 versions: 1 } } }
  config { name: "c" base_path: "/models/c" model_version_policy { all {} } }
}
"""


def test_models_config_is_read_with_tf_servings_own_proto(tmp_path):
    (tmp_path / "models.config").write_text(CONFIG % (tmp_path / "elsewhere"))
    a, b, c = read_model_config(tmp_path / "models.config")
    assert (a.name, a.base, a.policy, a.labels) == ("a", tmp_path.resolve() / "a", Policy(latest=2), {"stable": 1})
    assert (b.base, b.policy) == (tmp_path / "elsewhere", Policy(specific=(1, 3)))
    assert c.policy == Policy(all=True)


@pytest.mark.parametrize(("text", "fragment"), [
    ("model_config_list { config { name: 'a' base_path: '/x' } ", "is not a TF Serving ModelServerConfig"),
    ("model_config_list { }", "lists no models"),
    ("model_config_list { config { name: 'a' } }", "needs both a name and a base_path"),
    ("model_config_list { config { name: 'a' base_path: '/x' } config { name: 'a' base_path: '/y' } }",
     "is listed twice"),
    ("model_config_list { config { name: 'a' base_path: '/x' model_platform: 'onnx' } }",
     "only 'tensorflow' is served"),
    ("model_config_list { config { name: 'a' base_path: '/x' model_version_policy { specific { } } } }",
     "specific version policy with no versions"),
    ("model_config_list { config { name: 'a' base_path: '/x' model_version_policy { latest { } } } }",
     "asks for the latest 0 versions"),
])
def test_a_models_config_tf_serving_would_refuse_is_refused_in_one_line(tmp_path, text, fragment):
    from crossport.errors import ConfigError

    (tmp_path / "models.config").write_text(text)
    with pytest.raises(ConfigError, match="--model-config-file") as raised:
        read_model_config(tmp_path / "models.config")
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


# --- the manager, on copies of the session's published version --------------------------------------------

@pytest.fixture
def base(pipeline_run, tmp_path) -> Path:
    base = tmp_path / "models" / "emnist_mlp"
    base.mkdir(parents=True)
    return base


def publish(base: Path, pipeline_run, number: int) -> Path:
    """A copy of the session's version 1 renamed into place as ``number``, as a publish renames its staging."""
    staging = base / f".staging-{number}"
    shutil.copytree(pipeline_run.models_dir / "emnist_mlp" / "1", staging)
    staging.rename(base / str(number))
    return base / str(number)


def manager(base: Path, policy: Policy | None = None, labels: dict | None = None) -> Repository:
    """A repository over ``base`` whose servables are (name, number) pairs: the manager's decisions, no runtime."""
    from serving.repository import ModelSource

    source = ModelSource(base.name, base, policy or Policy(), labels or {})
    repository = Repository(lambda: [source], lambda name, number, path: (name, number))
    repository.poll()
    return repository


def states(repository: Repository) -> dict[int, str]:
    return {entry.number: entry.state for entry in repository.status("emnist_mlp")}


def test_new_versions_load_before_the_old_unload(base, pipeline_run):
    for number in (1, 2, 3):
        publish(base, pipeline_run, number)
    repository = manager(base, Policy(latest=2))
    assert states(repository) == {2: AVAILABLE, 3: AVAILABLE}
    with repository.acquire("emnist_mlp") as servable:
        assert servable == ("emnist_mlp", 3)  # no version: the newest
    publish(base, pipeline_run, 4)
    repository.poll()
    assert states(repository) == {2: END, 3: AVAILABLE, 4: AVAILABLE}
    with pytest.raises(ServingError, match=r"Specific\(emnist_mlp, 2\)") as raised, repository.acquire("emnist_mlp", 2):
        pass
    assert raised.value.code == "NOT_FOUND"


def test_a_dropped_version_unloads_once_its_last_request_is_done(base, pipeline_run):
    publish(base, pipeline_run, 1)
    repository = manager(base)
    with repository.acquire("emnist_mlp") as held:
        publish(base, pipeline_run, 2)
        repository.poll()
        assert states(repository) == {1: UNLOADING, 2: AVAILABLE}
        assert held == ("emnist_mlp", 1)
        with repository.acquire("emnist_mlp") as new:
            assert new == ("emnist_mlp", 2)  # new requests go to the new version meanwhile
    assert states(repository) == {1: END, 2: AVAILABLE}


def test_a_tampered_version_is_refused_and_served_once_its_files_are_right(base, pipeline_run):
    publish(base, pipeline_run, 1)
    repository = manager(base)
    tampered = publish(base, pipeline_run, 2)
    onnx = tampered / "assets.extra" / "model.onnx"
    original = onnx.read_bytes()
    onnx.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    repository.poll()
    assert states(repository) == {1: AVAILABLE, 2: END}  # the version already served goes on
    entry = repository.status("emnist_mlp", 2)[0]
    assert entry.code == "DATA_LOSS" and "model.onnx) changed" in str(entry.error)
    repository.poll()  # not tried again while its files are as they were
    assert repository.status("emnist_mlp", 2)[0].error is entry.error
    onnx.write_bytes(original)
    repository.poll()
    assert states(repository) == {1: END, 2: AVAILABLE}


def test_a_half_written_version_is_served_once_complete(base, pipeline_run):
    publish(base, pipeline_run, 1)
    repository = manager(base)
    partial = base / "2"
    partial.mkdir()
    shutil.copy2(pipeline_run.models_dir / "emnist_mlp" / "1" / "saved_model.pb", partial)
    repository.poll()
    assert states(repository) == {1: AVAILABLE, 2: END}
    assert "no assets.extra/manifest.json" in str(repository.status("emnist_mlp", 2)[0].error)
    shutil.copytree(pipeline_run.models_dir / "emnist_mlp" / "1", partial, dirs_exist_ok=True)
    repository.poll()
    assert states(repository) == {1: END, 2: AVAILABLE}


def test_a_version_that_breaks_the_signature_contract_is_refused(base, pipeline_run):
    """Its manifest re-made to match, so only the contract check can refuse it."""
    from crossport.files import sha256_path
    from export.servable import set_method_name

    publish(base, pipeline_run, 1)
    repository = manager(base)
    broken = publish(base, pipeline_run, 2)
    set_method_name(broken, "serving_default", "tensorflow/serving/classify")
    manifest_path = broken / "assets.extra" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["artifacts"][0]["sha256"] = sha256_path(broken, exclude=("assets.extra",))
    manifest_path.write_text(json.dumps(manifest))
    repository.poll()
    entry = repository.status("emnist_mlp", 2)[0]
    assert (entry.state, entry.code) == (END, "FAILED_PRECONDITION")
    assert "breaks the signature contract" in str(entry.error)
    assert states(repository)[1] == AVAILABLE


def test_labels_and_specific_versions_resolve_as_tf_serving_resolves_them(base, pipeline_run):
    for number in (1, 2, 3):
        publish(base, pipeline_run, number)
    repository = manager(base, Policy(specific=(1, 3)), {"stable": 1, "canary": 3, "gone": 2})
    assert states(repository) == {1: AVAILABLE, 3: AVAILABLE}
    with repository.acquire("emnist_mlp", label="stable") as servable:
        assert servable == ("emnist_mlp", 1)
    with repository.acquire("emnist_mlp", label="canary") as servable:
        assert servable == ("emnist_mlp", 3)
    for label, code in (("gone", "NOT_FOUND"), ("nightly", "INVALID_ARGUMENT")):
        with pytest.raises(ServingError) as raised, repository.acquire("emnist_mlp", label=label):
            pass
        assert raised.value.code == code
    with pytest.raises(ServingError, match=r"Latest\(other\)"), repository.acquire("other"):
        pass


def test_a_models_config_is_read_again_when_it_changes_and_kept_when_it_breaks(tmp_path, caplog):
    """As TF Serving's --model_config_file_poll_wait_seconds: crossport's publish moves the 'validated' label."""
    from serving.repository import config_reader

    path = tmp_path / "models.config"
    entry = ('model_config_list { config { name: "a" base_path: "/models/a" '
             'version_labels { key: "validated" value: %d } } }')
    path.write_text(entry % 1)
    never, often = config_reader(path), config_reader(path, every=1e-9)
    path.write_text(entry % 12)
    assert never()[0].labels == {"validated": 1}  # 0: read once, at start
    assert often()[0].labels == {"validated": 12}
    path.write_text("model_config_list { config { name: ")
    assert often()[0].labels == {"validated": 12}  # the models already read go on
    assert "kept the models already served" in caplog.text


def test_a_repository_path_serves_every_model_folder_and_one_published_later(pipeline_run, tmp_path):
    """`python -m pipelines.serve models` (what `make serve` runs): each model folder, hidden folders and files not."""
    from serving.repository import sources_at

    models = tmp_path / "models"
    publish(models / "emnist_mlp", pipeline_run, 1)
    (models / ".partial-123").mkdir()
    (models / "models.config").write_text("model_config_list { }")
    discover = sources_at(models)
    assert [source.name for source in discover()] == ["emnist_mlp"]
    publish(models / "second", pipeline_run, 4)
    assert [(source.name, source.policy) for source in discover()] == [("emnist_mlp", Policy()), ("second", Policy())]
