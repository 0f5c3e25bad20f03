"""The shipped ViT (models/tiny_vit.onnx, trained by models/train_vit.py on one shape per
scene): it is the pinned file, it classifies held-out scenes, and its explanations put most
positive relevance on the object — the property a heatmap of a trained model must have,
which a random ViT's cannot show. The scenes come from tests/shape_scenes.py with seeds the
training never drew from (it used 0; its held-out check 12345)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import shape_scenes
import transformer_zoo as tz
from onnxplain import Explainer

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny_vit.onnx"
SHA256 = "509ee835cb5c5c5f3384e2a477834206061f2f8aa0e841fab605140be910ad4a"
sys.path.insert(0, str(ROOT / "models"))
from train_vit import ShapeViT  # noqa: E402

# Measured on 200 scenes of seed 2026 when the model was trained: see models/README.md.
ACCURACY = 0.9
SHARE, OVER_AREA = 0.5, 2.0  # the bar: >= half the positive relevance, >= 2x the box's area share


@pytest.fixture(scope="module")
def explainer():
    return Explainer(str(MODEL))


@pytest.fixture(scope="module")
def relevance_scenes():
    images, labels, boxes = shape_scenes.scenes(20, np.random.default_rng(7))
    return shape_scenes.normalise(images), labels, boxes


def box_shares(attr: np.ndarray, boxes: np.ndarray) -> tuple:
    """Per scene: the share of the positive relevance (summed over channels) inside the
    object's box, and the box's share of the image's area."""
    heat = np.maximum(attr.sum(axis=1), 0.0)
    inside = np.zeros(heat.shape, bool)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        inside[i, y1:y2, x1:x2] = True
    share = (heat * inside).sum(axis=(1, 2)) / heat.sum(axis=(1, 2))
    return share, inside.mean(axis=(1, 2))


def test_the_shipped_vit_is_the_pinned_file():
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == SHA256
    assert SHA256 in (ROOT / "models" / "README.md").read_text()
    assert MODEL.stat().st_size < 1_000_000


def test_the_vit_classifies_held_out_scenes(explainer):
    images, labels, _ = shape_scenes.scenes(200, np.random.default_rng(2026))
    accuracy = (explainer.predict(shape_scenes.normalise(images)).argmax(1) == labels).mean()
    assert accuracy >= ACCURACY, accuracy


@pytest.mark.parametrize("method", ["lrp.attnlrp", "lrp.cp_lrp"])
def test_relevance_puts_most_positive_relevance_on_the_object_in_every_scene(explainer, relevance_scenes, method):
    """Measured: lrp.attnlrp shares 0.62-0.92 (mean 0.81), at least 2.3x the box's area share;
    lrp.cp_lrp 0.56-0.89 (mean 0.76), at least 2.1x."""
    x, labels, boxes = relevance_scenes
    share, area = box_shares(explainer.attribute(x, method=method, target=labels), boxes)
    assert np.all(share >= SHARE), (share.round(2), area.round(2))
    assert np.all(share >= OVER_AREA * area), (share.round(2), area.round(2))


@pytest.mark.parametrize("method", ["transformer_attribution", "generic_attention"])
def test_attention_maps_put_most_positive_relevance_on_the_objects_on_average(explainer, relevance_scenes, method):
    """The attention methods' maps live on the 8 x 8 patch grid, upsampled bilinearly, so
    they spill over the box's edges: over the 20 scenes together they reach the bar (measured
    mean share 0.67 and 0.62, the mean box area share 0.21), scene by scene they do not (next test)."""
    x, labels, boxes = relevance_scenes
    share, area = box_shares(explainer.attribute(x, method=method, target=labels), boxes)
    assert share.mean() >= SHARE and share.mean() >= OVER_AREA * area.mean(), (share.round(2), area.round(2))


@pytest.mark.xfail(strict=True, reason="measured: transformer_attribution misses the bar in 3 of 20 scenes (shares "
                   "0.489, 0.499; one of 0.625 at 1.98x the box's area share), generic_attention in 5 (shares "
                   "0.286-0.494, one at 1.73x)")
@pytest.mark.parametrize("method", ["transformer_attribution", "generic_attention"])
def test_attention_maps_put_most_positive_relevance_on_the_object_in_every_scene(explainer, relevance_scenes, method):
    x, labels, boxes = relevance_scenes
    share, area = box_shares(explainer.attribute(x, method=method, target=labels), boxes)
    assert np.all(share >= SHARE) and np.all(share >= OVER_AREA * area), (share.round(2), area.round(2))


@pytest.mark.parametrize("exporter", tz.EXPORTERS)
def test_the_architecture_s_attnlrp_equals_the_torch_reference_through_both_exporters(tmp_path, exporter):
    """The shipped ViT's layers (patch Conv, CLS token, LayerNorm, erf GELU, eager attention)
    with seeded weights: AttnLRP at the pixels equals the published rules as torch autograd
    (transformer_zoo's reference pass), for the TorchScript and the dynamo export."""
    torch.manual_seed(3)
    model = ShapeViT(blocks=2).eval()
    images, labels, _ = shape_scenes.scenes(2, np.random.default_rng(5))
    x = torch.from_numpy(shape_scenes.normalise(images))
    path = tz.export(model, tmp_path / f"vit_{exporter}.onnx", exporter, x)
    # The reference is the epsilon -> 0 limit: at the default 1e-6 the patch Conv's smallest
    # denominators (weights at their initial scale) move the relevance by 0.2%.
    ours = Explainer(str(path)).attribute(x.numpy(), method="lrp.attnlrp", target=int(labels[0]), epsilon=1e-9)
    ref = tz.input_relevance(model, x, int(labels[0]), tz.ATTNLRP).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
