"""Attention: gradients through fully masked rows are the forward's limit (0, never NaN),
and the fused Attention operator's gradient equals finite differences."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradcheck import check_gradient

from onnxplain import Explainer


def _masked_rows_model(op: str):
    """y = Where(row_masked, 0, op(x + bias)) where bias is -inf on the whole of row 1 (and on
    part of row 2 for Softmax, whose outputs stay finite there): op's row 1 is NaN (all -inf)
    and replaced by 0, as attention functions do."""
    bias = np.zeros((4, 5), np.float32)
    bias[1] = -np.inf
    if op == "Softmax":
        bias[2, :3] = -np.inf
    masked = np.zeros((4, 1), bool)
    masked[1] = True
    nodes = [helper.make_node("Add", ["x", "bias"], ["s"]),
             helper.make_node(op, ["s"], ["p"], axis=-1),
             helper.make_node("Where", ["masked", "zero", "p"], ["y"])]
    inits = [numpy_helper.from_array(bias, "bias"), numpy_helper.from_array(masked, "masked"),
             numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_fully_masked_row_has_a_zero_gradient_not_nan(op):
    x = np.random.default_rng(0).normal(size=(2, 4, 5)).astype(np.float32)
    m = _masked_rows_model(op)
    seed = np.random.default_rng(1).normal(size=(2, 4, 5)).astype(np.float32)
    got = Explainer(m, canonize=False).attribute(x, method="gradient", target=seed, probability=True)
    assert np.isfinite(got).all()
    assert not got[:, 1].any()
    if op == "Softmax":  # exp(-inf) = 0: the masked entries of a partly masked row have no gradient
        assert not got[:, 2, :3].any()
    check_gradient(m, {"x": x})
