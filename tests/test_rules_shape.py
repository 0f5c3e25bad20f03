"""Gradients of the shape, selection, padding, resizing and reduction operators equal finite
differences (and, for Resize, torch autograd of F.interpolate)."""

import numpy as np
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from gradcheck import check_gradient, node_model, numeric_gradient

from onnxplain import Explainer
from onnxplain.compile import Composite, compile_explainer
from onnxplain.graph import Graph
from onnxplain.errors import ModelError
from onnxplain.rules.gradient_shape import resize_matrix

I64 = np.int64
BIG = np.iinfo(np.int64).max


def rand(*shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def ints(*v):
    return np.array(v, dtype=I64)


def check_raw(model, x, output="y0", linear=False):
    """Like check_gradient, for operators whose output does not keep the input's batch axis
    first (the Explainer API splits runs by batch rows): compile and run the explainer directly."""
    spec = compile_explainer(Graph(model), Composite("gradient"), ["x"], output)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(spec.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run([output], {"x": x})[0]
    seed = np.asarray(np.random.default_rng(0).normal(size=y.shape), dtype=np.float32)
    got = sess.run([spec.attributions["x"]], {"x": x, spec.seed: seed})[0]
    # A linear map's central difference is exact for any step: a step of 1 avoids the
    # float32 cancellation that forces loose tolerances (Resize has no float64 kernel).
    flat, num, double = numeric_gradient(model, {"x": x}, "x", seed, output=output, eps=1.0 if linear else None)
    tol = 1e-4 if double or linear else 3e-2
    np.testing.assert_allclose(got.reshape(-1)[flat], num, rtol=tol, atol=tol)
    return got


def check(op, x, attrs=None, consts=None, opset=17, raw=False):
    m = node_model(op, {"x": x}, attrs, consts=consts, opset=opset)
    return check_raw(m, x) if raw else check_gradient(m, {"x": x})


# --- reshapes and permutations -----------------------------------------------------------

@pytest.mark.parametrize("op,attrs,consts", [
    ("Reshape", {}, {"s": ints(0, -1)}),
    ("Flatten", {"axis": 1}, None),
    ("Squeeze", {}, {"a": ints(-2)}),
    ("Unsqueeze", {}, {"a": ints(1, -1)}),
], ids=["reshape_0_-1", "flatten_axis1", "squeeze_neg_axis", "unsqueeze_1_-1"])
def test_reshape_family(op, attrs, consts):
    x = rand(2, 3, 1, 4) if op == "Squeeze" else rand(2, 3, 4)
    check(op, x, attrs, consts)


@pytest.mark.parametrize("perm", [[0, 2, 3, 1], [0, 3, 1, 2], None], ids=["nhwc", "nwch", "default_reverse"])
def test_transpose(perm):
    check("Transpose", rand(2, 3, 4, 5), {} if perm is None else {"perm": perm}, raw=perm is None)


@pytest.mark.parametrize("op,mode", [("DepthToSpace", "DCR"), ("DepthToSpace", "CRD"), ("SpaceToDepth", None)],
                         ids=["d2s_dcr", "d2s_crd", "s2d"])
def test_depth_space(op, mode):
    x = rand(2, 8, 3, 2) if op == "DepthToSpace" else rand(2, 2, 4, 6)
    attrs = {"blocksize": 2}
    if mode:
        attrs["mode"] = mode
    check(op, x, attrs)


# --- joining and splitting ---------------------------------------------------------------

@pytest.mark.parametrize("axis,opset", [(1, 17), (-1, 17), (1, 18), (0, 17)],
                         ids=["axis1", "axis-1", "axis1_opset18", "batch_axis"])
def test_concat(axis, opset):
    x = rand(2, 3, 4)
    c = rand(2, 2, 4, seed=1) if axis == 1 else rand(2, 3, 2, seed=1) if axis == -1 else rand(3, 3, 4, seed=1)
    m = node_model("Concat", {"x": x}, {"axis": axis, "_order": ["c", "x", "x"]}, consts={"c": c}, opset=opset)
    check_raw(m, x) if axis == 0 else check_gradient(m, {"x": x})


def test_concat_of_two_inputs_sends_each_its_part():
    x, z = rand(2, 3), rand(2, 5, seed=1)
    m = node_model("Concat", {"x": x, "z": z}, {"axis": 1})
    check_gradient(m, {"x": x, "z": z}, wrt="x")
    check_gradient(m, {"x": x, "z": z}, wrt="z")


@pytest.mark.parametrize("opset,shape,attrs,consts,n_out,output", [
    (17, (2, 6, 4), {"axis": 1}, None, 3, "y0"),
    (17, (2, 3, 4), {"axis": -1}, {"s": ints(1, 3)}, 2, "y1"),
    (17, (2, 6, 4), {"axis": 1}, {"s": ints(2, 1, 3)}, 3, "y1"),
    (18, (2, 3, 5), {"axis": 2, "num_outputs": 3}, None, 3, "y2"),
], ids=["equal_split_out0", "sizes_neg_axis_out1", "sizes_three_out1", "num_outputs_uneven_out2"])
def test_split_unused_outputs_get_zeros(opset, shape, attrs, consts, n_out, output):
    x = rand(*shape)
    m = node_model("Split", {"x": x}, attrs, consts=consts, opset=opset, n_outputs=n_out)
    check_gradient(m, {"x": x}, output=output)


# --- selection ---------------------------------------------------------------------------

SLICES = {
    "unit_steps": (ints(1), ints(3), ints(1), None),
    "negative_start": (ints(-3), ints(BIG), ints(2), None),
    "clamped_end": (ints(1, 0), ints(100, BIG), ints(1, 2), None),
    "step2": (ints(0), ints(5), ints(2), ints(2)),
    "step3_offset": (ints(1), ints(6), ints(-1), ints(3)),
    "reverse": (ints(-1), ints(-BIG), ints(2), ints(-1)),
    "step-2_clamped": (ints(100), ints(-100), ints(-1), ints(-2)),
    "neg_step_partial": (ints(4, 2), ints(1, 0), ints(2, 1), ints(-2, -1)),
    "batch_axis": (ints(1), ints(BIG), ints(0), None),
    "empty": (ints(3), ints(1), ints(2), None),
}


@pytest.mark.parametrize("case", list(SLICES), ids=list(SLICES))
def test_slice(case):
    starts, ends, axes, steps = SLICES[case]
    consts = {"s": starts, "e": ends, "a": axes}
    if steps is not None:
        consts["t"] = steps
    x = rand(3, 4, 6)
    m = node_model("Slice", {"x": x}, consts=consts)
    if case == "empty":
        got = Explainer(m, canonize=False).attribute(x, method="gradient", target=np.zeros((3, 4, 0), np.float32))
        assert np.all(got == 0)
        return
    check_raw(m, x) if case == "batch_axis" else check_gradient(m, {"x": x})


@pytest.mark.parametrize("axis,idx", [
    (1, ints(0, 2, 2, -1)),
    (-1, ints(3)),
    (2, np.array(1, dtype=I64)),
    (1, ints([0, 1], [1, 1])),
    (0, ints(1, 0, 1)),
], ids=["repeated_and_negative", "neg_axis", "scalar_index", "2d_repeated", "batch_axis"])
def test_gather(axis, idx):
    check("Gather", rand(2, 3, 4), {"axis": axis}, {"i": idx}, raw=axis == 0)


def test_gather_elements_adds_repeated_and_negative_indices():
    idx = ints([[0, 0, 2], [1, -2, 1]], [[2, 2, -1], [0, 1, 0]])  # (2, 2, 3) into axis 2 of (2, 2, 3)
    check("GatherElements", rand(2, 2, 3), {"axis": -1}, {"i": idx})


def test_gather_with_runtime_indices():
    x, i = rand(2, 5), ints(4, -1, 0)
    nodes = [helper.make_node("Gather", ["x", "i"], ["y0"], axis=1)]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5]),
                                       helper.make_tensor_value_info("i", TensorProto.INT64, [3])],
                          [helper.make_tensor_value_info("y0", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    spec = compile_explainer(Graph(m), Composite("gradient"), ["x"], "y0")
    sess = ort.InferenceSession(spec.model.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = rand(2, 3, seed=3)
    got = sess.run([spec.attributions["x"]], {"x": x, "i": i, spec.seed: seed})[0]
    want = np.zeros_like(x)
    np.add.at(want, (slice(None), i), seed)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_gather_nd_adds_repeated_indices():
    check("GatherND", rand(2, 3, 4), {}, {"i": ints([0, 1], [1, 2], [0, 1])}, raw=True)


# --- padding -----------------------------------------------------------------------------

@pytest.mark.parametrize("opset,mode,pads,axes", [
    (17, "constant", ints(0, 1, 2, 0, 2, 1), None),
    (17, "constant", ints(0, -1, 2, 0, 1, -2), None),
    (18, "constant", ints(2, -1), ints(-1)),
    (17, "reflect", ints(0, 2, 2, 0, 3, 1), None),
    (17, "reflect", ints(0, -1, 2, 0, 2, 0), None),
    (17, "edge", ints(0, 3, 1, 0, 2, 4), None),
    (18, "edge", ints(1, 3), ints(1)),
    (19, "wrap", ints(0, 2, 5, 0, 3, 1), None),
], ids=["constant", "constant_crop", "constant_axes_input", "reflect", "reflect_crop", "edge",
        "edge_axes_input", "wrap"])
def test_pad(opset, mode, pads, axes):
    consts = {"p": pads}
    order = ["x", "p"]
    if axes is not None:
        consts["a"] = axes
        order = ["x", "p", "", "a"]
    x = rand(2, 4, 3)
    m = node_model("Pad", {"x": x}, {"mode": mode, "_order": order}, consts=consts, opset=opset)
    check_gradient(m, {"x": x})


def test_pad_with_value_constant():
    x = rand(2, 3)
    m = node_model("Pad", {"x": x}, {"mode": "constant"}, consts={"p": ints(0, 1, 0, 2), "v": np.float32(3.0)})
    check_gradient(m, {"x": x})


# --- broadcasting and tiling ---------------------------------------------------------------

@pytest.mark.parametrize("x_shape,shape", [((2, 1, 3), ints(4, 3)), ((2, 1, 1), ints(1, 2, 3)), ((2, 3, 1), ints(1, 1, 5))],
                         ids=["middle_axis", "two_axes", "last_axis"])
def test_expand(x_shape, shape):
    check("Expand", rand(*x_shape), {}, {"s": shape})


@pytest.mark.parametrize("reps", [ints(1, 2, 3), ints(2, 1, 1), ints(1, 1, 1)], ids=["inner", "batch_axis", "ones"])
def test_tile(reps):
    check("Tile", rand(2, 3, 2), {}, {"r": reps}, raw=reps[0] != 1)


# --- reductions --------------------------------------------------------------------------

REDUCE_OPS = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
              "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"]
REDUCE_AXES = {"axis1": [1], "neg_axes": [-1, 1], "all": None}


def _reduce_model(op, x, axes, keepdims, opset, noop=None):
    attrs = {"keepdims": keepdims}
    if noop is not None:
        attrs["noop_with_empty_axes"] = noop
    consts = None
    axes_as_input = op == "ReduceSum" or opset >= 18
    if axes is not None:
        if axes_as_input:
            consts = {"a": ints(*axes)}
        else:
            attrs["axes"] = axes
    return node_model(op, {"x": x}, attrs, consts=consts, opset=opset)


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("keepdims", [0, 1], ids=["drop", "keep"])
@pytest.mark.parametrize("axes", list(REDUCE_AXES), ids=list(REDUCE_AXES))
@pytest.mark.parametrize("op", REDUCE_OPS)
def test_reduce(op, axes, keepdims, opset):
    x = rand(2, 3, 4)
    if op == "ReduceLogSum":
        x = np.abs(x) + 0.5
    m = _reduce_model(op, x, REDUCE_AXES[axes], keepdims, opset)
    # Reducing every axis also reduces the batch axis: check the explainer directly.
    check_raw(m, x) if axes == "all" else check_gradient(m, {"x": x})


@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean"])
def test_reduce_noop_with_empty_axes_is_identity(op):
    x = rand(2, 3)
    m = _reduce_model(op, x, None, 1, 18, noop=1)
    check_gradient(m, {"x": x})


def test_reduce_max_shares_gradient_among_ties():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=np.float32)
    m = _reduce_model("ReduceMax", x, [1], 0, 18)
    got = Explainer(m, canonize=False).attribute(x, method="gradient", target=np.ones((2,), np.float32))
    np.testing.assert_allclose(got, [[0, 0.5, 0.5, 0], [0.25, 0.25, 0.25, 0.25]])


def test_reduce_l2_at_zero_is_finite():
    x = np.zeros((2, 3), dtype=np.float32)
    m = _reduce_model("ReduceL2", x, [1], 1, 18)
    got = Explainer(m, canonize=False).attribute(x, method="gradient", target=np.ones((2, 1), np.float32))
    assert np.all(got == 0)


# --- resizing ----------------------------------------------------------------------------

CTMS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"]
NEAREST = ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"]
SCALES = {"x2": [2.0, 2.0], "x1.5": [1.5, 1.5], "down0.5": [0.5, 0.75], "mixed": [1.5, 0.6]}


def _resize_model(x, mode, ctm, scales=None, sizes=None, opset=17, roi=None, **attrs):
    lead = [1.0] * (x.ndim - 2)
    consts = {"roi": np.asarray(roi if roi is not None else [], np.float32)}
    if scales is not None:
        consts["scales"] = np.asarray(lead + list(scales), np.float32)
    else:
        consts["scales"] = np.zeros(0, np.float32)
        consts["sizes"] = ints(*(list(x.shape[:-2]) + list(sizes)))
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm, **attrs}
    return node_model("Resize", {"x": x}, attrs, consts=consts, opset=opset)


