"""Control flow: If/Loop/Scan bodies read outer-scope tensors; gradients through them equal
finite differences (float64 copies of the models), an operator without a rule inside a
body on the explained path is refused by name, and unrolling leaves outputs unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer
from onnxplain import canonize as C
from onnxplain.compile import Composite, compile_explainer, unsupported
from onnxplain.errors import UnsupportedOperatorError
from onnxplain.graph import Graph, implicit_inputs, node_inputs, read_model
from onnxplain.methods.gradients import GRADIENT

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE


def _np(elem):
    return np.float64 if elem == F64 else np.float32


def _init(name, value, elem):
    return numpy_helper.from_array(np.asarray(value, dtype=_np(elem)), name)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(m)
    return m


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def finite_differences(model64, feeds: dict, wrt: str, seed: np.ndarray, eps=1e-6) -> np.ndarray:
    """Central differences of sum(seed * first output) w.r.t. `wrt`, every element, in float64."""
    sess = _session(model64)
    base = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    x = base[wrt]
    out = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fp = sess.run(None, {**base, wrt: xp})[0]
        fm = sess.run(None, {**base, wrt: xm})[0]
        out[idx] = (seed * (fp - fm)).sum() / (2 * eps)
    return out


def gradient(model32, x: np.ndarray, seed: np.ndarray, **kw) -> np.ndarray:
    return Explainer(model32, **kw).attribute(x, method="gradient", target=seed.astype(np.float32),
                                              probability=True)


def rng_(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- If
def if_model(elem=F32, cond_from="data"):
    """z = (If sum(x) > 0 then tanh(relu(x W1)) else 2 sigmoid(x W2) * x[:, :3]) W3.

    x reaches z only through the branches, which read x, W1, W2 implicitly. The condition
    is computed from x (a non-differentiable comparison)."""
    r = rng_(1)
    w1, w2, w3 = r.normal(size=(4, 3)), r.normal(size=(4, 3)), r.normal(size=(3, 2))
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["t0"]), helper.make_node("Relu", ["t0"], ["t1"]),
         helper.make_node("Tanh", ["t1"], ["t_out"])],
        "then", [], [helper.make_tensor_value_info("t_out", elem, ["N", 3])])
    else_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W2"], ["e1"]), helper.make_node("Sigmoid", ["e1"], ["e2"]),
         helper.make_node("Slice", ["x", "s0", "s3", "s1"], ["e3"]),
         helper.make_node("Mul", ["e2", "e3"], ["e4"]), helper.make_node("Add", ["e4", "e4"], ["e_out"])],
        "else", [], [helper.make_tensor_value_info("e_out", elem, ["N", 3])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
        helper.make_node("Greater", ["sx", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
        helper.make_node("MatMul", ["y", "W3"], ["z"]),
    ]
    inits = [_init("W1", w1, elem), _init("W2", w2, elem), _init("W3", w3, elem), _init("zero", 0.0, elem),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([3], np.int64), "s3"),
             numpy_helper.from_array(np.array([1], np.int64), "s1")]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", 4])],
                  [helper.make_tensor_value_info("z", elem, ["N", 2])], inits)


def test_implicit_inputs_list_the_outer_tensors_branches_read():
    node = next(n for n in if_model().graph.node if n.op_type == "If")
    assert sorted(implicit_inputs(node)) == sorted(["x", "W1", "W2", "s0", "s3", "s1"])
    assert node_inputs(node)[0] == "cond" and sorted(node_inputs(node)[1:]) == sorted(implicit_inputs(node))


def test_inspect_analysis_sees_the_path_through_an_if():
    g = Graph(read_model(if_model()))
    assert "If" in {n.op_type for n in __import__("onnxplain.compile", fromlist=["x"]).active_nodes(g, ["x"], "z")}
    assert unsupported(g, GRADIENT, ["x"], "z") == []


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["then", "else"])
def test_gradient_through_if_equals_finite_differences(sign):
    x = np.abs(rng_(2).normal(size=(2, 4))) * sign
    seed = rng_(3).normal(size=(2, 2))
    got = gradient(if_model(F32), x.astype(np.float32), seed)
    want = finite_differences(if_model(F64), {"x": x}, "x", seed)
    assert np.abs(want).max() > 1e-2  # the path exists: a zero gradient would be wrong
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gradient_through_if_is_not_canonized_away():
    # Canonization (constant folding, Identity removal) keeps the branches' outer reads.
    m = if_model()
    before = m.graph.node[2].attribute[0].g.node[0].input[:]
    x = np.abs(rng_(4).normal(size=(1, 4))).astype(np.float32)
    canon = C.canonize(read_model(m))
    if_node = next(n for n in canon.graph.node if n.op_type == "If")
    assert list(if_node.attribute[0].g.node[0].input) == list(before)
    sess_a, sess_b = _session(m), _session(canon)
    np.testing.assert_allclose(sess_a.run(None, {"x": x})[0], sess_b.run(None, {"x": x})[0], rtol=1e-6)


def identity_before_if_model():
    """x -> Identity -> xi, read only inside the If branches: dropping the Identity must
    rename the branches' reference, and dead-code removal must keep the Identity's input."""
    then_g = helper.make_graph([helper.make_node("Tanh", ["xi"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", F32, None)])
    else_g = helper.make_graph([helper.make_node("Sigmoid", ["xi"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", F32, None)])
    nodes = [helper.make_node("Identity", ["x"], ["xi"]), helper.make_node("Constant", [], ["c"],
                                                                           value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
    return _model(nodes, [helper.make_tensor_value_info("x", F32, ["N", 3])],
                  [helper.make_tensor_value_info("y", F32, ["N", 3])])


def test_dropping_identity_renames_references_inside_branches():
    m = read_model(identity_before_if_model())
    canon = C.canonize(m)
    assert "Identity" not in {n.op_type for n in canon.graph.node}
    if_node = next(n for n in canon.graph.node if n.op_type == "If")
    assert implicit_inputs(if_node) == ["x"]
    x = rng_(5).normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(_session(canon).run(None, {"x": x})[0], np.tanh(x), rtol=1e-6)
    g = gradient(identity_before_if_model(), x, np.ones((2, 3)))
    np.testing.assert_allclose(g, 1 - np.tanh(x) ** 2, rtol=1e-5)


def test_operator_without_rule_inside_a_branch_is_refused_by_name(monkeypatch):
    # Tanh, used only inside the then-branch, loses its rule for this test; onnxruntime
    # still runs the model.
    from onnxplain.rules import base

    monkeypatch.delitem(base.RULES, ("gradient", "Tanh"))
    e = Explainer(if_model())
    x = np.ones((2, 4), np.float32)
    assert unsupported(e.graph, GRADIENT, ["x"], "z") == ["Tanh"]
    with pytest.raises(UnsupportedOperatorError, match="Tanh"):
        e.attribute(x, method="gradient", target=0)


def inlined_then_model():
    """if_model with its then-branch inlined: what the If computes where sum(x) > 0."""
    m = if_model()
    if_node = m.graph.node[2]
    branch = next(a.g for a in if_node.attribute if a.name == "then_branch")
    nodes = list(branch.node) + [helper.make_node("Identity", [branch.output[0].name], ["y"]), m.graph.node[3]]
    return _model(nodes, list(m.graph.input), list(m.graph.output), list(m.graph.initializer))


@pytest.mark.parametrize("method", ["gradient", "lrp.epsilon", "lrp.epsilon_plus", "lrp.epsilon_gamma_box",
                                    "excitation_backprop", "contrastive_excitation_backprop", "guided_backprop",
                                    "deconvnet"])
def test_if_backward_equals_that_of_the_taken_branch_inlined(method):
    # The composite is asked per branch node: LRP's rules apply inside the branches.
    x = np.abs(rng_(6).normal(size=(2, 4))).astype(np.float32)
    got = Explainer(if_model()).attribute(x, method=method, target=0)
    want = Explainer(inlined_then_model()).attribute(x, method=method, target=0)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_deeplift_refuses_an_if_on_the_path_by_name():
    x = np.abs(rng_(6).normal(size=(2, 4))).astype(np.float32)
    with pytest.raises(UnsupportedOperatorError, match="If"):
        Explainer(if_model()).attribute(x, method="deeplift", target=0)


# ----------------------------------------------------------------------------- Loop
def rnn_loop_model(elem=F32, trips="shape", cond="none"):
    """h_{t+1} = tanh(h_t U + x[:, t] W), over the T = x.shape[1] steps of x (N, T, 3); the
    trip count is Shape(x)[1] (or a constant); the body reads x, U and W implicitly; the
    scan output stacks each step's h (T, N, 2), and the output is h_T + mean over steps."""
    r = rng_(7)
    u, w = r.normal(size=(2, 2)) * 0.5, r.normal(size=(3, 2))
    body_nodes = [
        helper.make_node("Gather", ["x", "i"], ["xt"], axis=1),
        helper.make_node("MatMul", ["xt", "W"], ["a"]),
        helper.make_node("MatMul", ["h_in", "U"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["c"]),
        helper.make_node("Tanh", ["c"], ["h_out"]),
        helper.make_node("Identity", ["h_out"], ["h_scan"]),
    ]
    body_outputs = [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])]
    if cond == "counter":
        # tf2onnx style: the loop ends when a counter reaches a constant.
        body_nodes += [helper.make_node("Add", ["i", "one"], ["i1"]),
                       helper.make_node("Less", ["i1", "limit"], ["cond_out"])]
    else:
        body_nodes.append(helper.make_node("Identity", ["cond_in"], ["cond_out"]))
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", elem, ["N", 2])],
        body_outputs + [helper.make_tensor_value_info("h_out", elem, ["N", 2]),
                        helper.make_tensor_value_info("h_scan", elem, ["N", 2])],
        initializer=[numpy_helper.from_array(np.array(1, np.int64), "one"),
                     numpy_helper.from_array(np.array(3, np.int64), "limit")] if cond == "counter" else [])
    nodes = [helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Gather", ["sx", "k1"], ["T"]),
             helper.make_node("Shape", ["x"], ["sx2"]),
             helper.make_node("Slice", ["sx2", "k0", "k1v"], ["nb"]),
             helper.make_node("Concat", ["nb", "two"], ["hshape"], axis=0),
             helper.make_node("ConstantOfShape", ["hshape"], ["h0"], value=_init("v", [0.1], elem)),
             helper.make_node("Loop", ["T" if trips == "shape" else ("big" if cond == "counter" else "T3"),
                                       "true", "h0"], ["hT", "hs"], body=body),
             helper.make_node("ReduceMean", ["hs"], ["hm"], axes=[0], keepdims=0),
             helper.make_node("Add", ["hT", "hm"], ["z"])]
    inits = [_init("U", u, elem), _init("W", w, elem),
             numpy_helper.from_array(np.array(1, np.int64), "k1"),
             numpy_helper.from_array(np.array([0], np.int64), "k0"),
             numpy_helper.from_array(np.array([1], np.int64), "k1v"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array(3, np.int64), "T3"),
             numpy_helper.from_array(np.array(1000, np.int64), "big"),
             numpy_helper.from_array(np.array(True), "true")]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", "T", 3])],
                  [helper.make_tensor_value_info("z", elem, ["N", 2])], inits, opset=17)


