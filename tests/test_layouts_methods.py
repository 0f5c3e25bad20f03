"""Metrics, attribution factorization and activation maximization on models whose batch is
not simply the first axis of everything: a sequence-first (T, N, C) output, a state input
shaped (2, N, H) beside the data input, a fixed batch-1 export, a model that reads its whole
input as one sequence. Each gives the right numbers (checked against numpy) or a typed
error that names the layout."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer, metrics
from onnxplain.errors import InputError, OnnxplainError
from onnxplain.factorize import class_attributions, factorize
from onnxplain.methods.maximize import activation_maximization

RNG = np.random.default_rng(7)
W = RNG.normal(size=(4, 3)).astype(np.float32)  # features -> classes
K = RNG.normal(scale=0.5, size=(3, 2, 3)).astype(np.float32)  # Conv1d: 2 -> 3 channels, width 3
G = RNG.normal(size=(3, 4)).astype(np.float32)  # pooled channels -> 4 classes
V = RNG.normal(size=(3, 4)).astype(np.float32)  # state -> classes


def _model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def sequence_first_model():
    """x (N, F=4, T=5), a channels-first sequence -> (T, N, F) -> @ W -> tanh: y (T, N, 3)."""
    return _model([helper.make_node("Transpose", ["x"], ["xt"], perm=[2, 0, 1]),
                   helper.make_node("MatMul", ["xt", "w"], ["z"]), helper.make_node("Tanh", ["z"], ["y"])],
                  [_vi("x", ["N", 4, 5])], [_vi("y", [5, "N", 3])], [("w", W)])


def batch_one_model():
    """x (1, 4) -> tanh(x @ W): y (1, 3), the batch fixed at one by the export."""
    return _model([helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Tanh", ["z"], ["y"])],
                  [_vi("x", [1, 4])], [_vi("y", [1, 3])], [("w", W)])


def _conv_nodes(out="act"):
    return [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1]), helper.make_node("Relu", ["c"], [out])]


def conv_model(batch="N", state=False, layer_transposed=False, sequence_output=False):
    """x (N, 2, 8) -> Conv1d -> Relu = act (N, 3, 8) -> mean over length -> @ G -> y (N, 4),
    plus sum over directions of a state h (2, N, 3) @ V when `state`. `layer_transposed`
    reads the mean off a (8, N, 3) copy of act; `sequence_output` gives y (8, N, 4)."""
    nodes = _conv_nodes()
    inits = [("k", K), ("g", G), ("v", V), ("ax0", np.array([0]))]
    if sequence_output:
        nodes += [helper.make_node("Transpose", ["act"], ["seq"], perm=[2, 0, 1]),
                  helper.make_node("MatMul", ["seq", "g"], ["y"])]
        return _model(nodes, [_vi("x", [batch, 2, 8])], [_vi("y", [8, batch, 4])], inits)
    if layer_transposed:
        nodes += [helper.make_node("Transpose", ["act"], ["seq"], perm=[2, 0, 1]),
                  helper.make_node("ReduceMean", ["seq"], ["pooled"], axes=[0], keepdims=0)]
    else:
        nodes += [helper.make_node("ReduceMean", ["act"], ["pooled"], axes=[2], keepdims=0)]
    nodes += [helper.make_node("MatMul", ["pooled", "g"], ["logits" if state else "y"])]
    inputs = [_vi("x", [batch, 2, 8])]
    if state:
        inputs.append(_vi("h", [2, batch, 3]))
        nodes += [helper.make_node("ReduceSum", ["h", "ax0"], ["hs"], keepdims=0),
                  helper.make_node("MatMul", ["hs", "v"], ["hv"]), helper.make_node("Add", ["logits", "hv"], ["y"])]
    return _model(nodes, inputs, [_vi("y", [batch, 4])], inits)


def whole_sequence_model():
    """y = cumsum(x, axis 0) @ W: the rows of x are time steps of one sample."""
    return _model([helper.make_node("CumSum", ["x", "ax"], ["c"]), helper.make_node("MatMul", ["c", "w"], ["y"])],
                  [_vi("x", ["T", 4])], [_vi("y", ["T", 3])], [("w", W), ("ax", np.array(0))])


def conv_act(x):
    """The Relu output of conv_model in numpy: (N, 3, 8)."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1)))
    out = np.zeros((x.shape[0], 3, x.shape[2]))
    for t in range(x.shape[2]):
        out[:, :, t] = np.einsum("nci,oci->no", xp[:, :, t:t + 3], K)
    return np.maximum(out, 0)


