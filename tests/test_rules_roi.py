"""Gradients of TensorScatter and RoiAlign equal finite differences (float64 where
onnxruntime has the kernel), for write positions and boxes only known at run time."""

import numpy as np
import pytest

import backend_corpus as bc


def _passes(result):
    assert result.status == "passed", (result.status, result.detail)


# --- TensorScatter (opset 24) ------------------------------------------------------------------
@pytest.mark.parametrize("mode,indices", [("linear", [0, 2]), ("circular", [3, 4]), ("linear", None)],
                         ids=["linear", "circular_wraps", "no_write_indices"])
@pytest.mark.parametrize("axis", [-2, 1])
def test_tensor_scatter_gradient_reaches_the_kept_cache_and_the_written_update(mode, indices, axis):
    rng = np.random.default_rng(0)
    # (batch 2, max length 5, 3) with a 2-long update along axis 1 (= -2).
    past, update = rng.normal(size=(2, 5, 3)), rng.normal(size=(2, 2, 3))
    consts = {} if indices is None else {"w": np.array(indices, np.int64)}
    order = ["past", "update"] + ([] if indices is None else ["w"])
    _passes(bc.check_node("TensorScatter", {"past": past, "update": update}, {"mode": mode, "axis": axis,
                                                                            "_order": order},
                          consts=consts, opset=24))


def test_tensor_scatter_4d_cache_on_the_sequence_axis():
    rng = np.random.default_rng(1)
    past, update = rng.normal(size=(2, 3, 6, 4)), rng.normal(size=(2, 3, 1, 4))
    _passes(bc.check_node("TensorScatter", {"past": past, "update": update}, {"mode": "circular"},
                          consts={"w": np.array([5, 2], np.int64)}, opset=24))


# --- RoiAlign (opsets 10-21) -------------------------------------------------------------------
def _roi_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 3, 9, 10))
    # Boxes (x1, y1, x2, y2) of several sizes: inside, across the border, tiny, inverted.
    rois = np.array([[0.5, 1.2, 6.3, 7.9], [2.0, 0.0, 9.6, 4.4], [-1.5, 5.0, 3.2, 10.5],
                     [4.1, 4.3, 4.6, 4.9], [7.0, 6.0, 3.0, 2.0]], np.float64)
    batch = np.array([0, 1, 1, 0, 1], np.int64)
    return x, rois, batch


ROI_CASES = {
    "avg_half_pixel_adaptive": {"mode": "avg", "coordinate_transformation_mode": "half_pixel"},
    "avg_output_half_pixel_adaptive": {"mode": "avg", "coordinate_transformation_mode": "output_half_pixel"},
    "avg_half_pixel_ratio2": {"mode": "avg", "sampling_ratio": 2},
    "avg_output_half_pixel_ratio3_scale": {"mode": "avg", "coordinate_transformation_mode": "output_half_pixel",
                                           "sampling_ratio": 3, "spatial_scale": 0.8},
    "max_half_pixel_adaptive": {"mode": "max"},
    "max_output_half_pixel_ratio2": {"mode": "max", "coordinate_transformation_mode": "output_half_pixel",
                                     "sampling_ratio": 2},
    "max_half_pixel_ratio1_scale": {"mode": "max", "sampling_ratio": 1, "spatial_scale": 0.6},
}


@pytest.mark.parametrize("name", list(ROI_CASES))
def test_roi_align_gradient_with_respect_to_the_feature_map(name):
    x, rois, batch = _roi_inputs()
    attrs = {"output_height": 3, "output_width": 2, **ROI_CASES[name]}
    _passes(bc.check_node("RoiAlign", {"x": x}, attrs, consts={"rois": rois, "batch": batch}, opset=16))


def test_roi_align_opset10_gradient():
    # Opset 10 has no coordinate_transformation_mode: its boxes are output_half_pixel.
    x, rois, batch = _roi_inputs(1)
    _passes(bc.check_node("RoiAlign", {"x": x}, {"output_height": 2, "output_width": 4},
                          consts={"rois": rois, "batch": batch}, opset=10))


