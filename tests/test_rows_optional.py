"""Rows' optional outputs: read where they come out as rows, left out (never an error, never a
wrong row) where a run shows they do not carry the batch, as the dataset engine's scores need."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxplain.errors import ModelError
from onnxplain.runtime import Rows, Session


def model():
    # y: (N, 2) rows; s: a scalar over the whole batch; t: (2,) whatever the batch.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])]
    nodes = [helper.make_node("Mul", ["x", "two"], ["y"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("ReduceSum", ["x", "zero"], ["t"], keepdims=0)]
    inits = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
             helper.make_tensor("zero", TensorProto.INT64, [1], [0])]
    m = helper.make_model(helper.make_graph(nodes, "m", [x], outs, initializer=inits),
                          opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_optional_outputs_that_are_rows_are_read_and_the_others_left_out():
    rows = Rows(Session(model(), ["CPUExecutionProvider"]), {"x": 0, "y": 0, "s": 0, "t": 0})
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = rows.run({"x": x}, ["y"], optional=["s", "t"])
    assert set(out) == {"y"}  # s came out a scalar, t with 2 "rows" for 3 fed: not rows
    np.testing.assert_array_equal(out["y"], 2 * x)
    assert set(rows.run({"x": x[:2]}, ["y"], optional=["y", "s"])) == {"y"}
    # The same outputs asked for as required still fail loudly, naming the tensor.
    with pytest.raises(ModelError, match="'t' came out with 2 rows"):
        rows.run({"x": x}, ["y", "t"])
    chunks = list(rows.run_rows(3, lambda s, e: {"x": x[s:e]}, ["y"], optional=["s"]))
    assert all("s" not in c[2] for c in chunks)
