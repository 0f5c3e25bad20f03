"""Quantized and mixed-precision models, explained by the straight-through convention.

Finite differences of a quantized model are meaningless (it is piecewise constant), so each
rule is held against the convention itself: the gradient of x -> Q -> op -> DQ equals the
exact gradient (central differences in float64) of the float model x -> Clip -> float op
with dequantized weights -> Clip, where the clips are the integer ranges. Inputs lie on the
input quantization grid, so both models see the same real values (rounding changes
nothing) and every clipping mask agrees. Whole models quantized by onnxruntime's own tools
are compared with the dequantized float model built by hand and with the float original.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from gradcheck import numeric_gradient, to_double
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer
from onnxplain.errors import ModelError
from onnxplain.rules import quantized as Q
from onnxplain.rules.base import lookup

U8, I8 = TensorProto.UINT8, TensorProto.INT8


def _init(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, inputs, output, inits, opset=17, ms=False):
    """A model of `nodes`; its output's shape is what onnxruntime computes (onnx's shape
    inference does not know com.microsoft operators)."""
    import onnxruntime as ort

    g = helper.make_graph(nodes, "q", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, [])],
                          initializer=inits)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(Q.MS, 1)] if ms else [])
    m = helper.make_model(g, opset_imports=imports)
    m.ir_version = 8 if opset < 21 else 10
    feeds = {}
    for vi in inputs:
        dims = [2 if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
        feeds[vi.name] = np.zeros(dims, np.float32)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, None))
    shape = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0].shape
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N"] + list(shape[1:])))
    return m


def _x(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"] + list(shape[1:]))


def on_grid(rng, shape, s, z, lo, hi, qtype=U8):
    """Float inputs exactly representable with scale s and zero point z, spread over
    integers in [lo, hi] (beyond the type's range where lo/hi are, so some clip). The range
    limits themselves are left out: there the float model's Clip has a kink."""
    k = rng.integers(lo, hi + 1, size=shape)
    k = np.where(np.isin(k, Q.QRANGE[qtype]), k + 1, k)
    return (np.float32(s) * (k - z).astype(np.float32)).astype(np.float32)


def ste_gradient(model, x, seed):
    e = Explainer(model, canonize=False)
    return e.attribute(x, method="gradient", target=seed, probability=True)


def reference_gradient(model, x, seed, eps=1e-6):
    """Central differences of seed . model(x) in float64: onnxruntime where it has double
    kernels, else onnx's reference evaluator on the model cast to float64."""
    flat, num, double = numeric_gradient(model, {"x": x}, "x", seed, max_elements=10**6)
    if double:
        out = np.zeros(x.size)
        out[flat] = num
        return out.reshape(x.shape)
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(to_double(model))
    x64, s64 = x.astype(np.float64), seed.astype(np.float64)
    out = np.zeros(x.size)
    for i in range(x.size):
        xp, xm = x64.copy().reshape(-1), x64.copy().reshape(-1)
        xp[i] += eps
        xm[i] -= eps
        fp = ev.run(None, {"x": xp.reshape(x.shape)})[0]
        fm = ev.run(None, {"x": xm.reshape(x.shape)})[0]
        out[i] = float((s64 * (fp - fm)).sum() / (2 * eps))
    return out.reshape(x.shape)


def assert_convention(qmodel, fmodel, x, rng, atol=1e-4):
    seed = rng.normal(size=Explainer(qmodel, canonize=False).predict(x).shape).astype(np.float32)
    got = ste_gradient(qmodel, x, seed)
    want = reference_gradient(fmodel, x, seed)
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)
    return got


def clip_node(inp, out, s, z, qtype, nodes, inits, tag):
    lo, hi = Q.QRANGE[qtype]
    s, z = np.asarray(s, np.float64), np.asarray(z, np.float64)
    inits += [_init(f"{tag}_lo", (s * (lo - z)).astype(np.float32)),
              _init(f"{tag}_hi", (s * (hi - z)).astype(np.float32))]
    nodes.append(helper.make_node("Clip", [inp, f"{tag}_lo", f"{tag}_hi"], [out]))


def qparams(tag, s, z, qtype):
    dt = np.uint8 if qtype == U8 else np.int8
    return [_init(f"{tag}_s", np.float32(s)), _init(f"{tag}_z", dt(z))]


# ----------------------------------------------------------------------------- registry


def test_rules_are_looked_up_by_domain():
    qgemm = helper.make_node("QGemm", [], [], domain=Q.MS)
    assert lookup(qgemm) is Q.qgemm
    assert lookup("QGemm") is None  # no such operator in the default domain
    assert lookup("QGemm", domain=Q.MS) is Q.qgemm
    assert lookup(helper.make_node("Relu", [], [])) is lookup("Relu") is not None
    assert lookup(helper.make_node("Relu", [], [], domain="ai.onnx")) is lookup("Relu")


# ----------------------------------------------------------------------------- Q / DQ pairs


