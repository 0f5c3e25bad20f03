"""What each method family does through LSTM, GRU and RNN — never a silent fallback.

- guided backprop and deconvnet modify ReLU's backward only: through a recurrence they are
  its exact gradient (checked by float64 finite differences), except at Relu activations
  inside it, which take the modified rule (checked against a numpy backward pass);
- the LRP composites use Arras et al.'s rule (tests/test_lrp_recurrent.py);
- DeepLIFT carries its rescale multipliers through the recurrence, every product of gate and
  signal split exactly between its factors, checked against numpy and by summation-to-delta;
  before, it silently took the gradient (input x gradient);
- deep Taylor and (contrastive) excitation backprop have no rule for a recurrence and refuse
  it by name, where before they silently took its gradient;
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

REFUSING = ("deep_taylor", "excitation_backprop", "contrastive_excitation_backprop")


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
    for family in ("gradient", "guided_backprop", "deconvnet", "lrp.epsilon", "lrp.epsilon_plus", "deeplift"):
        assert report["unsupported"][family] == [], family
    assert report["rules"]["deeplift"] == [
        f"{op}: rescale multipliers on the activations, products of gate and signal split as "
        "d(a c) = mean(c) da + mean(a) dc (summation-to-delta holds)"]
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


# ----------------------------------------------------------------------------- DeepLIFT
def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def deeplift_reference(cfg, feeds, params, m_out):
    """DeepLIFT's attributions (batch-first, baseline 0 for x, h0 and c0) for multipliers
    `m_out` on the model's output, in float64 for default activations without clip: rescale
    dy / dx on every activation, d(a c) = mean(c) da + mean(a) dc on every product of two
    step values (means of the input's and the baseline's), transposed weights on the linear
    maps, written out per operator from its equations."""
    op, D, H, T, N = cfg.op, cfg.D, cfg.H, cfg.T, cfg.N
    f1 = {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in {**feeds, **params}.items()}
    f0 = {k: (np.zeros_like(v) if k in feeds and v.dtype.kind == "f" else v) for k, v in f1.items()}
    G = ref.GATES[op]
    B = f1.get("B", np.zeros((D, 2 * G * H)))
    records = []
    for f in (f1, f0):
        record = {}
        h0 = f["h0"].transpose(1, 0, 2) if "h0" in f else None
        c0 = f["c0"].transpose(1, 0, 2) if "c0" in f else None
        ref.forward(op, f["x"].transpose(1, 0, 2), f["W"], f["R"], f.get("B"), f.get("sl"), h0, c0,
                    f.get("P"), direction=cfg.direction, record=record, **cfg.attrs)
        records.append(record)
    parts, at = {}, 0
    for name in ("Y", "Y_h", "Y_c"):
        if name not in cfg.outputs or (name == "Y_c" and op != "LSTM"):
            continue
        shape = (N, T, D, H) if name == "Y" else (N, D, H)
        size = int(np.prod(shape[1:]))
        parts[name] = m_out[:, at:at + size].reshape(shape).astype(np.float64)
        at += size

    def slope(dy, dx, grad):
        return np.where(np.abs(dx) < 1e-10, grad, dy / np.where(np.abs(dx) < 1e-10, 1.0, dx))

    lens = f1.get("sl", np.full(N, T))
    lbr = cfg.attrs.get("linear_before_reset", 0)
    mx, mh0, mc0 = np.zeros((N, T, cfg.I)), np.zeros((N, D, H)), np.zeros((N, D, H))
    for d in range(D):
        rev = cfg.direction == "reverse" or d == 1
        W, R, Wb, Rb = f1["W"][d], f1["R"][d], B[d, :G * H], B[d, G * H:]
        for n in range(N):
            steps = list(range(lens[n] - 1, -1, -1) if rev else range(lens[n]))
            mh = parts["Y_h"][n, d].copy() if "Y_h" in parts and lens[n] > 0 else np.zeros(H)
            mc = parts["Y_c"][n, d].copy() if "Y_c" in parts and lens[n] > 0 else np.zeros(H)
            for t in reversed(steps):
                s1, s0 = records[0][(d, n, t)], records[1][(d, n, t)]
                if "Y" in parts:
                    mh = mh + parts["Y"][n, t, d]
                if op == "LSTM":
                    pre1, pre0 = (W @ s["x"] + R @ s["h_prev"] + Wb + Rb for s in (s1, s0))
                    o1, o0 = _sigmoid(pre1[H:2 * H]), _sigmoid(pre0[H:2 * H])
                    hc1, hc0 = np.tanh(s1["c"]), np.tanh(s0["c"])
                    m_o, m_hc = mh * (hc1 + hc0) / 2, mh * (o1 + o0) / 2
                    mc = mc + m_hc * slope(hc1 - hc0, s1["c"] - s0["c"], 1 - hc1 ** 2)
                    m_f, m_cprev = mc * (s1["c_prev"] + s0["c_prev"]) / 2, mc * (s1["f"] + s0["f"]) / 2
                    m_i, m_g = mc * (s1["g"] + s0["g"]) / 2, mc * (s1["i"] + s0["i"]) / 2
                    def sig(y1, y0, k):
                        return slope(y1 - y0, pre1[k * H:(k + 1) * H] - pre0[k * H:(k + 1) * H], y1 * (1 - y1))

                    m_a = np.concatenate([m_i * sig(s1["i"], s0["i"], 0), m_o * sig(o1, o0, 1),
                                          m_f * sig(s1["f"], s0["f"], 2),
                                          m_g * slope(s1["g"] - s0["g"], s1["a"] - s0["a"], 1 - s1["g"] ** 2)])
                    mh, mc = R.T @ m_a, m_cprev
                elif op == "GRU":
                    pz1, pz0 = ((W @ s["x"] + Wb)[:2 * H] + R[:2 * H] @ s["h_prev"] + Rb[:2 * H] for s in (s1, s0))
                    m_z = mh * ((s1["h_prev"] + s0["h_prev"]) - (s1["hh"] + s0["hh"])) / 2
                    m_hprev = mh * (s1["z"] + s0["z"]) / 2
                    m_hh = mh * ((1 - s1["z"]) + (1 - s0["z"])) / 2
                    m_ah = m_hh * slope(s1["hh"] - s0["hh"], s1["a"] - s0["a"], 1 - s1["hh"] ** 2)
                    Rh = R[2 * H:]
                    if lbr:
                        m_r, m_v = m_ah * (s1["v"] + s0["v"]) / 2, m_ah * (s1["r"] + s0["r"]) / 2
                        m_hprev = m_hprev + Rh.T @ m_v
                    else:
                        m_rh = Rh.T @ m_ah
                        m_r = m_rh * (s1["h_prev"] + s0["h_prev"]) / 2
                        m_hprev = m_hprev + m_rh * (s1["r"] + s0["r"]) / 2
                    m_zr = np.concatenate([
                        m_z * slope(s1["z"] - s0["z"], pz1[:H] - pz0[:H], s1["z"] * (1 - s1["z"])),
                        m_r * slope(s1["r"] - s0["r"], pz1[H:] - pz0[H:], s1["r"] * (1 - s1["r"]))])
                    mh = m_hprev + R[:2 * H].T @ m_zr
                    m_a = np.concatenate([m_zr, m_ah])
                else:
                    m_a = mh * slope(s1["h"] - s0["h"], s1["a"] - s0["a"], 1 - s1["h"] ** 2)
                    mh = R.T @ m_a
                mx[n, t] += W.T @ m_a
            mh0[n, d], mc0[n, d] = mh, mc
    out = {"x": f1["x"] * mx}
    if "h0" in feeds:
        out["h0"] = f1["h0"] * mh0
    if "c0" in feeds:
        out["c0"] = f1["c0"] * mc0
    return out


def _deeplift(cfg, m_out, tmp_path, seed=0, form=None, **options):
    from onnxplain.rules import recurrent_deeplift

    model, feeds, params = make(cfg, seed)
    onnx.save(model, tmp_path / "m.onnx")
    e = Explainer(str(tmp_path / "m.onnx"))
    scans = []
    real = recurrent_deeplift.scan_backward

    def counted(*args, **kwargs):
        scans.append(1)
        return real(*args, **kwargs)

    recurrent_deeplift.scan_backward = counted
    try:
        got = e.attribute(feeds, method="deeplift", target=m_out.astype(np.float32), **options)
    finally:
        recurrent_deeplift.scan_backward = real
    if form is not None:  # the form the rule took (see the fixture)
        assert bool(scans) == (form == "scan")
    return e, got, feeds, params


DEEPLIFT_CASES = [
    pytest.param(Config("LSTM"), id="LSTM"),
    pytest.param(Config("LSTM", direction="bidirectional", lens=[4, 2, 3]), id="LSTM-bidirectional-lengths"),
    pytest.param(Config("LSTM", direction="reverse", outputs=("Y_h", "Y_c")), id="LSTM-reverse-final-states"),
    pytest.param(Config("GRU"), id="GRU"),
    pytest.param(Config("GRU", attrs={"linear_before_reset": 1}, direction="bidirectional"),
                 id="GRU-lbr-bidirectional"),
    pytest.param(Config("RNN", lens=[4, 1, 3]), id="RNN-lengths"),
]


@pytest.mark.parametrize("cfg", DEEPLIFT_CASES)
def test_deeplift_through_a_recurrence_equals_the_rescale_and_product_rules_in_numpy(cfg, tmp_path, form):
    m_out = np.random.default_rng(8).normal(size=(cfg.N, _width(cfg)))
    _, got, feeds, params = _deeplift(cfg, m_out, tmp_path, form=form)
    want = deeplift_reference(cfg, feeds, params, m_out)
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-3, atol=1e-4 * np.abs(w).max(), err_msg=name)


SUMMATION_CASES = DEEPLIFT_CASES + [
    # Clipped pre-activations (their rescale reads them before the clip), peepholes.
    pytest.param(Config("LSTM", peephole=True, attrs={"clip": 0.5}, scale=1.2), id="LSTM-peepholes-clip"),
    pytest.param(Config("LSTM", attrs={"input_forget": 1, "clip": 0.7}, scale=1.2), id="LSTM-input-forget-clip"),
    pytest.param(Config("GRU", attrs={"clip": 0.5}, scale=1.2), id="GRU-clip"),
    pytest.param(Config("GRU", attrs={"clip": 0.5, "linear_before_reset": 1}, scale=1.2), id="GRU-lbr-clip"),
    pytest.param(Config("LSTM", lens=[4, 0, 2], direction="bidirectional"), id="LSTM-length-0"),
]


@pytest.mark.parametrize("cfg", SUMMATION_CASES)
def test_deeplift_through_a_recurrence_sums_to_the_outputs_difference_from_the_baseline(cfg, tmp_path, form):
    m_out = np.random.default_rng(9).normal(size=(cfg.N, _width(cfg)))
    e, got, feeds, _ = _deeplift(cfg, m_out, tmp_path, form=form)
    base = {k: np.zeros_like(v) if v.dtype.kind == "f" else v for k, v in feeds.items()}
    delta = (m_out * (e.predict(feeds) - e.predict(base))).sum(1)
    total = sum(v.reshape(cfg.N, -1).sum(1) for v in got.values())
    np.testing.assert_allclose(total, delta, rtol=1e-4, atol=1e-5 * np.abs(delta).max())
    # It is not input x gradient, what it silently was before.
    grad = e.attribute(feeds, method="input_x_gradient", target=m_out.astype(np.float32))
    assert np.abs(grad["x"] - got["x"]).max() > 1e-3 * np.abs(got["x"]).max()


def test_deeplift_with_a_constant_initial_state_still_sums_to_the_difference(tmp_path):
    # c_prev of the first step is the same for the input and the baseline (a constant c0):
    # f * c0 differs only through the forget gate, which gets that difference.
    cfg = Config("LSTM", h0=False, c0=False)
    model, feeds, _ = make(cfg)
    H = cfg.H
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    c0 = np.random.default_rng(10).normal(size=(1, cfg.N, H)).astype(np.float32)
    model.graph.initializer.append(onnx.numpy_helper.from_array(c0, "c0_const"))
    while len(node.input) < 7:
        node.input.append("")
    node.input[6] = "c0_const"
    onnx.save(model, tmp_path / "m.onnx")
    e = Explainer(str(tmp_path / "m.onnx"))
    m_out = np.random.default_rng(11).normal(size=(cfg.N, _width(cfg))).astype(np.float32)
    got = e.attribute(feeds, method="deeplift", target=m_out)
    delta = (m_out * (e.predict(feeds) - e.predict({"x": np.zeros_like(feeds["x"])}))).sum(1)
    np.testing.assert_allclose(got.reshape(cfg.N, -1).sum(1), delta, rtol=1e-4, atol=1e-5)


def test_deeplift_of_a_torch_lstm_classifier_sums_to_the_logits_difference(tmp_path):
    import warnings

    torch = pytest.importorskip("torch")

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = torch.nn.LSTM(3, 5, batch_first=True, bidirectional=True)
            self.fc = torch.nn.Linear(10, 4)

        def forward(self, x):
            y, _ = self.rnn(x)
            return self.fc(torch.relu(y[:, -1]))

    torch.manual_seed(2)
    path = tmp_path / "c.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Classifier().eval(), (torch.randn(2, 7, 3),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    e = Explainer(str(path))
    x = np.random.default_rng(12).normal(size=(3, 7, 3)).astype(np.float32)
    got = e.attribute(x, method="deeplift", target=2)
    delta = e.predict(x)[:, 2] - e.predict(np.zeros_like(x))[:, 2]
    np.testing.assert_allclose(got.reshape(3, -1).sum(1), delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("steps", [24, 300])
def test_deeplift_through_a_longer_lstm_stays_bounded_and_exact(tmp_path, steps):
    # "All of d(gate * signal) to the signal" as a multiplier is unbounded where the signal
    # barely moves: on the 24-step model it gave attributions of 3e8 that cancel. The
    # product rule keeps them of the order of the output's difference. (Both take the Scans.)
    cfg = Config("LSTM", T=steps, N=2, I=8, H=16, outputs=("Y_h",), h0=False, c0=False)
    m_out = np.zeros((cfg.N, _width(cfg)))
    m_out[:, 0] = 1.0
    e, got, feeds, _ = _deeplift(cfg, m_out, tmp_path, form="scan")
    delta = e.predict(feeds)[:, 0] - e.predict({"x": np.zeros_like(feeds["x"])})[:, 0]
    np.testing.assert_allclose(got.reshape(cfg.N, -1).sum(1), delta, rtol=1e-4, atol=1e-6)
    assert np.abs(got).max() < 1.0  # measured 0.13
