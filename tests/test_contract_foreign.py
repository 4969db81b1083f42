"""`pipelines.contract` on servables crossport did not build: each finding says who would object."""

from pathlib import Path

import pytest

from tests.helpers import call


def foreign_saved_model(path, *, key="serving_default", input_name="x", batch=None):
    """A SavedModel as another tool writes it: one predict signature, no classify, no warmup, no labels."""
    import tensorflow as tf

    class Model(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal((784, 10), seed=(1, 2)))

        @tf.function(input_signature=[tf.TensorSpec([batch, 784], tf.float32, name=input_name)])
        def predict(self, x):
            return {"scores": tf.nn.softmax(tf.matmul(x, self.w))}

    model = Model()
    tf.saved_model.save(model, str(path), signatures={key: model.predict})
    return path


def contract(path, capfd):
    """``python -m pipelines.contract PATH`` in this process (test_servables runs the command itself)."""
    from export.contract import main

    return call(main, str(path), capsys=capfd)


def test_a_foreign_servable_is_judged_finding_by_finding(tmp_path, capfd):
    from export.contract import WARNING, judge_version
    from export.servable import CROSSPORT_ONLY, TF_SERVING_REFUSES

    version = foreign_saved_model(tmp_path / "other" / "1")
    findings = judge_version(version)
    who = {text: kind for kind, text in findings}
    assert not [text for kind, text in findings if kind == TF_SERVING_REFUSES]  # TF Serving would serve it
    assert who["missing signature 'classify'"] == CROSSPORT_ONLY
    assert who["serving_default: inputs ['x'], expected ['images']"] == CROSSPORT_ONLY
    assert any(kind == WARNING and "TF Serving does not require one" in text for kind, text in findings)
    result = contract(tmp_path / "other", capfd)
    assert result.returncode == 1
    assert "PROBLEM (crossport's contract only): other/1: missing signature 'classify'" in result.stdout
    assert "WARNING: other/1: no assets.extra/tf_serving_warmup_requests" in result.stdout
    assert "TF Serving would refuse" not in result.stdout


def test_what_tf_serving_itself_refuses_is_said_so(tmp_path, capfd):
    from export.contract import judge_version
    from export.servable import CROSSPORT_ONLY, TF_SERVING_REFUSES

    version = foreign_saved_model(tmp_path / "1", key="predict_images", batch=1)
    findings = judge_version(version)
    assert (TF_SERVING_REFUSES, "no 'serving_default' signature: TF Serving's default for requests without a "
                                "signature_name") in findings
    assert (CROSSPORT_ONLY, "predict_images: input 'x' has a fixed batch dimension 1, expected -1") in findings
    result = contract(version, capfd)
    assert result.returncode == 1 and "PROBLEM (TF Serving would refuse): 1: no 'serving_default'" in result.stdout


def test_a_path_that_is_no_servable_gets_one_line(tmp_path, capfd):
    result = contract(tmp_path, capfd)
    assert result.returncode == 1 and result.stdout == ""
    assert "is neither a SavedModel version (saved_model.pb), a model directory" in result.stderr


@pytest.mark.slow
def test_crossports_own_servable_has_no_finding(pipeline_run):
    from export.contract import judge

    assert all(findings == [] for findings in judge(pipeline_run.models_dir).values())


@pytest.mark.slow
def test_a_repository_given_as_a_relative_path_has_no_finding(pipeline_run, monkeypatch, capfd):
    """`python -m pipelines.contract models`, as docs/serving.md runs it: /models/<name> is read in ./models."""
    from export.contract import judge

    monkeypatch.chdir(pipeline_run.models_dir.parent)
    found = judge(Path(pipeline_run.models_dir.name))
    assert found and all(findings == [] for findings in found.values()), found
    result = contract(pipeline_run.models_dir, capfd)
    assert result.returncode == 0 and "emnist_mlp/1: ok" in result.stdout
    assert result.stderr.strip() == ""  # TensorFlow's output (replaying the warmup) goes to the command's log