@pytest.mark.parametrize("qtype,z", [(U8, 128), (U8, 0), (I8, 0), (I8, -100)])
def test_a_quantize_dequantize_pair_is_the_identity_inside_the_range_and_zero_where_clipped(qtype, z):
    rng = np.random.default_rng(0)
    s = 0.02
    nodes = [helper.make_node("QuantizeLinear", ["x", "q_s", "q_z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "q_s", "q_z"], ["y"])]
    m = _model(nodes, [_x("x", (3, 40))], "y", qparams("q", s, z, qtype))
    lo, hi = Q.QRANGE[qtype]
    x = on_grid(rng, (3, 40), s, z, lo - 30, hi + 30)
    seed = rng.normal(size=x.shape).astype(np.float32)
    got = ste_gradient(m, x, seed)
    inside = (x / np.float32(s) + z >= lo) & (x / np.float32(s) + z <= hi)
    assert 0 < inside.mean() < 1
    np.testing.assert_allclose(got, np.where(inside, seed, 0), rtol=1e-6, atol=0)


def test_per_axis_quantization_rescales_and_clips_per_channel():
    # Q with per-channel scales, DQ with other per-channel scales: d/dx = s_dq / s_q inside.
    rng = np.random.default_rng(1)
    sq = np.array([0.01, 0.05, 0.2], np.float32)
    zq = np.array([0, 10, 250], np.uint8)
    sd = np.array([0.5, 2.0, 3.0], np.float32)
    nodes = [helper.make_node("QuantizeLinear", ["x", "sq", "zq"], ["q"], axis=1),
             helper.make_node("DequantizeLinear", ["q", "sd", "zq"], ["y"], axis=1)]
    m = _model(nodes, [_x("x", (2, 3, 5))], "y", [_init("sq", sq), _init("zq", zq), _init("sd", sd)])
    x = rng.normal(scale=4.0, size=(2, 3, 5)).astype(np.float32)
    seed = rng.normal(size=x.shape).astype(np.float32)
    t = x / sq[:, None] + zq[:, None]
    inside = (t >= 0) & (t <= 255)
    assert 0 < inside.mean() < 1
    want = np.where(inside, seed * (sd / sq)[:, None], 0)
    np.testing.assert_allclose(ste_gradient(m, x, seed), want, rtol=1e-6)


def test_blocked_quantization_repeats_each_scale_over_its_block():
    rng = np.random.default_rng(2)
    sq = rng.uniform(0.01, 0.1, size=(2, 3)).astype(np.float32)  # 8 columns, blocks of 3: 3 blocks
    nodes = [helper.make_node("QuantizeLinear", ["x", "sq"], ["q"], axis=1, block_size=3),
             helper.make_node("DequantizeLinear", ["q", "sq"], ["y"], axis=1, block_size=3)]
    g = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                          initializer=[_init("sq", sq)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    x = rng.normal(scale=4.0, size=(2, 8)).astype(np.float32)
    seed = rng.normal(size=x.shape).astype(np.float32)
    full = np.repeat(sq, 3, axis=1)[:, :8]
    inside = (x / full >= 0) & (x / full <= 255)  # uint8, zero point 0
    assert 0 < inside.mean() < 1
    np.testing.assert_allclose(ste_gradient(m, x, seed), np.where(inside, seed, 0), rtol=1e-6)


def test_dynamic_quantize_dequantize_is_the_identity():
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    m = _model(nodes, [_x("x", (3, 7))], "y", [])
    x = rng.normal(size=(3, 7)).astype(np.float32)
    seed = rng.normal(size=x.shape).astype(np.float32)
    np.testing.assert_allclose(ste_gradient(m, x, seed), seed, rtol=1e-5, atol=1e-6)


def test_fp16_island_gradient_comes_back_as_float32_through_the_casts():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(6, 4)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
             helper.make_node("MatMul", ["h", "w"], ["m"]), helper.make_node("Tanh", ["m"], ["t"]),
             helper.make_node("Cast", ["t"], ["y"], to=TensorProto.FLOAT)]
    m = _model(nodes, [_x("x", (3, 6))], "y", [_init("w", w)])
    x = rng.normal(size=(3, 6)).astype(np.float32)
    seed = rng.normal(size=(3, 4)).astype(np.float32)
    got = ste_gradient(m, x, seed)
    assert got.dtype == np.float32
    t = np.tanh(x.astype(np.float16).astype(np.float64) @ w.astype(np.float64))
    np.testing.assert_allclose(got, (seed * (1 - t**2)) @ w.astype(np.float64).T, rtol=2e-2, atol=2e-2)


def test_a_cast_to_an_integer_type_truncates_and_passes_no_gradient():
    nodes = [helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT32),
             helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT)]
    m = _model(nodes, [_x("x", (2, 3))], "y", [])
    x = np.array([[0.2, 1.7, -2.4], [3.1, 0.0, 5.5]], np.float32)
    np.testing.assert_array_equal(ste_gradient(m, x, np.ones((2, 3), np.float32)), 0)


# ----------------------------------------------------------------------------- integer ops


def _dynamic_linear(rng, per_column):
    """x -> DynamicQuantizeLinear -> MatMulInteger(W int8) -> Cast -> * (s_x s_w): the
    pattern of onnxruntime's quantize_dynamic; its float counterpart is x @ W_dequantized."""
    wq = rng.integers(-127, 128, size=(6, 4)).astype(np.int8)
    ws = rng.uniform(0.01, 0.05, size=4 if per_column else ()).astype(np.float32)
    wz = rng.integers(-5, 5, size=4 if per_column else ()).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ws"], ["scale"]), helper.make_node("Mul", ["accf", "scale"], ["y"])]
    m = _model(nodes, [_x("x", (3, 6))], "y", [_init("wq", wq), _init("ws", ws), _init("wz", wz)])
    wd = (wq.astype(np.float64) - wz.astype(np.float64)) * ws.astype(np.float64)
    return m, wd


@pytest.mark.parametrize("per_column", [False, True])
def test_matmul_integer_differentiates_as_the_matmul_of_the_dequantized_weight(per_column):
    rng = np.random.default_rng(5)
    m, wd = _dynamic_linear(rng, per_column)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    seed = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(ste_gradient(m, x, seed), seed @ wd.T, rtol=1e-5, atol=1e-6)


def test_matmul_integer_of_two_activations_differentiates_both():
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("Transpose", ["xq"], ["xt"], perm=[0, 2, 1]),
             helper.make_node("MatMulInteger", ["xq", "xt", "xz", "xz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "xs"], ["scale"]), helper.make_node("Mul", ["accf", "scale"], ["y"])]
    m = _model(nodes, [_x("x", (2, 3, 4))], "y", [])
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    seed = rng.normal(size=(2, 3, 3)).astype(np.float32)
    # y = xd xd^T with xd the dequantized x: d(seed . y)/dx = (seed + seed^T) xd
    lo, hi = x.min(), x.max()
    scale = (max(hi, 0) - min(lo, 0)) / 255
    zp = np.clip(np.round(-min(lo, 0) / scale), 0, 255)
    xd = (np.clip(np.round(x / scale) + zp, 0, 255) - zp) * scale
    want = (seed + seed.transpose(0, 2, 1)) @ xd
    np.testing.assert_allclose(ste_gradient(m, x, seed), want, rtol=1e-5, atol=1e-5)


def test_conv_integer_differentiates_as_the_conv_of_the_dequantized_weight():
    rng = np.random.default_rng(7)
    wq = rng.integers(0, 256, size=(4, 3, 3, 3)).astype(np.uint8)
    wz = np.uint8(128)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("ConvInteger", ["xq", "wq", "xz", "wz"], ["acc"], strides=[2, 2], pads=[1, 0, 1, 1]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "xs"], ["y"])]
    m = _model(nodes, [_x("x", (2, 3, 7, 8))], "y", [_init("wq", wq), _init("wz", wz)])
    fnodes = [helper.make_node("Conv", ["x", "wd"], ["y"], strides=[2, 2], pads=[1, 0, 1, 1])]
    f = _model(fnodes, [_x("x", (2, 3, 7, 8))], "y", [_init("wd", wq.astype(np.float32) - 128)])
    x = rng.normal(size=(2, 3, 7, 8)).astype(np.float32)
    seed = rng.normal(size=Explainer(m, canonize=False).predict(x).shape).astype(np.float32)
    np.testing.assert_allclose(ste_gradient(m, x, seed), reference_gradient(f, x, seed), rtol=1e-4, atol=1e-3)


def _qop_case(op, attrs, weights, float_nodes, float_inits, out_s, out_z, in_s=0.05, in_z=128, ms=False,
              shape=(2, 3, 6, 6), extra_inputs=None):
    """x -> Q(in) -> op(...) -> DQ(out) and its float counterpart x -> Clip -> float nodes
    (reading 'xc', writing 'r') -> Clip(out)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "in_s", "in_z"], ["xq"])]
    nodes.append(helper.make_node(op, extra_inputs(["xq", "in_s", "in_z"]), ["yq"], domain=Q.MS if ms else "",
                                  **attrs))
    nodes.append(helper.make_node("DequantizeLinear", ["yq", "out_s", "out_z"], ["y"]))
    inits = qparams("in", in_s, in_z, U8) + qparams("out", out_s, out_z, U8) + weights
    qm = _model(nodes, [_x("x", shape)], "y", inits, ms=ms)
    fn, fi = [], list(float_inits)
    clip_node("x", "xc", in_s, in_z, U8, fn, fi, "cin")
    fn += float_nodes
    clip_node("r", "y", out_s, out_z, U8, fn, fi, "cout")
    return qm, _model(fn, [_x("x", shape)], "y", fi)


@pytest.mark.parametrize("per_channel", [False, True])
def test_qlinear_conv_is_the_float_conv_of_dequantized_operands_clipped_at_the_output_range(per_channel):
    rng = np.random.default_rng(8)
    wq = rng.integers(-127, 128, size=(4, 3, 3, 3)).astype(np.int8)
    ws = rng.uniform(0.005, 0.02, size=4 if per_channel else ()).astype(np.float32)
    bias = rng.integers(-300, 300, size=4).astype(np.int32)
    in_s = 0.05
    conv = dict(strides=[2, 1], pads=[1, 1, 0, 1], dilations=[1, 2])
    weights = [_init("wq", wq), _init("ws", ws), _init("wz", np.zeros(ws.shape, np.int8)), _init("bq", bias)]
    wd = wq.astype(np.float32) * ws.reshape(-1, 1, 1, 1)
    bd = (bias * in_s * ws).astype(np.float32)
    qm, fm = _qop_case("QLinearConv", conv, weights,
                       [helper.make_node("Conv", ["xc", "wd", "bd"], ["r"], **conv)],
                       [_init("wd", wd), _init("bd", bd)], out_s=0.01, out_z=100, in_s=in_s,
                       extra_inputs=lambda xin: xin + ["wq", "ws", "wz", "out_s", "out_z", "bq"])
    x = on_grid(rng, (2, 3, 6, 6), in_s, 128, -20, 280)
    assert_convention(qm, fm, x, rng)


def test_qlinear_conv_after_a_tensor_of_unknown_shape_fixes_its_size_at_run_time():
    # After com.microsoft operators onnx's shape inference knows no shapes: the adjoint's
    # spatial size is cropped/padded at run time. Stride 2 on 7 columns leaves one unread.
    rng = np.random.default_rng(9)
    wq = rng.integers(-127, 128, size=(2, 3, 3, 3)).astype(np.int8)
    conv = dict(strides=[2, 2], pads=[0, 1, 0, 0])
    weights = [_init("wq", wq), _init("ws", np.float32(0.01)), _init("wz", np.int8(0))]
    qm, fm = _qop_case("QLinearConv", conv, weights,
                       [helper.make_node("Conv", ["xc", "wd"], ["r"], **conv)],
                       [_init("wd", wq.astype(np.float32) * 0.01)], out_s=0.02, out_z=128,
                       shape=(2, 3, 7, 7), extra_inputs=lambda xin: xin + ["wq", "ws", "wz", "out_s", "out_z"])
    e = Explainer(qm, canonize=False)
    b = _builder_without_shapes(e, "xq")
    node = next(n for n in e.graph.nodes if n.op_type == "QLinearConv")
    gx = Q._conv_adjoint(b, node, "g", wq.astype(np.float32), "test")
    assert any(n.op_type == "Pad" for n in b.nodes) and gx
    x = on_grid(rng, (2, 3, 7, 7), 0.05, 128, -20, 280)
    assert_convention(qm, fm, x, rng)  # (with shapes) and the run-time geometry below
    _run_time_geometry_agrees(qm, x, rng)


def _builder_without_shapes(e, hide):
    from onnxplain.rules.base import Builder

    b = Builder(e.graph)
    real_shape = b.shape
    b.shape = lambda name: None if name == hide else real_shape(name)
    return b


def _run_time_geometry_agrees(qm, x, rng):
    """The explainer compiled as if the quantized input's shape were unknown gives the same
    gradient as the one compiled with shapes."""
    import onnxplain.rules.base as base

    seed = rng.normal(size=Explainer(qm, canonize=False).predict(x).shape).astype(np.float32)
    want = ste_gradient(qm, x, seed)
    real = base.Builder.shape
    base.Builder.shape = lambda self, name: None if name == "xq" else real(self, name)
    try:
        got = ste_gradient(qm, x, seed)
    finally:
        base.Builder.shape = real
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trans_b,per_column", [(0, False), (1, True)])
def test_qgemm_is_the_float_gemm_of_dequantized_operands(trans_b, per_column):
    rng = np.random.default_rng(10)
    k, n = 6, 5
    wq = rng.integers(-127, 128, size=(n, k) if trans_b else (k, n)).astype(np.int8)
    ws = rng.uniform(0.01, 0.04, size=n if per_column else ()).astype(np.float32)
    c = rng.integers(-500, 500, size=n).astype(np.int32)
    in_s, alpha = 0.05, 0.7
    weights = [_init("wq", wq), _init("ws", ws), _init("wz", np.zeros(ws.shape, np.int8)), _init("cq", c)]
    wf = wq.astype(np.float32) * (ws.reshape(-1, 1) if trans_b and per_column else ws)
    cd = (c * in_s * ws).astype(np.float32)
    qm, fm = _qop_case("QGemm", dict(transB=trans_b, alpha=alpha), weights,
                       [helper.make_node("Gemm", ["xc", "wd", "cd"], ["r"], transB=trans_b, alpha=alpha)],
                       [_init("wd", wf), _init("cd", cd)], out_s=0.03, out_z=128, in_s=in_s, ms=True, shape=(3, k),
                       extra_inputs=lambda xin: xin + ["wq", "ws", "wz", "cq", "out_s", "out_z"])
    x = on_grid(rng, (3, k), in_s, 128, -20, 280)
    assert_convention(qm, fm, x, rng)


def test_qgemm_with_a_float_output_is_not_requantized():
    rng = np.random.default_rng(11)
    wq = rng.integers(-127, 128, size=(6, 4)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "in_s", "in_z"], ["xq"]),
             helper.make_node("QGemm", ["xq", "in_s", "in_z", "wq", "ws", "wz"], ["y"], domain=Q.MS)]
    m = _model(nodes, [_x("x", (3, 6))], "y", qparams("in", 0.05, 128, U8) +
               [_init("wq", wq), _init("ws", np.float32(0.02)), _init("wz", np.int8(0))], ms=True)
    x = on_grid(rng, (3, 6), 0.05, 128, 10, 250)
    seed = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(ste_gradient(m, x, seed), seed @ (wq.astype(np.float64) * 0.02).T, rtol=1e-5,
                               atol=1e-6)


def test_qlinear_matmul_is_the_float_matmul_of_dequantized_operands():
    rng = np.random.default_rng(12)
    wq = rng.integers(0, 256, size=(6, 4)).astype(np.uint8)
    ws = rng.uniform(0.01, 0.04, size=4).astype(np.float32)  # per column
    wz = np.full(4, 128, np.uint8)
    weights = [_init("wq", wq), _init("ws", ws), _init("wz", wz)]
    wd = (wq.astype(np.float32) - 128) * ws
    qm, fm = _qop_case("QLinearMatMul", {}, weights, [helper.make_node("MatMul", ["xc", "wd"], ["r"])],
                       [_init("wd", wd)], out_s=0.03, out_z=128, shape=(2, 3, 6),
                       extra_inputs=lambda xin: xin + ["wq", "ws", "wz", "out_s", "out_z"])
    x = on_grid(rng, (2, 3, 6), 0.05, 128, -20, 280)
    assert_convention(qm, fm, x, rng)


def _binary_case(op, float_op, rng, shape_b, const_b):
    """C = op(x, B) with B a constant, or B = x's quantized square (both operands vary)."""
    bs, bz = 0.04, 120
    nodes = [helper.make_node("QuantizeLinear", ["x", "in_s", "in_z"], ["xq"])]
    fn, fi = [], []
    clip_node("x", "xc", 0.05, 128, U8, fn, fi, "cin")
    inits = qparams("in", 0.05, 128, U8) + qparams("out", 0.06, 100, U8) + qparams("b", bs, bz, U8)
    if const_b:
        bq = rng.integers(0, 256, size=shape_b).astype(np.uint8)
        inits.append(_init("bq", bq))
        fi.append(_init("bd", (bs * (bq.astype(np.float32) - bz)).astype(np.float32)))
    else:  # B = x * 0.8 quantized with its own parameters
        inits.append(_init("k", np.float32(0.8)))
        nodes += [helper.make_node("DequantizeLinear", ["xq", "in_s", "in_z"], ["xd"]),
                  helper.make_node("Mul", ["xd", "k"], ["bf"]),
                  helper.make_node("QuantizeLinear", ["bf", "b_s", "b_z"], ["bq"])]
        fi.append(_init("k", np.float32(0.8)))
        fn.append(helper.make_node("Mul", ["xc", "k"], ["bf"]))
        clip_node("bf", "bd", bs, bz, U8, fn, fi, "cb")
    nodes += [helper.make_node(op, ["xq", "in_s", "in_z", "bq", "b_s", "b_z", "out_s", "out_z"], ["yq"], domain=Q.MS),
              helper.make_node("DequantizeLinear", ["yq", "out_s", "out_z"], ["y"])]
    fn.append(helper.make_node(float_op, ["xc", "bd"], ["r"]))
    clip_node("r", "y", 0.06, 100, U8, fn, fi, "cout")
    return (_model(nodes, [_x("x", (2, 3, 4))], "y", inits, ms=True), _model(fn, [_x("x", (2, 3, 4))], "y", fi))


@pytest.mark.parametrize("op,float_op", [("QLinearAdd", "Add"), ("QLinearMul", "Mul")])
@pytest.mark.parametrize("shape_b,const_b", [((4,), True), ((3, 1), True), (None, False)])
def test_qlinear_add_and_mul_differentiate_as_float_with_broadcasting(op, float_op, shape_b, const_b):
    rng = np.random.default_rng(13)
    qm, fm = _binary_case(op, float_op, rng, shape_b, const_b)
    # With B = 0.8 x requantized at scale 0.04, x = 0.05 k gives B = 0.04 k: on B's grid too,
    # so the float model sees the same B.
    x = on_grid(rng, (2, 3, 4), 0.05, 128, -20, 280)
    assert_convention(qm, fm, x, rng)


@pytest.mark.parametrize("op,float_nodes,attrs", [
    ("QLinearSigmoid", [("Sigmoid", {})], {}),
    ("QLinearLeakyRelu", [("LeakyRelu", {"alpha": 0.2})], {"alpha": 0.2}),
    ("QLinearGlobalAveragePool", [("GlobalAveragePool", {})], {"channels_last": 0}),
    ("QLinearAveragePool", [("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})],
     {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
])
def test_qlinear_unary_operators_differentiate_as_their_float_counterparts(op, float_nodes, attrs):
    rng = np.random.default_rng(14)
    (fop, fattrs), = float_nodes
    out_s, out_z = (0.002, 0) if op == "QLinearSigmoid" else (0.02, 128)
    qm, fm = _qop_case(op, attrs, [], [helper.make_node(fop, ["xc"], ["r"], **fattrs)], [], out_s=out_s,
                       out_z=out_z, ms=True, extra_inputs=lambda xin: xin + ["out_s", "out_z"])
    x = on_grid(rng, (2, 3, 6, 6), 0.05, 128, -20, 280)
    assert_convention(qm, fm, x, rng)


@pytest.mark.parametrize("include_pad", [0, 1])
def test_qlinear_average_pool_of_unknown_input_shape_spreads_at_run_time(include_pad):
    rng = np.random.default_rng(17)
    pool = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "count_include_pad": include_pad}
    qm, fm = _qop_case("QLinearAveragePool", pool, [], [helper.make_node("AveragePool", ["xc"], ["r"], **pool)], [],
                       out_s=0.02, out_z=128, ms=True, shape=(2, 2, 5, 6),
                       extra_inputs=lambda xin: xin + ["out_s", "out_z"])
    x = on_grid(rng, (2, 2, 5, 6), 0.05, 128, -20, 280)
    assert_convention(qm, fm, x, rng)
    _run_time_geometry_agrees(qm, x, rng)


def test_qlinear_concat_splits_the_gradient_between_its_inputs():
    rng = np.random.default_rng(15)
    nodes = [helper.make_node("QuantizeLinear", ["x", "in_s", "in_z"], ["xq"]),
             helper.make_node("QuantizeLinear", ["x2", "b_s", "b_z"], ["x2q"]),
             helper.make_node("QLinearConcat", ["out_s", "out_z", "xq", "in_s", "in_z", "x2q", "b_s", "b_z"], ["yq"],
                              domain=Q.MS, axis=1),
             helper.make_node("DequantizeLinear", ["yq", "out_s", "out_z"], ["y"])]
    fn, fi = [], []
    clip_node("x", "xc", 0.05, 128, U8, fn, fi, "cin")
    fi.append(_init("two", np.float32(2.0)))
    fn += [helper.make_node("Mul", ["xc", "two"], ["x2"])]
    clip_node("x2", "x2c", 0.1, 128, U8, fn, fi, "cb")
    fn.append(helper.make_node("Concat", ["xc", "x2c"], ["r"], axis=1))
    clip_node("r", "y", 0.06, 128, U8, fn, fi, "cout")
    two = [helper.make_node("Mul", ["x", "two"], ["x2"])]
    inits = qparams("in", 0.05, 128, U8) + qparams("b", 0.1, 128, U8) + qparams("out", 0.06, 128, U8) + \
        [_init("two", np.float32(2.0))]
    qm = _model(two + nodes, [_x("x", (2, 3, 4))], "y", inits, ms=True)
    fm = _model(fn, [_x("x", (2, 3, 4))], "y", fi)
    x = on_grid(rng, (2, 3, 4), 0.05, 128, -20, 280)
    assert_convention(qm, fm, x, rng)


def test_dynamic_quantize_matmul_differentiates_as_the_float_matmul():
    rng = np.random.default_rng(16)
    wq = rng.integers(-127, 128, size=(6, 4)).astype(np.int8)
    ws = rng.uniform(0.01, 0.04, size=4).astype(np.float32)
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "wq", "ws"], ["y"], domain=Q.MS)]
    m = _model(nodes, [_x("x", (1, 3, 6))], "y", [_init("wq", wq), _init("ws", ws)], ms=True)
    x = rng.normal(size=(1, 3, 6)).astype(np.float32)  # one sample: A is quantized with one scale per batch
    seed = rng.normal(size=(1, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(ste_gradient(m, x, seed), seed @ (wq.astype(np.float64) * ws).T, rtol=1e-5,
                               atol=1e-6)


def test_float8_quantization_is_refused_by_name():
    if not hasattr(TensorProto, "FLOAT8E4M3FN"):
        pytest.skip("onnx without float8")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    z = helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])
    g = helper.make_graph(nodes, "q", [_x("x", (2, 3))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                          initializer=[_init("s", np.float32(0.1)), z])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    with pytest.raises(ModelError, match="FLOAT8E4M3FN"):
        ste_gradient(m, np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32))


# ----------------------------------------------------------------------------- real quantized models


class _RandomReader:
    """Calibration data for onnxruntime's static quantization: random inputs."""

    def __init__(self, shape, n=32):
        rng = np.random.default_rng(0)
        self._it = iter([{"input": rng.normal(size=(1,) + shape).astype(np.float32)} for _ in range(n)])

    def get_next(self):
        return next(self._it, None)


VARIANTS = ("dynamic", "qdq", "qdq_per_channel", "qoperator", "qoperator_per_channel")


@pytest.fixture(scope="module")
def quantized_zoo(tmp_path_factory):
    """name -> {variant: path} for zoo models quantized by onnxruntime's own tools."""
    import zoo
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    d = tmp_path_factory.mktemp("quantized")
    out = {}
    for name in ("mlp", "vgg", "resnet", "densenet"):
        model = zoo.build(name)
        src = zoo.export(model, d / f"{name}.onnx", "torchscript")
        paths = {"float": src}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(src), str(d / f"{name}.dynamic.onnx"), weight_type=QuantType.QInt8)
            paths["dynamic"] = d / f"{name}.dynamic.onnx"
            for fmt in ("qdq", "qoperator"):
                for pc in (False, True):
                    key = fmt + ("_per_channel" if pc else "")
                    quantize_static(str(src), str(d / f"{name}.{key}.onnx"), _RandomReader(type(model).shape),
                                    quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                                    per_channel=pc)
                    paths[key] = d / f"{name}.{key}.onnx"
        out[name] = (type(model).shape, paths)
    return out