@pytest.mark.parametrize("trips,cond", [("shape", "none"), ("const", "none"), ("const", "counter")])
def test_gradient_through_loop_equals_finite_differences(trips, cond):
    x = rng_(8).normal(size=(2, 3, 3))
    seed = rng_(9).normal(size=(2, 2))
    got = gradient(rnn_loop_model(F32, trips, cond), x.astype(np.float32), seed)
    want = finite_differences(rnn_loop_model(F64, trips, cond), {"x": x}, "x", seed)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unrolled_loop_computes_the_same_outputs():
    m = rnn_loop_model(F32)
    g = Graph(read_model(m)).specialize({"x": (2, 4, 3)})
    unrolled = C.unroll_loops(g, [n.name for n in g.nodes if n.op_type == "Loop"])
    assert "Loop" not in {n.op_type for n in unrolled.graph.node}
    x = rng_(10).normal(size=(2, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(_session(unrolled).run(["z"], {"x": x})[0], _session(m).run(["z"], {"x": x})[0],
                               rtol=1e-6, atol=1e-6)


def test_loop_with_data_dependent_end_is_refused_with_the_reason():
    m = rnn_loop_model(F32)
    body = m.graph.node[6].attribute[0].g
    # cond_out = sum(h_out) > 0: the loop may stop on the data before its T steps.
    del body.node[-1]
    body.node.extend([helper.make_node("ReduceSum", ["h_out"], ["hsum"], keepdims=0),
                      helper.make_node("Greater", ["hsum", "zf"], ["cond_out"])])
    body.initializer.append(_init("zf", 0.0, F32))
    g = Graph(read_model(m))
    assert unsupported(g, GRADIENT, ["x"], "z") == ["Loop"]  # what inspect reports
    # A scalar condition on the data couples the samples: compiled for one batch shape.
    with pytest.raises(UnsupportedOperatorError, match="Loop node .*data-dependent"):
        compile_explainer(g.specialize({"x": (2, 3, 3)}), GRADIENT, ["x"], "z", method="gradient")


def test_loop_with_trip_count_known_only_at_run_time_is_refused():
    m = rnn_loop_model(F32)
    # The trip count is an input of the model: nothing fixes it at compile time.
    m.graph.input.append(helper.make_tensor_value_info("steps", TensorProto.INT64, ["N"]))
    m.graph.node.insert(0, helper.make_node("ReduceMax", ["steps"], ["steps_max"], keepdims=0))
    m.graph.node[7].input[0] = "steps_max"
    e = Explainer(m)
    assert unsupported(e.graph, GRADIENT, ["x"], "z") == ["Loop"]
    x = rng_(12).normal(size=(2, 3, 3)).astype(np.float32)
    with pytest.raises(UnsupportedOperatorError, match="trip count is known only at run time"):
        e.attribute({"x": x, "steps": np.array([3, 3])}, method="gradient", target=0)


@pytest.mark.parametrize("trips,cond", [("shape", "none"), ("const", "none"), ("const", "counter")])
def test_loops_the_input_shapes_fix_are_supported_before_specialisation(trips, cond):
    # inspect analyses the model as loaded (the sequence axis still symbolic).
    e = Explainer(rnn_loop_model(F32, trips, cond))
    assert unsupported(e.graph, GRADIENT, ["x"], "z") == []


# ----------------------------------------------------------------------------- Scan
def scan_model(elem=F32, in_axis=1, in_dir=0, out_axis=1, out_dir=0, rev2=1):
    """A Scan over axis `in_axis` of x (N, T, 3) and, reversed, of v (N, T, 3): state
    s_{t+1} = tanh(s_t U + x_t W) * v_t; scan output s_t stacked at `out_axis`; the output
    is the final state plus a weighted sum of the stacked states."""
    r = rng_(13)
    u, w = r.normal(size=(2, 2)) * 0.5, r.normal(size=(3, 2))
    wt = r.normal(size=(4,))
    body = helper.make_graph(
        [helper.make_node("MatMul", ["xt", "W"], ["a"]), helper.make_node("MatMul", ["s_in", "U"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Tanh", ["c"], ["d"]),
         helper.make_node("Slice", ["vt", "s0", "s2", "s1"], ["v2"]),
         helper.make_node("Mul", ["d", "v2"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["s_scan"])],
        "body",
        [helper.make_tensor_value_info("s_in", elem, ["N", 2]),
         helper.make_tensor_value_info("xt", elem, ["N", 3]),
         helper.make_tensor_value_info("vt", elem, ["N", 3])],
        [helper.make_tensor_value_info("s_out", elem, ["N", 2]),
         helper.make_tensor_value_info("s_scan", elem, None)])
    x_in = "x" if in_axis == 1 else "xt_"
    pre = [] if in_axis == 1 else [helper.make_node("Transpose", ["x"], ["xt_"], perm=[1, 0, 2])]
    nodes = pre + [
        helper.make_node("Scan", ["s0v", x_in, "x"], ["sT", "ss"], body=body, num_scan_inputs=2,
                         scan_input_axes=[in_axis if in_axis == 1 else 0, 1], scan_input_directions=[in_dir, rev2],
                         scan_output_axes=[out_axis], scan_output_directions=[out_dir]),
        # ss is (N, T, 2) for out_axis 1 (or -2), (T, N, 2) for 0.
        helper.make_node("Transpose", ["ss"], ["ss_t"], perm=[1, 0, 2] if out_axis == 0 else [0, 1, 2]),
        helper.make_node("Unsqueeze", ["wt", "ax"], ["wt2"]),
        helper.make_node("Mul", ["ss_t", "wt2"], ["sw"]),
        helper.make_node("ReduceSum", ["sw", "ax1"], ["ssum"], keepdims=0),
        helper.make_node("Add", ["sT", "ssum"], ["z"])]
    inits = [_init("U", u, elem), _init("W", w, elem), _init("wt", wt, elem),
             _init("s0v", np.full((1, 2), 0.2), elem),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([2], np.int64), "s2"),
             numpy_helper.from_array(np.array([1], np.int64), "s1"),
             numpy_helper.from_array(np.array([0, 2], np.int64), "ax"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, [1, 4, 3])],
                  [helper.make_tensor_value_info("z", elem, [1, 2])], inits)


@pytest.mark.parametrize("in_axis,in_dir,out_axis,out_dir", [(1, 0, 1, 0), (1, 1, 0, 1), (0, 0, -2, 1)])
def test_gradient_through_scan_equals_finite_differences(in_axis, in_dir, out_axis, out_dir):
    x = rng_(14).normal(size=(1, 4, 3))
    seed = rng_(15).normal(size=(1, 2))
    got = gradient(scan_model(F32, in_axis, in_dir, out_axis, out_dir), x.astype(np.float32), seed)
    want = finite_differences(scan_model(F64, in_axis, in_dir, out_axis, out_dir), {"x": x}, "x", seed)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_unrolled_scan_computes_the_same_outputs():
    for args in [(1, 0, 1, 0), (1, 1, 0, 1), (0, 0, -2, 1)]:
        m = scan_model(F32, *args)
        g = Graph(read_model(m))
        unrolled = C.unroll_loops(g, [n.name for n in g.nodes if n.op_type == "Scan"])
        assert "Scan" not in {n.op_type for n in unrolled.graph.node}
        x = rng_(16).normal(size=(1, 4, 3)).astype(np.float32)
        np.testing.assert_allclose(_session(unrolled).run(None, {"x": x})[0], _session(m).run(None, {"x": x})[0],
                                   rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- validity
def untyped_outputs_model():
    """z = tanh(x) W, and a second output g from an operator ONNX shape inference does not
    know (onnxruntime's com.microsoft Gelu): g has no type or shape in the specialised model."""
    w = rng_(17).normal(size=(3, 2))
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("MatMul", ["t", "W"], ["z"]),
             helper.make_node("Gelu", ["t"], ["g"], domain="com.microsoft")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, ["N", 3])],
                          [helper.make_tensor_value_info("z", F32, ["N", 2]),
                           helper.make_tensor_value_info("g", F32, ["N", 3])], [_init("W", w, F32)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=8)
    onnx.checker.check_model(m)
    return m


def test_explainer_is_valid_when_shape_inference_cannot_type_its_tensors():
    e = Explainer(untyped_outputs_model())
    x = rng_(18).normal(size=(2, 3)).astype(np.float32)
    graph = e._graph_for(e._feeds(x))
    assert graph.shape("g") is None
    # The untyped tensor as a forward output and as a requested activation.
    spec = compile_explainer(graph, GRADIENT, ["x"], "z", activations=["g"])
    onnx.checker.check_model(spec.model)
    out = {o.name: o for o in spec.model.graph.output}
    assert len(out[spec.activations["g"]].type.tensor_type.shape.dim) == 2
    seed = rng_(19).normal(size=(2, 2)).astype(np.float32)
    got = gradient(untyped_outputs_model(), x, seed)
    w = numpy_helper.to_array(untyped_outputs_model().graph.initializer[0])
    np.testing.assert_allclose(got, (seed @ w.T) * (1 - np.tanh(x) ** 2), rtol=1e-5, atol=1e-6)


def ir3_model(elem=F32, opset=8, ir=3):
    """An old-style model: IR version 3, opset 8, initializers also listed as graph inputs."""
    r = rng_(18)
    w, bias = r.normal(size=(3, 4)), r.normal(size=(4,))
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["h"]), helper.make_node("Tanh", ["h"], ["z"])]
    inits = [_init("W", w, elem), _init("B", bias, elem)]
    inputs = [helper.make_tensor_value_info("x", elem, ["N", 3]),
              helper.make_tensor_value_info("W", elem, [3, 4]), helper.make_tensor_value_info("B", elem, [4])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("z", elem, ["N", 4])], inits, opset=opset,
                  ir_version=ir)


