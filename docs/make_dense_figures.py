"""The README's pictures of dense targets: docs/detection.png (the tiny detector's explained
box), docs/region.png (a region of a U-Net's map), docs/time_steps.png (frames of a
sequence output) and, where the nudenet 3.4.2 and scikit-image 0.26.0 wheels are cached
(benchmarks/corpus.py, models/export_models.py), docs/detection_nudenet.png: `onnxplain
explain` on NudeNet's YOLOv8 320n.onnx and scikit-image's astronaut photo.

    .venv-ci/bin/python docs/make_dense_figures.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from detection_models import CLASSES, TinyCTC, TinyUNet, scenes  # noqa: E402

from onnxplain import dense_pictures as P  # noqa: E402
from onnxplain.explainer import Explainer  # noqa: E402
from onnxplain.target import resolve_target  # noqa: E402
from onnxplain.visualize import overlay, reduce_channels  # noqa: E402

SCALE = 4


def _big(image_chw):
    img = Image.fromarray((np.clip(image_chw.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8))
    return img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST)


def _panel(image_chw, attr, title):
    a2d = np.kron(reduce_channels(attr), np.ones((SCALE, SCALE)))
    pic = Image.fromarray(overlay(np.asarray(_big(image_chw)), a2d, alpha=0.6))
    out = Image.new("RGB", (pic.width, pic.height + 16), (255, 255, 255))
    out.paste(pic, (0, 16))
    ImageDraw.Draw(out).text((2, 2), title, fill=(0, 0, 0))
    return out


def _row(panels):
    w = sum(p.width for p in panels) + 6 * (len(panels) - 1)
    out = Image.new("RGB", (w, max(p.height for p in panels)), (255, 255, 255))
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + 6
    return out


def detection_figure(path):
    e = Explainer(str(ROOT / "models" / "tiny_yolo.onnx"))
    x, _ = scenes(1, np.random.default_rng(2024), kinds=[[0, 1, 1]])
    target, _ = resolve_target(e, e.feeds(x), "detection:0")
    layer = [n for n in onnx.load(str(ROOT / "models" / "tiny_yolo.onnx")).graph.node if n.op_type == "Conv"][-1]
    runs = [("input_x_gradient", {}), ("lrp.epsilon_plus_flat", {}), ("grad_cam", {"layer": layer.input[0]}),
            ("d_rise", {"n_masks": 1000, "cells": 8, "center": True, "baseline": 0.5})]
    panels = []
    for method, opts in runs:
        a = e.attribute(x, method=method, target=target, **opts)[0]
        pic = _panel(x[0], a, f"detection:0, {method}")
        body = pic.crop((0, 16, pic.width, pic.height))
        chosen = target.chosen[0]
        body = P.draw_detections(body, chosen, [d for d in target.found[0] if d is not chosen], (64, 64), CLASSES)
        pic.paste(body, (0, 16))
        panels.append(pic)
    _row(panels).save(path)


def region_figure(path):
    torch.manual_seed(0)
    net = TinyUNet().eval()
    x, _ = scenes(1, np.random.default_rng(3), kinds=[[0, 1]])
    onnx_path = Path("/tmp") / "onnxplain_unet.onnx"
    torch.onnx.export(net, (torch.from_numpy(x),), str(onnx_path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, opset_version=17, dynamo=False)
    e = Explainer(str(onnx_path))
    box = (20, 24, 44, 40)
    a = e.attribute(x, method="gradient", target="region:{},{},{},{}:1".format(*box))[0]
    pic = _panel(x[0], a, "region:20,24,44,40:1, gradient (U-Net, random weights)")
    area = np.zeros((64, 64), bool)
    area[box[1]:box[3], box[0]:box[2]] = True
    body = P.draw_outline(pic.crop((0, 16, pic.width, pic.height)), area)
    pic.paste(body, (0, 16))
    pic.save(path)


def time_figure(path):
    torch.manual_seed(1)
    net = TinyCTC(sequence_first=True).eval()
    x = np.random.default_rng(4).normal(size=(1, 8, 40)).astype(np.float32)
    onnx_path = Path("/tmp") / "onnxplain_ctc.onnx"
    torch.onnx.export(net, (torch.from_numpy(x),), str(onnx_path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {1: "n"}}, opset_version=17, dynamo=False)
    e = Explainer(str(onnx_path))
    a = e.attribute(x, method="input_x_gradient", target="steps:20-24:2")[0]
    y = e.predict(x)[:, 0]  # (T, C): the output is sequence-first
    from onnxplain.target import parse_target

    P.sequence_picture(path, y, parse_target("steps:20-24:2"), a)


def nudenet_figure(path):
    import tempfile
    import zipfile

    from click.testing import CliRunner

    from onnxplain import cli

    sys.path.insert(0, str(ROOT / "tests"))
    from test_detection import _cached_wheel

    nude, ski = _cached_wheel("nudenet-3.4.2-*.whl"), _cached_wheel("scikit_image-0.26.0-*.whl")
    if nude is None or ski is None:
        print("nudenet or scikit-image wheel not cached: docs/detection_nudenet.png not made")
        return
    tmp = Path(tempfile.mkdtemp())
    with zipfile.ZipFile(nude) as z:
        z.extract("nudenet/320n.onnx", tmp)
    with zipfile.ZipFile(ski) as z:
        z.extract("skimage/data/astronaut.png", tmp)
    args = ["explain", str(tmp / "nudenet" / "320n.onnx"), str(tmp / "skimage" / "data" / "astronaut.png"), "-t",
            "detection:0", "-m", "lrp.epsilon_plus_flat", "--size", "320,320", "--mean", "0,0,0", "--std", "1,1,1",
            "-o", str(path), "-q"]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    detection_figure(here / "detection.png")
    region_figure(here / "region.png")
    time_figure(here / "time_steps.png")
    nudenet_figure(here / "detection_nudenet.png")