def dequantized_float_model(path) -> onnx.ModelProto:
    """The float model of a QDQ model, built by hand: each DequantizeLinear of a constant
    becomes its dequantized value, each QuantizeLinear -> DequantizeLinear pair on an
    activation becomes Clip to the pair's representable range."""
    m = onnx.load(str(path))
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            inits[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    nodes, new_inits = [], []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q, s = inits[n.input[0]].astype(np.float64), inits[n.input[1]].astype(np.float64)
            z = inits[n.input[2]].astype(np.float64) if len(n.input) > 2 else np.zeros(())
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if s.size > 1:
                shape[axis] = -1
            new_inits.append(numpy_helper.from_array(((q - z.reshape(shape if z.size > 1 else ()))
                                                      * s.reshape(shape if s.size > 1 else ())).astype(np.float32),
                                                     n.output[0]))
        elif n.op_type == "DequantizeLinear":
            qn = producer[n.input[0]]
            assert qn.op_type == "QuantizeLinear" and list(qn.input[1:]) == list(n.input[1:])
            s, z = inits[n.input[1]].astype(np.float64), inits[n.input[2]].astype(np.float64)
            lo, hi = Q.QRANGE[helper.np_dtype_to_tensor_dtype(inits[n.input[2]].dtype)]
            new_inits += [numpy_helper.from_array(np.float32(s * (lo - z)), n.output[0] + "_lo"),
                          numpy_helper.from_array(np.float32(s * (hi - z)), n.output[0] + "_hi")]
            nodes.append(helper.make_node("Clip", [qn.input[0], n.output[0] + "_lo", n.output[0] + "_hi"],
                                          [n.output[0]], name=n.name))
        elif n.op_type != "QuantizeLinear":
            nodes.append(n)
    used = {i for n in nodes for i in n.input}
    keep = [t for t in g.initializer if t.name in used and t.name not in {t.name for t in new_inits}]
    graph = helper.make_graph(nodes, g.name, list(g.input), list(g.output), initializer=keep + new_inits)
    out = helper.make_model(graph, opset_imports=list(m.opset_import))
    out.ir_version = m.ir_version
    return out


def _inputs(shape, seed):
    """Inputs inside the calibrated ranges (narrower than the calibration data): outside
    them the quantized model saturates, and a saturated logit has gradient 0, rightly."""
    return np.random.default_rng(seed).normal(scale=0.7, size=(4,) + shape).astype(np.float32)


def _middle_classes(model, x):
    """Per sample the class whose quantized logit is the median one: the largest logit of a
    model calibrated on a few random inputs is often saturated at the top of its range."""
    e = Explainer(str(model))
    logits = np.concatenate([e.predict(x[i:i + 1]) for i in range(len(x))])
    return np.argsort(logits, axis=1)[:, logits.shape[1] // 2]


def _gradients(model, x, classes):
    # One sample at a time: dynamic quantization computes one scale for the whole batch,
    # so a sample's output depends on the others in its batch.
    e = Explainer(model)
    return np.concatenate([e.attribute(x[i:i + 1], method="gradient", target=int(c)).reshape(1, -1)
                           for i, c in enumerate(classes)]).astype(np.float64)


def _agreement(a, b):
    """Per sample: relative error |a - b| / |b| and Pearson correlation."""
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    corr = np.array([np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)])
    return rel, corr


# Measured (4 inputs each): mlp relative error 0 (equal to float rounding); resnet median
# 0.13 (0.08-0.31), correlation >= 0.952; densenet median 0.18 (0.12-0.22), correlation >= 0.977.
DEQUANTIZED_TOLERANCE = {"mlp": (1e-4, 0.9999), "resnet": (0.25, 0.94), "densenet": (0.3, 0.96)}


@pytest.mark.parametrize("name", ["mlp", "resnet", "densenet"])
@pytest.mark.parametrize("variant", ["qdq", "qdq_per_channel"])
def test_ste_gradient_of_a_qdq_model_is_the_gradient_of_its_dequantized_float_model(quantized_zoo, name, variant):
    # Both models have the same weights and clip at the same ranges; the quantized one's
    # activations are rounded, which moves the derivative of a nonlinearity (ReLU, BatchNorm
    # folded or not, max-pool winners) only where a value lies within half a step of a kink.
    # A linear path (the MLP's Gemms between clips) gives the same gradient to rounding.
    shape, paths = quantized_zoo[name]
    x = _inputs(shape, 20)
    classes = _middle_classes(paths[variant], x)
    ste = _gradients(str(paths[variant]), x, classes)
    ref = _gradients(dequantized_float_model(paths[variant]), x, classes)
    rel, corr = _agreement(ste, ref)
    print(f"{name} {variant} vs dequantized float: relative error {np.round(rel, 4)}, correlation {np.round(corr, 4)}")
    max_rel, min_corr = DEQUANTIZED_TOLERANCE[name]
    assert np.all(np.abs(ste).sum(axis=1) > 0)
    assert np.median(rel) < max_rel and np.all(corr > min_corr), (rel, corr)


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet", "densenet"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_ste_gradient_of_a_quantized_model_is_close_to_the_float_models(quantized_zoo, name, variant):
    shape, paths = quantized_zoo[name]
    x = _inputs(shape, 21)
    classes = _middle_classes(paths[variant], x)
    if name == "densenet" and variant.startswith("qoperator"):
        # After QLinearConcat (com.microsoft) onnx's shape inference types no tensor, and
        # the float BatchNormalization rule that follows needs its input's rank: refused by
        # name, never answered with a zero (until the graph types com.microsoft outputs:
        # onnxplain.contrib_types, tests/test_contrib_types.py).
        try:
            ste = _gradients(str(paths[variant]), x, classes)
        except ModelError as exc:
            assert "rank of tensor" in str(exc)
            return
    else:
        ste = _gradients(str(paths[variant]), x, classes)
    ref = _gradients(str(paths["float"]), x, classes)
    rel, corr = _agreement(ste, ref)
    print(f"{name} {variant}: relative error {np.round(rel, 3)}, correlation {np.round(corr, 3)}")
    assert np.all(corr > 0.8), (rel, corr)


def test_cli_explain_states_the_convention_once_for_a_quantized_model(quantized_zoo, tmp_path):
    from click.testing import CliRunner

    from onnxplain import cli

    shape, paths = quantized_zoo["mlp"]
    np.save(tmp_path / "x.npy", _inputs(shape, 22))
    runner = CliRunner()
    quantized = runner.invoke(cli.main, ["explain", str(paths["qdq"]), str(tmp_path / "x.npy"), "--target", "1",
                                         "--out", str(tmp_path / "a.npy")])
    assert quantized.exit_code == 0, quantized.output
    assert quantized.output.count("straight-through") == 1
    plain = runner.invoke(cli.main, ["explain", str(paths["float"]), str(tmp_path / "x.npy"), "--target", "1",
                                     "--out", str(tmp_path / "b.npy")])
    assert plain.exit_code == 0 and "straight-through" not in plain.output
    blackbox = runner.invoke(cli.main, ["explain", str(paths["qdq"]), str(tmp_path / "x.npy"), "--target", "1",
                                        "--method", "occlusion", "--out", str(tmp_path / "c.npy")])
    assert blackbox.exit_code == 0 and "straight-through" not in blackbox.output


@pytest.mark.parametrize("method", ["lrp.epsilon", "excitation_backprop", "deeplift"])
def test_relevance_methods_on_quantized_operators_are_refused_by_name(quantized_zoo, method):
    # LRP and DeepLIFT would reach the straight-through rules through their gradient
    # fallback (an LRP epsilon of 2e15 on the dynamic MLP, before this guard).
    shape, paths = quantized_zoo["mlp"]
    with pytest.raises(ModelError, match="quantized operator"):
        Explainer(str(paths["dynamic"])).attribute(_inputs(shape, 23)[:1], method=method, target=1)


@pytest.mark.parametrize("method", ["guided_backprop", "integrated_gradients", "input_x_gradient"])
def test_gradient_methods_on_a_quantized_model_use_the_convention(quantized_zoo, method):
    shape, paths = quantized_zoo["mlp"]
    x = _inputs(shape, 24)[:1]
    a = Explainer(str(paths["dynamic"])).attribute(x, method=method, target=1)
    assert a.shape == x.shape and np.all(np.isfinite(a)) and np.abs(a).sum() > 0


@pytest.fixture
def annotating_inference(monkeypatch):
    """graph.infer_types with onnxplain.contrib_types.annotate first (the one-line hook that
    graph.py needs): tensors after com.microsoft operators get their shapes."""
    from onnxplain import contrib_types, graph

    plain = graph.infer_types

    def infer(model, **kwargs):
        contrib_types.annotate(model, infer=lambda m: plain(m, **kwargs))
        return plain(model, **kwargs)

    monkeypatch.setattr(graph, "infer_types", infer)


class _LSTMClassifier(__import__("torch").nn.Module):
    def __init__(self):
        import torch

        super().__init__()
        self.lstm = torch.nn.LSTM(6, 8, batch_first=True, bidirectional=True)
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.fc(y[:, -1])


def test_dynamic_quantize_lstm_gradient_is_the_float_lstms_with_dequantized_weights(tmp_path, annotating_inference):
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    model = _LSTMClassifier().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 5, 6),), str(tmp_path / "lstm.onnx"), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
        quantize_dynamic(str(tmp_path / "lstm.onnx"), str(tmp_path / "lstm.int8.onnx"), weight_type=QuantType.QInt8)
    q = onnx.load(str(tmp_path / "lstm.int8.onnx"))
    assert any(n.op_type == "DynamicQuantizeLSTM" for n in q.graph.node)
    # The float model with the quantized model's weights, dequantized by hand.
    qi = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in q.graph.initializer}
    f = onnx.load(str(tmp_path / "lstm.onnx"))
    lstm = next(n for n in q.graph.node if n.op_type == "DynamicQuantizeLSTM")
    deq = {}
    for name, s, z in ((lstm.input[1], lstm.input[8], lstm.input[9]), (lstm.input[2], lstm.input[10], lstm.input[11])):
        w = (qi[name] - qi[z].reshape(-1, 1, 1)) * qi[s].reshape(-1, 1, 1)
        deq[name.replace("_quantized", "")] = w.transpose(0, 2, 1)
    deq["fc.weight"] = ((qi["fc.weight_quantized"] - qi["fc.weight_zero_point"]) * qi["fc.weight_scale"]).T
    for i, t in enumerate(f.graph.initializer):
        if t.name in deq:
            f.graph.initializer[i].CopyFrom(numpy_helper.from_array(deq.pop(t.name).astype(np.float32), t.name))
    assert not deq
    x = np.random.default_rng(25).normal(size=(1, 5, 6)).astype(np.float32)
    seed = np.array([[0.3, -1.0, 0.7]], np.float32)
    got = Explainer(q).attribute(x, method="gradient", target=seed)
    want = Explainer(f).attribute(x, method="gradient", target=seed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # and that float gradient is the float model's (float32 differences: onnxruntime's LSTM has no double kernel)
    np.testing.assert_allclose(want.reshape(-1), numeric_gradient(f, {"input": x}, "input", seed)[1], rtol=1e-2,
                               atol=1e-5)


def test_dynamic_quantize_lstm_without_shapes_downstream_is_refused_by_name_or_explained(tmp_path):
    # Without the graph typing com.microsoft outputs, the float rules after the LSTM lack
    # shapes: a typed refusal; with it (or any other way of knowing the shapes) a gradient.
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_LSTMClassifier().eval(), (torch.randn(2, 5, 6),), str(tmp_path / "lstm.onnx"), dynamo=False,
                          opset_version=17, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}})
        quantize_dynamic(str(tmp_path / "lstm.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8)
    x = np.random.default_rng(32).normal(size=(1, 5, 6)).astype(np.float32)
    try:
        a = Explainer(str(tmp_path / "q.onnx")).attribute(x, method="gradient", target=0)
    except ModelError as exc:
        assert "unknown shapes" in str(exc) or "rank" in str(exc)
        return
    assert np.all(np.isfinite(a)) and np.abs(a).sum() > 0


def _attention_models(rng, mask=None, unidirectional=0, per_column=False, batch=2, steps=4, hidden=8, heads=2):
    """x -> DynamicQuantizeLinear -> QAttention, and its float counterpart written with
    standard operators (dequantized weight), for a mask of None, 'lengths' or 'raw'."""
    wq = rng.integers(-127, 128, size=(hidden, 3 * hidden)).astype(np.int8)
    ws = rng.uniform(0.01, 0.03, size=3 * hidden if per_column else ()).astype(np.float32)
    bias = rng.normal(scale=0.1, size=3 * hidden).astype(np.float32)
    inits = [_init("w", wq), _init("ws", ws), _init("bias", bias)]
    extra = []
    if mask == "lengths":
        inits.append(_init("mask", np.array([steps, steps - 2][:batch], np.int32)))
    elif mask == "raw":
        raw = np.ones((batch, steps), np.int32)
        raw[-1, -1] = 0
        inits.append(_init("mask", raw))
    ins = ["xq", "w", "bias", "xs", "ws", "mask" if mask else "", "xz"]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("QAttention", ins, ["y"], domain=Q.MS, num_heads=heads, unidirectional=unidirectional)]
    g = helper.make_graph(nodes, "qa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, steps, hidden])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, steps, hidden])],
                          initializer=inits + extra)
    qm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(Q.MS, 1)])
    qm.ir_version = 8
    # float counterpart
    size = hidden // heads
    wd = wq.astype(np.float32) * ws
    maskbias = np.zeros((batch, 1, steps, steps), np.float32)
    if mask == "lengths":
        for i, end in enumerate([steps, steps - 2][:batch]):
            maskbias[i, :, :, end:] = -10000.0
    elif mask == "raw":
        maskbias[-1, :, :, -1] = -10000.0
    if unidirectional:
        maskbias = maskbias + np.triu(np.full((steps, steps), -10000.0, np.float32), 1)
    fn = [helper.make_node("MatMul", ["x", "wd"], ["m"]), helper.make_node("Add", ["m", "bias"], ["qkv"]),
          helper.make_node("Split", ["qkv", "parts"], ["q0", "k0", "v0"], axis=-1)]
    for t in ("q", "k", "v"):
        fn += [helper.make_node("Reshape", [t + "0", "hs"], [t + "1"]),
               helper.make_node("Transpose", [t + "1"], [t], perm=[0, 2, 1, 3])]
    fn += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
           helper.make_node("MatMul", ["q", "kt"], ["s0"]), helper.make_node("Mul", ["s0", "scale"], ["s1"]),
           helper.make_node("Add", ["s1", "maskbias"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
           helper.make_node("MatMul", ["p", "v"], ["o0"]),
           helper.make_node("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
           helper.make_node("Reshape", ["o1", "hid"], ["y"])]
    finits = [_init("wd", wd), _init("bias", bias), _init("parts", np.array([hidden] * 3, np.int64)),
              _init("hs", np.array([0, 0, heads, size], np.int64)), _init("scale", np.float32(1 / np.sqrt(size))),
              _init("maskbias", maskbias), _init("hid", np.array([0, 0, hidden], np.int64))]
    g = helper.make_graph(fn, "fa", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, steps, hidden])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, steps, hidden])],
                          initializer=finits)
    fm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    fm.ir_version = 8
    return qm, fm