def test_roi_align_with_boxes_computed_at_run_time():
    # The boxes are a graph input (a region proposal network's output): held fixed, not constant.
    from onnx import TensorProto, helper

    x, rois, batch = _roi_inputs(2)
    node = helper.make_node("RoiAlign", ["x", "rois", "batch"], ["y"], output_height=2, output_width=2, mode="avg")
    g = helper.make_graph([node], "roi_runtime", [
        helper.make_tensor_value_info("x", TensorProto.DOUBLE, list(x.shape)),
        helper.make_tensor_value_info("rois", TensorProto.DOUBLE, ["R", 4]),
        helper.make_tensor_value_info("batch", TensorProto.INT64, ["R"])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 16)])
    m.ir_version = 8
    from onnxplain.compile import Composite, compile_explainer
    from onnxplain.graph import Graph
    import onnxruntime as ort

    ex = compile_explainer(Graph(m), Composite("gradient"), ["x"], "y")
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    fwd = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x, "rois": rois, "batch": batch}
    y = fwd.run(None, feeds)[0]
    seed = np.random.default_rng(3).normal(size=y.shape)
    got = sess.run([ex.attributions["x"]], {**feeds, ex.seed: seed})[0]
    v = np.random.default_rng(4).normal(size=x.shape)
    fd = ((fwd.run(None, {**feeds, "x": x + 1e-5 * v})[0] - fwd.run(None, {**feeds, "x": x - 1e-5 * v})[0])
          * seed).sum() / 2e-5
    np.testing.assert_allclose((got * v).sum(), fd, rtol=1e-6)


