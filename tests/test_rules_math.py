"""Gradients of the trigonometric/hyperbolic functions, Mish, Swish, Shrink, Mod and the
normalisations of rules/gradient_math.py equal central finite differences, on attribute
combinations the onnx backend cases leave out (tests/backend_corpus.check_node)."""

import numpy as np
import pytest

from backend_corpus import check_node


def rand(*shape, seed=0, low=None, high=None):
    rng = np.random.default_rng(seed)
    if low is not None:
        return rng.uniform(low, high, size=shape).astype(np.float32)
    return rng.normal(size=shape).astype(np.float32)


def passes(r):
    assert r.status == "passed", (r.status, r.detail)


@pytest.mark.parametrize("op,low,high", [
    ("Tan", -1.2, 1.2), ("Asin", -0.9, 0.9), ("Acos", -0.9, 0.9), ("Atan", -3, 3), ("Sinh", -2, 2),
    ("Cosh", -2, 2), ("Asinh", -3, 3), ("Acosh", 1.1, 4), ("Atanh", -0.9, 0.9), ("Mish", -4, 4),
])
def test_unary_function_inside_its_domain(op, low, high):
    passes(check_node(op, {"x": rand(3, 5, low=low, high=high)}, opset=22))


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.5])
def test_swish_with_alpha(alpha):
    passes(check_node("Swish", {"x": rand(4, 6)}, {"alpha": alpha}, opset=24))


def test_shrink_with_bias_and_lambda_passes_nothing_inside():
    x = rand(4, 6) * 2
    x = np.where(np.abs(np.abs(x) - 0.7) < 0.05, x + 0.2, x).astype(np.float32)
    passes(check_node("Shrink", {"x": x}, {"lambd": 0.7, "bias": 0.3}, opset=18))


def test_mod_fmod_differentiates_both_operands_with_broadcasting():
    a = rand(3, 4, low=-5, high=5)
    d = rand(4, seed=1, low=0.7, high=2.0)
    passes(check_node("Mod", {"a": a, "d": d}, {"fmod": 1}, opset=18))


@pytest.mark.parametrize("p,axis", [(1, 0), (1, -1), (2, 1)])
def test_lp_normalization(p, axis):
    passes(check_node("LpNormalization", {"x": rand(3, 4, 2)}, {"p": p, "axis": axis}, opset=18))


def test_mean_variance_normalization_over_custom_axes():
    passes(check_node("MeanVarianceNormalization", {"x": rand(2, 3, 4)}, {"axes": [1, 2]}, opset=18))


@pytest.mark.parametrize("opset,groups", [(21, 1), (21, 2), (21, 3), (21, 6)])
def test_group_normalization_group_counts(opset, groups):
    c = 6
    per = groups if opset == 18 else c
    r = check_node("GroupNormalization", {"x": rand(2, c, 3, 2), "s": rand(per, seed=1), "t": rand(per, seed=2)},
                   {"num_groups": groups, "epsilon": 1e-3}, opset=opset)
    passes(r)


def test_rms_normalization_axis_1_with_broadcast_scale():
    passes(check_node("RMSNormalization", {"x": rand(2, 3, 4), "s": rand(4, seed=1)}, {"axis": 1}, opset=23))


@pytest.mark.parametrize("size,bias", [(3, 1.0), (5, 2.0), (1, 0.5)])  # onnxruntime runs odd sizes only
def test_lrn_window_sizes_and_bias(size, bias):
    passes(check_node("LRN", {"x": rand(2, 5, 3, 3)}, {"size": size, "bias": bias, "alpha": 0.1, "beta": 0.75},
                      opset=18))


def test_det_batched_and_singular():
    x = rand(2, 3, 3)
    x[1, 2] = x[1, 0] + x[1, 1]  # a singular matrix: det(X) inv(X)^T does not exist, the cofactors do
    passes(check_node("Det", {"x": x}, opset=22))