@pytest.mark.parametrize("ir,opset", [(3, 8), (3, 9), (4, 9), (5, 10), (6, 11), (7, 12), (8, 13), (9, 19), (10, 21),
                                      (13, 21)])
def test_every_ir_version_onnxruntime_loads_gives_an_exact_explainer(ir, opset):
    # Initializers also listed as graph inputs: required by IR 3, allowed after.
    x = rng_(19).normal(size=(2, 3))
    seed = rng_(20).normal(size=(2, 4))
    e = Explainer(ir3_model(F32, opset, ir))
    got = e.attribute(x.astype(np.float32), method="gradient", target=seed.astype(np.float32), probability=True)
    spec = compile_explainer(e._graph_for(e._feeds(x.astype(np.float32))), GRADIENT, ["x"], "z")
    onnx.checker.check_model(spec.model)
    _session(spec.model)  # onnxruntime accepts the explainer's IR version
    want = finite_differences(ir3_model(F64, opset, ir), {"x": x}, "x", seed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def loop_with_if_model(elem=F32):
    """A Loop whose body holds an If on the iteration's parity (tanh on even steps, sin on
    odd ones) reading the body's own tensor `c`: unrolling renames it inside the branches."""
    r = rng_(21)
    u = r.normal(size=(3, 3)) * 0.5
    then_g = helper.make_graph([helper.make_node("Tanh", ["c"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", elem, ["N", 3])])
    else_g = helper.make_graph([helper.make_node("Sin", ["c"], ["s"])], "else", [],
                               [helper.make_tensor_value_info("s", elem, ["N", 3])])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "U"], ["b"]), helper.make_node("Add", ["b", "x"], ["c"]),
         helper.make_node("Mod", ["i", "two"], ["parity"]), helper.make_node("Equal", ["parity", "zero"], ["even"]),
         helper.make_node("If", ["even"], ["h_out"], then_branch=then_g, else_branch=else_g),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", elem, ["N", 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", elem, ["N", 3])],
        initializer=[numpy_helper.from_array(np.array(2, np.int64), "two"),
                     numpy_helper.from_array(np.array(0, np.int64), "zero")])
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["z"], body=body)]
    inits = [_init("U", u, elem), numpy_helper.from_array(np.array(3, np.int64), "n")]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", 3])],
                  [helper.make_tensor_value_info("z", elem, ["N", 3])], inits)


