"""Rebuild the README's figures from the bundled model and photo.

    python docs/make_figures.py

Each figure is a grid of heatmaps overlaid on the photo, one per method, made with the
public API only (what a user would write).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from onnxplain import Explainer
from onnxplain.io import Preprocess, prepare_images
from onnxplain.visualize import grid, heatmap, reduce_channels, save_png

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
PHOTO = ROOT / "models" / "chelsea.png"

FIGURES = {
    "gradients.png": [
        ("gradient", {}), ("input_x_gradient", {}), ("integrated_gradients", {"n_steps": 32}),
        ("smoothgrad", {"n_samples": 50, "stdev": 0.3}), ("guided_backprop", {"clip_as_relu": True}),
        ("deconvnet", {"clip_as_relu": True}),
    ],
    "relevance.png": [
        ("excitation_backprop", {}), ("contrastive_excitation_backprop", {}), ("lrp.epsilon_plus", {}),
        ("lrp.epsilon_gamma_box", {}), ("lrp.epsilon_alpha2_beta1", {}), ("deeplift", {}),
    ],
}


def main(names=None) -> None:
    e = Explainer(MODEL)
    pre = Preprocess.from_metadata(json.loads(e.metadata["onnxplain.preprocess"]))
    x, images = prepare_images([PHOTO], pre)
    labels = (ROOT / "models" / "imagenet_classes.txt").read_text().splitlines()
    target = int(e.predict(x).argmax(1)[0])
    for fname, methods in FIGURES.items():
        if names and fname not in names:
            continue
        tiles, titles = [images[0]], [f"input: {labels[target]}"]
        for method, opts in methods:
            t0 = time.perf_counter()
            try:
                a = e.attribute(x, method=method, target=target, **opts)
            except Exception as exc:  # a method not available yet is left out, loudly
                print(f"{method}: skipped ({exc})", file=sys.stderr)
                continue
            heat = reduce_channels(a[0], layout="nchw")
            tiles.append(heatmap(heat))
            titles.append(method)
            print(f"{method}: {time.perf_counter() - t0:.2f} s")
        save_png(ROOT / "docs" / fname, grid(tiles, titles, ncols=4))
        print("wrote", ROOT / "docs" / fname)


if __name__ == "__main__":
    main(sys.argv[1:])
