"""The MLflow UI, driven in headless Chromium as a user walks it: Models → the registered version → its run →
the dataset and the parity report. Each page's text is checked; the screenshots are kept (in the test's folder,
and in $CROSSPORT_UI_SCREENSHOTS when set: docs/tracking.md's walk shows them)."""

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import Walk, keep_screenshots


@pytest.fixture
def browser(tmp_path):
    from tests.helpers import headless_chromium

    driver = headless_chromium(tmp_path / "profile", "1400,1000")
    yield driver
    driver.quit()


def frame_text(driver, wanted: str) -> str | None:
    """The text of the first frame on the page that shows ``wanted`` (the artifact viewer renders HTML in one)."""
    from selenium.webdriver.common.by import By

    for frame in driver.find_elements(By.TAG_NAME, "iframe"):
        try:
            driver.switch_to.frame(frame)
            text = driver.find_element(By.TAG_NAME, "body").text
        finally:
            driver.switch_to.default_content()
        if wanted in text:
            return text
    return None


def test_models_to_version_to_run_to_dataset_and_parity_report(pipeline_run, browser, tmp_path):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    client = MlflowClient(tracking_uri=pipeline_run.tracking_uri)
    path = str((pipeline_run.models_dir / "emnist_mlp" / "1").resolve())
    version = next(v for v in client.search_model_versions("name = 'emnist_mlp'")
                   if v.tags.get("crossport.servable_path") == path)
    walk = Walk(browser, tmp_path / "ui")
    browser.get(f"{pipeline_run.tracking_uri}/#/models")
    walk.shows("Registered Models", "emnist_mlp", "validated")
    # MLflow 3.17 keeps GenAI / Model training per browser and starts in GenAI: the one switch a new user makes
    walk.press("//*[normalize-space()='Model training'][not(*)]")
    shots = [walk.shot("1-models.png")]

    walk.press("//a[normalize-space()='emnist_mlp']")
    # the list also links each model's latest version ("Version 1" for every model other tests registered): wait
    # for this model's page, then press the link to this version by where it leads, not by its text
    walk.until(lambda: browser.current_url.endswith("/models/emnist_mlp"))
    walk.press(f"//a[contains(@href, '/models/emnist_mlp/versions/{version.version}')]")
    walk.until(lambda: browser.current_url.endswith(f"/models/emnist_mlp/versions/{version.version}"))
    page = walk.shows("Source Run", "Source Model", "Inputs (1)", "Outputs (1)", "crossport.saved_model_sha256")
    assert "mlflow.pyfunc.load_model('models:/emnist_mlp@validated')" in page
    assert "Parity report" in page  # the description's link to the report in the source run's artifacts
    report_link = browser.find_element("xpath", "//a[normalize-space()='Parity report']").get_attribute("href")
    assert report_link.endswith(f"/runs/{version.run_id}/artifacts/parity/parity.html"), report_link
    assert version.tags["crossport.saved_model_sha256"] in page
    shots.append(walk.shot("2-version.png"))

    walk.press(f"//a[contains(@href, '/runs/{version.run_id}')]")  # the source run: the pipeline's parent run
    page = walk.shows("Datasets", "digits", "accuracy_pytorch", "tflite_int8_full_bytes", "crossport.parity_verdict")
    assert "Child runs" in page and "register" in page and "Evaluation runs" not in page  # Model training view
    assert "emnist_mlp · digits · parity pass · version 1" in page  # the parent run, named for what it is
    shots.append(walk.shot("3-run.png"))

    walk.press("//*[@role='tab'][normalize-space()='Artifacts']")
    walk.press("//*[@data-testid='artifact-tree-node'][@aria-label='parity']/..")
    walk.press("//*[@data-testid='artifact-tree-node'][@aria-label='parity.json']/..")
    walk.shows('"verdict": "pass"', '"hops"')
    walk.press("//*[@data-testid='artifact-tree-node'][@aria-label='parity.html']/..")  # rendered, in a frame
    report = walk.until(lambda: frame_text(browser, "PASS: every hop"))
    assert "pytorch -> tflite_fp32" in report and "threshold t" in report
    shots.append(walk.shot("4-parity-report.png"))

    for shot in shots:
        image = Image.open(shot)
        assert image.size[0] >= 1200 and len(set(image.convert("L").getdata())) > 10  # a painted page, not blank
    keep = os.environ.get("CROSSPORT_UI_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for shot in shots:
            shutil.copy2(shot, Path(keep) / shot.name)


def test_the_parity_report_reads_in_a_browser_from_a_published_version(pipeline_run, browser, tmp_path):
    """The page a reviewer opens from the version itself (a failed run's: tests/test_gate.py)."""
    walk = Walk(browser, tmp_path / "ui")
    browser.get((pipeline_run.models_dir / "emnist_mlp" / "1" / "assets.extra" / "parity.html").as_uri())
    page = walk.shows("PASS: every hop", "Each hop against its reference", "Against the exact (float64) values")
    assert "onnxruntime -> saved_model:serving_default" in page and "|Δ| <= 2·B per element" in page
    assert "dataset digest" in page and "code commit" in page
    keep_screenshots([walk.shot("5-parity-html.png")])


def test_the_ui_starts_mlflow_on_the_store_without_job_runners_unless_asked(tmp_path, monkeypatch, capsys):
    """``make ui`` replaces itself with ``mlflow ui`` on the checked store, with MLflow 3's job runners (huey consumer
    processes for GenAI evaluation jobs, which crossport never submits) off; a user's own setting stands."""
    import argparse

    from pipelines import ui

    started = []

    class Replaced(Exception):
        pass

    def execv(path, argv):
        started.append((argv, os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION")))
        raise Replaced

    monkeypatch.setattr(os, "execv", execv)
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "unset below")  # restored to its state after the test
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION")
    args = argparse.Namespace(store=tmp_path / "store", host="127.0.0.1", port=5123)
    for _ in range(2):
        with pytest.raises(Replaced):
            ui.open_ui(args)
        monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    (argv, jobs), (_, chosen) = started
    assert jobs == "false" and chosen == "true"
    assert argv[1:6] == ["ui", "--host", "127.0.0.1", "--port", "5123"]
    assert f"sqlite:///{(tmp_path / 'store').resolve() / 'mlflow.db'}" in argv