def test_gradient_through_if_nested_in_a_loop_equals_finite_differences():
    x = rng_(22).normal(size=(2, 3))
    seed = rng_(23).normal(size=(2, 3))
    got = gradient(loop_with_if_model(F32), x.astype(np.float32), seed)
    want = finite_differences(loop_with_if_model(F64), {"x": x}, "x", seed)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def loop_in_if_model(elem=F32):
    """An If whose then-branch runs a 2-step Loop over the outer x (h <- tanh(h U + x))."""
    u = rng_(24).normal(size=(3, 3)) * 0.5
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "U"], ["b"]), helper.make_node("Add", ["b", "x"], ["c"]),
         helper.make_node("Tanh", ["c"], ["h_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", elem, ["N", 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", elem, ["N", 3])])
    then_g = helper.make_graph([helper.make_node("Loop", ["n", "", "x"], ["t"], body=body)], "then", [],
                               [helper.make_tensor_value_info("t", elem, ["N", 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", elem, ["N", 3])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
             helper.make_node("Greater", ["sx", "zf"], ["cond"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g)]
    inits = [_init("U", u, elem), _init("zf", 0.0, elem), numpy_helper.from_array(np.array(2, np.int64), "n")]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", 3])],
                  [helper.make_tensor_value_info("z", elem, ["N", 3])], inits)


def test_gradient_through_a_loop_nested_in_an_if_equals_finite_differences():
    x = np.abs(rng_(25).normal(size=(2, 3)))
    seed = rng_(26).normal(size=(2, 3))
    got = gradient(loop_in_if_model(F32), x.astype(np.float32), seed)
    want = finite_differences(loop_in_if_model(F64), {"x": x}, "x", seed)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def two_output_if_model(elem=F32, use_second=True):
    """If with two outputs; the then-branch passes x through (an Identity) as its first."""
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t1"]), helper.make_node("Tanh", ["x"], ["t2"])],
                               "then", [],
                               [helper.make_tensor_value_info("t1", elem, ["N", 3]),
                                helper.make_tensor_value_info("t2", elem, ["N", 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e1"]), helper.make_node("Mul", ["x", "x"], ["e2"])],
                               "else", [], [helper.make_tensor_value_info("e1", elem, ["N", 3]),
                                            helper.make_tensor_value_info("e2", elem, ["N", 3])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["sx"], keepdims=0),
             helper.make_node("Greater", ["sx", "zf"], ["cond"]),
             helper.make_node("If", ["cond"], ["y1", "y2"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Mul", ["y1", "w"], ["y1w"]),
             helper.make_node("Add", ["y1w", "y2"] if use_second else ["y1w", "y1w"], ["z"])]
    inits = [_init("zf", 0.0, elem), _init("w", [0.5, -1.0, 2.0], elem)]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", 3])],
                  [helper.make_tensor_value_info("z", elem, ["N", 3])], inits)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["then", "else"])
@pytest.mark.parametrize("use_second", [True, False], ids=["both_outputs", "first_output"])
def test_if_with_passthrough_and_unused_outputs_equals_finite_differences(sign, use_second):
    x = np.abs(rng_(27).normal(size=(2, 3))) * sign
    seed = rng_(28).normal(size=(2, 3))
    got = gradient(two_output_if_model(F32, use_second), x.astype(np.float32), seed)
    want = finite_differences(two_output_if_model(F64, use_second), {"x": x}, "x", seed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_if_with_undeclared_branch_shapes_compiles_an_exact_explainer():
    # Exporters often leave branch outputs untyped: the If output's batch axis then gets a
    # fresh symbol from shape inference. The explainer, run as is, is still exact.
    m = if_model(F32)
    for a in m.graph.node[2].attribute:
        for vi in a.g.output:
            vi.type.tensor_type.ClearField("shape")
    x = np.abs(rng_(29).normal(size=(2, 4))).astype(np.float32)
    seed = rng_(30).normal(size=(2, 2)).astype(np.float32)
    g = Graph(read_model(m)).specialize({"x": x.shape})
    spec = compile_explainer(g, GRADIENT, ["x"], "z")
    onnx.checker.check_model(spec.model)
    got = _session(spec.model).run([spec.attributions["x"]], {"x": x, spec.seed: seed})[0]
    m64 = if_model(F64)
    want = finite_differences(m64, {"x": x.astype(np.float64)}, "x", seed.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- exporters
def _torch_rnn():
    import torch

    class Rnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.w, self.u = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4, bias=False)

        def forward(self, x):
            h = torch.zeros(x.size(0), 4)
            for t in range(x.size(1)):
                h = torch.tanh(self.w(x[:, t]) + self.u(h))
            return h

    return Rnn()


def test_torchscript_loop_gradient_equals_torch_autograd():
    # A scripted for-loop exports as a Loop over Shape(x)[1] whose body slices x with
    # axes computed at run time: unrolled and folded, the rules apply.
    import io

    import torch

    module = _torch_rnn()
    f = io.BytesIO()
    torch.onnx.export(torch.jit.script(module), (torch.randn(2, 5, 3),), f, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "N", 1: "T"}}, opset_version=17, dynamo=False)
    model = onnx.load_from_string(f.getvalue())
    assert "Loop" in {n.op_type for n in model.graph.node}
    x = rng_(31).normal(size=(2, 5, 3)).astype(np.float32)
    seed = rng_(32).normal(size=(2, 4)).astype(np.float32)
    got = Explainer(model).attribute(x, method="gradient", target=seed, probability=True)
    xt = torch.tensor(x, requires_grad=True)
    (module(xt) * torch.tensor(seed)).sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_torch_cond_if_gradient_equals_torch_autograd():
    import torch

    class Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.lin = torch.nn.Linear(4, 2)

        def forward(self, x):
            y = torch.cond(x.sum() > 0, lambda v: torch.tanh(v) * 2, lambda v: torch.sigmoid(v) - v, (x,))
            return self.lin(y)

    module = Cond()
    program = torch.onnx.export(module, (torch.randn(2, 4),), dynamo=True, input_names=["x"], output_names=["z"],
                                dynamic_shapes={"x": {0: torch.export.Dim("N")}}, verbose=False)
    model = program.model_proto
    assert "If" in {n.op_type for n in model.graph.node}
    for sign in (1.0, -1.0):
        x = (np.abs(rng_(33).normal(size=(2, 4))) * sign).astype(np.float32)
        seed = rng_(34).normal(size=(2, 2)).astype(np.float32)
        got = Explainer(model).attribute(x, method="gradient", target=seed, probability=True)
        xt = torch.tensor(x, requires_grad=True)
        (module(xt) * torch.tensor(seed)).sum().backward()
        np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_deeplift_through_an_unrolled_loop_sums_to_the_output_difference():
    # The loop's steps are plain nodes once unrolled, so DeepLIFT's baseline copy of the
    # forward graph covers them and summation-to-delta holds (Add, MatMul, Tanh only).
    e = Explainer(rnn_loop_model(F32))
    x = rng_(35).normal(size=(2, 3, 3)).astype(np.float32)
    a = e.attribute(x, method="deeplift", target=0)
    delta = (e.predict(x) - e.predict(np.zeros_like(x)))[:, 0]
    np.testing.assert_allclose(a.reshape(2, -1).sum(axis=1), delta, rtol=1e-4, atol=1e-6)


def while_loop_model(elem=F32):
    """The form tf2onnx gives a Keras RNN's while-loop: the trip count is INT64_MAX, the
    initial condition is `0 < T` with T = Shape(x)[1], the body carries its own counter
    t and ends when t + 1 reaches T; each step reads x[:, t] (a Gather by the carried
    counter) and the outer weight W."""
    w = rng_(36).normal(size=(3, 3)) * 0.7
    body = helper.make_graph(
        [helper.make_node("Add", ["t_in", "one"], ["t_out"]),
         helper.make_node("Less", ["t_out", "T"], ["cond_out"]),
         helper.make_node("Gather", ["x", "t_in"], ["xt"], axis=1),
         helper.make_node("MatMul", ["h_in", "W"], ["a"]), helper.make_node("Add", ["a", "xt"], ["b"]),
         helper.make_node("Tanh", ["b"], ["h_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("t_in", TensorProto.INT64, []),
         helper.make_tensor_value_info("h_in", elem, ["N", 3])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("t_out", TensorProto.INT64, []),
         helper.make_tensor_value_info("h_out", elem, ["N", 3])],
        initializer=[numpy_helper.from_array(np.array(1, np.int64), "one")])
    nodes = [helper.make_node("Shape", ["x"], ["sx"]), helper.make_node("Gather", ["sx", "k1"], ["T"]),
             helper.make_node("Less", ["zero", "T"], ["cond0"]),
             helper.make_node("Gather", ["x", "zero"], ["h0"], axis=1),
             helper.make_node("Loop", ["max", "cond0", "zero", "h0"], ["t_final", "z"], body=body)]
    inits = [_init("W", w, elem), numpy_helper.from_array(np.array(1, np.int64), "k1"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(np.iinfo(np.int64).max, np.int64), "max")]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", "T", 3])],
                  [helper.make_tensor_value_info("z", elem, ["N", 3])], inits)


def test_while_loop_ended_by_a_carried_counter_equals_finite_differences():
    x = rng_(37).normal(size=(2, 4, 3))
    seed = rng_(38).normal(size=(2, 3))
    e = Explainer(while_loop_model(F32))
    assert unsupported(e.graph, GRADIENT, ["x"], "z") == []
    got = e.attribute(x.astype(np.float32), method="gradient", target=seed.astype(np.float32), probability=True)
    want = finite_differences(while_loop_model(F64), {"x": x}, "x", seed)
    assert np.abs(want).max() > 1e-2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_loop_too_long_to_unroll_is_refused_with_the_bound():
    m = loop_with_if_model(F32)
    for t in m.graph.initializer:
        if t.name == "n":
            t.CopyFrom(numpy_helper.from_array(np.array(9000, np.int64), "n"))  # 6 nodes each
    x = rng_(39).normal(size=(2, 3)).astype(np.float32)
    with pytest.raises(UnsupportedOperatorError, match="exceed 50000 nodes"):
        Explainer(m).attribute(x, method="gradient", target=rng_(40).normal(size=(2, 3)).astype(np.float32))


def shape_if_model(elem=F32):
    """If on a shape (TorchScript's `if x.size(1) > 2`): fixed once the input shape is."""
    r = rng_(41)
    w = r.normal(size=(3, 3))
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("Tanh", ["a"], ["t"])],
                               "then", [], [helper.make_tensor_value_info("t", elem, ["N", 3])])
    else_g = helper.make_graph([helper.make_node("Sigmoid", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", elem, ["N", 3])])
    nodes = [helper.make_node("Shape", ["x"], ["sx"]), helper.make_node("Gather", ["sx", "k1"], ["c"]),
             helper.make_node("Greater", ["c", "k2"], ["cond"]),
             helper.make_node("If", ["cond"], ["z"], then_branch=then_g, else_branch=else_g)]
    inits = [_init("W", w, elem), numpy_helper.from_array(np.array(1, np.int64), "k1"),
             numpy_helper.from_array(np.array(2, np.int64), "k2")]
    return _model(nodes, [helper.make_tensor_value_info("x", elem, ["N", "C"])],
                  [helper.make_tensor_value_info("z", elem, ["N", 3])], inits)


def test_if_fixed_by_the_input_shape_is_inlined_and_leaves_outputs_unchanged():
    m = shape_if_model()
    x = rng_(42).normal(size=(2, 3)).astype(np.float32)
    g = Graph(read_model(m)).specialize({"x": x.shape})
    cond = C._static_value(g, "cond", {}, {})  # Shape(x)[1] > 2 with x's axis 1 static
    assert cond is not None and bool(cond)
    inlined = C.inline_constant_ifs(onnx.load_from_string(g.model.SerializeToString()), {"cond": cond})
    assert "If" not in {n.op_type for n in inlined.graph.node}
    np.testing.assert_allclose(_session(inlined).run(None, {"x": x})[0], _session(m).run(None, {"x": x})[0],
                               rtol=1e-6, atol=1e-7)


def test_deeplift_through_an_if_fixed_by_the_input_shape_sums_to_the_output_difference():
    # Inlined once the shapes are known, the branch is plain nodes: DeepLIFT applies.
    e = Explainer(shape_if_model())
    x = rng_(43).normal(size=(2, 3)).astype(np.float32)
    a = e.attribute(x, method="deeplift", target=1)
    delta = (e.predict(x) - e.predict(np.zeros_like(x)))[:, 1]
    np.testing.assert_allclose(a.sum(axis=1), delta, rtol=1e-4, atol=1e-6)
    seed = rng_(44).normal(size=(2, 3))
    got = gradient(shape_if_model(F32), x, seed)
    want = finite_differences(shape_if_model(F64), {"x": x.astype(np.float64)}, "x", seed)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [rnn_loop_model, scan_model], ids=["Loop", "Scan"])
def test_operator_without_rule_inside_a_loop_body_is_refused_by_name(monkeypatch, make):
    from onnxplain.rules import base

    monkeypatch.delitem(base.RULES, ("gradient", "Tanh"))
    m = make(F32)
    g = Graph(read_model(m))
    assert unsupported(g, GRADIENT, ["x"], "z") == ["Tanh"]
    shape = (2, 3, 3) if make is rnn_loop_model else (1, 4, 3)
    with pytest.raises(UnsupportedOperatorError, match="Tanh"):
        compile_explainer(g.specialize({"x": shape}), GRADIENT, ["x"], "z", method="gradient")


# ----------------------------------------------------------------------------- LRP positions
def activation_if_model(inline=False):
    """x (N, 4) -> If (on an integer input s, not on x) then relu(x) else -x -> x W -> z.
    With `inline`, the then-branch written out: what the If computes where sum(s) > 0."""
    w = rng_(45).normal(size=(4, 3))
    if inline:
        nodes = [helper.make_node("Relu", ["x"], ["y"])]
    else:
        then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", F32, ["N", 4])])
        else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", F32, ["N", 4])])
        nodes = [helper.make_node("ReduceSum", ["s"], ["ss"], keepdims=0),
                 helper.make_node("Greater", ["ss", "zero"], ["cond"]),
                 helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    nodes.append(helper.make_node("MatMul", ["y", "W"], ["z"]))
    inits = [_init("W", w, F32), numpy_helper.from_array(np.array(0, np.int64), "zero")]
    return _model(nodes, [helper.make_tensor_value_info("x", F32, ["N", 4]),
                          helper.make_tensor_value_info("s", TensorProto.INT64, ["N", 1])],
                  [helper.make_tensor_value_info("z", F32, ["N", 3])], inits)


@pytest.mark.parametrize("method", ["lrp.epsilon_plus_flat", "deep_taylor", "lrp.epsilon_alpha2_beta1_flat"])
def test_first_layer_rules_find_the_first_layer_behind_an_if(method):
    # The MatMul after the If is the first linear layer: the If's branches read x.
    x = np.abs(rng_(46).normal(size=(2, 4))).astype(np.float32)
    feeds = {"x": x, "s": np.ones((2, 1), np.int64)}
    got = Explainer(activation_if_model()).attribute(feeds, method=method, target=0)
    want = Explainer(activation_if_model(inline=True)).attribute(feeds, method=method, target=0)
    got, want = (got["x"], want["x"]) if isinstance(got, dict) else (got, want)
    assert np.abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["lrp.epsilon_plus_flat", "deep_taylor"])
def test_position_rules_with_a_linear_layer_inside_a_branch_are_refused(method, tmp_path):
    x = np.abs(rng_(47).normal(size=(2, 4))).astype(np.float32)
    with pytest.raises(UnsupportedOperatorError, match="If"):
        Explainer(if_model()).attribute(x, method=method, target=0)
