"""Quantized test models shared by the engine's tests and the corpus referee's."""

import numpy as np
from onnx import TensorProto as T
from onnx import helper


def dynamic_conv(rounding: str = "Floor", batch=1, opset: int = 12):
    """onnx.quantize's dynamically quantized Conv, as ddddocr-common-old has 21 of them: the
    input quantized on the fly (DynamicQuantizeLinear), a uint8 weight, the float bias
    quantized by the product of the two scales (Div -> `rounding` -> Cast int32),
    ConvInteger, then the product with the scales. Returns (model, dequantized weight as
    float64, float bias)."""
    rng = np.random.default_rng(0)
    wq = rng.integers(0, 256, (3, 2, 3, 3)).astype(np.uint8)
    bias = rng.uniform(-0.5, 0.5, 3).astype(np.float32)
    inits = [helper.make_tensor("wq", T.UINT8, wq.shape, wq.ravel()), helper.make_tensor("ws", T.FLOAT, [], [0.004]),
             helper.make_tensor("wz", T.UINT8, [], [131]), helper.make_tensor("b", T.FLOAT, [3], bias),
             helper.make_tensor("bshape", T.INT64, [4], [1, 3, 1, 1])]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("Mul", ["xs", "ws"], ["s"]),
        helper.make_node("Div", ["b", "s"], ["bdiv"]),
        helper.make_node(rounding, ["bdiv"], ["bround"]),
        helper.make_node("Cast", ["bround"], ["bq"], to=T.INT32),
        helper.make_node("Reshape", ["bq", "bshape"], ["bq4"]),
        helper.make_node("ConvInteger", ["xq", "wq", "xz", "wz"], ["acc"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Add", ["acc", "bq4"], ["accb"]),
        helper.make_node("Cast", ["accb"], ["accf"], to=T.FLOAT),
        helper.make_node("Mul", ["accf", "s"], ["y"]),
    ]
    g = helper.make_graph(nodes, "dq_conv", [helper.make_tensor_value_info("x", T.FLOAT, [batch, 2, 5, 6])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [batch, 3, 5, 6])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    wd = (wq.astype(np.float64) - 131) * np.float64(np.float32(0.004))
    return model, wd, bias
