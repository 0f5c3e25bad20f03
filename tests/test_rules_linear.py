"""Gradients of linear layers (Conv, ConvTranspose, Gemm, MatMul) equal finite differences
over their attribute combinations, and agree with torch autograd."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gradcheck import check_gradient, node_model

from onnxplain import Explainer
from onnxplain.compile import Composite, compile_explainer
from onnxplain.graph import Graph


# Conv, ConvTranspose and AveragePool have no double kernels in onnxruntime, so finite
# differences run in float32; being linear, they are still accurate well below gradcheck's
# float32 default tolerance.
LINEAR_TOL = {"rtol": 3e-3, "atol": 3e-3}


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# --- Conv ---------------------------------------------------------------------------------
def _conv_case(dim=2, size=7, k=3, stride=1, pads=None, dil=1, group=1, auto_pad=None, batch=2,
               bias=True, cin=4, cout=4):
    """pads: (begin, end), the same on every spatial axis."""
    attrs = {"strides": [stride] * dim, "dilations": [dil] * dim, "group": group}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    if pads is not None:
        attrs["pads"] = [pads[0]] * dim + [pads[1]] * dim
    return dict(x=(batch, cin, *([size] * dim)), w=(cout, cin // group, *([k] * dim)), attrs=attrs, bias=bias)


CONV_CASES = {
    "2d_k3_s1_p0": _conv_case(),
    "2d_k3_s1_p1sym": _conv_case(pads=(1, 1)),
    "2d_k3_s2_p1sym_odd": _conv_case(stride=2, pads=(1, 1)),
    "2d_k3_s2_p1sym_even": _conv_case(size=8, stride=2, pads=(1, 1)),
    "2d_k3_s3_asym_p0_2": _conv_case(size=8, stride=3, pads=(0, 2)),
    "2d_k2_s2_even": _conv_case(size=6, k=2, stride=2),
    "2d_k2_s2_odd_lastcolunused": _conv_case(size=7, k=2, stride=2),
    "2d_k1_s2": _conv_case(k=1, stride=2),
    "2d_k1_s3_p1": _conv_case(k=1, stride=3, pads=(1, 1)),
    "2d_k3_d2": _conv_case(size=8, dil=2),
    "2d_k3_d2_s2_p2": _conv_case(size=9, dil=2, stride=2, pads=(2, 2)),
    "2d_k3_d2_s3_asym": _conv_case(size=9, dil=2, stride=3, pads=(1, 0)),
    "2d_g2": _conv_case(group=2, pads=(1, 1)),
    "2d_g2_s2_d2": _conv_case(size=8, group=2, stride=2, dil=2, pads=(1, 2)),
    "2d_depthwise": _conv_case(group=4, pads=(1, 1)),
    "2d_depthwise_mult2_s2": _conv_case(group=4, cout=8, stride=2, pads=(1, 1)),
    "2d_depthwise_mult2_s1_asym": _conv_case(group=4, cout=8, pads=(0, 2)),
    "2d_g2_s1_d2_asym": _conv_case(size=8, group=2, dil=2, pads=(3, 1)),
    "2d_k1_s1_p1_pads_past_kernel": _conv_case(k=1, pads=(1, 1)),
    "2d_same_upper_s1": _conv_case(auto_pad="SAME_UPPER"),
    "2d_same_upper_s2_even": _conv_case(size=8, k=2, stride=2, auto_pad="SAME_UPPER"),
    "2d_same_upper_s2_odd": _conv_case(stride=2, auto_pad="SAME_UPPER"),
    "2d_same_lower_s2_odd_k2": _conv_case(k=2, stride=2, auto_pad="SAME_LOWER"),
    "2d_same_lower_s3_even": _conv_case(size=8, stride=3, auto_pad="SAME_LOWER"),
    "2d_same_upper_k1_s3_negpad": _conv_case(size=5, k=1, stride=3, auto_pad="SAME_UPPER"),
    "2d_valid_s2": _conv_case(stride=2, auto_pad="VALID"),
    "2d_notset_no_pads": _conv_case(stride=2, auto_pad="NOTSET"),
    "2d_batch1": _conv_case(batch=1, stride=2, pads=(1, 1)),
    "2d_batch3_nobias": _conv_case(batch=3, bias=False, pads=(0, 1)),
    "2d_rect": dict(x=(2, 3, 6, 9), w=(2, 3, 2, 3), attrs={"strides": [2, 3], "pads": [0, 1, 1, 0]}, bias=True),
    "1d_k3_s2_p1": _conv_case(dim=1, size=9, stride=2, pads=(1, 1)),
    "1d_k3_d2_s3_asym_g2": _conv_case(dim=1, size=12, stride=3, dil=2, group=2, pads=(2, 0)),
    "1d_same_lower_s2": _conv_case(dim=1, size=10, stride=2, auto_pad="SAME_LOWER"),
    "3d_k3_s2_p1": _conv_case(dim=3, size=5, stride=2, pads=(1, 1), cin=2, cout=2),
    "3d_k2_g2_same_upper": _conv_case(dim=3, size=4, k=2, group=2, auto_pad="SAME_UPPER", cin=2, cout=2),
}


def _conv_model(case, op="Conv", weight_input=False, bias_input=False):
    x = _rand(*case["x"], seed=1)
    w = _rand(*case["w"], seed=2)
    cout = case["w"][0] if op == "Conv" else case["w"][1] * case["attrs"].get("group", 1)
    bias = _rand(cout, seed=3)
    inputs, consts, order = {"x": x}, {}, ["x", "w"]
    (inputs if weight_input else consts)["w"] = w
    if case["bias"]:
        (inputs if bias_input else consts)["b"] = bias
        order.append("b")
    fixed = [k for k in ("w", "b") if k in inputs]  # fed, but shared by every sample
    m = node_model(op, inputs, dict(case["attrs"], _order=order), consts=consts, fixed=fixed)
    return m, inputs


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_input_gradient(name):
    m, feeds = _conv_model(CONV_CASES[name])
    check_gradient(m, feeds, **LINEAR_TOL)


@pytest.mark.parametrize("name", ["2d_k3_s1_p1sym", "2d_depthwise_mult2_s1_asym", "3d_k2_g2_same_upper"])
def test_stride_1_conv_input_gradient_is_a_forward_conv(name):
    """Stride-1 Convs with constant weights propagate back through a Conv with the flipped
    kernel (faster in onnxruntime than ConvTranspose); strided ones keep ConvTranspose."""
    m, feeds = _conv_model(CONV_CASES[name])
    graph = Graph(m)
    spec = compile_explainer(graph, Composite("gradient"), ["x"], graph.outputs[0])
    ops = [n.op_type for n in spec.model.graph.node]
    assert ops.count("Conv") == 2 and "ConvTranspose" not in ops
    strided, _ = _conv_model(CONV_CASES["2d_k3_s2_p1sym_odd"])
    graph = Graph(strided)
    spec = compile_explainer(graph, Composite("gradient"), ["x"], graph.outputs[0])
    assert "ConvTranspose" in [n.op_type for n in spec.model.graph.node]


@pytest.mark.parametrize("name", ["2d_k3_s2_p1sym_odd", "2d_k3_d2_s3_asym", "2d_g2_s2_d2", "2d_depthwise",
                                  "2d_same_lower_s2_odd_k2", "2d_rect", "1d_k3_d2_s3_asym_g2",
                                  "3d_k2_g2_same_upper"])
def test_conv_weight_gradient(name):
    # A fed weight, shared by the samples of the batch.
    case = dict(CONV_CASES[name])
    case["bias"] = False
    m, feeds = _conv_model(case, weight_input=True)
    check_gradient(m, feeds, wrt="w", **LINEAR_TOL)


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
def test_bias_gradient_is_the_sum_over_batch_and_positions(op):
    # A fed bias, shared by the samples of the batch.
    case = _conv_case(stride=2, pads=(1, 1), batch=2, cin=3, cout=3)
    if op == "ConvTranspose":
        case["w"] = (3, 3, 3, 3)
    m, feeds = _conv_model(case, op=op, bias_input=True)
    check_gradient(m, feeds, wrt="b", **LINEAR_TOL)


def test_weight_computed_from_constants_gets_no_gradient_nodes():
    # A weight behind a Cast of an initializer (as behind DequantizeLinear in quantized
    # models) receives no gradient; onnxruntime would run its costly Conv regardless.
    x = _rand(2, 3, 6, 6)
    m = node_model("Conv", {"x": x}, {"pads": [1, 1, 1, 1], "_order": ["x", "wc"]},
                   consts={"wc": _rand(4, 3, 3, 3, seed=2)})
    m.graph.initializer[0].name = "w16"
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(_rand(4, 3, 3, 3, seed=2).astype(np.float16), "w16"))
    m.graph.node.insert(0, helper.make_node("Cast", ["w16"], ["wc"], to=TensorProto.FLOAT))
    ex = compile_explainer(Graph(m).specialize({"x": x.shape}), Composite("gradient"), ["x"], "y0")
    ops = [n.op_type for n in ex.model.graph.node]
    assert ops.count("Conv") == 1 and ops.count("ConvTranspose") == 1
    check_gradient(m, {"x": x}, **LINEAR_TOL)


# --- ConvTranspose --------------------------------------------------------------------------
def _convt_case(dim=2, size=5, k=3, stride=1, pads=None, dil=1, group=1, out_pad=None, batch=2, cin=4,
                cout=4, bias=True, **extra):
    attrs = {"strides": [stride] * dim, "dilations": [dil] * dim, "group": group, **extra}
    if pads is not None:
        attrs["pads"] = [pads[0]] * dim + [pads[1]] * dim
    if out_pad is not None:
        attrs["output_padding"] = [out_pad] * dim
    return dict(x=(batch, cin, *([size] * dim)), w=(cin, cout // group, *([k] * dim)), attrs=attrs, bias=bias)


CONVT_CASES = {
    "2d_k3_s1": _convt_case(),
    "2d_k3_s2_p1": _convt_case(stride=2, pads=(1, 1)),
    "2d_k3_s2_p1_outpad1": _convt_case(stride=2, pads=(1, 1), out_pad=1),
    "2d_k2_s2": _convt_case(k=2, stride=2, size=4),
    "2d_k3_s3_asym_outpad2": _convt_case(stride=3, pads=(0, 2), out_pad=2),
    "2d_k3_d2_s2": _convt_case(stride=2, dil=2, pads=(1, 0)),
    "2d_g2_s2": _convt_case(group=2, stride=2, pads=(1, 1), out_pad=1),
    "2d_depthwise": _convt_case(group=4, stride=2, pads=(1, 1)),
    "2d_batch1_nobias": _convt_case(batch=1, bias=False, stride=2),
    "2d_output_shape": _convt_case(stride=2, output_shape=[10, 10]),
    "2d_output_shape_odd_total": _convt_case(stride=2, output_shape=[10, 9]),
    "2d_same_upper": _convt_case(stride=2, auto_pad="SAME_UPPER"),
    "2d_same_lower": _convt_case(stride=2, auto_pad="SAME_LOWER"),
    "1d_k3_s2_outpad1": _convt_case(dim=1, size=6, stride=2, out_pad=1, pads=(1, 0)),
    "3d_k2_s2_g2": _convt_case(dim=3, size=3, k=2, stride=2, group=2, cin=2, cout=2),
}


@pytest.mark.parametrize("name", list(CONVT_CASES))
def test_conv_transpose_input_gradient(name):
    m, feeds = _conv_model(CONVT_CASES[name], op="ConvTranspose")
    check_gradient(m, feeds, **LINEAR_TOL)


@pytest.mark.parametrize("name", ["2d_k3_s2_p1_outpad1", "2d_k3_d2_s2", "2d_g2_s2", "1d_k3_s2_outpad1"])
def test_conv_transpose_weight_gradient(name):
    case = dict(CONVT_CASES[name])
    case["x"] = (case["w"][0],) + case["x"][1:]
    case["bias"] = False
    m, feeds = _conv_model(case, op="ConvTranspose", weight_input=True)
    check_gradient(m, feeds, wrt="w", **LINEAR_TOL)


# --- Gemm -----------------------------------------------------------------------------------
GEMM_CASES = {
    "plain": ({}, (3, 5), (5, 4), (4,)),
    "transB_alpha_beta": ({"transB": 1, "alpha": 0.7, "beta": 1.3}, (3, 5), (4, 5), (4,)),
    # With transA the batch axis of A is its column axis; square A keeps it the output's.
    "transA": ({"transA": 1}, (5, 5), (5, 4), (1, 4)),
    "transA_transB_alpha": ({"transA": 1, "transB": 1, "alpha": -2.0}, (5, 5), (4, 5), (5, 4)),
    "no_bias_batch1": ({"transB": 1}, (1, 5), (4, 5), None),
    "scalar_bias": ({"beta": 0.5}, (3, 5), (5, 4), ()),
}


@pytest.mark.parametrize("name", list(GEMM_CASES))
def test_gemm_input_gradient(name):
    attrs, sa, sb, sc = GEMM_CASES[name]
    a = _rand(*sa, seed=1)
    consts = {"w": _rand(*sb, seed=2)}
    if sc is not None:
        consts["c"] = _rand(*sc, seed=3)
    m = node_model("Gemm", {"a": a}, attrs, consts=consts)
    check_gradient(m, {"a": a})


@pytest.mark.parametrize("ta", [0, 1], ids=["A", "At"])
@pytest.mark.parametrize("tb", [0, 1], ids=["B", "Bt"])
def test_gemm_weight_and_bias_gradients(ta, tb):
    # Every input shares the batch axis, so all operands are 4 x 4 here; the bias's symbolic
    # first axis then faces a fixed one and its broadcast is decided at run time.
    feeds = {k: _rand(4, 4, seed=i) for i, k in enumerate("awc")}
    m = node_model("Gemm", feeds, {"transA": ta, "transB": tb, "alpha": 0.5, "beta": -1.5})
    for wrt in "awc":
        check_gradient(m, feeds, wrt=wrt)


# --- MatMul ---------------------------------------------------------------------------------
MATMUL_CASES = {
    "2d_x_2d": ((3, 5), (5, 4)),
    "3d_x_2d": ((3, 2, 5), (5, 4)),
    "4d_x_2d": ((2, 3, 2, 5), (5, 4)),
    "3d_x_3d_bcast_right": ((3, 2, 5), (1, 5, 4)),
    "4d_bcast_x_3d": ((3, 1, 2, 5), (4, 5, 2)),
    "4d_x_4d_bcast_right": ((3, 4, 2, 5), (1, 1, 5, 2)),
    "2d_x_1d": ((3, 5), (5,)),
    "3d_x_1d": ((3, 2, 5), (5,)),
    "1d_x_2d": ((5,), (3, 5, 4)),
}


@pytest.mark.parametrize("name", list(MATMUL_CASES))
def test_matmul_gradient_with_a_constant_operand(name):
    sa, sb = MATMUL_CASES[name]
    a, w = _rand(*sa, seed=1), _rand(*sb, seed=2)
    if len(sa) == 1:  # a 1-D left operand is the constant; the batch rides on the right
        m = node_model("MatMul", {"w": w}, {"_order": ["a", "w"]}, consts={"a": a})
        check_gradient(m, {"w": w})
    else:
        m = node_model("MatMul", {"a": a}, {}, consts={"w": w})
        check_gradient(m, {"a": a})


# Both operands are inputs, so both carry the batch as their first axis.
MATMUL_BOTH = {
    "2d_x_2d": ((4, 4), (4, 3)),
    "3d_x_2d": ((5, 2, 5), (5, 4)),
    "3d_x_3d": ((3, 2, 5), (3, 5, 4)),
    "4d_x_4d_bcast_right": ((3, 4, 2, 5), (3, 1, 5, 2)),
    "4d_bcast_left_x_4d": ((3, 1, 2, 5), (3, 4, 5, 2)),
    "2d_x_1d": ((5, 5), (5,)),
    "3d_x_1d": ((4, 2, 4), (4,)),
    "1d_x_2d": ((3,), (3, 3)),
    "1d_x_3d": ((3,), (3, 3, 4)),
}


@pytest.mark.parametrize("name", list(MATMUL_BOTH))
def test_matmul_gradients_of_both_operands(name):
    sa, sb = MATMUL_BOTH[name]
    feeds = {"a": _rand(*sa, seed=1), "w": _rand(*sb, seed=2)}
    m = node_model("MatMul", feeds)
    for wrt in "aw":
        got = check_gradient(m, feeds, wrt=wrt)
        assert got.shape == feeds[wrt].shape


@pytest.mark.parametrize("batch", [1, 3], ids=["batch1_broadcast", "batch3_matched"])
def test_matmul_batch_broadcast_decided_at_run_time(batch):
    # (N, 2, 5) @ (3, 5, 4): N broadcasts against 3 when it is 1 and matches it when it is 3;
    # only the run time knows which, so the gradient finds the axes to sum then.
    x = _rand(batch, 2, 5)
    m = node_model("MatMul", {"x": x}, consts={"w": _rand(3, 5, 4, seed=2)})
    # Compiled and run directly: the Explainer expects the output's batch to be the input's.
    ex = compile_explainer(Graph(m).specialize({"x": x.shape}), Composite("gradient"), ["x"], "y0")
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = _rand(3, 2, 4, seed=4)
    got = sess.run([ex.attributions["x"]], {"x": x, ex.seed: seed})[0]
    tx = torch.tensor(x, requires_grad=True)
    (tx @ torch.tensor(_rand(3, 5, 4, seed=2))).backward(torch.tensor(seed))
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_matmul_of_two_vectors():
    # A 0-d output has no batch axis, which the Explainer requires: compile and run directly.
    v, u = _rand(6, seed=1), _rand(6, seed=2)
    m = node_model("MatMul", {"v": v, "u": u})
    ex = compile_explainer(Graph(m).specialize({"v": v.shape, "u": u.shape}), Composite("gradient"),
                           ["v", "u"], "y0")
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    gv, gu = sess.run([ex.attributions["v"], ex.attributions["u"]],
                      {"v": v, "u": u, ex.seed: np.array(1.5, np.float32)})
    np.testing.assert_allclose(gv, 1.5 * u, rtol=1e-6)
    np.testing.assert_allclose(gu, 1.5 * v, rtol=1e-6)


# --- against torch autograd ------------------------------------------------------------------
def _onnxplain_grads(model, feeds, seed):
    e = Explainer(model, canonize=False)
    out = e.attribute(feeds if len(feeds) > 1 else next(iter(feeds.values())), method="gradient",
                      target=seed, probability=True)
    return out if isinstance(out, dict) else {next(iter(feeds)): out}


def test_conv_agrees_with_torch_autograd():
    x, w, bias = _rand(3, 4, 9, 8, seed=1), _rand(6, 2, 3, 2, seed=2), _rand(6, seed=3)
    attrs = {"strides": [2, 3], "pads": [1, 0, 2, 1], "dilations": [2, 1], "group": 2}
    m = node_model("Conv", {"x": x}, attrs, consts={"w": w, "b": bias})
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(w)
    y = torch.nn.functional.conv2d(torch.nn.functional.pad(tx, (0, 1, 1, 2)), tw, torch.tensor(bias),
                                   stride=(2, 3), dilation=(2, 1), groups=2)
    seed = _rand(*y.shape, seed=4)
    y.backward(torch.tensor(seed))
    got = _onnxplain_grads(m, {"x": x}, seed)["x"]
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_conv_transpose_agrees_with_torch_autograd():
    x, w = _rand(2, 4, 5, 6, seed=1), _rand(4, 3, 3, 3, seed=2)
    attrs = {"strides": [2, 3], "pads": [1, 1, 1, 1], "output_padding": [1, 2], "group": 2, "dilations": [1, 2]}
    m = node_model("ConvTranspose", {"x": x}, attrs, consts={"w": w})
    tx = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.conv_transpose2d(tx, torch.tensor(w), stride=(2, 3), padding=1,
                                             output_padding=(1, 2), groups=2, dilation=(1, 2))
    seed = _rand(*y.shape, seed=4)
    y.backward(torch.tensor(seed))
    got = _onnxplain_grads(m, {"x": x}, seed)["x"]
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_matmul_agrees_with_torch_autograd():
    a, w = _rand(3, 4, 2, 5, seed=1), _rand(3, 1, 5, 2, seed=2)
    m = node_model("MatMul", {"a": a, "w": w})
    ta, tw = torch.tensor(a, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = ta @ tw
    seed = _rand(*y.shape, seed=4)
    y.backward(torch.tensor(seed))
    got = _onnxplain_grads(m, {"a": a, "w": w}, seed)
    np.testing.assert_allclose(got["a"], ta.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["w"], tw.grad.numpy(), rtol=1e-5, atol=1e-5)
