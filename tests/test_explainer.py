"""The Python API's contract: shapes, targets, layers, errors, memory budget, export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer, InputError, ModelError, OptionError, UnsupportedOperatorError
from onnxplain.compile import SEED
from onnxplain.explainer import explainer_metadata
from onnxplain.methods import EXPORTABLE


def _mlp_with_softmax(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4), torch.nn.Softmax(-1)).eval()
    path = tmp_path / "mlp_softmax.onnx"
    torch.onnx.export(net, (torch.randn(2, 6),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["p"], dynamic_axes={"x": {0: "b"}, "p": {0: "b"}})
    return net, path


def _grad(net, x, target, upto=None):
    xt = torch.tensor(x, requires_grad=True)
    out = net[:upto](xt) if upto else net(xt)
    out[torch.arange(len(x)), target].sum().backward()
    return xt.grad.numpy()


def test_terminal_softmax_is_looked_through_unless_probability_asked(tmp_path):
    net, path = _mlp_with_softmax(tmp_path)
    e = Explainer(path)
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(e.attribute(x, target=[0, 1, 2]), _grad(net, x, [0, 1, 2], upto=3), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e.attribute(x, target=[0, 1, 2], probability=True), _grad(net, x, [0, 1, 2]),
                               rtol=1e-4, atol=1e-7)


def test_layer_attribution_is_the_gradient_at_that_tensor(tmp_path):
    net, path = _mlp_with_softmax(tmp_path)
    e = Explainer(path)
    relu_out = next(n.output[0] for n in e.graph.nodes if n.op_type == "Relu")
    x = np.random.default_rng(1).normal(size=(2, 6)).astype(np.float32)
    h = net[:2](torch.tensor(x)).detach().requires_grad_(True)
    net[2](h)[:, 3].sum().backward()
    got = e.attribute(x, method="gradient", target=3, layer=relu_out)
    assert got.shape == (2, 8)
    np.testing.assert_allclose(got, h.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_a_single_sample_without_batch_axis_is_accepted(tmp_path):
    _, path = _mlp_with_softmax(tmp_path)
    e = Explainer(path)
    x = np.ones(6, np.float32)
    assert e.attribute(x, target=1).shape == (1, 6)


def test_seed_array_explains_a_weighted_sum_of_outputs(tmp_path):
    net, path = _mlp_with_softmax(tmp_path)
    e = Explainer(path)
    x = np.random.default_rng(2).normal(size=(2, 6)).astype(np.float32)
    seed = np.array([[1, -1, 0, 0.5], [0, 0, 2, 0]], np.float32)
    xt = torch.tensor(x, requires_grad=True)
    (net[:3](xt) * torch.tensor(seed)).sum().backward()
    np.testing.assert_allclose(e.attribute(x, target=seed), xt.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_memory_budget_chunks_passes_without_changing_results(tmp_path):
    _, path = _mlp_with_softmax(tmp_path)
    x = np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)
    big = Explainer(path).attribute(x, method="integrated_gradients", target=1, n_steps=300)
    small_e = Explainer(path, memory_budget=1)  # one row per run
    small = small_e.attribute(x, method="integrated_gradients", target=1, n_steps=300)
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-7)
    session = next(v[1] for v in small_e._cache.values() if isinstance(v, tuple))
    assert session.rows_per_run() == 1


def test_thousand_step_ig_runs_in_bounded_chunks(tmp_path):
    _, path = _mlp_with_softmax(tmp_path)
    budget = 4 << 20
    e = Explainer(path, memory_budget=budget)
    x = np.random.default_rng(4).normal(size=(2, 6)).astype(np.float32)
    e.attribute(x, method="integrated_gradients", target=0, n_steps=1000)
    session = next(v[1] for v in e._cache.values() if isinstance(v, tuple))
    assert session.rows_per_run() * session.row_bytes() <= budget


def test_unsupported_operators_are_all_named(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4])
    # onnxruntime's own contrib operators, which no rule module covers.
    nodes = [helper.make_node("Inverse", ["x"], ["e"], domain="com.microsoft"),
             helper.make_node("ExpandDims", ["e", "ax"], ["f"], domain="com.microsoft"),
             helper.make_node("Squeeze", ["f", "ax64"], ["y"])]
    inits = [numpy_helper.from_array(np.array(-1, np.int32), "ax"), numpy_helper.from_array(np.array([-1]), "ax64")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    e = Explainer(m)
    seed = np.ones((1, 4, 4), np.float32)
    with pytest.raises(UnsupportedOperatorError) as info:
        e.attribute(np.eye(4, dtype=np.float32)[None] * 2, target=seed)
    msg = str(info.value)
    assert "Inverse" in msg and "ExpandDims" in msg and "occlusion" in msg


@pytest.mark.parametrize("bad, error, words", [
    (np.ones((2, 5), np.float32), InputError, "must have shape (b, 6), got (2, 5)"),
    (np.full((1, 6), np.nan, np.float32), InputError, "NaN"),
    (np.array([["a"] * 6]), InputError, "dtype"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, bad, error, words):
    _, path = _mlp_with_softmax(tmp_path)
    with pytest.raises(error, match=None) as info:
        Explainer(path).attribute(bad, target=0)
    assert words in str(info.value)


@pytest.mark.parametrize("kwargs, words", [
    (dict(method="no_such_method"), "unknown method"),
    (dict(method="integrated_gradients", steps=3), "n_steps"),
    (dict(method="integrated_gradients", n_steps=0), "positive"),
    (dict(method="integrated_gradients", integration="simpson"), "gausslegendre"),
    (dict(method="gradient", layer="nope"), "unknown layer"),
])
def test_bad_options_raise_option_errors(tmp_path, kwargs, words):
    _, path = _mlp_with_softmax(tmp_path)
    with pytest.raises(OptionError) as info:
        Explainer(path).attribute(np.ones((1, 6), np.float32), target=0, **kwargs)
    assert words in str(info.value)


def test_target_out_of_range_is_an_input_error(tmp_path):
    _, path = _mlp_with_softmax(tmp_path)
    with pytest.raises(InputError, match="out of range"):
        Explainer(path).attribute(np.ones((1, 6), np.float32), target=7)


def test_garbage_model_is_a_model_error(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ModelError):
        Explainer(p)


def test_exported_explainer_runs_in_plain_onnxruntime(tmp_path):
    net, path = _mlp_with_softmax(tmp_path)
    e = Explainer(path)
    out = tmp_path / "explainer.onnx"
    e.export(out, method="gradient")
    model = onnx.load(str(out))
    meta = explainer_metadata(model)
    x = np.random.default_rng(5).normal(size=(2, 6)).astype(np.float32)
    seed = np.zeros((2, 4), np.float32)
    seed[:, 2] = 1
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    attr = sess.run([meta["attributions"]["x"]], {"x": x, SEED: seed})[0]
    np.testing.assert_allclose(attr, e.attribute(x, target=2), rtol=1e-6)
    np.testing.assert_allclose(attr, _grad(net, x, [2, 2], upto=3), rtol=1e-5, atol=1e-7)


def test_multi_pass_methods_cannot_be_exported(tmp_path):
    _, path = _mlp_with_softmax(tmp_path)
    with pytest.raises(OptionError, match="several passes"):
        Explainer(path).export(tmp_path / "x.onnx", method="integrated_gradients")


def test_a_token_model_is_attributed_at_its_embedding_output():
    x = helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    emb = numpy_helper.from_array(np.arange(10, dtype=np.float32).reshape(5, 2), "emb")
    axes = numpy_helper.from_array(np.array([1]), "axes")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("ReduceSum", ["e", "axes"], ["y"],
                                                                                  keepdims=0)]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [emb, axes]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    e = Explainer(m)
    ids = np.array([[1, 2, 3]])
    got = e.attribute(ids, method="input_x_gradient", target=1)
    # y[1] = sum over positions of emb[id, 1]: input x gradient is each embedding's own entry.
    np.testing.assert_array_equal(got, np.stack([np.zeros(3), emb_table_column(ids)], -1)[None][0][None])
    with pytest.raises(OptionError, match="not float"):
        e.attribute(ids, wrt="ids", target=1)


def emb_table_column(ids):
    return np.arange(10, dtype=np.float32).reshape(5, 2)[ids[0], 1]


@pytest.mark.parametrize("method", sorted(EXPORTABLE))
def test_every_exportable_method_exports_what_attribute_returns(tmp_path, method):
    _, path = _mlp_with_softmax(tmp_path)
    e = Explainer(path)
    out = tmp_path / "explainer.onnx"
    e.export(out, method=method)
    meta = explainer_metadata(onnx.load(str(out)))
    x = np.random.default_rng(6).normal(size=(3, 6)).astype(np.float32)
    seed = np.zeros((3, 4), np.float32)
    seed[:, 1] = 1
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    attr = sess.run([meta["attributions"]["x"]], {"x": x, SEED: seed})[0]
    np.testing.assert_allclose(attr, e.attribute(x, method=method, target=1), rtol=1e-5, atol=1e-7)


EXPORT_OPTIONS = [
    ("lrp.epsilon", {"epsilon": 0.25}),
    ("lrp.epsilon_gamma_box", {"epsilon": 0.5, "gamma": 0.5, "low": -3.0, "high": 3.0}),  # an MLP: epsilon acts
    ("lrp", {"rules": "Gemm:alpha_beta,first:flat", "alpha": 3.0, "beta": 2.0}),
    ("deep_taylor", {"low": -4.0, "high": 4.0}),
    ("excitation_backprop", {"stabilizer": 1e-3}),
    ("guided_backprop", {"clip_as_relu": True}),
]


@pytest.mark.parametrize("method, options", EXPORT_OPTIONS, ids=[m for m, _ in EXPORT_OPTIONS])
def test_export_with_options_exports_what_attribute_returns_with_them(tmp_path, method, options):
    _, path = _mlp_with_softmax(tmp_path)
    e = Explainer(path)
    out = tmp_path / "explainer.onnx"
    e.export(out, method=method, **options)
    meta = explainer_metadata(onnx.load(str(out)))
    x = np.random.default_rng(7).normal(size=(3, 6)).astype(np.float32)
    seed = np.eye(4, dtype=np.float32)[[1, 2, 3]]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    attr = sess.run([meta["attributions"]["x"]], {"x": x, SEED: seed})[0]
    with_options = e.attribute(x, method=method, target=[1, 2, 3], **options)
    np.testing.assert_allclose(attr, with_options, rtol=1e-5, atol=1e-7)
    if method.startswith("lrp"):  # the options took effect: defaults give other numbers
        defaults = e.attribute(x, method=method, target=[1, 2, 3],
                               **({"rules": options["rules"]} if method == "lrp" else {}))
        assert np.abs(defaults - attr).max() > 1e-3 * np.abs(attr).max()


def test_export_rejects_bad_options_and_a_user_composite_without_rules(tmp_path):
    _, path = _mlp_with_softmax(tmp_path)
    e = Explainer(path)
    with pytest.raises(OptionError, match="no option"):
        e.export(tmp_path / "x.onnx", method="lrp.epsilon", alpha=2.0)
    with pytest.raises(OptionError, match="rules"):
        e.export(tmp_path / "x.onnx", method="lrp")
    with pytest.raises(OptionError, match="alpha - beta"):
        e.export(tmp_path / "x.onnx", method="lrp", rules="Gemm:alpha_beta", alpha=2.0, beta=2.0)
    assert not (tmp_path / "x.onnx").exists()


def test_session_cache_is_bounded_by_model_bytes_and_rebuilds_what_it_dropped(tmp_path, monkeypatch):
    """Each cached session holds a copy of the weights: six LRP composites on a VGG-16 in one
    Explainer ran out of 24 GB before the cache was bounded."""
    _, path = _mlp_with_softmax(tmp_path)
    x = np.random.default_rng(8).normal(size=(2, 6)).astype(np.float32)
    methods = ["gradient", "lrp.epsilon", "lrp.epsilon_plus", "excitation_backprop", "guided_backprop"]
    unbounded = Explainer(path)
    expected = {m: unbounded.attribute(x, method=m, target=1) for m in methods}
    assert len(unbounded._cache) >= len(methods)
    monkeypatch.setenv("ONNXPLAIN_CACHE_BYTES", "1")  # room for the newest entry only
    e = Explainer(path)
    for m in methods + methods[::-1]:
        np.testing.assert_allclose(e.attribute(x, method=m, target=1), expected[m], rtol=1e-6, atol=1e-8)
        assert len(e._cache) == 1


def test_inputs_of_many_shapes_keep_a_bounded_number_of_specialised_graphs():
    """A text model fed sequences of every length must not keep one weight copy per length."""
    from onnxplain.explainer import SPECIALIZED_SHAPES

    w = np.random.default_rng(9).normal(size=(4, 3)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "L", 3])
    m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                            [numpy_helper.from_array(w, "w")]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    e = Explainer(m)
    for length in range(1, 3 * SPECIALIZED_SHAPES):
        xs = np.ones((2, length, 4), np.float32)
        seed = np.zeros((2, length, 3), np.float32)
        seed[..., 1] = 1
        np.testing.assert_allclose(e.attribute(xs, target=seed), np.broadcast_to(w[:, 1], (2, length, 4)))
        assert len(e._specialized) <= SPECIALIZED_SHAPES


@pytest.mark.parametrize("method", ["gradient", "input_x_gradient", "guided_backprop", "lrp.epsilon_plus",
                                    "excitation_backprop", "contrastive_excitation_backprop", "deeplift"])
def test_the_predicted_class_is_formed_in_the_explainer_without_a_second_forward_pass(tmp_path, monkeypatch,
                                                                                        method):
    net, path = _mlp_with_softmax(tmp_path)
    x = np.random.default_rng(10).normal(size=(5, 6)).astype(np.float32)
    predicted = list(net[:3](torch.tensor(x)).argmax(1).numpy())
    assert len(set(predicted)) > 1  # the rows explain different classes
    expected = Explainer(path).attribute(x, method=method, target=predicted)
    forwards = []
    original = Explainer._forward
    monkeypatch.setattr(Explainer, "_forward", lambda self, f, t: forwards.append(t) or original(self, f, t))
    for budget in (None, 1):  # all rows in one run, and one row per run
        e = Explainer(path, memory_budget=budget)
        got = e.attribute(x, method=method)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    if method != "deeplift":  # DeepLIFT runs the model on its baseline as well
        assert forwards == []


def test_the_predicted_class_in_the_graph_breaks_ties_as_numpy_does():
    """All-equal scores: the first class, as argmax over the scores gives."""
    w = np.zeros((3, 4), np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                            [numpy_helper.from_array(w, "w")]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    e = Explainer(m)
    xs = np.ones((2, 3), np.float32)
    ctx_seed = []
    from onnxplain.methods.base import Context

    original = Context.backward

    def keep(self, *a, **k):
        out = original(self, *a, **k)
        ctx_seed.append(self.seed)
        return out

    import unittest.mock as mock

    with mock.patch.object(Context, "backward", keep):
        e.attribute(xs, method="gradient")
    np.testing.assert_array_equal(ctx_seed[0], np.eye(4, dtype=np.float32)[[0, 0]])


def test_an_explained_tensor_whose_first_axis_is_not_the_batch_is_a_clear_error():
    """(4, 3) from a batch of 2 (a Transpose puts the features first): the predicted class
    of each row cannot be read from it, with the seed formed in the graph or not."""
    w = np.ones((3, 2), np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]), helper.make_node("MatMul", ["xt", "w"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w.T.copy(), "w")]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(OptionError, match="not the batch"):
        Explainer(m).attribute(np.ones((2, 4), np.float32), method="gradient")
