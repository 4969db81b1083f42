"""The command lines as a user meets them: every flag check and combination, in this process.

Each check ends before any framework loads, so these run as ``main(argv)`` here (:func:`tests.helpers.call`): the
same one line, exit code and untouched files as on the command line. One subprocess test per entry point proves
the wiring (``python -m ...`` → ``main`` → the exit code)."""

import json

import pytest

from crossport.files import sha256_path
from tests.helpers import call, one_line_error, pipeline_here, run_cli, run_module, usage_error, users_folder


@pytest.fixture
def made_run(tmp_path):
    """A run directory as ``--stage all`` leaves it after its first write: a manifest holding the config."""
    from pipelines.config import PipelineConfig
    from pipelines.manifest import Manifest

    run = tmp_path / "run"
    run.mkdir()
    Manifest.create(run, PipelineConfig(dataset="digits", epochs=3, tracking=False).to_dict()).save()
    return run


# --- the wiring, once per entry point ------------------------------------------------------------

@pytest.mark.slow
def test_help_lists_every_flag_without_importing_frameworks():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("--stage", "--run-dir", "--dataset", "--data-dir", "--epochs", "--seed", "--models-dir",
                 "--name", "--tracking-uri", "--no-tracking", "--debug"):
        assert flag in result.stdout
    for stage in ("data", "train", "export", "translate", "package", "tflite", "validate", "publish"):
        assert stage in result.stdout
    probe = run_module("tests.probe_imports", "pipelines.run")
    assert probe.returncode == 0 and probe.stdout.strip() == "[]", probe.stdout + probe.stderr


@pytest.mark.slow
def test_a_refused_flag_ends_the_process_with_one_line_and_its_exit_code(tmp_path):
    result = run_cli("--no-tracking", "--tracking-uri", "sqlite:///x.db", "--run-dir", str(tmp_path / "r"))
    one_line_error(result, 2, "--no-tracking and --tracking-uri contradict each other")
    usage_error(run_cli("--stage", "deploy"), "invalid choice: 'deploy'")


@pytest.mark.slow
@pytest.mark.parametrize(("command", "args", "fragment"), [
    ("pipelines.serve", ("MODELS", "--port", "99999"), "expected an integer from 0 to 65535, found 99999"),
    ("pipelines.diagnose", ("RUN", "--examples", "0"), "--examples: expected an integer from 1 to"),
    ("pipelines.lineage", ("--name", "x", "--registry-version", "-3"), "expected an integer from 1 to"),
    ("pipelines.ui", ("--port", "70000"), "expected an integer from 0 to 65535, found 70000"),
])
def test_each_commands_refusals_reach_the_shell(tmp_path, command, args, fragment):
    args = [str(tmp_path) if a in ("MODELS", "RUN") else a for a in args]
    usage_error(run_module(command, *args), fragment)


# --- pipelines.run: flags and numbers ------------------------------------------------------------

@pytest.mark.parametrize(("flag", "value", "fragment"), [
    ("--seed", "-1", "--seed must be at least 0, found -1"),
    ("--seed", str(2**64), f"--seed must be at most {2**64 - 1}, found {2**64}"),
    ("--epochs", str(2**31), "--epochs must be at most 2147483647"),
    ("--epochs", "0", "--epochs must be at least 1, found 0"),
    ("--batch-size", "0", "--batch-size must be at least 1, found 0"),
    ("--threads", "0", "--threads must be at least 1, found 0"),
    ("--patience", "0", "--patience must be at least 1, found 0"),
    ("--learning-rate", "nan", "learning rate must be positive and finite, found nan"),
    ("--learning-rate", "inf", "learning rate must be positive and finite, found inf"),
    ("--learning-rate", "-1", "learning rate must be positive"),
    ("--int8-max-drop", "0", "--int8-max-drop must be accuracy points in (0, 100], found 0.0"),
    ("--int8-max-drop", "-1", "--int8-max-drop must be accuracy points in (0, 100], found -1.0"),
    ("--int8-max-drop", "nan", "--int8-max-drop must be accuracy points in (0, 100], found nan"),
    ("--int8-max-drop", "101", "--int8-max-drop must be accuracy points in (0, 100], found 101.0"),
    ("--name", "emnist\n", "model name 'emnist\\n' is not allowed"),
    ("--name", "", "model name '' is not allowed"),
    ("--name", "a" * 65, "at most 64 characters"),
    ("--name", "../escape", "model name '../escape' is not allowed"),
])
def test_out_of_range_settings(made_run, capsys, flag, value, fragment):
    before = sha256_path(made_run)
    one_line_error(pipeline_here("--stage", "publish", "--run-dir", str(made_run), flag, value, capsys=capsys), 2,
                   fragment)
    assert sha256_path(made_run) == before


