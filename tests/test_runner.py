"""The runner holds every stage to its declared contract."""

import pytest

from crossport.errors import ManifestError
from pipelines.config import PipelineConfig
from pipelines.manifest import Manifest
from pipelines.results import Made, StageResult
from pipelines.runner import run_stages, stage_record
from pipelines.stages import STAGES, Stage
from pipelines.tracking import NullTracker


def run_one(tmp_path, stage):
    manifest = Manifest.create(tmp_path, PipelineConfig().to_dict())
    (tmp_path / "thing.txt").write_text("x")
    run_stages(manifest, PipelineConfig(), (stage,), NullTracker())
    return manifest


def test_a_stage_that_does_not_record_what_it_declares_is_refused(tmp_path):
    lazy = Stage("lazy", (), ("thing",), lambda ctx: StageResult())
    with pytest.raises(ManifestError, match=r"stage 'lazy' declares it makes \['thing'\] but recorded no thing"):
        run_one(tmp_path, lazy)


def test_a_stage_that_returns_more_than_it_declares_is_refused(tmp_path):
    def sneaky(ctx):
        return StageResult(made=[Made("thing", ctx.run_dir / "thing.txt")])

    with pytest.raises(ManifestError, match=r"declares it makes \[\] but recorded undeclared thing"):
        run_one(tmp_path, Stage("sneaky", (), (), sneaky))


def test_a_stage_that_keeps_its_contract_runs(tmp_path):
    def honest(ctx):
        return StageResult(made=[Made("thing", ctx.run_dir / "thing.txt", ())])

    manifest = run_one(tmp_path, Stage("honest", (), ("thing",), honest))
    assert manifest.stages["honest"]["status"] == "done"
    assert manifest.artifacts["thing"].stage == "honest"  # the runner recorded it, under the stage's name


def test_a_stage_that_fails_after_writing_a_report_has_it_recorded_then_fails(tmp_path):
    from crossport.errors import ParityError

    def reporting(ctx):
        return StageResult(made=[Made("thing", ctx.run_dir / "thing.txt")], error=ParityError(["drifted"]))

    with pytest.raises(ParityError, match="drifted"):
        run_one(tmp_path, Stage("reporting", (), ("thing",), reporting))
    manifest = Manifest.load(tmp_path)
    assert manifest.stages["reporting"]["status"] == "failed" and "thing" in manifest.artifacts


def test_resume_reads_the_config_fields_each_stage_declares():
    config = PipelineConfig()
    manifest = Manifest.create(".", config.to_dict())
    package = next(stage for stage in STAGES if stage.name == "package")
    assert stage_record(manifest, config, package)["config"] == {"name": "emnist_mlp"}
    assert all(set(stage.reads) <= set(config.to_dict()) for stage in STAGES)


def test_a_failed_run_is_never_picked_as_the_latest(tmp_path):
    import json

    from pipelines.runner import latest_run_dir

    for name, status in (("20260101T000000Z-aaaaaa", "done"), ("20260102T000000Z-bbbbbb", "failed"),
                         ("20260103T000000Z-cccccc", "running")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"stages": {"data": {"status": "done"},
                                                                              "train": {"status": status}}}))
    (tmp_path / "20260104T000000Z-dddddd").mkdir()
    (tmp_path / "20260104T000000Z-dddddd" / "manifest.json").write_text("{truncated")
    assert latest_run_dir(tmp_path) == tmp_path / "20260101T000000Z-aaaaaa"
    assert latest_run_dir(tmp_path / "absent") is None


# run in a fresh process: a high-water mark is the process's whole history, and a test process's depends on the tests
# that ran in it before
PEAKS = """
import json, resource, sys
import numpy as np
from pipelines.config import PipelineConfig
from pipelines.manifest import Manifest
from pipelines.results import StageResult
from pipelines.runner import run_stages
from pipelines.stages import Stage
from pipelines.summary import peak_line
from pipelines.tracking import NullTracker

def big(ctx):  # 256 MiB, every page touched, and freed before the stage ends
    held = np.ones(2**25)
    assert held.sum() == 2**25
    return StageResult()

manifest = Manifest.create(sys.argv[1], PipelineConfig().to_dict())
stages = tuple(Stage(name, (), (), run) for name, run in (
    ("small", lambda ctx: StageResult()), ("big", big), ("after", lambda ctx: StageResult())))
walls = run_stages(manifest, PipelineConfig(), stages, NullTracker())
print(json.dumps({"peaks": {name: info["peak_rss_gib"] for name, info in manifest.stages.items()},
                  "line": peak_line(manifest, walls),
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_each_stage_records_the_processs_peak_after_it_and_the_summary_names_the_stage_that_raised_it(tmp_path):
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    done = subprocess.run([sys.executable, "-c", PEAKS, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    peaks = found["peaks"]
    assert peaks["big"] >= peaks["small"] + 0.2 and peaks["after"] == peaks["big"], peaks  # a high-water mark
    # never reset: what getrusage (and /usr/bin/time) reports from outside is still the process's whole peak
    assert found["maxrss_kib"] >= peaks["big"] * 2**20 - 1024
    assert "reached in big; the peak after each stage: small " in found["line"]
    assert f", big {peaks['big']:.2f}, after {peaks['after']:.2f})" in found["line"]
