"""The benchmark command produces a complete, self-consistent report (numbers are not asserted)."""

import json
import os
import subprocess
import sys

import pytest

from crossport.formats import BY_NAME, FORMATS
from tests.helpers import ROOT, call, one_line_error


def mlp_macs(classes: int) -> int:
    from torch import nn

    from training.model import ModelConfig, build_model

    model = build_model(ModelConfig(arch="mlp", num_classes=classes))
    return sum(layer.in_features * layer.out_features for layer in model.modules() if isinstance(layer, nn.Linear))


def test_quick_benchmark_writes_json_markdown_and_chart(pipeline_run, tmp_path):
    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    result = subprocess.run([sys.executable, "-m", "pipelines.bench", str(version), "--quick", "--out",
                             str(tmp_path), "--no-tracking"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    made = (fmt.name for fmt in FORMATS if fmt.name != "onnx" and not fmt.optional)  # int8_mixed: not in this run
    assert set(report["runtimes"]) == {"pytorch", "onnxruntime", *made}
    # The MLP's products counted here from its layer sizes, independently of the benchmark's hooks.
    classes = len((version / "assets.extra" / "labels.txt").read_text().splitlines())
    macs = mlp_macs(classes)
    assert report["macs_per_example"] == macs
    ceiling = report["ceiling"]
    assert ceiling["examples_per_s"] == pytest.approx(ceiling["macs_per_s"] / macs)
    for name, info in report["runtimes"].items():
        for batch in ("batch1", "batch128"):
            row = info[batch]
            assert row["examples_per_s"] == pytest.approx(row["requests_per_s"] * row["batch"]), name
            assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
            assert row["rounds"] == 3 and row["spread"] >= 0  # --quick: 3 timed rounds after a warm-up
        if BY_NAME.get({"onnxruntime": "onnx"}.get(name, name), FORMATS[0]).arithmetic == "int8":
            assert info["ceiling_share"] is None  # never a share of the float32 ceiling
        else:  # the better of the two ways to use every core
            assert info["ceiling_share"] == pytest.approx(info["batch128_all_cores"] / ceiling["examples_per_s"])
        ways = [info["batch128"], info.get("batch128_callers")]
        assert info["batch128_all_cores"] == max(way["examples_per_s"] for way in ways if way)
        assert info["artifact_bytes"] > 0
    cold = report["runtimes"]["tflite_fp32"]["cold_start"]
    assert cold["runs"] >= 1 and cold["median_s"] > 0 and cold["peak_rss_mb"] > 0
    for variant in ("fp32", "int8_full"):
        package = report["serverless"][variant]
        assert package["zipped_bytes"] <= package["unzipped_bytes"] and package["cold_start"]["median_s"] > 0
    assert all(row["errors"] == 0 and row["requests"] > 0 for row in report["http"])
    load = [row for row in report["http"] if not row.get("cost")]
    assert {row["protocol"] for row in load} == {"rest", "grpc"}  # the same backends over both APIs
    # what a request costs beyond the model: the same batch of 128 as float32 and as uint8 pixels, per backend
    cost = {(row["backend"], row["protocol"]): row for row in report["http"] if row.get("cost")}
    assert set(cost) == {("tflite_fp32", "grpc"), ("tflite_fp32", "grpc_uint8")}  # --quick: one backend
    for backend in ("tflite_fp32",):
        floats, pixels = cost[backend, "grpc"], cost[backend, "grpc_uint8"]
        assert floats["batch"] == pixels["batch"] == 128
        assert floats["request_bytes"] / pixels["request_bytes"] > 3.9  # 4 bytes a value against 1, and a header
        for row in (floats, pixels):
            before, after = row["model_cpu_ms_before_after"]  # the call timed on both sides of the loads
            assert before > 0 and after > 0 and row["model_cpu_ms_per_call"] == pytest.approx((before + after) / 2)
            assert row["server_cpu_over_model"] == pytest.approx(row["server_cpu_ms_per_request"]
                                                                 / row["model_cpu_ms_per_call"])
    ticks = 1 / os.sysconf("SC_CLK_TCK")  # /proc counts CPU time in clock ticks, per process
    for row in load:
        runtime = report["runtimes"][{"onnx": "onnxruntime"}.get(row["backend"], row["backend"])]
        assert row["in_process_share"] == pytest.approx(row["examples_per_s"] / runtime["batch1"]["examples_per_s"])
        # The server's CPU covers its workers: no request costs it less than the model call alone takes in process
        # (its workers' one thread does that call's work), and all of it fits in every core for the load's time.
        server_cpu = row["server_cpu_ms_per_request"] * row["requests"] / 1e3
        assert row["server_cpu_ms_per_request"] >= runtime["batch1"]["p50_ms"], row
        assert server_cpu <= os.cpu_count() * row["seconds"] + (row["workers"] + 1) * 2 * ticks, row
        assert 0 < row["client_cpu_ms_per_request"] * row["requests"] / 1e3 <= os.cpu_count() * row["seconds"], row
    for name in ("onnxruntime", "tflite_fp32"):  # one thread against every core, at batch 128
        single = report["runtimes"][name]["batch128_one_thread"]
        assert single["batch"] == 128 and single["examples_per_s"] > 0
        cores = report["runtimes"][name]["threads"]
        assert cores >= 1
        callers = report["runtimes"][name]["batch128_callers"]  # every core as one-thread concurrent callers
        assert (callers is None) == (cores == 1)
        if callers:
            assert callers["batch"] == 128 and callers["examples_per_s"] > 0 and callers["rounds"] == 3
    assert ceiling["library"] in ceiling["by_library_gflops"]
    assert ceiling["gflops"] == max(ceiling["by_library_gflops"].values())
    assert all(row["workers"] == report["runtimes"]["tflite_fp32"]["threads"] for row in load)
    assert set(report["pipeline_stage_wall_s"]) >= {"data", "train", "export", "translate", "validate"}
    assert all(peak > 0 for peak in report["pipeline_stage_peak_rss_gib"].values())
    assert (tmp_path / "bench.png").stat().st_size > 0
    markdown = (tmp_path / "bench.md").read_text()
    assert "(int8: not comparable)" in markdown
    assert "Pipeline run's peak memory after each stage (GiB, its process): data " in markdown
    assert "% of ceiling" in markdown and "serverless package" in markdown and "web service backend" in markdown
    assert markdown in result.stdout
    assert f"wrote bench.json, bench.md, bench.png, bench.log to {tmp_path}; not tracked" in result.stdout
    import re

    ours = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR) ")  # the libraries' output is in bench.log
    assert [line for line in result.stderr.splitlines() if line.strip() and not ours.match(line)] == []
    assert re.search(r"oneDNN|XNNPACK|absl|cuda|tensorflow", (tmp_path / "bench.log").read_text(errors="replace"),
                     re.IGNORECASE)
    advice = markdown.split("Recommendation on this machine")[1]
    served = {n: info for n, info in report["runtimes"].items() if n != "pytorch"}
    fastest = min(served, key=lambda n: served[n]["batch1"]["p50_ms"])
    busiest = max(served, key=lambda n: served[n]["batch128_all_cores"])
    assert f"- lowest latency: {fastest} (" in advice and f"- highest throughput: {busiest} (" in advice
    assert "- smallest: " in advice
    # and tracked: the bench run in MLflow carries both batch-128 figures per runtime
    from mlflow import MlflowClient

    from pipelines.tracking import log_benchmark

    run_id = log_benchmark(pipeline_run.tracking_uri, "bench-test", report, tmp_path)
    logged = MlflowClient(pipeline_run.tracking_uri).get_run(run_id).data.metrics
    for name, info in report["runtimes"].items():
        assert logged[f"{name}_batch128_examples_per_s"] == pytest.approx(info["batch128"]["examples_per_s"])
        assert logged[f"{name}_batch128_all_cores_examples_per_s"] == pytest.approx(info["batch128_all_cores"])


def test_a_folder_that_is_not_a_version_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    from pipelines.bench import main

    (tmp_path / "empty").mkdir()
    result = call(main, str(tmp_path / "empty"), "--quick", "--out", str(tmp_path / "out"), "--no-tracking",
                  capsys=capsys)
    one_line_error(result, 1, f"{tmp_path / 'empty'} is not a published crossport version", "models/emnist_mlp/1")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_peers_side_by_side_with_a_missing_peer_as_a_row(pipeline_run, tmp_path):
    """crossport's own row goes through every step a peer's does (a fresh converter process, the gate, interleaved
    timing); the peers, not installed here (no network), are rows saying so, not a crash."""
    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    result = subprocess.run([sys.executable, "-m", "pipelines.bench", str(version), "--peers", "--no-install",
                             "--quick", "--out", str(tmp_path / "out"), "--no-tracking"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CROSSPORT_PEERS_DIR": str(tmp_path / "none")})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "peers.json").read_text())
    rows = {row["peer"]: row for row in report["peers"]}
    assert set(rows) == {"crossport", "onnx2tf", "litert-torch"}
    for peer in ("onnx2tf", "litert-torch"):
        assert rows[peer]["error"] == f"not installed in {tmp_path / 'none' / peer} (make peers installs it)"
    ours = rows["crossport"]
    assert ours["conversion_wall_s"] > ours["convert_s"] > 0 and ours["import_s"] > 0
    assert ours["conversion_rounds"] == 1 and "conversion_vs_crossport" not in ours  # --quick: one round
    entry = ours["files"]["fp32"]
    assert entry["kind"] == "fp32" and entry["verdict"] == "pass" and entry["transposes"] == 0
    assert entry["batch1"]["rounds"] == 3 and entry["batch128"]["examples_per_s"] > 0
    assert entry["exact"]["scores"]["sign_statistic"] < entry["sign_threshold"]
    # its int8 files, calibrated on the run's own calibration inputs as every peer's are, judged as lossy files: the
    # very variants the run published, so the gate passes them with the drop's bound it states
    assert ours["quantize_s"] > 0
    for kind in ("int8_dynamic", "int8_full"):
        lossy = ours["files"][kind]
        assert lossy["kind"] == kind and lossy["verdict"] == "pass"
        drop = lossy["accuracy_drop"]
        assert drop["limit"] > 0 and drop["upper"] >= drop["estimate"] and lossy["batch128"]["examples_per_s"] > 0
    markdown = (tmp_path / "out" / "peers.md").read_text()
    assert "| crossport | fp32 |" in markdown and "| onnx2tf | — | not installed" in markdown
    assert "| crossport | int8_full | input [N, 784], any batch | +" in markdown
    # the process, and inside it the imports and the conversion after them (what the goal compares), each shown
    assert f"| {ours['conversion_wall_s']:.2f} ({ours['import_s']:.2f} + {ours['convert_s']:.2f}) |" in markdown
    assert (tmp_path / "out" / "peers.png").stat().st_size > 0
    # and tracked: a peers run carries every measured file's figures and the three files
    from mlflow import MlflowClient

    from pipelines.tracking import log_peers

    client = MlflowClient(pipeline_run.tracking_uri)
    run_id = log_peers(pipeline_run.tracking_uri, "peers-test", report, tmp_path / "out")
    assert client.get_run(run_id).data.metrics["crossport_fp32_batch1_p50_ms"] == pytest.approx(
        entry["batch1"]["p50_ms"])
    assert {a.path for a in client.list_artifacts(run_id)} == {"peers.json", "peers.md", "peers.png"}


def scripted_peer(name: str, folder, made_from, failed: tuple[str, ...] = ()):
    """A peer whose converter script copies ``made_from`` as its float32 file and reports ``failed`` kinds as files it
    could not make, as onnx2tf's script reports its int8 files of a MobileNetV3."""
    import dataclasses
    from pathlib import Path

    from pipelines.tools.bench.peers import Peer

    converter = folder / f"convert_{name}.py"
    why = "RuntimeError: flatbuffer_direct fast path failed."
    converter.write_text(
        "import json, shutil, sys\n"
        "from pathlib import Path\n"
        "made = Path(sys.argv[5]) / 'float32.tflite'\n"
        f"shutil.copyfile({str(made_from)!r}, made)\n"
        f"failed = {{kind: {why!r} for kind in {list(failed)!r}}}\n"
        "print(json.dumps({'files': {'fp32': str(made)}, 'failed': failed,\n"
        "                  'import_s': 0.1, 'convert_s': 0.2, 'quantize_s': 0.3}))\n")

    @dataclasses.dataclass(frozen=True)
    class Scripted(Peer):
        path: Path = converter

        @property
        def script(self) -> Path:
            return self.path

    return Scripted(name, None, "onnx")


@pytest.mark.slow
def test_a_peers_file_it_could_not_make_is_a_row_saying_why_beside_the_files_it_made(pipeline_run, tmp_path,
                                                                                      monkeypatch):
    """onnx2tf converts a MobileNetV3 to float32 and then fails on its int8 files: its script reports the files it
    made and, for each it could not, why; each is a row of the table, and the float file is measured as ever, beside
    crossport's file of its kind round by round (here crossport's row is the run's own file, made by a script too)."""
    from pipelines.tools.bench import peers
    from pipelines.tools.bench.peers import compare_peers, render_peers

    made = pipeline_run.run_dir / "model_fp32.tflite"
    monkeypatch.setattr(peers, "PEERS", (scripted_peer("crossport", tmp_path, made),
                                         scripted_peer("half", tmp_path, made, ("int8_dynamic", "int8_full"))))
    version = pipeline_run.models_dir / "emnist_mlp" / "1"
    results = compare_peers(version, pipeline_run.run_dir, install=False, quick=True)
    ours, row = results["peers"]
    assert list(row["files"]) == ["fp32", "int8_dynamic", "int8_full"]
    assert row["files"]["fp32"]["verdict"] == "pass" and row["files"]["fp32"]["batch1"]["p50_ms"] > 0
    for kind in ("int8_dynamic", "int8_full"):
        assert row["files"][kind] == {
            "kind": kind, "error": "half could not make it: RuntimeError: flatbuffer_direct fast path failed."}
    table = render_peers(results).splitlines()
    assert table[2].startswith("| crossport | fp32 | input [N, 784], any batch | ")
    assert table[3].startswith("| half | fp32 | input [N, 784], any batch | ")
    assert table[4].startswith("| half | int8_dynamic | half could not make it: RuntimeError: flatbuffer_direct")
    # the peer's fp32 file against crossport's, within each of the 3 rounds; crossport's own row has no ratio
    for batch in ("batch1", "batch128"):
        assert "vs_crossport" not in ours["files"]["fp32"][batch]
        ratio = row["files"]["fp32"][batch]["vs_crossport"]
        assert ratio["rounds"] == 3 and ratio["low"] <= ratio["median"] <= ratio["high"]
        assert f"(×{ratio['median']:.2f}, {ratio['low']:.2f}–{ratio['high']:.2f})" in table[3]
    # and its error against the exact values beside crossport's, example by example: the same file, the same errors
    assert "vs_crossport" not in ours["files"]["fp32"]["exact"]["scores"]
    errors = row["files"]["fp32"]["exact"]["scores"]
    examples = json.loads((pipeline_run.run_dir / "parity.json").read_text())["examples"]
    assert errors["vs_crossport"] == {"ratio": 1.0, "low": 1.0, "high": 1.0, "examples": examples}
    assert f"| {errors['rms']:.2e} (×1.00, 1.00–1.00) |" in table[3]
    # both ratios reach the peers run in MLflow
    from mlflow import MlflowClient

    from pipelines.tools.bench.peers import render_peers_chart
    from pipelines.tracking import log_peers

    out = tmp_path / "out"
    out.mkdir()
    (out / "peers.json").write_text(json.dumps(results))
    (out / "peers.md").write_text("\n".join(table))
    render_peers_chart(results, out / "peers.png")
    metrics = MlflowClient(pipeline_run.tracking_uri).get_run(
        log_peers(pipeline_run.tracking_uri, "peers-test", results, out)).data.metrics
    assert metrics["half_fp32_scores_rms_over_crossport"] == 1.0
    assert metrics["crossport_converting_over_half"] == pytest.approx(row["conversion_vs_crossport"]["median"])


def test_a_peers_timing_is_compared_with_crossports_round_by_round():
    """Interleaved rounds on a machine that slows down for a while: each file's own figures spread by half, while
    the peer's file takes 1.1× crossport's time in every round; the paired ratio says 1.1 with no spread. Rounds
    compared out of order, or the medians of all rounds, would not."""
    from pipelines.tools.bench.harness import paired, summarize

    slowdown = [1.0, 1.5, 1.2, 1.0, 1.4]
    ours = [([0.001 * s] * 9, 0.009 * s) for s in slowdown]
    theirs = [([0.0011 * s] * 9, 0.0099 * s) for s in slowdown]
    assert summarize(ours, 1)["spread"] == pytest.approx((1 / 1.0 - 1 / 1.5) / (1 / 1.2))  # 40 %, on their own
    for batch, expected in ((1, 1.1), (128, 1 / 1.1)):  # latency at batch 1, throughput at 128
        ratio = paired(theirs, ours, batch)
        assert ratio["rounds"] == 5
        assert ratio["low"] == pytest.approx(expected) and ratio["high"] == pytest.approx(expected)
        assert ratio["median"] == pytest.approx(expected)
    shuffled = paired(theirs[::-1], ours, 1)
    assert shuffled["high"] / shuffled["low"] > 1.4
    with pytest.raises(ValueError, match="paired rounds: 4 against 5"):
        paired(theirs[:4], ours, 1)


def test_a_peer_folder_crossport_did_not_make_is_never_cleared(tmp_path, monkeypatch):
    from pipelines.tools.bench.peers import PEERS, environment

    monkeypatch.setenv("CROSSPORT_PEERS_DIR", str(tmp_path))
    theirs = tmp_path / "onnx2tf" / "notes.txt"
    theirs.parent.mkdir()
    theirs.write_text("mine")
    peer = next(peer for peer in PEERS if peer.name == "onnx2tf")
    with pytest.raises(RuntimeError, match=f"{tmp_path / 'onnx2tf'} holds files crossport did not write"):
        environment(peer, install=True)
    assert theirs.read_text() == "mine"


@pytest.mark.slow  # runs each candidate interpreter
def test_a_peers_python_is_found_among_pyenvs_versions_when_the_path_has_none_that_runs(tmp_path, monkeypatch):
    """pyenv's shim for python3.12 is on the PATH but answers "command not found" unless that version is active: the
    peer's interpreter is then the installed version's own."""
    from pipelines.tools.bench.peers import interpreter

    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / "python9.9"
    shim.write_text("#!/bin/sh\necho 'pyenv: python9.9: command not found' >&2\nexit 127\n")
    shim.chmod(0o755)
    version = tmp_path / "pyenv" / "versions" / "9.9.1" / "bin"
    version.mkdir(parents=True)
    (version / "python9.9").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", f"{shims}:{os.environ['PATH']}")
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "pyenv"))
    assert interpreter("python9.9") == str(version / "python9.9")  # the executable as it reports itself
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path / "none"))
    assert interpreter("python9.9") is None


