import pytest

from crossport.errors import PublishError
from crossport.files import sha256_path
from export.publish import TEMP_PREFIX, publish_version, versions, write_models_config


def build_with(content: str):
    def build(staging):
        (staging / "saved_model.pb").write_text(content)
        (staging / "assets.extra").mkdir()

    return build


def stamp(staging, version):
    (staging / "assets.extra" / "version.txt").write_text(str(version))


def test_versions_count_up_and_never_overwrite(tmp_path):
    first, path1 = publish_version(tmp_path, "m", build_with("one"), stamp)
    before = sha256_path(path1)
    second, path2 = publish_version(tmp_path, "m", build_with("two"), stamp)
    assert (first, second) == (1, 2)
    assert sha256_path(path1) == before
    assert (path2 / "saved_model.pb").read_text() == "two"
    assert (path2 / "assets.extra" / "version.txt").read_text() == "2"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "2"]  # no staging left behind


def test_next_version_follows_the_highest_not_the_count(tmp_path):
    (tmp_path / "m" / "7").mkdir(parents=True)
    (tmp_path / "m" / "notes").mkdir()
    (tmp_path / "m" / f"{TEMP_PREFIX}123-abc").mkdir()  # a crashed run's leftovers are not versions
    assert versions(tmp_path / "m") == [7]
    version, _ = publish_version(tmp_path, "m", build_with("x"), stamp)
    assert version == 8


def test_a_version_claimed_meanwhile_is_skipped(tmp_path):
    """Another publisher renames its version N into place between our pick and our rename."""
    calls = []

    def racing_stamp(staging, version):
        calls.append(version)
        if len(calls) == 1:
            other = tmp_path / "m" / str(version)
            other.mkdir()
            (other / "saved_model.pb").write_text("theirs")
        stamp(staging, version)

    version, path = publish_version(tmp_path, "m", build_with("ours"), racing_stamp)
    assert calls == [1, 2] and version == 2
    assert (tmp_path / "m" / "1" / "saved_model.pb").read_text() == "theirs"
    assert (path / "saved_model.pb").read_text() == "ours"


def test_a_failing_build_publishes_nothing_and_cleans_up(tmp_path):
    def broken(staging):
        (staging / "saved_model.pb").write_text("half")
        raise PublishError("disk full (simulated)")

    with pytest.raises(PublishError, match="simulated"):
        publish_version(tmp_path, "m", broken, stamp)
    assert list((tmp_path / "m").iterdir()) == []
    assert not (tmp_path / "models.config").exists()


def test_unwritable_models_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PublishError, match=r"cannot write to models directory .*file/models.*Check its permissions"):
        publish_version(blocker / "models", "m", build_with("x"), stamp)


def test_models_config_is_a_tf_serving_model_server_config(tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    publish_version(tmp_path, "beta", build_with("x"), stamp)
    publish_version(tmp_path, "alpha", build_with("x"), stamp)
    (tmp_path / "empty_model").mkdir()  # no versions: not listed
    config = text_format.Parse((tmp_path / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    entries = [(c.name, c.base_path, c.model_platform, dict(c.version_labels)) for c in config.model_config_list.config]
    # base paths as TF Serving sees them under the usual container mount; the newest version labelled validated
    assert entries == [("alpha", "/models/alpha", "tensorflow", {"validated": 1}),
                       ("beta", "/models/beta", "tensorflow", {"validated": 1})]
    assert write_models_config(tmp_path).read_text() == (tmp_path / "models.config").read_text()
    publish_version(tmp_path, "alpha", build_with("y"), stamp, serving_root="/srv/tf/")
    config = text_format.Parse((tmp_path / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert [(c.base_path, c.version_labels["validated"]) for c in config.model_config_list.config] == [
        ("/srv/tf/alpha", 2), ("/srv/tf/beta", 1)]
    write_models_config(tmp_path, serving_root=None)  # this machine's own absolute paths
    config = text_format.Parse((tmp_path / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    assert config.model_config_list.config[0].base_path == str((tmp_path / "alpha").resolve())


def test_the_contract_check_reads_container_paths_in_the_repository(tmp_path):
    from export.contract import models_config_problems

    publish_version(tmp_path, "alpha", build_with("x"), stamp)
    problems = models_config_problems(tmp_path, signatures=False)
    assert problems == []  # /models/alpha is checked as tmp_path/alpha
    assert models_config_problems(tmp_path, signatures=False, serving_root="/elsewhere") == [
        "alpha: base_path /models/alpha holds no integer version directories"]
