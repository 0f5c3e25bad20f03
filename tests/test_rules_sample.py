"""Gradients of the sampling and spectral rules (rules/gradient_sample.py,
rules/gradient_signal.py) and of Resize with run-time sizes equal central finite
differences: GridSample w.r.t. a varying grid, Resize to the shape of another tensor (a
decoder's skip connection), complex and padded DFTs, complex STFTs, Col2Im geometries."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from backend_corpus import check_model, check_node

I64 = np.int64


def rand(*shape, seed=0, scale=1.0):
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def passes(r):
    assert r.status == "passed", (r.status, r.detail)


@pytest.mark.parametrize("pad", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_linear_differentiates_the_grid_too(pad, align):
    grid = rand(1, 3, 4, 2, seed=1, scale=0.8)  # some points outside [-1, 1]
    r = check_node("GridSample", {"x": rand(1, 2, 4, 5), "grid": grid},
                   {"mode": "linear", "padding_mode": pad, "align_corners": align}, opset=22, extra={"grid"})
    passes(r)


def test_grid_sample_cubic_refuses_a_varying_grid_by_name():
    r = check_node("GridSample", {"x": rand(1, 1, 4, 4), "grid": rand(1, 2, 2, 2, seed=1, scale=0.5)},
                   {"mode": "cubic"}, opset=22, extra={"grid"})
    assert r.status == "refused" and "cubic" in r.detail


@pytest.mark.parametrize("mode,ctm", [("linear", "half_pixel"), ("nearest", "asymmetric"),
                                      ("cubic", "align_corners"), ("linear", "pytorch_half_pixel")])
def test_resize_to_the_shape_of_another_tensor_at_run_time(mode, ctm):
    # sizes = Concat(Shape(x)[:2], Shape(ref)[2:]): known only at run time.
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"], end=2),
        helper.make_node("Shape", ["ref"], ["sr"], start=2),
        helper.make_node("Concat", ["sx", "sr"], ["sizes"], axis=0),
        helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode=mode, coordinate_transformation_mode=ctm),
        helper.make_node("Add", ["y", "ref"], ["z"]),
    ]
    g = helper.make_graph(nodes, "Resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4]),
                                            helper.make_tensor_value_info("ref", TensorProto.FLOAT, [1, 2, 5, 7])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    passes(check_model(m, {"x": rand(1, 2, 3, 4), "ref": rand(1, 2, 5, 7, seed=1)}))


@pytest.mark.parametrize("inverse,onesided,length", [(0, 0, 12), (1, 0, 6), (1, 0, 8)])
def test_dft_complex_input_padded_or_truncated(inverse, onesided, length):
    r = check_node("DFT", {"x": rand(2, 8, 3, 2)}, {"inverse": inverse, "onesided": onesided,
                   "_order": ["x", "n", "axis"]}, consts={"n": np.array(length, dtype=I64),
                                                          "axis": np.array(1, dtype=I64)}, opset=20)
    passes(r)


def test_stft_two_sided_with_window_and_frame_length():
    r = check_node("STFT", {"x": rand(2, 40, 1), "w": rand(8, seed=1)}, {"onesided": 0,
                   "_order": ["x", "step", "w", "n"]}, consts={"step": np.array(3, dtype=I64),
                                                               "n": np.array(8, dtype=I64)}, opset=17)
    passes(r)


@pytest.mark.parametrize("strides,dilations,pads", [([2, 1], [1, 2], [1, 0, 0, 1]), ([1, 1], [2, 2], [0, 0, 0, 0])])
def test_col2im_geometries(strides, dilations, pads):
    image, block = np.array([6, 7], dtype=I64), np.array([2, 3], dtype=I64)
    eff = [(b - 1) * d + 1 for b, d in zip(block, dilations)]
    n_blocks = [(i + pads[k] + pads[k + 2] - e) // s + 1 for k, (i, e, s) in enumerate(zip(image, eff, strides))]
    x = rand(1, 2 * 6, int(np.prod(n_blocks)))
    passes(check_node("Col2Im", {"x": x}, {"strides": strides, "dilations": dilations, "pads": pads,
                      "_order": ["x", "i", "b"]}, consts={"i": image, "b": block}, opset=18))
