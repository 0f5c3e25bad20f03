"""Layouts real models have: the batch on another axis or on none, fixed batch sizes, 0-d
and state inputs, sequence-first outputs, scikit-learn's ZipMap, ai.onnx.ml-only graphs,
and a terminal Softmax behind reshapes. Each is handled, or refused with a typed error --
never answered on the wrong axis."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer, OptionError

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _fd(f, x, seed, h=1e-3):
    """Central differences of sum(seed * f(x)) in float64, element by element."""
    g = np.zeros_like(x, dtype=np.float64)
    for i in np.ndindex(x.shape):
        xp, xm = x.astype(np.float64).copy(), x.astype(np.float64).copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (np.sum(seed * f(xp)) - np.sum(seed * f(xm))) / (2 * h)
    return g


W = RNG.normal(size=(4, 3)).astype(np.float32)


def test_a_sequence_first_output_is_explained_on_its_batch_axis():
    # x (N, T, F) -> Transpose -> (T, N, F) @ W -> (T, N, C): the CTC/LSTM layout.
    m = _model([helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
                helper.make_node("MatMul", ["xt", "w"], ["y"])],
               [_vi("x", ["N", 5, 4])], [_vi("y", [5, "N", 3])], [("w", W)])
    e = Explainer(m)
    x = RNG.normal(size=(2, 5, 4)).astype(np.float32)
    assert e.predict(x).shape == (5, 2, 3)  # the model's own layout
    seed = RNG.normal(size=(5, 2, 3)).astype(np.float32)  # shaped like the output
    got = e.attribute(x, target=seed)
    want = np.einsum("tnc,fc->ntf", seed, W)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_state_input_batched_on_its_second_axis_is_attributed_in_its_own_layout():
    # y = x @ W + h[0] + 2 h[1]; h shaped (2, N, 3) like an LSTM/GRU state.
    two = np.array([1.0, 2.0], np.float32).reshape(2, 1, 1)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["xw"]),
                helper.make_node("Mul", ["h", "two"], ["h2"]),
                helper.make_node("ReduceSum", ["h2", "ax0"], ["hs"], keepdims=0),
                helper.make_node("Add", ["xw", "hs"], ["y"])],
               [_vi("x", ["batch", 4]), _vi("h", [2, "batch", 3])], [_vi("y", ["batch", 3])],
               [("w", W), ("two", two), ("ax0", np.array([0]))])
    e = Explainer(m)
    assert e.graph.input_batch_axes() == ({"x": 0, "h": 1}, None)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    h = RNG.normal(size=(2, 3, 3)).astype(np.float32)
    got = e.attribute({"x": x, "h": h}, target=[0, 1, 2])
    assert got["h"].shape == (2, 3, 3) and got["x"].shape == (3, 4)
    onehot = np.eye(3, dtype=np.float32)[[0, 1, 2]]
    np.testing.assert_allclose(got["x"], onehot @ W.T, rtol=1e-6)
    np.testing.assert_allclose(got["h"], np.stack([onehot, 2 * onehot]), rtol=1e-6)
    # Hold the state fixed: only x is attributed.
    only_x = e.attribute({"x": x, "h": h}, target=[0, 1, 2], wrt="x")
    np.testing.assert_allclose(only_x, got["x"])


def test_a_0d_input_stays_0d_and_is_held_fixed():
    # y = x * rate, rate a 0-d input (a sample rate).
    m = _model([helper.make_node("Mul", ["x", "rate"], ["y"])],
               [_vi("x", ["N", 3]), _vi("rate", [])], [_vi("y", ["N", 3])])
    e = Explainer(m)
    x = RNG.normal(size=(2, 3)).astype(np.float32)
    feeds = {"x": x, "rate": np.float32(4.0)}
    np.testing.assert_allclose(e.predict(feeds), 4 * x)
    np.testing.assert_allclose(e.attribute(feeds, target=1), np.tile([0, 4, 0], (2, 1)))
    # Attributed itself, a 0-d input gets one gradient per sample: d y[i,1] / d rate = x[i,1].
    np.testing.assert_allclose(e.attribute(feeds, target=1, wrt="rate"), x[:, 1], rtol=1e-6)
    np.testing.assert_allclose(e.attribute(feeds, method="occlusion", target=1, window=(1,)),
                               np.tile([0, 4, 0], (2, 1)) * x, rtol=1e-5)


def test_a_batch_1_export_explains_any_number_of_samples_one_by_one():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Tanh", ["z"], ["y"])],
               [_vi("x", [1, 4])], [_vi("y", [1, 3])], [("w", W)])
    e = Explainer(m)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    got = e.attribute(x, target=[2, 0, 1])
    for i, c in enumerate([2, 0, 1]):
        z = x[i] @ W
        np.testing.assert_allclose(got[i], W[:, c] * (1 - np.tanh(z[c]) ** 2), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e.predict(x), np.tanh(x @ W), rtol=1e-6)
    ig = e.attribute(x, method="integrated_gradients", target=0, n_steps=16)
    np.testing.assert_allclose(ig.sum(1), np.tanh(x @ W)[:, 0], rtol=1e-3)  # completeness


def test_a_fixed_batch_of_two_runs_three_samples_padded():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [2, 4])], [_vi("y", [2, 3])], [("w", W)])
    e = Explainer(m)
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_allclose(e.predict(x), x @ W, rtol=1e-6)
    np.testing.assert_allclose(e.attribute(x, target=1), np.tile(W[:, 1], (3, 1)), rtol=1e-6)


def test_an_output_that_merges_the_batch_is_explained_sample_by_sample():
    # y = Reshape(x @ W, [-1]): the batch and the classes merged into one axis.
    m = _model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Reshape", ["z", "s"], ["y"])],
               [_vi("x", ["N", 4])], [_vi("y", ["M"])], [("w", W), ("s", np.array([-1]))])
    e = Explainer(m)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    seed = np.array([[0, 1, 0], [0, 0, 2]], np.float32)  # one row per sample, its own output
    got = e.attribute(x, target=seed)
    np.testing.assert_allclose(got, seed @ W.T, rtol=1e-6)


def _softmax_behind(kind):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits"])]
    if kind == "identity":
        nodes += [helper.make_node("Softmax", ["logits"], ["p"], axis=-1), helper.make_node("Identity", ["p"], ["y"])]
    elif kind == "reshape":
        nodes += [helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
                  helper.make_node("Reshape", ["p", "s"], ["y"])]
    return _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], [("w", W), ("s", np.array([-1, 3]))])


@pytest.mark.parametrize("kind", ["identity", "reshape"])
def test_softmax_is_looked_through_behind_an_identity_or_reshape(kind):
    e = Explainer(_softmax_behind(kind))
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(e.attribute(x, target=1), np.tile(W[:, 1], (2, 1)), rtol=1e-6)


def test_softmax_of_an_opset_11_model_is_looked_through_after_conversion():
    # Softmax-11 on (N, C, 2) with axis=1 flattens to 2-D: the converter writes Flatten ->
    # Softmax -> Reshape, and the logits must still be what is explained.
    w = RNG.normal(size=(4, 6)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Reshape", ["z", "s"], ["logits"]),
                helper.make_node("Softmax", ["logits"], ["y"], axis=1)],
               [_vi("x", ["N", 4])], [_vi("y", ["N", 3, 2])], [("w", w), ("s", np.array([0, 3, 2]))], opset=11)
    e = Explainer(m)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    seed = np.zeros((2, 3, 2), np.float32)
    seed[:, 1, 0] = 1
    want = np.tile(w.reshape(4, 3, 2)[:, 1, 0], (2, 1))
    np.testing.assert_allclose(e.attribute(x, target=seed), want, rtol=1e-5)


def test_a_scikit_learn_classifier_with_zipmap_loads_and_explains_its_probabilities():
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx

    X = RNG.normal(size=(60, 4)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    clf = LogisticRegression().fit(X, y)
    e = Explainer(to_onnx(clf, X[:1]))
    x = X[:3]
    probs = e.predict(x, output="output_probability") if False else None  # noqa: F841  (a sequence output)
    assert e.explained_tensor() != "output_label"
    a = e.attribute(x, method="occlusion", target=1, window=(1,))
    assert a.shape == x.shape and np.all(np.isfinite(a))
    # Occluding a feature moves P(class 1) the way the fitted coefficients say.
    signs = np.sign(a) * np.sign(x)
    coef = np.sign(clf.coef_[0])
    big = np.abs(a) > 1e-4
    assert np.all((signs == coef)[big])


def test_a_model_of_ml_operators_only_loads_and_runs():
    x = _vi("x", ["N", 3])
    node = helper.make_node("Scaler", ["x"], ["y"], domain="ai.onnx.ml", offset=[0.0, 1.0, 2.0],
                            scale=[1.0, 2.0, 3.0])
    m = helper.make_model(helper.make_graph([node], "g", [x], [_vi("y", ["N", 3])]),
                          opset_imports=[helper.make_opsetid("ai.onnx.ml", 3)])
    m.ir_version = 8
    e = Explainer(m)
    v = RNG.normal(size=(2, 3)).astype(np.float32)
    np.testing.assert_allclose(e.predict(v), (v - [0, 1, 2]) * [1, 2, 3], rtol=1e-6)
    a = e.attribute(v, method="occlusion", target=2, window=(1,))
    np.testing.assert_allclose(a[:, 2], ((v - [0, 1, 2]) * [1, 2, 3])[:, 2] - (-2 * 3), rtol=1e-5)


def test_a_model_importing_no_opset_is_refused():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["N", 2])], [_vi("y", ["N", 2])])
    del m.opset_import[:]
    with pytest.raises(Exception, match="opset"):
        Explainer(m)


def test_naming_an_integer_or_unknown_input_with_wrt_is_an_option_error():
    m = _model([helper.make_node("Mul", ["x", "rate"], ["y"])],
               [_vi("x", ["N", 3]), _vi("rate", [])], [_vi("y", ["N", 3])])
    e = Explainer(m)
    with pytest.raises(OptionError, match="wrt"):
        e.attribute({"x": np.ones((1, 3), np.float32), "rate": np.float32(1)}, wrt="nope", target=0)
    with pytest.raises(OptionError, match="either"):
        e.attribute({"x": np.ones((1, 3), np.float32), "rate": np.float32(1)}, wrt="x", layer="y", target=0)


def test_an_ir3_model_whose_initializers_are_not_listed_as_inputs_loads_and_explains():
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", ["N", 4])], [_vi("y", ["N", 3])],
               [("w", W)], opset=8)
    m.ir_version = 3
    e = Explainer(m)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(e.attribute(x, target=2), np.tile(W[:, 2], (2, 1)), rtol=1e-6)


def test_a_dimension_written_as_minus_one_is_a_free_dimension():
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", [-1, 3])], [_vi("y", [-1, 3])])
    e = Explainer(m)
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(e.predict(x), np.maximum(x, 0))
    np.testing.assert_allclose(e.attribute(x, target=0)[:, 0], (x[:, 0] > 0).astype(np.float32))


def test_predict_returns_an_output_without_a_batch_axis_as_the_model_gives_it():
    m = _model([helper.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=0)], [_vi("x", ["N", 3])], [_vi("y", [3])],
               [("ax", np.array([0]))])
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(Explainer(m).predict(x), x.sum(0), rtol=1e-6)


def _byte_model():
    # A magika-like model: byte ids -> embedding -> mean -> linear.
    table = RNG.normal(size=(256, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "bytes"], ["e"]),
             helper.make_node("ReduceMean", ["e", "ax"], ["m"], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["y"])]
    m = _model(nodes, [_vi("bytes", ["N", 6], TensorProto.INT32)], [_vi("y", ["N", 3])],
               [("table", table), ("ax", np.array([1])), ("w", W)], opset=18)
    return m, table


def test_black_box_methods_perturb_integer_inputs_with_a_baseline_id():
    m, table = _byte_model()
    e = Explainer(m)
    ids = RNG.integers(1, 256, size=(2, 6)).astype(np.int32)
    got = e.attribute(ids, method="occlusion", target=1, window=(1,), baseline=0)
    # Replacing byte j by 0 moves the score by (table[id_j] - table[0]) . W[:, 1] / 6.
    want = ((table[ids] - table[0]) @ W[:, 1]) / 6
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    ablation = e.attribute(ids, method="feature_ablation", target=1, baseline=0)
    np.testing.assert_allclose(ablation, want, rtol=1e-4, atol=1e-6)
    with pytest.raises(OptionError, match="integer"):
        e.attribute(ids, method="rise", target=1)
    # White-box methods attribute at the embedding output instead.
    assert e.attribute(ids, method="gradient", target=1).shape == (2, 6, 4)


def test_softmax_then_a_reshape_to_another_shape_explains_the_logits_in_the_outputs_shape():
    # paddle2onnx's CTC heads: (N, 6) logits -> Softmax -> Reshape (N, 3, 2).
    w = RNG.normal(size=(4, 6)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=-1),
                helper.make_node("Reshape", ["p", "s"], ["y"])],
               [_vi("x", ["N", 4])], [_vi("y", ["N", 3, 2])], [("w", w), ("s", np.array([0, 3, 2]))])
    e = Explainer(m)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    seed = np.zeros((2, 3, 2), np.float32)
    seed[:, 2, 1] = 1
    np.testing.assert_allclose(e.attribute(x, target=seed), np.tile(w[:, 5], (2, 1)), rtol=1e-5)
    np.testing.assert_allclose(e.predict(x).reshape(2, 6).sum(1), 1, rtol=1e-5)  # outputs unchanged


def test_cli_wrt_attributes_to_the_named_input_and_holds_the_state_fixed(tmp_path):
    from click.testing import CliRunner

    from onnxplain import cli

    two = np.array([1.0, 2.0], np.float32).reshape(2, 1, 1)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Mul", ["h", "two"], ["h2"]),
                helper.make_node("ReduceSum", ["h2", "ax0"], ["hs"], keepdims=0),
                helper.make_node("Add", ["xw", "hs"], ["y"])],
               [_vi("x", ["batch", 4]), _vi("h", [2, "batch", 3])], [_vi("y", ["batch", 3])],
               [("w", W), ("two", two), ("ax0", np.array([0]))])
    onnx.save(m, str(tmp_path / "m.onnx"))
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    h = RNG.normal(size=(2, 2, 3)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x, h=h)
    out = tmp_path / "a.npy"
    r = CliRunner().invoke(cli.main, ["explain", str(tmp_path / "m.onnx"), str(tmp_path / "in.npz"), "--wrt", "h",
                                      "-t", "2", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    want = np.zeros((2, 2, 3), np.float32)
    want[0, :, 2], want[1, :, 2] = 1, 2
    np.testing.assert_allclose(np.load(out), want)
    bad = CliRunner().invoke(cli.main, ["explain", str(tmp_path / "m.onnx"), str(tmp_path / "in.npz"), "--wrt", "z"])
    assert bad.exit_code == 2 and "wrt" in bad.output


def test_a_model_that_runs_through_its_first_axis_takes_the_whole_input_as_one_sample():
    # y = cumsum(x, axis 0) @ W: rows are time steps, not samples (a state carried along).
    m = _model([helper.make_node("CumSum", ["x", "ax"], ["c"]), helper.make_node("MatMul", ["c", "w"], ["y"])],
               [_vi("x", ["T", 4])], [_vi("y", ["T", 3])], [("w", W), ("ax", np.array(0))])
    e = Explainer(m)
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(e.predict(x), np.cumsum(x, 0) @ W, rtol=1e-5)
    seed = np.zeros((5, 3), np.float32)
    seed[-1, 0] = 1  # the last step's first score depends on every step
    got = e.attribute(x, target=seed)
    np.testing.assert_allclose(got, np.tile(W[:, 0], (5, 1)), rtol=1e-5)
    # Integrated gradients, whose path points would be mixed as rows of a batch, stays exact.
    ig = e.attribute(x, method="integrated_gradients", target=seed, n_steps=8)
    np.testing.assert_allclose(ig.sum(), (np.cumsum(x, 0) @ W)[-1, 0], rtol=1e-4)


def _rate_model():
    # y = x @ W1 if rate == 16000 else x @ W2, the branch read off a 0-d input (silero's sr).
    w2 = (2 * W).astype(np.float32)
    then = helper.make_graph([helper.make_node("MatMul", ["x", "w1"], ["t"])], "then", [], [_vi("t", ["N", 3])])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w2"], ["e"])], "else", [], [_vi("e", ["N", 3])])
    nodes = [helper.make_node("Equal", ["rate", "k16"], ["is16"]),
             helper.make_node("If", ["is16"], ["y"], then_branch=then, else_branch=other)]
    return _model(nodes, [_vi("x", ["N", 4]), _vi("rate", [], TensorProto.INT64)], [_vi("y", ["N", 3])],
                  [("w1", W), ("w2", w2), ("k16", np.array(16000))]), w2


def test_a_branch_chosen_by_a_fixed_input_is_explained_for_each_of_its_values():
    m, w2 = _rate_model()
    e = Explainer(m)
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    for rate, w in ((16000, W), (8000, w2), (16000, W)):
        feeds = {"x": x, "rate": np.array(rate)}
        np.testing.assert_allclose(e.predict(feeds), x @ w, rtol=1e-5)
        np.testing.assert_allclose(e.attribute(feeds, target=1), np.tile(w[:, 1], (2, 1)), rtol=1e-5)


def test_a_graph_model_whose_nodes_and_edges_differ_in_number_is_one_sample():
    # Graph pooling: y = (sum over edges of x[src]) @ W, x (nodes, F), edges (2, E).
    m = _model([helper.make_node("Gather", ["edges", "zero"], ["src"], axis=0),
                helper.make_node("Gather", ["x", "src"], ["xs"], axis=0),
                helper.make_node("ReduceSum", ["xs", "ax0"], ["pooled"], keepdims=1),
                helper.make_node("MatMul", ["pooled", "w"], ["y"])],
               [_vi("x", ["nodes", 4]), _vi("edges", [2, "edge_count"], TensorProto.INT64)], [_vi("y", [1, 3])],
               [("w", W), ("zero", np.array(0)), ("ax0", np.array([0]))])
    e = Explainer(m)
    x = RNG.normal(size=(4, 4)).astype(np.float32)
    edges = np.array([[0, 2, 2, 3, 3, 3], [1, 0, 1, 2, 0, 1]])
    feeds = {"x": x, "edges": edges}
    np.testing.assert_allclose(e.predict(feeds), x[edges[0]].sum(0, keepdims=True) @ W, rtol=1e-5)
    got = e.attribute(feeds, target=np.array([[0, 1, 0]], np.float32))
    counts = np.bincount(edges[0], minlength=4).astype(np.float32)
    np.testing.assert_allclose(got, counts[:, None] * W[:, 1][None], rtol=1e-5)


def test_a_rule_that_needs_every_shape_static_gets_the_batch_fixed_too(monkeypatch):
    # A rule that refuses a symbolic batch (as a quantized pool with auto_pad does on shapes
    # it cannot read) is compiled again with every dimension static, sample by sample.
    from onnxplain import explainer as ex
    from onnxplain.errors import ModelError

    real = ex.compile_explainer
    calls = []

    def picky(graph, *args, **kwargs):
        static = all(isinstance(d, int) for d in graph.shape(graph.inputs[0]))
        calls.append(static)
        if not static:
            raise ModelError("this rule needs the static shape of its input")
        return real(graph, *args, **kwargs)

    monkeypatch.setattr(ex, "compile_explainer", picky)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Tanh", ["z"], ["y"])],
               [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], [("w", W)])
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    got = Explainer(m).attribute(x, target=[0, 1, 2])
    z = x @ W
    want = W.T[[0, 1, 2]] * (1 - np.tanh(z[np.arange(3), [0, 1, 2]]) ** 2)[:, None]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert calls == [False, True]


def test_a_model_whose_nodes_are_out_of_order_loads():
    # onnxruntime's float16 converter writes nodes out of topological order.
    m = _model([helper.make_node("Tanh", ["z"], ["y"]), helper.make_node("MatMul", ["x", "w"], ["z"])],
               [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], [("w", W)])
    x = RNG.normal(size=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(Explainer(m).predict(x), np.tanh(x @ W), rtol=1e-5)


def test_a_dynamically_quantized_batch_is_explained_as_it_runs_with_a_target_per_sample():
    # One activation scale per run couples the rows a little; they are still samples (one
    # class per sample works), explained as the batch ran, not as a single sequence.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import tempfile, os  # noqa: E401

    w = RNG.normal(size=(4, 16)).astype(np.float32)
    v = RNG.normal(size=(16, 3)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                helper.make_node("MatMul", ["r", "v"], ["y"])],
               [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], [("w", w), ("v", v)])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "f.onnx"), os.path.join(d, "q.onnx")
        onnx.save(m, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        e = Explainer(dst)
        x = RNG.normal(size=(3, 4)).astype(np.float32)
        x[2] *= 20  # a large sample changes the batch's one activation scale
        together = e.attribute(x, target=[0, 1, 2])
        assert together.shape == (3, 4) and np.all(np.isfinite(together))
        assert not e.plan(e.feeds(x)).whole
        # Close to the float model's gradient (the straight-through convention).
        relu = (x @ w > 0).astype(np.float32)
        want = np.stack([(relu[i] * v[:, c]) @ w.T for i, c in enumerate([0, 1, 2])])
        assert np.corrcoef(together.ravel(), want.ravel())[0, 1] > 0.9


def test_a_class_target_on_rows_that_are_not_samples_is_an_error_not_another_score():
    m = _model([helper.make_node("CumSum", ["x", "ax"], ["c"]), helper.make_node("ReduceSum", ["c", "one"], ["y"],
                                                                                  keepdims=0)],
               [_vi("x", ["T", 4])], [_vi("y", ["T"])], [("ax", np.array(0)), ("one", np.array([1]))])
    e = Explainer(m)
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    with pytest.raises(OptionError, match="not separate samples"):
        e.attribute(x, target=0)  # "one score per sample" would silently be step 0 alone
    np.testing.assert_allclose(e.attribute(x, target=np.ones(5, np.float32)), np.tile(np.arange(5, 0, -1)[:, None], 4))


def _squeezing_model():
    # y = Squeeze(x @ W): a Squeeze without axes also squeezes a batch of 1 away.
    return _model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Squeeze", ["z"], ["y"])],
                  [_vi("x", ["N", 4])], [_vi("y", ["N", 3])], [("w", W)])


def test_an_output_whose_batch_of_one_is_squeezed_away_is_explained():
    e = Explainer(_squeezing_model())
    x = RNG.normal(size=(1, 4)).astype(np.float32)
    assert e.predict(x).shape == (3,)  # as onnxruntime gives it
    np.testing.assert_allclose(e.attribute(x, target=np.array([0, 1, 0], np.float32)), W[:, 1][None], rtol=1e-6)
    occ = e.attribute(x, method="occlusion", target=np.array([0, 1, 0], np.float32), window=(1,))
    np.testing.assert_allclose(occ, x * W[:, 1][None], rtol=1e-5)
    np.testing.assert_allclose(e.attribute(RNG.normal(size=(2, 4)).astype(np.float32), target=1),
                               np.tile(W[:, 1], (2, 1)), rtol=1e-6)


def test_a_model_that_takes_one_row_without_saying_so_is_run_row_by_row():
    # Concat with a fixed (1, 3) input along axis 1 holds only for a batch of 1.
    h = np.ones((1, 3), np.float32)
    m = _model([helper.make_node("Concat", ["x", "h"], ["c"], axis=1), helper.make_node("MatMul", ["c", "v"], ["y"])],
               [_vi("x", ["N", 3]), _vi("h", [1, 3])], [_vi("y", ["N", 2])],
               [("v", RNG.normal(size=(6, 2)).astype(np.float32))])
    e = Explainer(m)
    x = RNG.normal(size=(3, 3)).astype(np.float32)
    v = numpy_helper.to_array(m.graph.initializer[0])
    # No axis of y is provably the batch (inference meets N and 1 at the Concat): one answer
    # per sample, stacked, each as the model gives it for one row.
    np.testing.assert_allclose(e.predict({"x": x, "h": h}),
                               (np.concatenate([x, np.ones((3, 3))], 1) @ v)[:, None], rtol=1e-5)
    occ = e.attribute({"x": x, "h": h}, method="occlusion", target=0, window=(1,))
    np.testing.assert_allclose(occ, x * v[:3, 0][None], rtol=1e-4, atol=1e-6)


def test_exporting_a_token_model_attributes_at_its_embedding_output(tmp_path):
    import onnxruntime as ort

    from onnxplain.compile import SEED

    m, table = _byte_model()
    spec = Explainer(m).export(tmp_path / "e.onnx", method="input_x_gradient")
    assert list(spec.attributions) == ["e"]  # the Gather of the byte table
    ids = RNG.integers(0, 256, size=(2, 6)).astype(np.int32)
    seed = np.tile(np.array([[0, 1, 0]], np.float32), (2, 1))
    out = ort.InferenceSession(str(tmp_path / "e.onnx")).run([spec.attributions["e"]], {"bytes": ids, SEED: seed})[0]
    np.testing.assert_allclose(out, Explainer(m).attribute(ids, method="input_x_gradient", target=1), rtol=1e-6)
