"""A bias quantized at run time (onnx.quantize's dynamic Conv: Div(b, s_x s_w) -> Floor ->
Cast int32 -> Add to the ConvInteger accumulator), explained by the straight-through
convention: the rounding passes the gradient, so the dynamic scale's terms cancel and the
gradient is that of the dequantized float conv. With Floor taken as constant the scale kept
a term b / s_x that the DynamicQuantizeLinear rule sent to the input's argmax and argmin:
a silent wrong answer on ddddocr-common-old (3.2x off its float64 referee)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxplain import Explainer
from quantized_models import dynamic_conv

T = TensorProto


def _dynamic_conv(rounding="Floor"):
    model, wd, _bias = dynamic_conv(rounding, batch="n", opset=13)
    return model, wd


@pytest.mark.parametrize("rounding", ["Floor", "Round", "Ceil"])
def test_a_run_time_quantized_bias_leaves_the_dequantized_conv_gradient(tmp_path, rounding):
    torch = pytest.importorskip("torch")
    model, wd = _dynamic_conv(rounding)
    path = tmp_path / "dq_conv.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (1, 2, 5, 6)).astype(np.float32)
    x[0, 0, 2, 3] = 1.0  # a clear argmax and argmin, where the scale's stray term landed
    x[0, 1, 4, 0] = -1.0
    seed = rng.standard_normal((1, 3, 5, 6)).astype(np.float32)
    got = Explainer(path).attribute(x, method="gradient", target=seed)
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    out = torch.nn.functional.conv2d(xt, torch.tensor(wd), padding=1)
    (want,) = torch.autograd.grad((out * torch.tensor(seed.astype(np.float64))).sum(), xt)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * np.abs(want.numpy()).max())


def test_a_rounding_that_does_not_quantize_stays_piecewise_constant(tmp_path):
    # y = x * Floor(x): the exact gradient is Floor(x) (Floor's own derivative is zero).
    x_vi = helper.make_tensor_value_info("x", T.FLOAT, ["n", 4])
    y_vi = helper.make_tensor_value_info("y", T.FLOAT, ["n", 4])
    nodes = [helper.make_node("Floor", ["x"], ["f"]), helper.make_node("Mul", ["x", "f"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "floor", [x_vi], [y_vi]), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.save(m, str(tmp_path / "floor.onnx"))
    x = np.array([[0.3, 1.7, -2.2, 3.5]], np.float32)
    got = Explainer(tmp_path / "floor.onnx").attribute(x, method="gradient", target=np.ones((1, 4), np.float32))
    np.testing.assert_array_equal(got, np.floor(x))