# ----------------------------------------------------------------------------- metrics
def _deletion_reference(x, relevance, score, steps, baseline=0.0):
    """Remove positions (given per sample by `relevance`, most relevant first) to `baseline`
    in `steps` steps; score(inputs) -> (N,) after each."""
    n, p = relevance.shape
    order = np.argsort(-relevance, axis=1, kind="stable")
    curve = []
    for count in np.rint(np.linspace(0, 1, steps + 1) * p).astype(int):
        removed = np.zeros((n, p), bool)
        np.put_along_axis(removed, order[:, :count], True, axis=1)
        curve.append(score(removed))
    return np.stack(curve, axis=1)


def test_deletion_of_a_frame_of_a_sequence_first_output_scores_that_frame():
    e = Explainer(sequence_first_model())
    x = RNG.normal(size=(2, 4, 5)).astype(np.float32)
    a = RNG.normal(size=x.shape).astype(np.float32)
    got = metrics.deletion(e, x, a, target="step:2:1", steps=5, probability=False)
    # Positions are the 5 time steps (all 4 channels of a step together); score: y[2, n, 1].

    def score(removed):
        xd = np.where(removed[:, None, :], 0.0, x.astype(np.float64))
        return np.tanh(np.einsum("nft,fc->tnc", xd, W))[2, :, 1]

    want = _deletion_reference(x, a.sum(1), score, 5)
    np.testing.assert_allclose(got.curve, want, rtol=1e-5, atol=1e-6)


def test_evaluate_on_a_sequence_first_output_agrees_with_the_metrics_called_alone():
    e = Explainer(sequence_first_model())
    x = RNG.normal(size=(3, 4, 5)).astype(np.float32)
    settings = {"deletion": {"steps": 5}, "insertion": {"steps": 5, "baseline": 0.0}}
    res = metrics.evaluate(e, x, {"gradient": {}}, metrics=("deletion", "insertion"), target="step:4:0",
                           settings=settings)["gradient"]
    a = e.attribute(x, method="gradient", target="step:4:0")
    np.testing.assert_allclose(res["deletion"].values,
                               metrics.deletion(e, x, a, target="step:4:0", steps=5).values, rtol=1e-6)
    np.testing.assert_allclose(res["insertion"].values,
                               metrics.insertion(e, x, a, target="step:4:0", steps=5, baseline=0.0).values, rtol=1e-6)


def test_metrics_on_a_batch_one_export_run_sample_by_sample():
    # Before: the first scoring run fed all samples at once and onnxruntime refused the batch.
    e = Explainer(batch_one_model())
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    a = RNG.normal(size=x.shape).astype(np.float32)
    got = metrics.deletion(e, x, a, target=[2, 0, 1], steps=4, probability=False)
    cls = np.array([2, 0, 1])

    def score(removed):
        xd = np.where(removed, 0.0, x.astype(np.float64))
        return np.tanh(xd @ W)[np.arange(3), cls]

    np.testing.assert_allclose(got.curve, _deletion_reference(x, a, score, 4), rtol=1e-5, atol=1e-6)
    res = metrics.evaluate(e, x, {"gradient": {}}, metrics=("deletion", "infidelity", "max_sensitivity"),
                           target=[2, 0, 1], settings={"deletion": {"steps": 4}})["gradient"]
    assert all(np.all(np.isfinite(s.values)) and s.values.shape == (3,) for s in res.values())


def test_metrics_on_a_model_with_a_state_input_are_refused_by_name():
    e = Explainer(conv_model(state=True))
    feeds = {"x": RNG.normal(size=(2, 2, 8)).astype(np.float32), "h": RNG.normal(size=(2, 2, 3)).astype(np.float32)}
    with pytest.raises(InputError, match="one input"):
        metrics.deletion(e, feeds, np.zeros((2, 2, 8), np.float32), target=0)