def test_a_new_run_with_a_bad_setting_leaves_no_run_directory(tmp_path, capsys):
    one_line_error(pipeline_here("--name", "../escape", "--run-dir", str(tmp_path / "run"), "--no-tracking",
                            capsys=capsys), 2, "model name '../escape' is not allowed")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("argv", "fragment"), [
    (("--stage", "deploy"), "invalid choice: 'deploy'"),
    (("--dataset", "cifar10"), "invalid choice: 'cifar10'"),
    (("--dataset", "imagenet"), "invalid choice: 'imagenet'"),
])
def test_unknown_names_are_refused_by_the_parser(capsys, argv, fragment):
    usage_error(pipeline_here(*argv, capsys=capsys), fragment)


@pytest.mark.parametrize(("argv", "code", "fragment"), [
    (("--no-tracking", "--tracking-uri", "sqlite:///x.db"), 2, "--no-tracking and --tracking-uri contradict"),
    (("--stage", "validate", "--force"), 2, "--force applies to --stage all"),
    (("--stage", "train", "--onnx", "m.onnx"), 2, "--onnx starts a run (--stage all)"),
    (("--onnx", "m.onnx", "--epochs", "3"), 2, "--epochs configure training"),
    (("--labels", "l.txt",), 2, "--labels apply to a model brought with --onnx"),
    (("--orientation", "upright"), 2, "--orientation apply to a model brought with --onnx"),
    (("--eval-orientation", "upright"), 2, "--eval-orientation apply to a model brought with --onnx"),
    (("--mean", "0.1", "--std", "0.3"), 2, "--mean, --std apply to a model brought with --onnx"),
    (("--onnx", "m.onnx", "--mean", "0.1"), 2, "--mean and --std go together"),
    (("--onnx", "m.onnx", "--mean", "0.1", "--std", "0"), 2, "--std finite and positive, found 0.1 and 0.0"),
])
def test_contradictory_flags(made_run, capsys, argv, code, fragment):
    one_line_error(pipeline_here(*argv, "--run-dir", str(made_run), capsys=capsys), code, fragment)


# --- pipelines.run: run directories --------------------------------------------------------------

def test_single_stage_without_a_run_directory_says_what_to_do(tmp_path, capsys):
    one_line_error(pipeline_here("--stage", "train", "--run-dir", str(tmp_path / "nothing"), capsys=capsys), 1,
                   "is not a crossport run directory: no manifest.json. Run --stage all first")


@pytest.mark.parametrize("stage", ["all", "validate"])
def test_run_dir_that_is_a_file(tmp_path, capsys, stage):
    path = tmp_path / "a-file"
    path.write_text("not a run")
    one_line_error(pipeline_here("--stage", stage, "--run-dir", str(path), capsys=capsys), 2,
                   f"--run-dir {path} is a file")
    assert path.read_text() == "not a run"


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda text: text[: len(text) // 2], "is unreadable"),
    (lambda text: "[]", "manifest format list"),
    (lambda text: json.dumps({**json.loads(text), "artifacts": {"onnx": {"name": "onnx"}}}), "manifest's layout"),
    (lambda text: json.dumps({**json.loads(text), "artifacts": []}), "manifest's layout"),
    (lambda text: json.dumps({**json.loads(text), "config": "x"}), "manifest's layout"),
    (lambda text: json.dumps({**json.loads(text), "format_version": 99}), "manifest format 99"),
])
def test_broken_run_manifest(made_run, capsys, edit, fragment):
    path = made_run / "manifest.json"
    path.write_text(edit(path.read_text()))
    before = sha256_path(made_run)
    one_line_error(pipeline_here("--stage", "validate", "--run-dir", str(made_run), capsys=capsys), 1, fragment)
    assert sha256_path(made_run) == before


