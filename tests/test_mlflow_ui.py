"""What a person sees in the MLflow UI: `softprompt mlflow ui NAME` serves the search's store, and the
link it prints opens, in a real headless Chromium, on the runs table of that search's trials with
the metrics they are compared by. `make test` installs Chromium (tests/install_prerequisites.sh);
without it this test skips, and under CI=true it fails instead."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

from softprompt.search.config import search_config
from softprompt.search.record import save_config
from softprompt.search.tracking import start_search_run, ui_link
from softprompt.trainables.tracking import TrialTracker

TRIALS = {"aaaa_00000": 0.8125, "aaaa_00001": 0.6875}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI") == "true":  # CI must run it: a skip there would hide a broken UI link
            pytest.fail("chromium is missing (tests/install_prerequisites.sh installs it)")
        pytest.skip("chromium is missing; CI=true makes this a failure")
    return found


@pytest.fixture
def tracked_search(tmp_path, tiny_llama_dir):
    """A search's MLflow records as a search leaves them: the parent run, and a child run per trial
    logged by the trials' own tracker. No Tune: this is about what the UI shows of them."""
    cfg = search_config({"name": "ui", "storage_path": str(tmp_path / "runs"), "space": "quick", "trials": 2,
                         "train": {"model": str(tiny_llama_dir), "task": "rotten_tomatoes"}})
    save_config(cfg)
    target = start_search_run(cfg, f"sqlite:///{tmp_path / 'mlflow.db'}")
    for trial_id, accuracy in TRIALS.items():
        tracker = TrialTracker(target, trial_id, {"lr": 0.1, "prompt_length": 20})
        tracker.log({"step": 15, "train_loss": 0.7, "best_dev_accuracy": accuracy - 0.1, "best_step": 15})
        tracker.log({"step": 45, "train_loss": 0.5, "best_dev_accuracy": accuracy, "best_step": 45})
        tracker.finish("completed")
    return cfg, target


def test_mlflow_ui_prints_a_link_that_opens_on_the_search_s_trials_in_a_browser(tracked_search, tmp_path):
    browser = chromium()
    cfg, target = tracked_search
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "softprompt", "mlflow", "ui", "ui", "--storage-path",
                           cfg.storage_path, "--port", str(port)], stdout=subprocess.PIPE, text=True,
                          cwd=tmp_path, start_new_session=True)
    try:
        line = ui.stdout.readline()  # printed once the server answers
        link = ui_link(target, port)
        assert line.strip().endswith(link), line
        assert "#/compare-runs?runs=" in link
        page = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=30000",
                               "--dump-dom", link], capture_output=True, text=True, timeout=180).stdout
    finally:
        os.killpg(ui.pid, signal.SIGINT)
        ui.wait(timeout=60)
    for trial_id in TRIALS:
        assert f"trial_{trial_id}" in page  # each trial's run, by the name the search gave it
    assert "best_dev_accuracy" in page  # the metric the trials are compared by, as a column
    assert "train_loss" in page
    assert f"Comparing {len(TRIALS)} Runs" in page  # the trials only, not the search's parent run
    assert Path(cfg.storage_path, "ui").is_dir()