def _on_dynamic_grid(rng, shape):
    """Inputs that DynamicQuantizeLinear represents exactly: integers 0..255 (both used)
    times the scale their own range gives, shifted by the zero point it computes."""
    k = rng.integers(0, 256, size=shape)
    k.flat[0], k.flat[1] = 0, 255
    s = np.float32(4.0 / 255)
    return (s * (k - 100).astype(np.float32)).astype(np.float32)


@pytest.mark.parametrize("mask,unidirectional,per_column", [(None, 0, False), ("lengths", 0, True), ("raw", 1, False)])
def test_qattention_differentiates_as_float_attention_with_dequantized_weights(mask, unidirectional, per_column):
    rng = np.random.default_rng(26)
    qm, fm = _attention_models(rng, mask, unidirectional, per_column)
    import onnxruntime as ort

    x = _on_dynamic_grid(rng, (2, 4, 8))

    def run(m):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(qm), run(fm), rtol=1e-3, atol=1e-3)  # the float model is QAttention's meaning
    seed = rng.normal(size=(2, 4, 8)).astype(np.float32)
    got = Explainer(qm, canonize=False).attribute(x, method="gradient", target=seed, probability=True)
    np.testing.assert_allclose(got, reference_gradient(fm, x, seed), rtol=1e-3, atol=1e-4)