# --- MaxRoiPool (onnxruntime: float32, opsets 1-21) ------------------------------------------------
def _separated(shape, seed=0):
    """Distinct values at least 0.05 apart, so no float32 finite-difference step changes a
    window's maximum."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return (rng.permutation(n) * 0.05 - 0.025 * n).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_max_roi_pool_gradient_goes_to_each_window_maximum(scale):
    x = _separated((2, 3, 8, 9))
    # (batch, x1, y1, x2, y2): inside, across the border, a half-way rounding, one pixel.
    rois = np.array([[0, 0, 0, 5, 6], [1, 3, 2, 11, 9], [1, 2.5, 1.5, 6.5, 5.5], [0, 4, 4, 4, 4]], np.float32)
    _passes(bc.check_node("MaxRoiPool", {"x": x}, {"pooled_shape": [3, 2], "spatial_scale": scale},
                          consts={"rois": rois}, opset=16))


# --- DeformConv (opset 19; onnxruntime: float32) ---------------------------------------------------
def _deform_inputs(c=4, oc=6, group=2, og=2, k=(2, 3), size=(6, 7), pads=(1, 0, 1, 1), strides=(1, 2),
                   dil=(2, 1), mask=True, bias=True, seed=0):
    rng = np.random.default_rng(seed)
    oh = (size[0] + pads[0] + pads[2] - (dil[0] * (k[0] - 1) + 1)) // strides[0] + 1
    ow = (size[1] + pads[1] + pads[3] - (dil[1] * (k[1] - 1) + 1)) // strides[1] + 1
    # Offsets away from whole numbers: sample positions off the bilinear kinks.
    off = rng.integers(-2, 2, size=(2, og * k[0] * k[1] * 2, oh, ow)) + rng.uniform(0.15, 0.85, (1,))
    off = off + rng.uniform(-0.1, 0.1, off.shape)
    ins = {"X": rng.normal(size=(2, c, *size)), "W": rng.normal(size=(oc, c // group, *k)), "offset": off}
    if bias:
        ins["B"] = rng.normal(size=(oc,))
    if mask:
        ins["mask"] = rng.uniform(0.2, 1.0, size=(2, og * k[0] * k[1], oh, ow))
    attrs = {"kernel_shape": list(k), "pads": list(pads), "strides": list(strides), "dilations": list(dil),
             "group": group, "offset_group": og}
    return {n: v.astype(np.float32) for n, v in ins.items()}, attrs


DEFORM_CASES = {
    "groups_offset_groups_mask_bias": {},
    "plain_3x3": {"c": 2, "oc": 3, "group": 1, "og": 1, "k": (3, 3), "pads": (1, 1, 1, 1), "strides": (1, 1),
                  "dil": (1, 1), "mask": False, "bias": False},
    "offset_group_4_strided": {"c": 4, "oc": 2, "group": 1, "og": 4, "strides": (2, 2), "bias": False},
}


@pytest.mark.parametrize("name", list(DEFORM_CASES))
def test_deform_conv_gradient_for_x_w_offset_bias_and_mask(name):
    ins, attrs = _deform_inputs(**DEFORM_CASES[name])
    order = ["X", "W", "offset"] + (["B"] if "B" in ins else ([""] if "mask" in ins else [])) + \
        (["mask"] if "mask" in ins else [])
    _passes(bc.check_node("DeformConv", ins, dict(attrs, _order=order), opset=19,
                          extra=tuple(k for k in ins)))


def test_deform_conv_offset_gradient_at_whole_positions_is_the_derivative_from_above():
    # onnx's test_basic_deform_conv_with_padding samples at whole positions, where bilinear
    # interpolation has a kink: the gradient is the one-sided derivative for offsets that grow.
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from onnxplain.compile import SEED, Composite, compile_explainer
    from onnxplain.graph import Graph

    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    w = np.ones((1, 1, 2, 2), np.float32)
    off = np.zeros((1, 8, 4, 4), np.float32)
    off[0, 0, 0, 0] = 0.5
    off[0, 5, 2, 1] = -1.0  # whole, negative
    node = helper.make_node("DeformConv", ["x", "w", "off"], ["y"], kernel_shape=[2, 2], pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "deform", [helper.make_tensor_value_info("off", TensorProto.FLOAT, list(off.shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])],
                          initializer=[onnx.numpy_helper.from_array(x, "x"), onnx.numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 8
    ex = compile_explainer(Graph(m), Composite("gradient"), ["off"], "y")
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    fwd = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = np.random.default_rng(0).normal(size=(1, 1, 4, 4)).astype(np.float32)
    got = sess.run([ex.attributions["off"]], {"off": off, ex.seed: seed})[0]
    v = np.random.default_rng(1).uniform(0, 1, off.shape).astype(np.float32)
    f0 = fwd.run(None, {"off": off})[0].astype(np.float64)

    def from_above(h):  # within one cell: every sample stays on the same bilinear piece above
        return ((fwd.run(None, {"off": off + h * v})[0] - f0) * seed).sum() / h

    # Bilinear pieces are quadratic along v: Richardson's step removes the O(h) term.
    above = 2 * from_above(1e-2) - from_above(2e-2)
    np.testing.assert_allclose((got * v).sum(), above, rtol=5e-4)


def test_tensor_scatter_in_float16_routes_the_gradient_exactly():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from onnxplain.compile import Composite, compile_explainer
    from onnxplain.graph import Graph

    node = helper.make_node("TensorScatter", ["past", "update", "w"], ["y"], mode="circular")
    g = helper.make_graph([node], "ts", [helper.make_tensor_value_info("past", TensorProto.FLOAT16, [2, 4, 3]),
                                         helper.make_tensor_value_info("update", TensorProto.FLOAT16, [2, 2, 3]),
                                         helper.make_tensor_value_info("w", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4, 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 24)])
    m.ir_version = 10
    ex = compile_explainer(Graph(m), Composite("gradient"), ["past", "update"], "y")
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = np.arange(24, dtype=np.float16).reshape(2, 4, 3)
    feeds = {"past": np.zeros((2, 4, 3), np.float16), "update": np.zeros((2, 2, 3), np.float16),
             "w": np.array([3, 1], np.int64), ex.seed: seed}
    gp, gu = sess.run([ex.attributions["past"], ex.attributions["update"]], feeds)
    # Batch 0 writes at 3 then (circularly) 0; batch 1 at 1 and 2.
    np.testing.assert_array_equal(gu[0], seed[0, [3, 0]])
    np.testing.assert_array_equal(gu[1], seed[1, [1, 2]])
    kept = seed.copy()
    kept[0, [3, 0]] = 0
    kept[1, [1, 2]] = 0
    np.testing.assert_array_equal(gp, kept)
