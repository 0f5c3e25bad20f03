"""Gradient rules of LSTM, GRU and RNN agree with float64 finite differences and with torch.

Both forms of the rule are checked: unrolled over the steps (short sequences) and as two
Scans (long or open sequence lengths), by forcing the switch-over length.

onnxruntime has float kernels only for the recurrent operators, so the finite differences
are taken on an independent float64 numpy forward (rnn_reference.py) that each case first
checks against onnxruntime's own output; one test per operator also differentiates
onnxruntime's float32 forward directly at several step sizes. Every case differentiates
all outputs at once (Y, Y_h, Y_c flattened into one output, one random seed).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from rnn_models import Config, expected, make, numeric, sequence_first, session

from onnxplain import Explainer
from onnxplain.compile import SEED, Composite, compile_explainer
from onnxplain.errors import ModelError, UnsupportedOperatorError
from onnxplain.graph import Graph
from onnxplain.rules import recurrent_scan

ALL_ACTIVATIONS = [  # (name, alpha, beta) as given in the node; None: the operator's default
    ("Relu", None, None), ("Tanh", None, None), ("Sigmoid", None, None), ("Affine", 0.7, 0.2),
    ("LeakyRelu", 0.2, None), ("ThresholdedRelu", 0.3, None), ("ScaledTanh", 1.3, 0.6),
    ("HardSigmoid", 0.3, 0.45), ("Elu", 0.6, None), ("Softsign", None, None), ("Softplus", None, None),
    ("LeakyRelu", None, None), ("HardSigmoid", None, None), ("Elu", None, None), ("ThresholdedRelu", None, None),
]


def _act_case(name, alpha, beta):
    attrs = {"activations": [name]}
    if alpha is not None:
        attrs["activation_alpha"] = [alpha]
    if beta is not None:
        attrs["activation_beta"] = [beta]
    return pytest.param(Config("RNN", attrs=attrs, lens=[4, 3, 2]),
                        id=f"RNN-{name}" + ("" if alpha is not None else "-defaults"))


CASES = []
for _op in ("RNN", "GRU", "LSTM"):
    CASES += [
        pytest.param(Config(_op), id=f"{_op}-forward"),
        pytest.param(Config(_op, direction="reverse", lens=[4, 2, 1]), id=f"{_op}-reverse-lengths"),
        pytest.param(Config(_op, direction="bidirectional", lens=[3, 0, 4]), id=f"{_op}-bidirectional-empty-sample"),
        pytest.param(Config(_op, direction="bidirectional", layout=1, lens=[2, 4, 3]), id=f"{_op}-layout1"),
        pytest.param(Config(_op, h0=False, c0=False, bias=False, direction="reverse"), id=f"{_op}-no-states-no-bias"),
        pytest.param(Config(_op, attrs={"clip": 0.7}, direction="bidirectional", scale=1.5), id=f"{_op}-clip"),
        pytest.param(Config(_op, outputs=("Y",), lens=[1, 4, 2]), id=f"{_op}-Y-only"),
        pytest.param(Config(_op, outputs=("Y_h",), direction="bidirectional", lens=[1, 4, 2]), id=f"{_op}-Y_h-only"),
    ]
CASES += [
    pytest.param(Config("LSTM", outputs=("Y_c",), lens=[3, 4, 1]), id="LSTM-Y_c-only"),
    pytest.param(Config("LSTM", peephole=True), id="LSTM-peepholes"),
    pytest.param(Config("LSTM", attrs={"input_forget": 1}, direction="reverse"), id="LSTM-input-forget"),
    pytest.param(Config("LSTM", peephole=True, direction="bidirectional", lens=[4, 1, 3], scale=1.2,
                        attrs={"input_forget": 1, "clip": 0.9}), id="LSTM-peepholes-input-forget-clip"),
    pytest.param(Config("LSTM", direction="bidirectional", attrs={
        "activations": ["HardSigmoid", "Softsign", "ScaledTanh", "Sigmoid", "Elu", "Affine"],
        "activation_alpha": [0.3, 1.2, 0.5, 0.8], "activation_beta": [0.45, 0.7, 0.1]}), id="LSTM-activations"),
    pytest.param(Config("GRU", attrs={"linear_before_reset": 1}), id="GRU-linear-before-reset"),
    pytest.param(Config("GRU", direction="bidirectional", lens=[2, 4, 1], scale=1.2,
                        attrs={"linear_before_reset": 1, "clip": 0.8}), id="GRU-linear-before-reset-clip"),
    pytest.param(Config("GRU", direction="bidirectional", attrs={
        "activations": ["Sigmoid", "Affine", "HardSigmoid", "Elu"],
        "activation_alpha": [0.7, 0.3, 0.6], "activation_beta": [0.1, 0.45]}), id="GRU-activations"),
    pytest.param(Config("RNN", direction="bidirectional", attrs={
        "activations": ["Tanh", "LeakyRelu"], "activation_alpha": [0.25]}), id="RNN-activations-per-direction"),
]
CASES += [_act_case(*a) for a in ALL_ACTIVATIONS]


def _explainer_gradient(cfg, model, feeds, params, wrt, seed_arr):
    graph = Graph(model).specialize({k: v.shape for k, v in feeds.items()})
    spec = compile_explainer(graph, Composite("gradient"), list(wrt), "out")
    m = sequence_first(spec.model) if cfg.layout else spec.model
    fed = {**feeds, **(params if cfg.params_as_inputs else {}), SEED: seed_arr.astype(np.float32)}
    return dict(zip(wrt, session(m).run([spec.attributions[w] for w in wrt], fed))), spec


def _check_forward(cfg, model, feeds, params):
    """The float64 reference is the operator onnxruntime runs (layout 0: the only one its
    CPU kernels take)."""
    want = expected(cfg, feeds, params)
    if cfg.layout:
        model = sequence_first(model)
    got = session(model).run(["out"], {**feeds, **(params if cfg.params_as_inputs else {})})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()),
                               err_msg="the float64 reference disagrees with onnxruntime's forward")
    return want


def _assert_close(got, num, what):
    scale = max(np.abs(num).max(), 1e-3)
    np.testing.assert_allclose(got, num, rtol=1e-3, atol=2e-5 * scale, err_msg=f"gradient of {what}")
    assert np.abs(num).max() > 1e-3, f"degenerate case: the gradient of {what} is zero"


@pytest.fixture(params=["unrolled", "scan"])
def form(request, monkeypatch):
    """Which form the gradient takes: the switch-over length set so that every case (or
    none) takes the Scan form."""
    monkeypatch.setattr(recurrent_scan, "UNROLL_MAX", 10**6 if request.param == "unrolled" else 0)
    return request.param


def _scans(spec) -> int:
    return sum(n.op_type == "Scan" for n in spec.model.graph.node)


@pytest.mark.parametrize("cfg", CASES)
def test_gradient_equals_float64_finite_differences(cfg, form):
    model, feeds, params = make(cfg)
    y = _check_forward(cfg, model, feeds, params)
    seed_arr = np.random.default_rng(1).normal(size=y.shape)
    wrt = [k for k in ("x", "h0", "c0") if k in feeds]
    got, spec = _explainer_gradient(cfg, model, feeds, params, wrt, seed_arr)
    assert (_scans(spec) > 0) == (form == "scan")
    for k in wrt:
        _assert_close(got[k], numeric(cfg, feeds, params, seed_arr, k), f"{cfg.op} input {k}")


PARAM_CASES = [
    pytest.param(Config(N=2, op="RNN", direction="bidirectional", lens=[4, 2]), id="RNN"),
    pytest.param(Config(N=2, op="GRU", direction="reverse", lens=[4, 2]), id="GRU"),
    pytest.param(Config(N=2, op="GRU", direction="bidirectional", attrs={"linear_before_reset": 1}), id="GRU-linear-before-reset"),
    pytest.param(Config(N=2, op="LSTM", direction="bidirectional", peephole=True, lens=[4, 2]), id="LSTM-peepholes"),
    pytest.param(Config(N=2, op="LSTM", peephole=True, attrs={"input_forget": 1, "clip": 1.0}, scale=1.2),
                 id="LSTM-input-forget-clip"),
]


@pytest.mark.parametrize("cfg", PARAM_CASES)
def test_gradient_of_computed_weights_equals_finite_differences(cfg):
    """W, R, B and P fed as inputs (computed weights) get their gradients too."""
    cfg.params_as_inputs = True
    model, feeds, params = make(cfg)
    y = _check_forward(cfg, model, feeds, params)
    seed_arr = np.random.default_rng(2).normal(size=y.shape)
    wrt = ["x", "h0"] + list(params)
    got, _ = _explainer_gradient(cfg, model, feeds, params, wrt, seed_arr)
    for k in wrt:
        _assert_close(got[k], numeric(cfg, feeds, params, seed_arr, k), f"{cfg.op} {k}")


@pytest.mark.parametrize("cfg", [
    pytest.param(Config("LSTM", computed_weights=True, peephole=True, direction="bidirectional", lens=[4, 2, 3]),
                 id="LSTM"),
    pytest.param(Config("GRU", computed_weights=True, attrs={"linear_before_reset": 1}, direction="reverse"), id="GRU"),
    pytest.param(Config("RNN", computed_weights=True, lens=[1, 4, 2]), id="RNN"),
])
def test_gradient_through_computed_constant_weights_equals_finite_differences(cfg, form):
    """Weights computed from initializers (a dequantized model's) need no gradient of their
    own; the Scan form passes them through its bodies as states."""
    model, feeds, params = make(cfg)
    y = _check_forward(cfg, model, feeds, params)
    seed_arr = np.random.default_rng(6).normal(size=y.shape)
    wrt = [k for k in ("x", "h0", "c0") if k in feeds]
    got, spec = _explainer_gradient(cfg, model, feeds, params, wrt, seed_arr)
    assert (_scans(spec) > 0) == (form == "scan")
    for k in wrt:
        _assert_close(got[k], numeric(cfg, feeds, params, seed_arr, k), f"{cfg.op} input {k}")


@pytest.mark.parametrize("op", ["RNN", "GRU", "LSTM"])
def test_gradient_equals_float32_finite_differences_of_onnxruntime(op):
    """Differences of onnxruntime's own float32 forward, at the best of three step sizes,
    along random directions (the issue's real-model criterion)."""
    cfg = Config(op, direction="bidirectional", lens=[4, 3, 2])
    model, feeds, params = make(cfg)
    e = Explainer(model, canonize=False)
    y = e.predict(feeds)
    seed_arr = np.random.default_rng(3).normal(size=y.shape).astype(np.float32)
    got = e.attribute(feeds, method="gradient", target=seed_arr)
    sess = session(model)
    rng = np.random.default_rng(4)
    for name in [k for k in ("x", "h0", "c0") if k in feeds]:
        for _ in range(5):
            v = rng.normal(size=feeds[name].shape).astype(np.float32)
            ad = float((got[name] * v).sum())
            errs = []
            for h in (1e-2, 1e-3, 1e-4):
                up = sess.run(["out"], {**feeds, name: feeds[name] + h * v})[0].astype(np.float64)
                down = sess.run(["out"], {**feeds, name: feeds[name] - h * v})[0].astype(np.float64)
                errs.append(abs(float((seed_arr * (up - down)).sum()) / (2 * h) - ad))
            assert min(errs) <= 1e-2 * max(abs(ad), 1e-6), (name, ad, errs)


@pytest.mark.parametrize("name", ["Affine", "ScaledTanh"])
def test_activation_without_its_parameters_is_zero_as_onnxruntime_runs_it(name):
    """onnxruntime's Affine and ScaledTanh default to alpha = beta = 0 (output 0): the rule
    mirrors it, so the gradient through such a step is exactly zero, as the forward is flat."""
    cfg = Config("RNN", attrs={"activations": [name]}, outputs=("Y",))
    model, feeds, params = make(cfg)
    y = _check_forward(cfg, model, feeds, params)
    assert not np.any(y)
    got, _ = _explainer_gradient(cfg, model, feeds, params, ["x", "h0"], np.ones_like(y))
    assert not np.any(got["x"]) and not np.any(got["h0"])


def _open_length(model):
    for vi in list(model.graph.input[:1]) + list(model.graph.output):
        time_axis = vi.type.tensor_type.shape.dim[1]
        time_axis.Clear()
        time_axis.dim_param = "T"
    return Graph(model)


def test_open_sequence_length_takes_the_scan_form_and_is_exact():
    """A sequence length the model leaves open (and no specialisation fixes) is no obstacle
    to the Scan form; one explainer serves every length."""
    cfg = Config("LSTM", direction="bidirectional", outputs=("Y", "Y_h"))
    model, _, _ = make(cfg)
    spec = compile_explainer(_open_length(model), Composite("gradient"), ["x", "h0"], "out")
    assert _scans(spec) == 4
    sess = session(spec.model)
    for T in (3, 7):
        cfg.T = T
        _, feeds, params = make(cfg)  # the same weights (drawn first), inputs of length T
        y = expected(cfg, feeds, params)
        seed_arr = np.random.default_rng(T).normal(size=y.shape)
        got = sess.run([spec.attributions["x"], spec.attributions["h0"]], {**feeds, SEED: seed_arr.astype(np.float32)})
        for k, g in zip(("x", "h0"), got):
            _assert_close(g, numeric(cfg, feeds, params, seed_arr, k), f"LSTM input {k} at length {T}")


def test_open_sequence_length_with_computed_weights_is_a_typed_error_naming_the_node():
    """The Scan form holds constant weights only; a computed weight's gradient is unrolled,
    which needs the length."""
    model, _, _ = make(Config("LSTM", params_as_inputs=True))
    with pytest.raises(ModelError, match="LSTM 'rnn'.*static sequence length"):
        compile_explainer(_open_length(model), Composite("gradient"), ["x", "W"], "out")


def test_unknown_activation_is_a_typed_error():
    model, feeds, _ = make(Config("RNN", attrs={"activations": ["Swish"]}))
    graph = Graph(model).specialize({k: v.shape for k, v in feeds.items()})
    with pytest.raises(UnsupportedOperatorError, match="RNN with activation Swish"):
        compile_explainer(graph, Composite("gradient"), ["x"], "out")


def test_long_sequence_takes_the_scan_form_whose_size_does_not_grow_with_the_length():
    """A bidirectional LSTM over 100 and 200 steps: two Scans per direction, the same number
    of nodes for both lengths, and agreement with finite differences of the reference."""
    sizes = []
    for T in (100, 200):
        cfg = Config("LSTM", direction="bidirectional", T=T, N=2, I=2, H=4, outputs=("Y_h",), scale=0.4,
                     lens=[T, T // 3])
        model, feeds, params = make(cfg)
        graph = Graph(model).specialize({k: v.shape for k, v in feeds.items()})
        spec = compile_explainer(graph, Composite("gradient"), ["x"], "out")
        assert _scans(spec) == 4
        sizes.append(len(spec.model.graph.node))
    assert sizes[0] == sizes[1]
    y = expected(cfg, feeds, params)
    seed_arr = np.random.default_rng(5).normal(size=y.shape)
    got = session(spec.model).run([spec.attributions["x"]], {**feeds, SEED: seed_arr.astype(np.float32)})[0]
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 50, 1), (0, 199, 0), (1, 7, 0), (1, 150, 1)]:
        vals = []
        for sgn in (1, -1):
            x = feeds["x"].astype(np.float64)
            x[idx] += sgn * eps
            vals.append(float((seed_arr * expected(cfg, {**feeds, "x": x}, params)).sum()))
        num = (vals[0] - vals[1]) / (2 * eps)
        assert abs(got[idx] - num) <= 1e-3 * abs(num) + 1e-6, (idx, got[idx], num)


# --------------------------------------------------------------------------- torch
torch = pytest.importorskip("torch")


class Classifier(torch.nn.Module):
    """A recurrent layer over (batch, time, features), its last step into a Linear classifier."""

    def __init__(self, cell, **kw):
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True, **kw)
        self.fc = torch.nn.Linear(5 * (2 if kw.get("bidirectional") else 1), 4)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


TORCH_CASES = [
    ("LSTM", {}), ("LSTM", {"bidirectional": True, "num_layers": 2}), ("GRU", {"bidirectional": True}),
    ("GRU", {}), ("RNN", {"num_layers": 2}), ("RNN", {"nonlinearity": "relu", "bidirectional": True}),
]


def _export(module, x, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(module, (x,), str(path), dynamo=True, input_names=["x"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                              dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load(str(path))


# The dynamo exporter is slow (seconds per model): one case per cell with it.
DYNAMO_CASES = [("LSTM", {}), ("GRU", {"bidirectional": True}), ("RNN", {"num_layers": 2})]
EXPORTS = [(c, kw, False) for c, kw in TORCH_CASES] + [(c, kw, True) for c, kw in DYNAMO_CASES]


@pytest.mark.parametrize("cell,kw,dynamo", EXPORTS, ids=[
    f"{c}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}-{'dynamo' if d else 'torchscript'}"
    for c, kw, d in EXPORTS])
def test_gradient_of_torch_recurrent_classifier_equals_autograd(cell, kw, dynamo, tmp_path):
    """Explainer(model).attribute(x, method="gradient", target=c) on torch.nn.LSTM/GRU/RNN +
    Linear, exported by both exporters, equals torch autograd element-wise. The TorchScript
    exporter emits LSTM/GRU/RNN nodes; dynamo emits LSTM and GRU nodes and decomposes RNN into
    MatMul/Add/Tanh|Relu steps (differentiated by the element-wise rules)."""
    torch.manual_seed(0)
    module = Classifier(getattr(torch.nn, cell), **kw).eval()
    model = _export(module, torch.randn(2, 6, 3), tmp_path / "m.onnx", dynamo)
    ops = {n.op_type for n in model.graph.node}
    assert (cell in ops) == (not dynamo or cell != "RNN"), ops
    x = torch.randn(3, 6, 3, requires_grad=True)
    module(x)[:, 2].sum().backward()
    e = Explainer(model)
    np.testing.assert_allclose(e.predict(x.detach().numpy()), module(x).detach().numpy(), atol=1e-5)
    got = e.attribute(x.detach().numpy(), method="gradient", target=2)
    want = x.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_gradient_of_torch_lstm_over_a_long_sequence_equals_autograd(tmp_path):
    """Two bidirectional LSTM layers over 120 steps (the Scan form) against torch autograd."""
    torch.manual_seed(2)
    module = Classifier(torch.nn.LSTM, bidirectional=True, num_layers=2).eval()
    model = _export(module, torch.randn(2, 120, 3), tmp_path / "m.onnx", False)
    x = torch.randn(2, 120, 3, requires_grad=True)
    module(x)[:, 1].sum().backward()
    got = Explainer(model).attribute(x.detach().numpy(), method="gradient", target=1)
    want = x.grad.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