def test_metrics_on_a_model_that_reads_its_whole_input_as_one_sample_are_refused_by_name():
    # Its rows are time steps: scored as samples, they would be a silent wrong answer.
    e = Explainer(whole_sequence_model())
    x = RNG.normal(size=(5, 4)).astype(np.float32)
    seed = np.zeros((5, 3), np.float32)
    seed[-1, 0] = 1
    with pytest.raises(InputError, match="'x' of shape \\(5, 4\\) has no batch axis"):
        metrics.deletion(e, x, np.ones_like(x), target=seed)


# ----------------------------------------------------------------------------- factorize
def _maps_reference(x):
    """Each class's input x gradient at act, summed over channels: act * G[ch, c] / 8."""
    act = conv_act(x)[0]
    return np.einsum("cl,ck->kl", act, G / 8.0)


@pytest.mark.parametrize("kind", ["batch-1", "state-input"])
def test_factorize_a_model_with_a_fixed_batch_or_a_state_input(kind):
    x = RNG.normal(size=(1, 2, 8)).astype(np.float32)
    if kind == "batch-1":
        e, feeds = Explainer(conv_model(batch=1)), x
    else:
        # The state (2, N, 3) is repeated along its own batch axis (1), not its first.
        e = Explainer(conv_model(state=True))
        feeds = {"x": x, "h": RNG.normal(size=(2, 1, 3)).astype(np.float32)}
    maps = class_attributions(e, feeds, "act", [0, 1, 2, 3])
    np.testing.assert_allclose(maps, _maps_reference(x), rtol=1e-4, atol=1e-6)
    f = factorize(e, feeds, layer="act", k=2, classes="all")
    assert f.spatial.shape == (2, 8) and f.loadings.shape == (2, 4)
    np.testing.assert_allclose(f.maps, _maps_reference(x), rtol=1e-4, atol=1e-6)


def test_factorize_refuses_a_sequence_first_output_by_its_shape():
    e = Explainer(conv_model(sequence_output=True))
    with pytest.raises(InputError, match=r"factorization needs \(N, classes\)"):
        factorize(e, RNG.normal(size=(1, 2, 8)).astype(np.float32), layer="act", k=2, classes="all")


def test_factorize_refuses_a_layer_whose_batch_is_not_its_first_axis():
    e = Explainer(conv_model(layer_transposed=True))
    with pytest.raises(InputError, match="layer 'seq'.*batch on axis 1"):
        factorize(e, RNG.normal(size=(1, 2, 8)).astype(np.float32), layer="seq", k=2, classes="all")


def test_factorize_refuses_a_model_that_reads_its_whole_input_as_one_sample():
    e = Explainer(whole_sequence_model())
    with pytest.raises(OnnxplainError):
        factorize(e, RNG.normal(size=(5, 4)).astype(np.float32), layer="c", k=1, classes="all")


# ----------------------------------------------------------------------------- maximize
def test_activation_maximization_of_a_frame_of_a_sequence_first_output():
    e = Explainer(sequence_first_model())
    r = activation_maximization(e, target="step:2:1", n_iter=20, lr=0.1, seed=0)
    assert r.input.shape == (1, 4, 5)
    # The objective it reports is y[2, 0, 1] of the input it returns, and it went up.
    np.testing.assert_allclose(r.final, e.predict(r.input)[2, 0, 1], rtol=1e-5)
    assert r.final > r.initial + 0.1
    assert "target step:2:1" in r.objective


def test_activation_maximization_of_a_batch_one_export():
    e = Explainer(batch_one_model())
    r = activation_maximization(e, target=1, n_iter=20, lr=0.1, seed=0)
    assert r.input.shape == (1, 4)
    np.testing.assert_allclose(r.final, e.predict(r.input)[0, 1], rtol=1e-5)
    assert r.final > r.initial + 0.1 and "class 1" in r.objective


def test_activation_maximization_of_a_model_with_a_state_input_is_refused_by_name():
    with pytest.raises(InputError, match="one float input"):
        activation_maximization(Explainer(conv_model(state=True)), target=0, n_iter=2)
