"""Gradients of pooling operators equal finite differences over their attribute
combinations, add up where overlapping windows share a winner, and agree with torch."""

from functools import partial

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from gradcheck import check_gradient, node_model

from onnxplain import Explainer
from onnxplain.compile import Composite, compile_explainer
from onnxplain.graph import Graph


# Conv, ConvTranspose and AveragePool have no double kernels in onnxruntime, so finite
# differences run in float32; being linear, they are still accurate well below gradcheck's
# float32 default tolerance.
LINEAR_TOL = {"rtol": 3e-3, "atol": 3e-3}


def _separated(*shape, seed=0):
    """Random values at least 0.1 apart, so no finite-difference step changes a max pool's
    winner (the float32 fallback steps by 1e-2)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    # Centred on zero but at least 0.03 away from it (Lp pools with p=1 have a kink there).
    values = rng.permutation(n) * 0.1 - 0.1 * (n // 2) + 0.05 + rng.uniform(-0.01, 0.01, n)
    return values.reshape(shape).astype(np.float32)


def _grad(model, x, seed):
    return Explainer(model, canonize=False).attribute(x, method="gradient", target=seed, probability=True)


def _pool_case(dim=2, size=7, k=3, stride=1, pads=None, dil=None, ceil=None, auto_pad=None, batch=2,
               channels=3, **extra):
    """pads: (begin, end), the same on every spatial axis."""
    attrs = {"kernel_shape": [k] * dim, "strides": [stride] * dim, **extra}
    if pads is not None:
        attrs["pads"] = [pads[0]] * dim + [pads[1]] * dim
    if dil is not None:
        attrs["dilations"] = [dil] * dim
    if ceil is not None:
        attrs["ceil_mode"] = ceil
    if auto_pad is not None:
        attrs["auto_pad"] = auto_pad
    return (batch, channels, *([size] * dim)), attrs


# --- MaxPool --------------------------------------------------------------------------------
MAXPOOL_CASES = {
    "k2_s2_even": _pool_case(size=6, k=2, stride=2),
    "k2_s2_odd": _pool_case(size=7, k=2, stride=2),
    "k3_s1_overlap": _pool_case(),
    "k3_s2_overlap_p1": _pool_case(stride=2, pads=(1, 1)),
    "k3_s2_overlap_even_p1": _pool_case(size=8, stride=2, pads=(1, 1)),
    "k3_s3_asym_p0_2": _pool_case(size=8, stride=3, pads=(0, 2)),
    "k1_s2": _pool_case(k=1, stride=2),
    "k2_d2_s1": _pool_case(size=7, k=2, dil=2),
    "k3_d2_s2_p2": _pool_case(size=9, dil=2, stride=2, pads=(2, 2)),
    "k3_s2_ceil": _pool_case(size=8, stride=2, ceil=1),
    "k2_s3_ceil_p1": _pool_case(size=9, k=2, stride=3, ceil=1, pads=(1, 1)),
    "k3_s2_d2_ceil_asym": _pool_case(size=10, stride=2, dil=2, ceil=1, pads=(1, 0)),
    "same_upper_k3_s2_odd": _pool_case(stride=2, auto_pad="SAME_UPPER"),
    "same_upper_k2_s2_even": _pool_case(size=8, k=2, stride=2, auto_pad="SAME_UPPER"),
    "same_lower_k2_s2_odd": _pool_case(k=2, stride=2, auto_pad="SAME_LOWER"),
    "same_lower_k3_s3": _pool_case(size=8, stride=3, auto_pad="SAME_LOWER"),
    "valid_k3_s2": _pool_case(stride=2, auto_pad="VALID"),
    "storage_order_colmajor": _pool_case(stride=2, pads=(1, 1), storage_order=1),
    "batch1": _pool_case(batch=1, stride=2, pads=(1, 1)),
    "batch3": _pool_case(batch=3, stride=2, pads=(0, 1), ceil=1),
    "1d_k3_s2_p1": _pool_case(dim=1, size=11, stride=2, pads=(1, 1)),
    "1d_k2_s3_ceil_d2": _pool_case(dim=1, size=10, k=2, stride=3, ceil=1, dil=2),
    "3d_k2_s2_p1": _pool_case(dim=3, size=5, k=2, stride=2, pads=(1, 0), channels=2),
}


@pytest.mark.parametrize("name", list(MAXPOOL_CASES))
def test_max_pool_gradient(name):
    shape, attrs = MAXPOOL_CASES[name]
    x = _separated(*shape)
    check_gradient(node_model("MaxPool", {"x": x}, attrs), {"x": x})


def test_max_pool_with_indices_output_gradient():
    x = _separated(2, 3, 7, 7)
    m = node_model("MaxPool", {"x": x}, {"kernel_shape": [3, 3], "strides": [2, 2], "storage_order": 1},
                   n_outputs=2)
    check_gradient(m, {"x": x})


def test_overlapping_max_pool_adds_where_windows_share_a_winner():
    # 3x3 windows at stride 2 on 7x7: element (2, 2) lies in the windows of outputs
    # (0,0), (0,1), (1,0), (1,1); planted as the largest value, it wins all four.
    x = _separated(2, 3, 7, 7)
    x[:, :, 2, 2] = 100.0
    m = node_model("MaxPool", {"x": x}, {"kernel_shape": [3, 3], "strides": [2, 2]})
    seed = np.random.default_rng(5).normal(size=(2, 3, 3, 3)).astype(np.float32)
    got = _grad(m, x, seed)
    np.testing.assert_allclose(got[:, :, 2, 2], seed[:, :, :2, :2].sum(axis=(2, 3)), rtol=1e-6)
    check_gradient(m, {"x": x})


def test_max_pool_ties_go_to_the_first_maximum_as_in_torch():
    # Equal values inside a window: one of them takes the whole gradient, the first in
    # row-major order, as torch does.
    x = np.round(np.random.default_rng(3).uniform(0, 2, size=(3, 2, 9, 9))).astype(np.float32)
    m = node_model("MaxPool", {"x": x}, {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]})
    tx = torch.tensor(x, requires_grad=True)
    y = F.max_pool2d(tx, 3, 2, padding=1)
    seed = np.random.default_rng(4).normal(size=tuple(y.shape)).astype(np.float32)
    y.backward(torch.tensor(seed))
    np.testing.assert_allclose(_grad(m, x, seed), tx.grad.numpy(), rtol=1e-6, atol=1e-6)


def test_max_pool_ceil_dilation_agrees_with_torch():
    x = _separated(2, 3, 10, 11)
    attrs = {"kernel_shape": [3, 2], "strides": [2, 3], "pads": [1, 0, 1, 0], "dilations": [2, 1], "ceil_mode": 1}
    m = node_model("MaxPool", {"x": x}, attrs)
    tx = torch.tensor(x, requires_grad=True)
    y = F.max_pool2d(tx, (3, 2), (2, 3), padding=(1, 0), dilation=(2, 1), ceil_mode=True)
    seed = np.random.default_rng(4).normal(size=tuple(y.shape)).astype(np.float32)
    y.backward(torch.tensor(seed))
    np.testing.assert_allclose(_grad(m, x, seed), tx.grad.numpy(), rtol=1e-6, atol=1e-6)


# --- AveragePool ----------------------------------------------------------------------------
AVGPOOL_CASES = {
    "k2_s2_even": _pool_case(size=6, k=2, stride=2),
    "k2_s2_odd": _pool_case(size=7, k=2, stride=2),
    "k3_s1": _pool_case(),
    "k1_s3": _pool_case(k=1, stride=3),
    "k3_s2_p1_excl": _pool_case(stride=2, pads=(1, 1), count_include_pad=0),
    "k3_s2_p1_incl": _pool_case(stride=2, pads=(1, 1), count_include_pad=1),
    "k3_s3_asym_excl": _pool_case(size=8, stride=3, pads=(0, 2), count_include_pad=0),
    "k3_s3_asym_incl": _pool_case(size=8, stride=3, pads=(2, 1), count_include_pad=1),
    "k3_s2_ceil_excl": _pool_case(size=8, stride=2, ceil=1, count_include_pad=0),
    "k3_s2_ceil_incl": _pool_case(size=8, stride=2, ceil=1, count_include_pad=1),
    "k2_s3_ceil_p1_incl": _pool_case(size=9, k=2, stride=3, ceil=1, pads=(1, 1), count_include_pad=1),
    "k3_s2_ceil_p1_excl_even": _pool_case(size=6, stride=2, ceil=1, pads=(1, 1), count_include_pad=0),
    "same_upper_k3_s2_excl": _pool_case(stride=2, auto_pad="SAME_UPPER"),
    "same_upper_k2_s2_incl": _pool_case(k=2, stride=2, auto_pad="SAME_UPPER", count_include_pad=1),
    "same_lower_k2_s2_excl": _pool_case(k=2, stride=2, auto_pad="SAME_LOWER"),
    "same_lower_k3_s3_incl": _pool_case(size=8, stride=3, auto_pad="SAME_LOWER", count_include_pad=1),
    "valid_k3_s2": _pool_case(stride=2, auto_pad="VALID"),
    "batch1": _pool_case(batch=1, stride=2, pads=(1, 1)),
    "batch3_incl": _pool_case(batch=3, stride=2, pads=(0, 1), count_include_pad=1),
    "1d_k3_s2_p1_incl_ceil": _pool_case(dim=1, size=10, stride=2, pads=(1, 1), ceil=1, count_include_pad=1),
    "1d_k2_s1_excl": _pool_case(dim=1, size=9, k=2, pads=(1, 0)),
    "3d_k2_s2_p1_excl": _pool_case(dim=3, size=5, k=2, stride=2, pads=(1, 0), channels=2),
}


@pytest.mark.parametrize("name", list(AVGPOOL_CASES))
def test_average_pool_gradient(name):
    shape, attrs = AVGPOOL_CASES[name]
    x = _separated(*shape)
    check_gradient(node_model("AveragePool", {"x": x}, attrs), {"x": x}, **LINEAR_TOL)


@pytest.mark.parametrize("include", [0, 1], ids=["excl_pad", "incl_pad"])
def test_average_pool_dilated_gradient_opset19(include):
    x = _separated(2, 3, 9, 9)
    attrs = {"kernel_shape": [3, 2], "strides": [2, 2], "dilations": [2, 2], "pads": [2, 1, 1, 0],
             "ceil_mode": 1, "count_include_pad": include}
    check_gradient(node_model("AveragePool", {"x": x}, attrs, opset=19), {"x": x}, **LINEAR_TOL)


@pytest.mark.parametrize("include", [False, True], ids=["excl_pad", "incl_pad"])
@pytest.mark.parametrize("ceil", [False, True], ids=["floor", "ceil"])
def test_average_pool_agrees_with_torch(include, ceil):
    x = _separated(2, 3, 8, 9)
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": int(ceil),
             "count_include_pad": int(include)}
    m = node_model("AveragePool", {"x": x}, attrs)
    tx = torch.tensor(x, requires_grad=True)
    y = F.avg_pool2d(tx, 3, 2, padding=1, ceil_mode=ceil, count_include_pad=include)
    seed = np.random.default_rng(4).normal(size=tuple(y.shape)).astype(np.float32)
    y.backward(torch.tensor(seed))
    np.testing.assert_allclose(_grad(m, x, seed), tx.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_ceil_mode_window_starting_in_the_end_pad_is_dropped_as_in_torch(op):
    # 8 wide, kernel 2, stride 3, pads 1, ceil_mode: a 4th window would start in the end
    # pad. onnxruntime and torch drop it; onnx's shape inference keeps it (a (4, 4) output),
    # so the Explainer cannot run this model: compile and run the explainer directly.
    x = _separated(2, 3, 8, 8)
    attrs = {"kernel_shape": [2, 2], "strides": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1}
    if op == "AveragePool":
        attrs["count_include_pad"] = 1
    m = node_model(op, {"x": x}, attrs)
    ex = compile_explainer(Graph(m).specialize({"x": x.shape}), Composite("gradient"), ["x"], "y0")
    for vi in ex.model.graph.input:  # the declared seed shape is onnx's (4, 4)
        if vi.name == ex.seed:
            vi.type.tensor_type.ClearField("shape")
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    tx = torch.tensor(x, requires_grad=True)
    pool = F.max_pool2d if op == "MaxPool" else partial(F.avg_pool2d, count_include_pad=True)
    y = pool(tx, 2, 3, padding=1, ceil_mode=True)
    assert tuple(y.shape[2:]) == (3, 3)
    seed = np.random.default_rng(4).normal(size=tuple(y.shape)).astype(np.float32)
    y.backward(torch.tensor(seed))
    got = sess.run([ex.attributions["x"]], {"x": x, ex.seed: seed})[0]
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=1e-5, atol=1e-6)


# --- global pools and Lp pools ---------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 2, 7), (3, 2, 3, 3, 2)], ids=["2d", "1d", "3d"])
@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pool_gradient(op, shape):
    x = _separated(*shape)
    check_gradient(node_model(op, {"x": x}), {"x": x})


def test_global_max_pool_ties_go_to_the_first_maximum_as_in_torch():
    x = np.round(np.random.default_rng(3).uniform(0, 2, size=(3, 4, 5, 5))).astype(np.float32)
    m = node_model("GlobalMaxPool", {"x": x})
    tx = torch.tensor(x, requires_grad=True)
    y = F.adaptive_max_pool2d(tx, 1)
    seed = np.random.default_rng(4).normal(size=tuple(y.shape)).astype(np.float32)
    y.backward(torch.tensor(seed))
    got = _grad(m, x, seed)
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=1e-6, atol=1e-6)
    assert ((got != 0).sum(axis=(2, 3)) == 1).all()


LPPOOL_CASES = {
    "p2_k3_s2_p1": _pool_case(stride=2, pads=(1, 1), p=2),
    "p1_k2_s1": _pool_case(k=2, p=1),
    "p3_k3_s3_asym": _pool_case(size=8, stride=3, pads=(0, 2), p=3),
    "p2_same_upper_k2_s2": _pool_case(k=2, stride=2, auto_pad="SAME_UPPER", p=2),
    "1d_p2_k3_s2": _pool_case(dim=1, size=9, stride=2, p=2),
}


@pytest.mark.parametrize("name", list(LPPOOL_CASES))
def test_lp_pool_gradient(name):
    shape, attrs = LPPOOL_CASES[name]
    x = _separated(*shape)
    check_gradient(node_model("LpPool", {"x": x}, attrs), {"x": x})


@pytest.mark.parametrize("p", [1, 2, 3])
def test_global_lp_pool_gradient(p):
    x = _separated(2, 3, 4, 5)
    check_gradient(node_model("GlobalLpPool", {"x": x}, {"p": p}), {"x": x})


def test_lp_pool_of_an_all_zero_window_has_a_finite_gradient():
    x = _separated(1, 2, 4, 4)
    x[:, :, :2, :2] = 0.0
    m = node_model("LpPool", {"x": x}, {"kernel_shape": [2, 2], "strides": [2, 2], "p": 2})
    got = _grad(m, x, np.ones((1, 2, 2, 2), np.float32))
    assert np.isfinite(got).all()
    assert (got[:, :, :2, :2] == 0).all()


# --- MaxPool with dilations in every rank ---------------------------------------------------
def _dilated(dim, size, k, dil, stride=1, pads=None, ceil=None, **extra):
    shape, attrs = _pool_case(dim=dim, size=size, k=k, stride=stride, pads=pads, dil=dil, ceil=ceil,
                              channels=2, **extra)
    return shape, attrs


DILATED_MAXPOOL_CASES = {
    "1d_k3_d3_s1": _dilated(1, 12, 3, 3),
    "1d_k2_d2_s2_p1_ceil": _dilated(1, 11, 2, 2, stride=2, pads=(1, 1), ceil=1),
    "2d_k2_d3_s1_colmajor": _dilated(2, 8, 2, 3, storage_order=1),
    "2d_k3_d2_s3_asym_ceil": _dilated(2, 10, 3, 2, stride=3, pads=(2, 0), ceil=1),
    # The geometry of onnx's test_maxpool_3d_dilations, on values without ties.
    "3d_k2_d2_s1": _dilated(3, 4, 2, 2),
    "3d_k2_d2_s1_colmajor": _dilated(3, 5, 2, 2, storage_order=1),
    "3d_k3_d2_s2_p2": _dilated(3, 7, 3, 2, stride=2, pads=(2, 2)),
    "3d_k2_d3_s2_p1_0_ceil": _dilated(3, 8, 2, 3, stride=2, pads=(1, 0), ceil=1),
}


@pytest.mark.parametrize("name", list(DILATED_MAXPOOL_CASES))
def test_dilated_max_pool_gradient_equals_finite_differences(name):
    shape, attrs = DILATED_MAXPOOL_CASES[name]
    x = _separated(*shape)
    check_gradient(node_model("MaxPool", {"x": x}, attrs), {"x": x})


def test_3d_dilated_max_pool_with_mixed_per_axis_geometry_gradient():
    x = _separated(1, 2, 6, 7, 9)
    attrs = {"kernel_shape": [2, 3, 2], "strides": [1, 2, 3], "dilations": [3, 1, 2],
             "pads": [1, 0, 1, 0, 1, 1], "ceil_mode": 1}
    check_gradient(node_model("MaxPool", {"x": x}, attrs), {"x": x})


def _backend_3d_dilated_input():
    # onnx's test_maxpool_3d_dilations input: the 4x4 plane 1..16 repeated along depth, so
    # every window (depths d and d+2) holds its maximum twice.
    return np.tile(np.arange(1, 17, dtype=np.float32).reshape(1, 1, 1, 4, 4), (1, 1, 4, 1, 1))


def test_3d_dilated_max_pool_ties_go_to_the_first_maximum_as_in_torch():
    x = _backend_3d_dilated_input()
    attrs = {"kernel_shape": [2, 2, 2], "strides": [1, 1, 1], "dilations": [2, 2, 2]}
    m = node_model("MaxPool", {"x": x}, attrs)
    tx = torch.tensor(x, requires_grad=True)
    y = F.max_pool3d(tx, 2, 1, dilation=2)
    seed = np.random.default_rng(4).normal(size=tuple(y.shape)).astype(np.float32)
    y.backward(torch.tensor(seed))
    got = _grad(m, x, seed)
    np.testing.assert_allclose(got, tx.grad.numpy(), rtol=1e-6, atol=1e-6)
    # Each output's gradient lands on one element of its window: depth 0 or 1, never both.
    assert np.count_nonzero(got) == seed.size
    assert not got[:, :, 2:].any()


def test_3d_dilated_max_pool_gradient_is_the_limit_from_the_first_maximum_side():
    # Off the tie, with the first maximum slightly ahead, the same gradient is the true one.
    x = _backend_3d_dilated_input()
    attrs = {"kernel_shape": [2, 2, 2], "strides": [1, 1, 1], "dilations": [2, 2, 2]}
    m = node_model("MaxPool", {"x": x}, attrs)
    seed = np.random.default_rng(4).normal(size=(1, 1, 2, 2, 2)).astype(np.float32)
    at_tie = _grad(m, x, seed)
    ahead = x - np.arange(x.size, dtype=np.float32).reshape(x.shape) * 1e-3
    np.testing.assert_array_equal(_grad(m, ahead, seed), at_tie)
    check_gradient(m, {"x": ahead})


@pytest.mark.parametrize("pool", [
    {"kernel_shape": [2, 2], "dilations": [2, 2]},
    {"kernel_shape": [3, 2], "dilations": [2, 3], "strides": [2, 1], "pads": [1, 0, 2, 1], "ceil_mode": 1},
    {"kernel_shape": [2, 3], "dilations": [3, 1], "strides": [2, 2], "ceil_mode": 1},
], ids=["d2", "asym_pads_ceil", "ceil_no_pads"])
def test_smooth_lrp_max_pool_with_dilations_before_opset_19_equals_opset_19(pool):
    # AveragePool has no dilations before opset 19: there the smooth split sums its windows by a
    # depthwise Conv; onnxruntime's own dilated AveragePool at opset 19 is the reference.
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 3, 3)).astype(np.float32)
    x = rng.normal(size=(2, 2, 9, 10)).astype(np.float32)
    out = {}
    for opset in (17, 19):
        probe = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], **pool)], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 9, 10])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[numpy_helper.from_array(w, "w")])
        m = helper.make_model(probe, opset_imports=[helper.make_opsetid("", 19)])
        m.ir_version = 8
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        flat = [helper.make_node("Flatten", ["y"], ["f"]), helper.make_node("MatMul", ["f", "w2"], ["z"])]
        w2 = rng.normal(size=(int(np.prod(y.shape[1:])), 3)).astype(np.float32) if opset == 17 else w2
        g = helper.make_graph(list(probe.node) + flat, "g", list(probe.input),
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(w2, "w2")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        out[opset] = Explainer(m).attribute(x, method="lrp_epsilon", maxpool="smooth", target=1)
    np.testing.assert_allclose(out[17], out[19], rtol=1e-4, atol=1e-6)
