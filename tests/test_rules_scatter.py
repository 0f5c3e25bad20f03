"""Gradients of the scatter/gather-by-index rules (rules/gradient_scatter.py) and of the
product, running-sum/product and Einsum rules (rules/gradient_reduce.py) equal central
finite differences, on the cases the onnx backend cases leave out: duplicate indices,
zeros inside products, ties, diagonals and broadcasting."""

import numpy as np
import pytest

from backend_corpus import check_node

I64 = np.int64


def rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def passes(r):
    assert r.status == "passed", (r.status, r.detail)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_elements_with_duplicate_indices(reduction):
    idx = np.array([[1, 0, 1], [2, 2, 0]], dtype=I64)  # row 1 writes twice to column 1, row 2 to column 2
    upd = rand(2, 3, seed=1)
    if reduction == "mul":
        upd[0, 0] = 0.0  # a zero factor: the product of the others is the gradient, not y / u
    r = check_node("ScatterElements", {"data": rand(2, 4), "updates": upd}, {"axis": 1, "reduction": reduction,
                   "_order": ["data", "idx", "updates"]}, consts={"idx": idx}, opset=18)
    passes(r)


def test_scatter_elements_mul_two_zeros_at_one_position():
    upd = np.array([[0.0, 0.0, 1.5]], dtype=np.float32)
    idx = np.array([[2, 2, 0]], dtype=I64)
    passes(check_node("ScatterElements", {"data": rand(1, 3), "updates": upd}, {"axis": 1, "reduction": "mul",
                      "_order": ["data", "idx", "updates"]}, consts={"idx": idx}, opset=18))


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max"])
def test_scatter_nd_slices(reduction):
    idx = np.array([[0], [2]], dtype=I64)
    passes(check_node("ScatterND", {"data": rand(3, 4), "updates": rand(2, 4, seed=1)}, {"reduction": reduction,
                      "_order": ["data", "idx", "updates"]}, consts={"idx": idx}, opset=18))


@pytest.mark.parametrize("largest,axis", [(1, 0), (0, 1)])
def test_top_k_values_along_any_axis(largest, axis):
    passes(check_node("TopK", {"x": rand(4, 5)}, {"axis": axis, "largest": largest, "_order": ["x", "k"]},
                      consts={"k": np.array([2], dtype=I64)}, opset=18, n_outputs=2))


def test_compress_without_axis_flattens():
    cond = np.array([1, 0, 1, 1, 0, 0, 1], dtype=bool)
    passes(check_node("Compress", {"x": rand(2, 4)}, {"_order": ["x", "c"]}, consts={"c": cond}, opset=18))


def test_center_crop_pad_crops_one_axis_and_pads_another():
    passes(check_node("CenterCropPad", {"x": rand(5, 2, 3)}, {"axes": [0, 2], "_order": ["x", "s"]},
                      consts={"s": np.array([3, 6], dtype=I64)}, opset=18))


@pytest.mark.parametrize("axes,keepdims", [([1], 1), ([0, 2], 0)])
def test_reduce_prod_with_zeros(axes, keepdims):
    x = rand(3, 4, 2)
    x[0, 1, 0] = 0.0  # one zero in a product
    x[1, 2, :] = 0.0  # two zeros in one product (axis 2)
    passes(check_node("ReduceProd", {"x": x}, {"keepdims": keepdims, "_order": ["x", "a"]},
                      consts={"a": np.array(axes, dtype=I64)}, opset=18))


@pytest.mark.parametrize("exclusive,reverse", [(1, 1), (0, 1), (1, 0)])
def test_cum_sum_and_cum_prod_directions(exclusive, reverse):
    attrs = {"exclusive": exclusive, "reverse": reverse, "_order": ["x", "a"]}
    passes(check_node("CumSum", {"x": rand(4, 3)}, attrs, consts={"a": np.array(0, dtype=I64)}, opset=18))
    x = rand(3, 5)
    x[1, 2] = 0.0
    passes(check_node("CumProd", {"x": x}, attrs, consts={"a": np.array(1, dtype=I64)}, opset=26))


@pytest.mark.parametrize("eq,shapes", [
    ("ii->i", [(3, 3)]),
    ("ij->", [(2, 3)]),
    ("ij,jk", [(2, 3), (3, 4)]),
    ("...ij,...jk->...ik", [(1, 2, 3), (4, 3, 2)]),
    ("bij,bjk->bk", [(2, 3, 4), (2, 4, 2)]),
])
def test_einsum_diagonals_sums_and_broadcasting(eq, shapes):
    inputs = {f"x{k}": rand(*s, seed=k) for k, s in enumerate(shapes)}
    passes(check_node("Einsum", inputs, {"equation": eq}, opset=18))


def test_trilu_lower_with_offset():
    passes(check_node("Trilu", {"x": rand(2, 4, 5)}, {"upper": 0, "_order": ["x", "k"]},
                      consts={"k": np.array(-1, dtype=I64)}, opset=18))
