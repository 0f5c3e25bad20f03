"""The compiled explainer reads ReLU masks off the Relu's output, not its input: the same
values (y > 0 exactly where x > 0), while the Conv before the Relu stays fusable."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer
from onnxplain.compile import _masks_from_relu_outputs


def _conv_relu_net(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5)).eval()
    path = tmp_path / "conv_relu.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 6, 6),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    return net, path


def test_relu_gradient_masks_read_the_relu_output_so_its_conv_can_fuse(tmp_path):
    _, path = _conv_relu_net(tmp_path)
    spec_path = tmp_path / "grad.onnx"
    Explainer(str(path)).export(spec_path, method="gradient")
    m = onnx.load(str(spec_path))
    relu_in = {n.input[0] for n in m.graph.node if n.op_type == "Relu"}
    relu_out = {n.output[0] for n in m.graph.node if n.op_type == "Relu"}
    greater = [n for n in m.graph.node if n.op_type == "Greater"]
    assert len(greater) == 2
    assert all(n.input[0] in relu_out and n.input[0] not in relu_in for n in greater)
    # Nothing but its Relu reads a Conv output any more.
    readers = {t: [n for n in m.graph.node if t in n.input] for t in relu_in}
    assert all(len(r) == 1 and r[0].op_type == "Relu" for r in readers.values())


def test_gradient_through_relu_equals_torch_autograd_with_zeros_at_zero(tmp_path):
    net, path = _conv_relu_net(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 3, 6, 6)).astype(np.float32)
    x[0] = 0.0  # conv outputs equal to the bias: the biases below make some exactly 0
    with torch.no_grad():
        net[0].bias[:4] = 0.0
    torch.onnx.export(net, (torch.tensor(x[:1]),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    got = Explainer(str(path)).attribute(x, method="gradient", target=[0, 2, 4])
    xt = torch.tensor(x, requires_grad=True)
    net(xt)[torch.arange(3), torch.tensor([0, 2, 4])].sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_the_rewrite_changes_no_value_at_nan_zero_and_negative_zero():
    # y = Relu(x); the backward mask Greater(x, 0) rewritten to Greater(y, 0), then Where.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])
    g = helper.make_tensor_value_info("g", TensorProto.FLOAT, [6])
    out = helper.make_tensor_value_info("dx", TensorProto.FLOAT, [6])
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    fwd = [helper.make_node("Relu", ["x"], ["y"])]
    bw = [helper.make_node("Greater", ["x", "zero"], ["mask"], name="onnxplain/mask"),
          helper.make_node("Where", ["mask", "g", "zero"], ["dx"], name="onnxplain/where")]
    rewritten = _masks_from_relu_outputs(fwd, bw, [zero])
    assert rewritten[0].input[0] == "y" and bw[0].input[0] == "x"  # the emitted node is left as it was
    feeds = {"x": np.array([np.nan, 0.0, -0.0, -1e-38, 1e-38, 2.0], np.float32),
             "g": np.arange(1, 7, dtype=np.float32)}
    results = []
    for nodes in (bw, rewritten):
        model = helper.make_model(helper.make_graph(fwd + nodes, "m", [x, g], [out], [zero]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        results.append(s.run(None, feeds)[0])
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[1], [0, 0, 0, 0, 5, 6])
