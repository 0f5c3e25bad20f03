"""What each method family does through LSTM, GRU and RNN — never a silent fallback.

- guided backprop and deconvnet modify ReLU's backward only: through a recurrence they are
  its exact gradient (checked by float64 finite differences), except at Relu activations
  inside it, which take the modified rule (checked against a numpy backward pass);
- the LRP composites use Arras et al.'s rule (tests/test_lrp_recurrent.py);
- deep Taylor, (contrastive) excitation backprop and DeepLIFT have no rule for a recurrence
  and refuse it by name, where before they silently took its gradient;
- `inspect` says, per family, which rule serves the recurrence or that it is missing.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import rnn_reference as ref
from rnn_models import Config, make, numeric, sequence_first, session

from onnxplain import Explainer, cli
from onnxplain.compile import SEED, compile_explainer
from onnxplain.errors import UnsupportedOperatorError
from onnxplain.graph import Graph
from onnxplain.methods.gradients import DECONVNET, GRADIENT, GUIDED, GUIDED_CLIP
from onnxplain.rules import recurrent_scan

REFUSING = ("deep_taylor", "excitation_backprop", "contrastive_excitation_backprop", "deeplift")


@pytest.fixture(params=["unrolled", "scan"])
def form(request, monkeypatch):
    monkeypatch.setattr(recurrent_scan, "UNROLL_MAX", 10**6 if request.param == "unrolled" else 0)
    return request.param


def _width(cfg):
    return sum(cfg.T * cfg.D * cfg.H if o == "Y" else cfg.D * cfg.H for o in cfg.outputs
               if o != "Y_c" or cfg.op == "LSTM")


def _backward(cfg, composite, seed_arr, seed=0, form=None):
    model, feeds, params = make(cfg, seed)
    graph = Graph(model).specialize({k: v.shape for k, v in feeds.items()})
    wrt = [k for k in ("x", "h0", "c0") if k in feeds]
    spec = compile_explainer(graph, composite, wrt, "out")
    if form is not None:
        assert any(n.op_type == "Scan" for n in spec.model.graph.node) == (form == "scan")
    m = sequence_first(spec.model) if cfg.layout else spec.model
    got = session(m).run([spec.attributions[w] for w in wrt], {**feeds, SEED: seed_arr.astype(np.float32)})
    return dict(zip(wrt, got)), feeds, params


# ----------------------------------------------------------------------------- guided backprop
EXACT_CASES = [
    pytest.param(Config("LSTM", direction="bidirectional", lens=[4, 2, 3]), id="LSTM-bidirectional-lengths"),
    pytest.param(Config("GRU", attrs={"linear_before_reset": 1}), id="GRU-linear-before-reset"),
    pytest.param(Config("RNN", attrs={"activations": ["LeakyRelu"], "activation_alpha": [0.1]}), id="RNN-leakyrelu"),
]


@pytest.mark.parametrize("composite", [GUIDED, DECONVNET, GUIDED_CLIP], ids=lambda c: c.name)
@pytest.mark.parametrize("cfg", EXACT_CASES)
def test_guided_backprop_and_deconvnet_through_a_recurrence_without_relu_are_its_exact_gradient(cfg, composite, form):
    seed_arr = np.random.default_rng(1).normal(size=(cfg.N, _width(cfg)))
    got, feeds, params = _backward(cfg, composite, seed_arr, form=form)
    for name in ("x", "h0"):
        fd = numeric(cfg, feeds, params, seed_arr, name)
        np.testing.assert_allclose(got[name], fd, rtol=1e-3, atol=1e-4 * np.abs(fd).max(), err_msg=name)


def guided_rnn_reference(cfg, feeds, params, seed_arr, mode):
    """Backward of a forward-direction ReLU RNN (the model of rnn_models.make) in float64,
    with guided backprop's (mode 'guided') or deconvnet's ReLU rule at every step."""
    f = {k: np.asarray(v, np.float64) for k, v in {**feeds, **params}.items()}
    W, R, B = f["W"][0], f["R"][0], f["B"][0]
    H, T, N = cfg.H, cfg.T, cfg.N
    x, h = f["x"], f["h0"][:, 0]
    pre = []
    for t in range(T):
        a = x[:, t] @ W.T + h @ R.T + B[:H] + B[H:]
        pre.append(a)
        h = np.maximum(a, 0)
    gy = seed_arr[:, :T * H].reshape(N, T, H)
    dh = seed_arr[:, T * H:].reshape(N, H).astype(np.float64)
    dx = np.zeros_like(x)
    for t in reversed(range(T)):
        g = dh + gy[:, t]
        da = np.maximum(g, 0) if mode == "deconvnet" else np.maximum(g, 0) * (pre[t] > 0)
        dx[:, t] = da @ W
        dh = da @ R
    return dx, dh[:, None]


@pytest.mark.parametrize("composite,mode", [(GUIDED, "guided"), (DECONVNET, "deconvnet")], ids=["guided", "deconvnet"])
def test_relu_activations_inside_an_rnn_take_the_modified_relu_backward(composite, mode, form):
    cfg = Config("RNN", attrs={"activations": ["Relu"]}, T=5, H=4, scale=0.8)
    seed_arr = np.random.default_rng(2).normal(size=(cfg.N, _width(cfg)))
    got, feeds, params = _backward(cfg, composite, seed_arr, form=form)
    dx, dh0 = guided_rnn_reference(cfg, feeds, params, seed_arr, mode)
    np.testing.assert_allclose(got["x"], dx, rtol=1e-4, atol=1e-5 * np.abs(dx).max())
    np.testing.assert_allclose(got["h0"], dh0, rtol=1e-4, atol=1e-5 * np.abs(dh0).max())
    # The modification matters here: the exact gradient differs.
    exact, _, _ = _backward(cfg, GRADIENT, seed_arr, form=form)
    assert np.abs(exact["x"] - got["x"]).max() > 1e-2 * np.abs(dx).max()
    fd = numeric(cfg, feeds, params, seed_arr, "x")
    np.testing.assert_allclose(exact["x"], fd, rtol=1e-3, atol=1e-4 * np.abs(fd).max())


# ----------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def recurrent_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("families_recurrent")
    out = {}
    for cfg in (Config("LSTM", h0=False, c0=False), Config("GRU", h0=False), Config("RNN", h0=False),
                Config("RNN", h0=False, attrs={"activations": ["Relu"]})):
        model, feeds, _ = make(cfg)
        key = cfg.op + ("-relu" if cfg.attrs else "")
        onnx.save(model, d / f"{key}.onnx")
        out[key] = (d / f"{key}.onnx", feeds["x"])
    return out


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("method", REFUSING)
def test_methods_without_a_recurrent_rule_refuse_the_recurrence_by_name(recurrent_models, op, method):
    path, x = recurrent_models[op]
    with pytest.raises(UnsupportedOperatorError, match=f"method '{method}' has no rule for operator.*{op}") as info:
        Explainer(str(path)).attribute(x, method=method, target=0)
    assert info.value.operators == [op]


def test_a_user_composite_that_names_the_gradient_for_the_recurrence_gets_it(recurrent_models):
    path, x = recurrent_models["LSTM"]
    e = Explainer(str(path))
    got = e.attribute(x, method="lrp", target=0, rules="LSTM:gradient")
    np.testing.assert_allclose(got, e.attribute(x, method="gradient", target=0), rtol=1e-6, atol=1e-7)


def test_the_lrp_composites_still_explain_the_recurrence(recurrent_models):
    path, x = recurrent_models["GRU"]
    r = Explainer(str(path)).attribute(x, method="lrp.epsilon_plus", target=0)
    assert np.all(np.isfinite(r)) and np.abs(r).sum() > 0


# ----------------------------------------------------------------------------- inspect
def _inspect(path) -> dict:
    result = CliRunner().invoke(cli.main, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_inspect_reports_per_family_the_recurrent_rule_or_that_it_is_missing(recurrent_models, op):
    report = _inspect(recurrent_models[op][0])
    for method in REFUSING:
        assert report["unsupported"][method] == [op], method
        assert report["rules"][method] == [], method
    for family in ("gradient", "guided_backprop", "deconvnet", "lrp.epsilon", "lrp.epsilon_plus"):
        assert report["unsupported"][family] == [], family
    assert report["rules"]["guided_backprop"] == [f"{op}: exact gradient (guided backprop modifies ReLU backward "
                                                  "only; no Relu activation inside)"]
    assert all(line.startswith(f"{op}: Arras et al. 2017") for line in report["rules"]["lrp.epsilon"])


def test_inspect_says_guided_backprop_modifies_relu_activations_inside_an_rnn(recurrent_models):
    report = _inspect(recurrent_models["RNN-relu"][0])
    assert report["rules"]["guided_backprop"] == [
        "RNN: exact gradient, the modified ReLU backward of guided backprop at its Relu activations"]
    assert report["rules"]["gradient"] == ["RNN: exact gradient"]


def test_inspect_text_lists_the_rules_of_recurrent_operators(recurrent_models):
    result = CliRunner().invoke(cli.main, ["inspect", str(recurrent_models["LSTM"][0])])
    assert result.exit_code == 0, result.output
    assert "rules of recurrent and quantized operators" in result.stdout
    line = next(ln for ln in result.stdout.splitlines() if ln.strip().startswith("deep_taylor"))
    assert line.split()[-1] == "LSTM"


def test_reference_forward_matches_the_rnn_model_used_here():
    # The guided reference reimplements the ReLU RNN forward; it must agree with rnn_reference.
    cfg = Config("RNN", attrs={"activations": ["Relu"]}, T=5, H=4, scale=0.8, outputs=("Y_h",))
    model, feeds, params = make(cfg)
    f = {k: np.asarray(v, np.float64) for k, v in {**feeds, **params}.items()}
    _, yh = ref.forward("RNN", f["x"].transpose(1, 0, 2), f["W"], f["R"], f["B"], None,
                        f["h0"].transpose(1, 0, 2), None, None, activations=["Relu"])
    got = session(model).run(None, feeds)[0]
    np.testing.assert_allclose(got, yh.transpose(1, 0, 2).reshape(cfg.N, -1), rtol=1e-5, atol=1e-6)
