"""The harness itself: a known gradient passes, a wrong one is caught."""

import numpy as np
import pytest

from gradcheck import check_gradient, node_model

from onnxplain.rules import base


def test_gemm_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5)).astype(np.float32)
    m = node_model("Gemm", {"x": x}, {"transB": 1, "alpha": 0.7},
                   consts={"w": rng.normal(size=(4, 5)).astype(np.float32), "c": rng.normal(size=(4,)).astype(np.float32)})
    check_gradient(m, {"x": x})


def test_harness_detects_a_wrong_rule(monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 4)).astype(np.float32)
    m = node_model("Relu", {"x": x})
    # A rule that forgets the mask must fail the check.
    monkeypatch.setitem(base.RULES, ("gradient", "Relu"), lambda b, node, g: [g[0]])
    with pytest.raises(AssertionError):
        check_gradient(m, {"x": x})