@pytest.mark.parametrize("scale", list(SCALES), ids=list(SCALES))
@pytest.mark.parametrize("ctm", CTMS)
@pytest.mark.parametrize("nearest_mode", NEAREST)
def test_resize_nearest(nearest_mode, ctm, scale):
    x = rand(2, 2, 4, 6)
    check_raw(_resize_model(x, "nearest", ctm, SCALES[scale], nearest_mode=nearest_mode), x, linear=True)


@pytest.mark.parametrize("scale", list(SCALES), ids=list(SCALES))
@pytest.mark.parametrize("ctm", CTMS + ["half_pixel_symmetric"])
def test_resize_linear(ctm, scale):
    x = rand(2, 2, 4, 6)
    check_raw(_resize_model(x, "linear", ctm, SCALES[scale], opset=19), x, linear=True)


@pytest.mark.parametrize("exclude_outside", [0, 1], ids=["edge", "exclude_outside"])
@pytest.mark.parametrize("scale", ["x2", "x1.5", "down0.5"])
@pytest.mark.parametrize("ctm", CTMS)
def test_resize_cubic(ctm, scale, exclude_outside):
    x = rand(2, 2, 5, 6)
    m = _resize_model(x, "cubic", ctm, SCALES[scale], exclude_outside=exclude_outside)
    check_raw(m, x, linear=True)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("sizes", [(8, 9), (3, 4), (1, 1)], ids=["up", "down", "to_1x1"])
