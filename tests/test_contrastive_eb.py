"""Contrastive excitation backprop read at a mid layer (Zhang et al. 2016; TorchRay's
saliency_layer): the contrast of the layer, summed over its channels and upsampled to the
input, while the default stays the map at the input (tested against target minus dual in
tests/test_relevance_methods.py)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onnxplain import Explainer, OptionError

TINY = Path(__file__).resolve().parent.parent / "models" / "tiny_cnn.onnx"
MID = "/relu2/Relu_output_0"  # (batch, 16, 16, 16) of a (batch, 3, 32, 32) input


@pytest.fixture(scope="module")
def ex():
    return Explainer(TINY)


def _x():
    return np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)


def test_the_default_map_is_read_at_the_input(ex):
    x = _x()
    a = ex.attribute(x, method="contrastive_excitation_backprop", target=[1, 4])
    assert a.shape == x.shape


def test_a_saliency_layer_map_is_the_layers_contrast_summed_over_channels_and_upsampled(ex):
    x = _x()
    a = ex.attribute(x, method="contrastive_excitation_backprop", target=[1, 4], saliency_layer=MID)
    assert a.shape == (2, 1, 32, 32)
    at_layer = ex.attribute(x, method="contrastive_excitation_backprop", target=[1, 4], layer=MID)
    summed = at_layer.sum(axis=1)
    for i in range(2):
        up = np.asarray(Image.fromarray(summed[i].astype(np.float32)).resize((32, 32), Image.BILINEAR))
        np.testing.assert_allclose(a[i, 0], up, rtol=1e-5, atol=1e-7 * np.abs(up).max())
    # Target minus dual, each of the seed's mass 1: the contrast sums to ~0 (up to the mass
    # that units with no excitatory input drop).
    np.testing.assert_allclose(summed.reshape(2, -1).sum(1), 0.0, atol=1e-3)


def test_a_saliency_layer_that_is_not_a_feature_map_is_refused(ex):
    with pytest.raises(OptionError, match="saliency_layer"):
        ex.attribute(_x(), method="contrastive_excitation_backprop", target=1, saliency_layer="logits")
    with pytest.raises(OptionError, match="saliency_layer"):
        ex.export("/tmp/never.onnx", method="contrastive_excitation_backprop", saliency_layer=MID)
