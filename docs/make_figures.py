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
from onnxplain.factorize import default_layer
from onnxplain.io import Preprocess, prepare_images
from onnxplain.visualize import colorbar, grid, heatmap, overlay, picture, reduce_channels, save_png

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "efficientnet_lite0.onnx"
PHOTO = ROOT / "models" / "chelsea.png"

CEB = {"saliency_layer": "mid"}  # replaced by the CLI's choice of layer for the model

FIGURES = {
    "gradients.png": [
        ("gradient", {}), ("input_x_gradient", {}), ("integrated_gradients", {"n_steps": 32}),
        ("smoothgrad", {"n_samples": 50}, "absolute"), ("guided_backprop", {"clip_as_relu": True}),
        ("deconvnet", {"clip_as_relu": True}),
    ],
    "relevance.png": [
        # Contrastive EB as the CLI draws it (and the paper): read at a mid layer, its positive
        # part, for two classes, to show that the map follows the class.
        ("excitation_backprop", {}), ("contrastive_excitation_backprop", CEB, None, "predicted"),
        ("contrastive_excitation_backprop", CEB, None, 287), ("lrp.epsilon_plus", {}),
        ("lrp.epsilon_gamma_box", {}), ("lrp.epsilon_alpha2_beta1", {}), ("deeplift", {}),
    ],
}


def _legend(height: int) -> np.ndarray:
    """The two colour bars of a grid: signed maps (bwr) and non-negative ones (inferno), each
    map scaled by its own top value."""
    half = (height - 8) // 2
    signed = colorbar(half, "bwr", True, -1.0, 1.0, "signed: red for, blue against")
    positive = colorbar(half, "inferno", False, 0.0, 1.0, "non-negative")
    w = max(signed.shape[1], positive.shape[1])
    pad = lambda b: np.pad(b, ((0, 0), (0, w - b.shape[1]), (0, 0)), constant_values=255)  # noqa: E731
    return np.concatenate([pad(signed), np.full((height - 2 * half, w, 3), 255, np.uint8), pad(positive)])


def _with_legend(pic: np.ndarray) -> np.ndarray:
    legend = _legend(pic.shape[0] - 8)
    legend = np.pad(legend, ((4, 4), (0, 6), (0, 0)), constant_values=255)
    return np.concatenate([pic, legend], axis=1)


def main(names=None) -> None:
    e = Explainer(MODEL)
    pre = Preprocess.from_metadata(json.loads(e.metadata["onnxplain.preprocess"]))
    x, images = prepare_images([PHOTO], pre)
    labels = (ROOT / "models" / "imagenet_classes.txt").read_text().splitlines()
    target = int(e.predict(x).argmax(1)[0])
    if not names or "quickstart.png" in names:
        # What `onnxplain explain` with no arguments writes.
        a = e.attribute(x, method="lrp.epsilon_plus_flat", target=target)
        save_png(ROOT / "docs" / "quickstart.png", picture(
            a[0], image=images[0], title=f"efficientnet_lite0: class {target} ({labels[target]}), "
                                          "lrp.epsilon_plus_flat"))
        print("wrote", ROOT / "docs" / "quickstart.png")
    for fname, methods in FIGURES.items():
        if names and fname not in names:
            continue
        tiles, titles = [images[0]], [f"input: {labels[target]}"]
        for method, opts, *rest in methods:
            how, tgt = (rest + [None, "predicted"])[:2]
            tgt = target if tgt == "predicted" else tgt
            if opts.get("saliency_layer") == "mid":
                opts = {**opts, "saliency_layer": default_layer(e)}
            t0 = time.perf_counter()
            try:
                a = e.attribute(x, method=method, target=tgt, **opts)
            except Exception as exc:  # a method not available yet is left out, loudly
                print(f"{method}: skipped ({exc})", file=sys.stderr)
                continue
            heat = reduce_channels(a[0], layout="nchw", how="abs_max" if how else "sum")
            # A map read at a 14x14 layer says where, not which pixel: drawn over the photo.
            tiles.append(overlay(images[0], heat, alpha=0.6, background="gray") if "saliency_layer" in opts
                         else heatmap(heat))
            # SmoothGrad as its paper draws it: |gradient|, max over channels.
            title = f"{method} (|max|)" if how else method
            if "saliency_layer" in opts:
                title = f"contrastive EB, {labels[tgt]}: {opts['saliency_layer'].strip('/').split('/')[0]}"
            titles.append(title)
            print(f"{method}: {time.perf_counter() - t0:.2f} s")
        save_png(ROOT / "docs" / fname, _with_legend(grid(tiles, titles, ncols=4)))
        print("wrote", ROOT / "docs" / fname)


if __name__ == "__main__":
    main(sys.argv[1:])
