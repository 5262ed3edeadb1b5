"""`fedmi report`: the HTML page of a run renders in headless Chromium: a non-blank screenshot, the
page's own script ran, and nothing on the console."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedmi.experiments.config import parse_config
from fedmi.experiments.federated_run import run_federated
from fedmi.experiments.html_report import write_html_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# CI installs Chromium and sets this, so that a missing browser fails there instead of skipping.
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("FEDMI_REQUIRE_CHROMIUM"),
                                    reason="Debian's chromium is not installed")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    assert CHROMIUM is not None, "chromium is not installed (apt-get install chromium)"
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           *args, page.as_uri()], capture_output=True, text=True, timeout=120)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "shapes"
    cfg = parse_config({"data": {"dataset": "synthetic-shapes", "per_site": 12, "size": 16}, "model": "unet",
                        "model_options": {"channels": [4, 8], "strides": [2]}, "rounds": 2,
                        "trainer": {"optimizer": "adam", "lr": 0.01, "batch_size": 4, "local_steps": 2}}, "test")
    run_federated(cfg, out)
    return out


def test_the_report_holds_results_plots_predictions_data_card_and_config(segmentation_run):
    page = write_html_report(segmentation_run).read_text()
    for part in ("<h2>Results</h2>", "SYNTHETIC DATA", "DICE", "HD95", "<h2>Plots</h2>", "Example predictions",
                 "<h2>Data card</h2>", "Intensity distribution per site", "<h2>Config</h2>", "model_options"):
        assert part in page, part
    assert page.count("data:image/png;base64,") >= 4  # convergence, predictions, histograms, samples
    assert "src=\"http" not in page and "href=\"http" not in page  # self-contained


@needs_chromium
def test_the_report_renders_in_headless_chromium(segmentation_run, tmp_path):
    page = write_html_report(segmentation_run)
    dom = _chromium(page, tmp_path / "profile-dom", "--dump-dom")
    assert 'data-rendered="yes"' in dom.stdout  # the page's own script ran to its end
    assert _console(dom.stderr) == []
    shot = tmp_path / "shot.png"
    _chromium(page, tmp_path / "profile-shot", "--window-size=1200,1600", f"--screenshot={shot}")
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200) and pixels.std() > 10  # text, tables and plots, not a blank page


@needs_chromium
def test_the_console_check_catches_a_broken_page(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>notDefined();</script></body></html>")
    assert any("notDefined" in line for line in _console(_chromium(bad, tmp_path / "p", "--dump-dom").stderr))