@pytest.mark.parametrize("ctm", ["half_pixel", "pytorch_half_pixel", "align_corners"])
def test_resize_with_sizes(mode, sizes, ctm):
    x = rand(2, 2, 4, 6)
    check_raw(_resize_model(x, mode, ctm, sizes=sizes), x, linear=True)


@pytest.mark.parametrize("policy", ["not_larger", "not_smaller"])
def test_resize_keep_aspect_ratio(policy):
    x = rand(2, 2, 4, 6)
    m = node_model("Resize", {"x": x}, {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": policy,
                                        "_order": ["x", "", "", "sizes"]},
                   consts={"sizes": ints(7, 7)}, opset=18)
    check_raw(m, x, linear=True)


def test_resize_axes_attribute():
    x = rand(2, 3, 5)
    m = node_model("Resize", {"x": x}, {"mode": "linear", "axes": [-1], "_order": ["x", "", "scales"]},
                   consts={"scales": np.array([1.7], np.float32)}, opset=18)
    check_raw(m, x, linear=True)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_tf_crop_and_resize(mode):
    x = rand(2, 2, 4, 6)
    roi = [0, 0, -0.2, 0.1, 1, 1, 0.8, 1.3]
    m = _resize_model(x, mode, "tf_crop_and_resize", sizes=(5, 7), roi=roi, extrapolation_value=2.0)
    check_raw(m, x, linear=True)