def test_conversions_run_in_interleaved_rounds_and_crossport_is_compared_within_each(tmp_path, monkeypatch):
    """Every converter's round r before any converter's round r + 1; a converter that fails its first round is a row
    saying why, one that fails a later round is left out of that round's figures; crossport's conversion after its
    imports is set against each peer's whole process within the rounds both converted in."""
    from pipelines.tools.bench import peers

    monkeypatch.setattr(peers, "PEERS", (peers.Peer("crossport", None, "onnx"), peers.Peer("quick", None, "onnx"),
                                         peers.Peer("broken", None, "onnx")))
    calls = []
    seconds = {"crossport": (2.0, 2.2, 1.8), "quick": (4.0, 4.0, 3.0)}

    def convert(peer, python, run_dir, shape, calibration, out):
        round_ = int(out.name)
        calls.append((peer.name, round_))
        if peer.name == "broken" or (peer.name == "quick" and round_ == 1):
            raise RuntimeError("conversion failed: no")
        return {"files": {}, "import_s": 1.0, "convert_s": seconds[peer.name][round_], "quantize_s": 0.5,
                "wall_s": 1.0 + seconds[peer.name][round_] + 0.5}

    monkeypatch.setattr(peers, "convert", convert)
    runs = peers._conversions(tmp_path, (784,), tmp_path / "c.npy", tmp_path, False, 3)
    assert calls == [("crossport", 0), ("quick", 0), ("broken", 0), ("crossport", 1), ("quick", 1),
                     ("crossport", 2), ("quick", 2)]
    assert str(runs["broken"]) == "conversion failed: no"
    assert [run["round"] for run in runs["quick"]] == [0, 2] and runs["quick"][1]["whole_s"] == 4.0  # 1 + 3
    ratio = peers._converting_over(runs["crossport"], runs["quick"])
    assert ratio == {"median": pytest.approx((2.0 / 5.0 + 1.8 / 4.0) / 2), "low": pytest.approx(0.4),
                     "high": pytest.approx(0.45), "rounds": 2}
