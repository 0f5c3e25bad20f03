"""`onnxplain evaluate` and `onnxplain report` as a user sees them: the ranked table, the
JSON and the curve plot; one self-contained HTML page, rendered in headless Chromium."""

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from onnxplain import cli
from onnxplain.report import plot_curves, rank_methods

MODELS = Path(__file__).resolve().parent.parent / "models"
TINY = MODELS / "tiny_cnn.onnx"
CHROMIUM = "/usr/bin/chromium"


def invoke(*args):
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    img = Image.open(MODELS / "chelsea.png")
    img.save(d / "a.png")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(d / "b.png")
    return d


def test_evaluate_ranks_methods_and_writes_json_log_and_plot(photos, tmp_path):
    out = tmp_path / "results.json"
    r = invoke("evaluate", TINY, photos, "--methods", "gradient,input_x_gradient", "--metrics",
               "deletion,insertion,selectivity,continuity", "-S", "deletion:steps=10", "-S", "selectivity:patch=4",
               "--out", out, "--plot", tmp_path / "curves.png")
    assert r.exit_code == 0, r.output
    assert re.search(r"rank\s+method\s+deletion ↓\s+insertion ↑\s+selectivity ↑\s+continuity ↓", r.output)
    result = json.loads(out.read_text())
    assert [x["method"] for x in result["ranking"]] and set(result["table"]) == {"gradient", "input_x_gradient"}
    assert len(result["records"]) == 2 and len(out.with_suffix(".jsonl").read_text().splitlines()) == 2
    plot = np.asarray(Image.open(tmp_path / "curves.png").convert("RGB"))
    assert plot.shape[1] == 920 and plot.std() > 10
    # --resume with everything done recomputes nothing and gives the same table (the same
    # settings: other settings would be other results, tests/test_runkey.py).
    again = invoke("evaluate", TINY, photos, "--methods", "gradient,input_x_gradient", "--metrics",
                   "deletion,insertion,selectivity,continuity", "-S", "deletion:steps=10", "-S", "selectivity:patch=4",
                   "--out", out, "--resume")
    assert again.exit_code == 0 and json.loads(out.read_text())["table"] == result["table"]


def test_evaluate_usage_errors_exit_2(tmp_path):
    assert invoke("evaluate", TINY, MODELS / "chelsea.png", "--metrics", "nope").exit_code == 2
    r = invoke("evaluate", TINY, MODELS / "chelsea.png", "-O", "occlusion:window=3", "--methods", "gradient")
    assert r.exit_code == 2 and "not one of the chosen" in r.output


def test_ranking_counts_each_metric_in_its_direction():
    table = {"a": {"deletion": 0.1, "insertion": 0.9}, "b": {"deletion": 0.2, "insertion": 0.8},
             "c": {"deletion": 0.3, "insertion": 0.95}}
    assert [m for m, _ in rank_methods(table)] == ["a", "c", "b"]
    pic = plot_curves({"deletion": {"a": ([0, 0.5, 1], [1, 0.5, 0]), "b": ([0, 1], [1, 1])}})
    assert pic.dtype == np.uint8 and pic.ndim == 3


@pytest.fixture(scope="module")
def page(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    r = invoke("report", TINY, photos, "--methods", "gradient,lrp.epsilon_plus", "-S", "deletion:steps=10",
               "-o", out)
    assert r.exit_code == 0, r.output
    return out


def test_report_is_one_self_contained_page(page):
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<style>" in text
    assert not re.search(r"""(src|href)=['"](?!data:)""", text)  # nothing fetched from elsewhere
    assert text.count("data:image/png;base64,") == 2 + 2 * 2 + 1  # inputs, grid, curves
    assert "deletion ↓" in text and "lrp.epsilon_plus" in text


def test_report_thumbnails_are_at_least_224_pixels_and_say_what_the_colours_mean(page):
    """Before: 224 px pictures shown at 150 px, and no word on the colours."""
    import base64
    import io

    text = page.read_text()
    width = re.search(r"\.grid img\{width:(\d+)px", text)
    assert width and int(width.group(1)) >= 224
    for uri in re.findall(r"src='data:image/png;base64,([^']+)' *>", text)[:6]:
        with Image.open(io.BytesIO(base64.b64decode(uri))) as img:
            assert max(img.size) >= 224
    assert "red for the class, blue against" in text


@pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason="chromium is not installed at /usr/bin/chromium "
                    "(.ci/run installs it with apt-get); the screenshot test needs it")
def test_report_renders_in_headless_chromium(page, tmp_path):
    shot = tmp_path / "shot.png"
    profile = tmp_path / "profile"
    profile.mkdir()
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600", page.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=90, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 20  # not a blank page
    # The colours of the heatmaps are there: saturated blue of the bwr map (gradient),
    # and the warm reds/oranges of inferno (LRP), which the page's own greys never have.
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    blue = (b > 150) & (r < 120) & (g < 120)
    warm = (r > 180) & (g < 140) & (b < 100)
    assert blue.sum() > 200 and warm.sum() > 200, (blue.sum(), warm.sum())