def test_resize_antialias_is_reported():
    x = rand(2, 2, 4, 6)
    m = _resize_model(x, "linear", "half_pixel", [0.5, 0.5], opset=18, antialias=1)
    with pytest.raises(ModelError, match="antialias"):
        Explainer(m, canonize=False).attribute(x, method="gradient", target=np.ones((2, 2, 2, 3), np.float32))


def _runtime_model(nodes, inputs, inits=(), opset=18):
    """A model whose graph inputs are `inputs` (name -> (elem type, declared shape)), output y0."""
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info(k, t, s) for k, (t, s) in inputs.items()],
                          [helper.make_tensor_value_info("y0", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(v, k) for k, v in dict(inits).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def check_runtime(model, feeds: dict, wrt="x"):
    """Compile the gradient of y0 w.r.t. `wrt` without specialising shapes (so values the
    rules need are only known at run time), and compare it with central differences of
    seed . y0 over every element, in float64."""
    from gradcheck import to_double

    ex = compile_explainer(Graph(model), Composite("gradient"), [wrt], "y0")
    for vi in ex.model.graph.input:  # onnx may guess the seed's rank from the axes' length
        if vi.name == ex.seed:
            vi.type.tensor_type.ClearField("shape")
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    fwd = ort.InferenceSession(to_double(model).SerializeToString(), providers=["CPUExecutionProvider"])
    d = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    y = fwd.run(["y0"], d)[0]
    seed = np.random.default_rng(7).normal(size=y.shape)
    got = sess.run([ex.attributions[wrt]], {**feeds, ex.seed: seed.astype(np.float32)})[0]
    num = np.zeros(d[wrt].shape)
    for i in np.ndindex(*num.shape):
        xp, xm = d[wrt].copy(), d[wrt].copy()
        xp[i] += 1e-6
        xm[i] -= 1e-6
        num[i] = ((fwd.run(["y0"], {**d, wrt: xp})[0] - fwd.run(["y0"], {**d, wrt: xm})[0]) * seed).sum() / 2e-6
    assert got.shape == num.shape
    np.testing.assert_allclose(got, num, rtol=1e-4, atol=1e-5)
    return got


F32, I = TensorProto.FLOAT, TensorProto.INT64


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ([1], [5], [1], [1]), ([-2], [-7], [1], [-2]), ([0, 4], [2, 0], [0, 1], [1, -1]), ([-4], [100], [-1], [3]),
], ids=["unit", "negative_step", "two_axes", "negative_axis_step3"])
def test_slice_with_starts_ends_axes_steps_computed_at_run_time(starts, ends, axes, steps):
    x = rand(3, 7)
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y0"])]
    m = _runtime_model(nodes, {"x": (F32, ["N", 7]), "s": (I, [len(starts)]), "e": (I, [len(starts)]),
                               "a": (I, [len(starts)]), "t": (I, [len(starts)])})
    check_runtime(m, {"x": x, "s": ints(*starts), "e": ints(*ends), "a": ints(*axes), "t": ints(*steps)})


