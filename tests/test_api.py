"""The public Python API for images and pictures: load_image with the model's preprocessing,
heatmap, overlay and save, importable from the package itself."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnxplain
from onnxplain import Explainer

MODELS = Path(__file__).resolve().parent.parent / "models"
TINY = MODELS / "tiny_cnn.onnx"


def test_the_picture_api_is_exported_by_the_package():
    for name in ("load_image", "heatmap", "overlay", "save"):
        assert name in onnxplain.__all__ and callable(getattr(onnxplain, name))


def test_load_image_applies_the_models_preprocessing_as_the_cli_does(tmp_path):
    from click.testing import CliRunner

    from onnxplain import cli

    x, image = onnxplain.load_image(MODELS / "chelsea.png", TINY)
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    a = Explainer(TINY).attribute(x, method="gradient", target=3)
    r = CliRunner().invoke(cli.main, ["explain", str(TINY), str(MODELS / "chelsea.png"), "-t", "3",
                                      "-o", str(tmp_path / "a.npy")])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(a, np.load(tmp_path / "a.npy"), rtol=1e-6, atol=1e-9)


def test_load_image_of_several_files_stacks_them(tmp_path):
    img = Image.open(MODELS / "chelsea.png")
    img.save(tmp_path / "a.png")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(tmp_path / "b.png")
    x, images = onnxplain.load_image([tmp_path / "a.png", tmp_path / "b.png"], Explainer(TINY))
    assert x.shape == (2, 3, 32, 32) and len(images) == 2
    np.testing.assert_allclose(x[1], x[0][:, :, ::-1], atol=0.05)


def test_heatmap_overlay_and_save_draw_and_write_an_attribution(tmp_path):
    x, image = onnxplain.load_image(MODELS / "chelsea.png", TINY)
    a = Explainer(TINY).attribute(x, method="gradient", target=3)
    hm = onnxplain.heatmap(a[0])
    assert hm.shape == (32, 32, 3) and hm.dtype == np.uint8
    over = onnxplain.overlay(image, a[0])
    assert over.shape == image.shape
    png = onnxplain.save(tmp_path / "a.png", a[0], image=image, title="tiny_cnn: class 3, gradient")
    with Image.open(png) as pic:
        assert pic.size[1] >= 224  # with a title and a colour bar
    npy = onnxplain.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(np.load(npy), a)
    with pytest.raises(onnxplain.OptionError, match="png"):
        onnxplain.save(tmp_path / "a.gif", a)