# ----------------------------------------------------------------------------- run-time parameters


def compiled_gradient(model, wrt, output, feeds, seed):
    """The gradient explainer compiled and run directly (whole tensors, no batch axis)."""
    import onnxruntime as ort

    from onnxplain.compile import compile_explainer
    from onnxplain.graph import Graph, read_model
    from onnxplain.methods.gradients import GRADIENT

    spec = compile_explainer(Graph(read_model(model)), GRADIENT, [wrt], output)
    sess = ort.InferenceSession(spec.model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([spec.attributions[wrt]], {**feeds, spec.seed: seed})[0]


def test_dynamic_quantization_scale_has_its_exact_gradient():
    # s = (max(x, 0) - min(x, 0)) / 255 moves with the largest and the smallest element only.
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("Identity", ["s"], ["y"])]
    g = helper.make_graph(nodes, "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    x = np.array([[0.3, -1.2, 2.5, 0.1, -0.4], [1.0, 0.2, -0.3, 0.7, 0.05]], np.float32)
    got = compiled_gradient(m, "x", "y", {"x": x}, np.ones((), np.float32))
    want = np.zeros_like(x)
    want[0, 2], want[0, 1] = 1 / 255, -1 / 255
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    flat, num, _ = numeric_gradient(m, {"x": x}, "x", np.ones((), np.float32), eps=1e-3)
    np.testing.assert_allclose(num, want.reshape(-1)[flat], rtol=1e-2, atol=1e-5)


def test_dequantize_linear_scale_and_zero_point_fed_at_run_time_have_their_gradients():
    # x = s (q - z): d/ds = sum g (q - z), per channel with axis; d/dz = -s sum g.
    rng = np.random.default_rng(27)
    q = rng.integers(0, 256, size=(2, 3, 4)).astype(np.uint8)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=1)]
    g = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("s", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
                          initializer=[_init("q", q)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    s = np.array([0.1, 0.2, 0.05], np.float32)
    seed = rng.normal(size=(2, 3, 4)).astype(np.float32)
    got = compiled_gradient(m, "s", "y", {"s": s}, seed)
    np.testing.assert_allclose(got, (seed * q.astype(np.float64)).sum(axis=(0, 2)), rtol=1e-5)


def test_a_consumer_that_cannot_differentiate_a_run_time_scale_refuses_it():
    # QLinearMatMul with DynamicQuantizeLinear's scale: the scale's gradient would be needed
    # for the straight-through terms to cancel, and this rule does not compute it.
    wq = np.ones((4, 3), np.uint8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("QLinearMatMul", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    m = _model(nodes, [_x("x", (1, 4))], "y", [_init("w", wq), _init("ws", np.float32(0.1)), _init("wz", np.uint8(0)),
                                               _init("ys", np.float32(0.1)), _init("yz", np.uint8(0))])
    with pytest.raises(ModelError, match="computed from the input"):
        ste_gradient(m, np.ones((1, 4), np.float32), np.ones((1, 3), np.float32))


def test_integer_arithmetic_on_an_accumulator_passes_the_gradient():
    # MatMulInteger's int32 accumulator plus an int32 bias before the Cast (as some
    # converters write it): the Add must pass the gradient, or only the scale's term (at
    # the largest element) would be left, a wrong answer with no error.
    rng = np.random.default_rng(28)
    wq = rng.integers(-127, 128, size=(6, 4)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"]),
             helper.make_node("Add", ["acc", "bias"], ["acc2"]),
             helper.make_node("Sub", ["acc2", "acc_off"], ["acc3"]),
             helper.make_node("Cast", ["acc3"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "xs"], ["y"])]
    m = _model(nodes, [_x("x", (1, 6))], "y", [_init("wq", wq), _init("wz", np.int8(0)),
                                               _init("bias", np.arange(4, dtype=np.int32)),
                                               _init("acc_off", np.int32(3))])
    x = rng.normal(size=(1, 6)).astype(np.float32)
    seed = rng.normal(size=(1, 4)).astype(np.float32)
    # y = x W + s (bias - 3): the integer bias is in units of the dynamic scale s, which
    # moves with the largest (+1/255) and smallest (-1/255) element of x.
    ds = np.zeros(6)
    ds[x.argmax()], ds[x.argmin()] = 1 / 255, -1 / 255
    want = seed @ wq.astype(np.float64).T + (seed * (np.arange(4) - 3)).sum() * ds
    np.testing.assert_allclose(ste_gradient(m, x, seed), want, rtol=1e-4, atol=1e-5)


def test_a_quantized_tensor_feeding_an_operator_without_integer_gradients_is_refused():
    # Relu on the int32 accumulator: the float Relu rule skips integer inputs, which would
    # cut the path with no error; refused by name instead.
    wq = np.ones((6, 4), np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "wq", "xz", "wz"], ["acc"]),
             helper.make_node("Relu", ["acc"], ["accr"]),
             helper.make_node("Cast", ["accr"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["accf", "xs"], ["y"])]
    m = _model(nodes, [_x("x", (1, 6))], "y", [_init("wq", wq), _init("wz", np.int8(0))])
    with pytest.raises(ModelError, match="Relu"):
        ste_gradient(m, np.ones((1, 6), np.float32), np.ones((1, 4), np.float32))


def _toposorted(model):
    """onnxruntime's float16 converter appends its input casts at the end of the graph."""
    g = model.graph
    have = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in have for i in n.input):
                ordered.append(n)
                have.update(n.output)
            else:
                rest.append(n)
        pending = rest
    del g.node[:]
    g.node.extend(ordered)
    return model


@pytest.mark.parametrize("name", ["vgg", "resnet", "densenet"])
def test_a_float16_model_with_float32_inputs_has_the_float_models_gradient(name, tmp_path):
    # onnxruntime's float16 converter (keep_io_types): float32 in and out, float16 inside,
    # Casts at the borders; the gradient comes back in float32, equal to the float model's
    # to float16 precision (measured 0.2-1.5% relative: float16 rounding moves a few ReLU
    # decisions). VGG's overlapping max-pool scatters in float32.
    import zoo
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = zoo.build(name)
    src = zoo.export(model, tmp_path / f"{name}.onnx", "torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = _toposorted(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True))
    assert all(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer if t.data_type != TensorProto.INT64)
    x = np.random.default_rng(29).normal(size=(2,) + type(model).shape).astype(np.float32)
    got = Explainer(half).attribute(x, method="gradient", target=1)
    want = Explainer(str(src)).attribute(x, method="gradient", target=1)
    assert got.dtype == np.float32
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2


@pytest.mark.parametrize("op,nodes,inits", [
    ("Gather", [helper.make_node("Gather", ["h", "idx"], ["o"], axis=1)], [("idx", np.array([0, 2, 2], np.int64))]),
    ("TopK", [helper.make_node("TopK", ["h", "k"], ["o", "i"], axis=1)], [("k", np.array([2], np.int64))]),
    ("MaxPool", [helper.make_node("Unsqueeze", ["h", "ax"], ["h4"]),
                 helper.make_node("MaxPool", ["h4"], ["o"], kernel_shape=[1, 3], strides=[1, 2])],
     [("ax", np.array([1, 2], np.int64))]),
])
def test_scattering_gradients_in_a_float16_island_run_in_float32(op, nodes, inits):
    rng = np.random.default_rng(30)
    all_nodes = [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16)] + nodes + \
        [helper.make_node("Cast", ["o"], ["y"], to=TensorProto.FLOAT)]
    m = _model(all_nodes, [_x("x", (3, 6))], "y", [_init(k, v) for k, v in inits])
    x = rng.normal(size=(3, 6)).astype(np.float32)
    e = Explainer(m, canonize=False)
    seed = rng.normal(size=e.predict(x).shape).astype(np.float32)
    got = e.attribute(x, method="gradient", target=seed, probability=True)
    assert got.dtype == np.float32
    # the same graph in float32 throughout
    f = onnx.ModelProto()
    f.CopyFrom(m)
    f.graph.node[0].attribute[0].i = TensorProto.FLOAT
    want = Explainer(f, canonize=False).attribute(x, method="gradient", target=seed, probability=True)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_the_builder_records_the_convention_for_the_explainers_metadata(quantized_zoo):
    from onnxplain.compile import compile_explainer
    from onnxplain.graph import Graph, read_model
    from onnxplain.methods.gradients import GRADIENT
    from onnxplain.rules import base

    seen = []
    real = base.Builder.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append(self)

    shape, paths = quantized_zoo["mlp"]
    base.Builder.__init__ = spy
    try:
        graph = Graph(read_model(str(paths["qdq"])))
        compile_explainer(graph.specialize({graph.inputs[0]: (1,) + shape}), GRADIENT, graph.inputs, graph.outputs[0])
    finally:
        base.Builder.__init__ = real
    assert any(Q.CONVENTION in getattr(b, "conventions", ()) for b in seen)


def test_cli_explain_names_inputs_whose_quantized_gradient_is_clipped_to_zero(quantized_zoo, tmp_path):
    from click.testing import CliRunner
    from onnxruntime.quantization import QuantFormat, quantize_static

    from onnxplain import cli

    shape, paths = quantized_zoo["mlp"]
    narrow = tmp_path / "narrow.onnx"
    reader = _RandomReader(shape)
    reader._it = iter([{"input": d["input"] * 0.05} for d in reader._it])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(paths["float"]), str(narrow), reader, quant_format=QuantFormat.QDQ)
    np.save(tmp_path / "x.npy", np.random.default_rng(31).normal(size=(1,) + shape).astype(np.float32))
    r = CliRunner().invoke(cli.main, ["explain", str(narrow), str(tmp_path / "x.npy"), "--out", str(tmp_path / "a.npy")])
    assert r.exit_code == 0, r.output
    # here the hidden layers' ranges clip every path (the logit itself is inside its range)
    assert "gradient is 0 for" in r.output and "clipped to a quantization range" in r.output
    assert not np.any(np.load(tmp_path / "a.npy"))


def test_an_exported_explainer_of_a_quantized_model_states_the_convention(quantized_zoo, tmp_path):
    from onnxplain import Explainer
    from onnxplain.explainer import explainer_metadata

    shape, paths = quantized_zoo["mlp"]
    spec = Explainer(str(paths["qdq"])).export(tmp_path / "e.onnx", method="gradient")
    assert Q.CONVENTION in explainer_metadata(spec.model)["conventions"]
    float_spec = Explainer(str(paths["float"])).export(tmp_path / "f.onnx", method="gradient")
    assert explainer_metadata(float_spec.model)["conventions"] == []


def test_inspect_reports_quantized_operators_missing_for_relevance_composites(quantized_zoo):
    from onnxplain import Explainer
    from onnxplain.compile import unsupported
    from onnxplain.methods import gradients, relevance

    _, paths = quantized_zoo["mlp"]
    e = Explainer(str(paths["dynamic"]))
    lrp_missing = unsupported(e.graph, relevance.zennit_composite("lrp.epsilon"), e.float_inputs, e.explained_tensor())
    assert "MatMulInteger" in lrp_missing or "DynamicQuantizeMatMul" in lrp_missing
    assert unsupported(e.graph, gradients.GRADIENT, e.float_inputs, e.explained_tensor()) == []