def test_slice_with_a_negative_start_on_an_axis_only_known_at_run_time():
    x = rand(3, 7)
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a"], ["y0"])]
    m = _runtime_model(nodes, {"x": (F32, ["N", "L"])}, {"s": ints(-3), "e": ints(BIG), "a": ints(1)})
    check_runtime(m, {"x": x})


@pytest.mark.parametrize("with_axes", [False, True], ids=["all_axes", "axes_input"])
def test_constant_pad_with_pads_computed_at_run_time(with_axes):
    # Negative pads crop: the adjoint pads back with zeros.
    x = rand(2, 3, 5)
    ins = {"x": (F32, ["N", 3, 5]), "p": (I, [4 if with_axes else 6])}
    nodes = [helper.make_node("Pad", ["x", "p", "", "a"] if with_axes else ["x", "p"], ["y0"], mode="constant")]
    pads = ints(1, -1, 2, 1) if with_axes else ints(0, 1, -1, 0, 2, 1)
    m = _runtime_model(nodes, ins, {"a": ints(1, -1)} if with_axes else {})
    check_runtime(m, {"x": x, "p": pads})


@pytest.mark.parametrize("keep", [0, 1])
@pytest.mark.parametrize("op", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceL2", "ReduceLogSumExp",
                                "ReduceSumSquare"])