def test_a_folder_that_is_not_a_run_is_not_written_over(tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("mine")
    one_line_error(pipeline_here("--run-dir", str(theirs), "--no-tracking", capsys=capsys), 2,
                   f"--run-dir {theirs} is not empty and is not a crossport run")
    assert [p.name for p in theirs.iterdir()] == ["thesis.tex"]


def test_tracking_uri_for_a_run_made_without_tracking(made_run, capsys):
    path = made_run / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["tracking"] = False  # as --stage all --no-tracking records it
    path.write_text(json.dumps(manifest))
    one_line_error(pipeline_here("--stage", "publish", "--run-dir", str(made_run), "--tracking-uri", "http://127.0.0.1:9",
                            capsys=capsys), 2, "was made with --no-tracking", "start a new run")


@pytest.mark.slow  # it gets as far as the run's provenance, which asks git
def test_a_made_run_that_passes_every_check_is_refused_at_its_first_stage(made_run, capsys):
    """The fixture's run is sound, so the checks above are refusals of the flags, not of the run: it gets past
    every check and stops only at the stage's missing input."""
    one_line_error(pipeline_here("--stage", "validate", "--run-dir", str(made_run), capsys=capsys), 1,
                   "stage 'validate' needs artifact 'dataset'")


def test_resolve_config_reports_what_the_run_will_use(made_run):
    """The pure half of the command line: flags over the run's recorded config, nothing written."""
    from pipelines.run import resolve_config

    before = sha256_path(made_run)
    invocation = resolve_config(["--stage", "publish", "--run-dir", str(made_run), "--name", "mine",
                                 "--republish"])
    assert (invocation.stage, invocation.run_dir) == ("publish", made_run)
    assert invocation.config.name == "mine" and invocation.config.epochs == 3 and invocation.config.republish
    fresh = resolve_config(["--model", "cnn", "--run-dir", str(made_run.parent / "new")])
    assert fresh.config.name == "emnist_cnn" and not (made_run.parent / "new").exists()
    assert sha256_path(made_run) == before


# --- the other commands' integers and stores ------------------------------------------------------

def _main(command):
    from importlib import import_module

    return import_module({"pipelines.serve": "serving.serve", "pipelines.diagnose": "pipelines.tools.diagnose",
                          "pipelines.lineage": "pipelines.tools.lineage", "pipelines.ui": "pipelines.ui"}[command]).main


@pytest.mark.parametrize(("command", "args", "fragment"), [
    ("pipelines.serve", ("MODELS", "--port", "99999"), "expected an integer from 0 to 65535, found 99999"),
    ("pipelines.serve", ("MODELS", "--port", "-1"), "expected an integer from 0 to 65535, found -1"),
    ("pipelines.serve", ("MODELS", "--version", "0"), "expected an integer from 1 to"),
    ("pipelines.serve", ("MODELS", "--port", "http"), "found 'http'"),
    ("pipelines.serve", ("MODELS", "--workers", "0"), "--workers: expected an integer from 1 to"),
    ("pipelines.diagnose", ("RUN", "--examples", "0"), "--examples: expected an integer from 1 to"),
    ("pipelines.lineage", ("--name", "x", "--registry-version", "-3"), "expected an integer from 1 to"),
    ("pipelines.ui", ("--port", "70000"), "expected an integer from 0 to 65535, found 70000"),
])
def test_out_of_range_command_integers(tmp_path, capsys, command, args, fragment):
    args = [str(tmp_path) if a in ("MODELS", "RUN") else a for a in args]
    usage_error(call(_main(command), *args, capsys=capsys), fragment)


def _sqlite_without_mlflow(path):
    import sqlite3

    with sqlite3.connect(path) as connection:
        connection.execute("create table recipes (name text)")


@pytest.mark.parametrize(("setup", "fragment"), [
    (lambda store: users_folder(store), "holds files MLflow's store does not (thesis.tex)"),
    (lambda store: (store.mkdir(), (store / "mlflow.db").write_bytes(b"my notes, not a database" * 50)),
     "is not an SQLite database"),
    (lambda store: (store.mkdir(), _sqlite_without_mlflow(store / "mlflow.db")), "without MLflow's tables"),
    (lambda store: store.write_text("a file"), "is a file"),
])
def test_ui_store_that_is_not_mlflows(tmp_path, capsys, setup, fragment):
    store = tmp_path / "store"
    setup(store)
    before = sha256_path(store)
    one_line_error(call(_main("pipelines.ui"), "--store", str(store), "--port", "0", capsys=capsys), 2, fragment)
    assert sha256_path(store) == before

