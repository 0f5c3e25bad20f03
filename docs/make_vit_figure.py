"""Rebuild docs/vit.png and models/vit_scene.png from the shipped ViT.

    python docs/make_vit_figure.py

docs/vit.png: for one held-out scene of each class (tests/shape_scenes.py, seed 7, as its
test draws them), the scene | its AttnLRP heatmap (summed over channels; the box the test
measures in grey) | that heatmap over a grey copy of the scene | transformer_attribution
over it, for the true class, with the predicted class in each title. models/vit_scene.png: one such scene as a 32x32 PNG for the README's command.
Public API only (what a user would write).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from onnxplain import Explainer
from onnxplain.visualize import grid, heatmap, overlay, reduce_channels, save_png

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import shape_scenes  # noqa: E402

MODEL = ROOT / "models" / "tiny_vit.onnx"
SCALE = 5  # the 32 px scenes drawn at 160 px


def _big(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] * SCALE, rgb.shape[0] * SCALE), Image.NEAREST))


def _boxed(rgb: np.ndarray, box) -> np.ndarray:
    """The object's box drawn in grey, where the test measures the relevance's share."""
    out = rgb.copy()
    x1, y1, x2, y2 = (v * SCALE for v in box)
    out[y1, x1:x2] = out[y2 - 1, x1:x2] = out[y1:y2, x1] = out[y1:y2, x2 - 1] = 128
    return out


def main(n: int = 4) -> None:
    e = Explainer(str(MODEL))
    images, labels, boxes = shape_scenes.scenes(20, np.random.default_rng(7))
    # The first scene of each class, so that every shape is shown.
    pick = [int(np.flatnonzero(labels == c)[0]) for c in range(len(shape_scenes.CLASSES))][:n]
    images, labels, boxes = images[pick], labels[pick], boxes[pick]
    x = shape_scenes.normalise(images)
    predicted = e.predict(x).argmax(1)
    lrp = e.attribute(x, method="lrp.attnlrp", target=labels)
    chefer = e.attribute(x, method="transformer_attribution", target=labels)
    tiles, titles = [], []
    for i in range(n):
        photo = _big(np.rint(images[i].transpose(1, 2, 0) * 255).astype(np.uint8))
        heat = reduce_channels(lrp[i], layout="nchw", how="sum")
        name = shape_scenes.CLASSES[labels[i]]
        tiles += [photo, _boxed(heatmap(np.kron(heat, np.ones((SCALE, SCALE)))), boxes[i]),
                  overlay(photo, heat, alpha=0.9, background="gray"),
                  overlay(photo, chefer[i, 0], alpha=0.8, background="gray")]
        titles += [f"{name} (predicted {shape_scenes.CLASSES[predicted[i]]})", "lrp.attnlrp", "lrp.attnlrp on grey",
                   "transformer_attribution on grey"]
    save_png(ROOT / "docs" / "vit.png", grid(tiles, titles, ncols=4))
    print("wrote", ROOT / "docs" / "vit.png")
    save_png(ROOT / "models" / "vit_scene.png", np.rint(images[0].transpose(1, 2, 0) * 255).astype(np.uint8))
    print("wrote", ROOT / "models" / "vit_scene.png", f"({shape_scenes.CLASSES[labels[0]]})")


if __name__ == "__main__":
    main()