def test_reduction_with_axes_computed_at_run_time(op, keep):
    x = rand(2, 3, 4)
    nodes = [helper.make_node(op, ["x", "a"], ["y0"], keepdims=keep)]
    m = _runtime_model(nodes, {"x": (F32, ["N", 3, 4]), "a": (I, ["K"])})
    check_runtime(m, {"x": x, "a": ints(-1, 0)})


@pytest.mark.parametrize("noop", [0, 1])
def test_reduction_with_empty_axes_computed_at_run_time_follows_noop_with_empty_axes(noop):
    x = rand(2, 3, 4)
    nodes = [helper.make_node("ReduceMean", ["x", "a"], ["y0"], keepdims=0, noop_with_empty_axes=noop)]
    m = _runtime_model(nodes, {"x": (F32, ["N", 3, 4]), "a": (I, ["K"])})
    check_runtime(m, {"x": x, "a": np.zeros(0, I64)})


def test_broadcast_gradient_where_the_rank_is_only_known_at_run_time():
    # Squeeze by run-time axes leaves the rank of 'sq' (and of the product) unknown: the
    # broadcast axes of 'w' are found at run time, the missing leading ones included.
    x, w = rand(2, 1, 3, 4), rand(3, 1, seed=1)
    nodes = [helper.make_node("Squeeze", ["x", "a"], ["sq"]), helper.make_node("Mul", ["sq", "w"], ["y0"])]
    m = _runtime_model(nodes, {"x": (F32, ["N", 1, 3, 4]), "w": (F32, [3, 1]), "a": (I, [1])})
    check_runtime(m, {"x": x, "w": w, "a": ints(1)}, wrt="w")
    check_runtime(m, {"x": x, "w": w, "a": ints(1)}, wrt="x")


def test_split_and_concat_on_a_negative_axis_where_the_rank_is_only_known_at_run_time():
    x = rand(2, 1, 3, 4)
    nodes = [helper.make_node("Squeeze", ["x", "a"], ["sq"]),
             helper.make_node("Split", ["sq"], ["p", "q"], axis=-1, num_outputs=2),
             helper.make_node("Mul", ["q", "q"], ["q2"]),
             helper.make_node("Concat", ["q2", "p", "sq"], ["y0"], axis=-1)]
    m = _runtime_model(nodes, {"x": (F32, ["N", 1, 3, 4]), "a": (I, [1])})
    check_runtime(m, {"x": x, "a": ints(1)})


# --- Resize against torch autograd -------------------------------------------------------

