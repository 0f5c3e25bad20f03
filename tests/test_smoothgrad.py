"""SmoothGrad's noise: by default a fraction of each input's range (Smilkov et al. 2017 found
10-20% best), so a normalised photo and a 0..255 one get the same relative noise; an
explicit stdev (Captum's, on the input's scale) wins."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxplain import Explainer


@pytest.fixture(scope="module")
def square_sum(tmp_path_factory):
    """y = sum(x * x) over 64 features: its gradient 2(x + noise) reveals the noise drawn."""
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
             helper.make_node("ReduceSum", ["sq"], ["y"], keepdims=1, axes=[1])]
    graph = helper.make_graph(nodes, "sq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    path = tmp_path_factory.mktemp("sg") / "sq.onnx"
    onnx.save(model, str(path))
    return Explainer(path)


def _noise_std(e, x, **options):
    # vargrad of 2(x + e) is 4 var(e): the drawn noise's standard deviation, per sample.
    v = e.attribute(x, method="vargrad", target=0, n_samples=400, **options)
    return np.sqrt(v.mean(axis=1) / 4.0)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_default_noise_is_15_percent_of_each_samples_range(square_sum, scale):
    """Before: stdev=1.0 on any scale, noise as large as a normalised photo's whole range."""
    x = np.stack([np.linspace(0, 1, 64), np.linspace(-2, 2, 64)]).astype(np.float32) * scale
    std = _noise_std(square_sum, x)
    np.testing.assert_allclose(std, 0.15 * np.ptp(x, axis=1), rtol=0.06)


def test_noise_level_sets_the_fraction_of_the_range(square_sum):
    x = np.linspace(-1, 3, 64, dtype=np.float32)[None]
    np.testing.assert_allclose(_noise_std(square_sum, x, noise_level=0.05), 0.05 * 4.0, rtol=0.06)


def test_an_explicit_stdev_wins_over_noise_level(square_sum):
    x = np.linspace(0, 100, 64, dtype=np.float32)[None]
    np.testing.assert_allclose(_noise_std(square_sum, x, stdev=0.3, noise_level=0.2), 0.3, rtol=0.06)