TORCH_CASES = {
    # name: (torch kwargs, ONNX mode, coordinate transform, nearest_mode)
    "nearest": ({"mode": "nearest"}, "nearest", "asymmetric", "floor"),
    "nearest_exact": ({"mode": "nearest-exact"}, "nearest", "half_pixel", "round_prefer_ceil"),
    "bilinear": ({"mode": "bilinear", "align_corners": False}, "linear", "pytorch_half_pixel", None),
    "bilinear_align_corners": ({"mode": "bilinear", "align_corners": True}, "linear", "align_corners", None),
    "bicubic": ({"mode": "bicubic", "align_corners": False}, "cubic", "pytorch_half_pixel", None),
    "bicubic_align_corners": ({"mode": "bicubic", "align_corners": True}, "cubic", "align_corners", None),
}


@pytest.mark.parametrize("factor", [2.0, 1.5, 0.5], ids=["x2", "x1.5", "down0.5"])
@pytest.mark.parametrize("case", list(TORCH_CASES), ids=list(TORCH_CASES))
def test_resize_gradient_matches_torch(case, factor):
    torch = pytest.importorskip("torch")
    kwargs, mode, ctm, nearest_mode = TORCH_CASES[case]
    x = rand(2, 3, 6, 8)
    attrs = {"nearest_mode": nearest_mode} if nearest_mode else {}
    if mode == "cubic":
        attrs["cubic_coeff_a"] = -0.75
    m = _resize_model(x, mode, ctm, [factor, factor], **attrs)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.interpolate(xt, scale_factor=factor, **kwargs)
    seed = rand(*yt.shape, seed=5)
    (yt * torch.tensor(seed)).sum().backward()
    e = Explainer(m, canonize=False)
    np.testing.assert_allclose(e.predict(x), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    got = e.attribute(x, method="gradient", target=seed, probability=True)
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_resize_matrix_rows_sum_to_one():
    for mode in ("nearest", "linear", "cubic"):
        m = resize_matrix(mode, "half_pixel", 5, 8, 1.6)
        np.testing.assert_allclose(m.sum(axis=1), 1.0)


@pytest.mark.parametrize("batch_axis,time_axis", [(1, 0), (0, 1)])
def test_reverse_sequence_gradient_is_the_same_reversal(batch_axis, time_axis):
    import backend_corpus as bc

    x = np.random.default_rng(0).normal(size=(4, 4, 3) if batch_axis == 1 else (4, 5, 3))
    r = bc.check_node("ReverseSequence", {"x": x}, {"batch_axis": batch_axis, "time_axis": time_axis},
                      consts={"lens": np.array([4, 1, 3, 2], np.int64)})
    assert r.status == "passed", (r.status, r.detail)


def test_optional_get_element_of_a_tensor_passes_the_gradient_through():
    import backend_corpus as bc

    x = np.random.default_rng(0).normal(size=(3, 4))
    r = bc.check_node("OptionalGetElement", {"x": x}, opset=18)
    assert r.status == "passed", (r.status, r.detail)


def test_slice_computed_at_run_time_in_float16_scatters_in_float32():
    # onnxruntime's CPU scatter cannot add in float16; the gradient is the float32 one, cast.
    x = rand(3, 7).astype(np.float16)
    nodes = [helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y0"])]
    m = _runtime_model(nodes, {"x": (TensorProto.FLOAT16, ["N", 7]), "s": (I, [1]), "e": (I, [1]),
                               "a": (I, [1]), "t": (I, [1])})
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    ex = compile_explainer(Graph(m), Composite("gradient"), ["x"], "y0")
    for vi in ex.model.graph.input:
        if vi.name == ex.seed:
            vi.type.tensor_type.ClearField("shape")
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = rand(3, 3, seed=1).astype(np.float16)
    got = sess.run([ex.attributions["x"]], {"x": x, "s": ints(-1), "e": ints(0), "a": ints(1), "t": ints(-2),
                                            ex.seed: seed})[0]
    want = np.zeros((3, 7), np.float16)
    want[:, [6, 4, 2]] = seed
    np.testing.assert_array_equal(got, want)
