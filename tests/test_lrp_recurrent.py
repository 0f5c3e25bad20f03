"""LRP through LSTM, GRU and RNN: the rule of Arras et al. 2017 (relevance follows the signal,
not the gate; the epsilon rule on the linear maps), against an independent numpy
implementation, conservation, and its use by every LRP composite.

The numpy reference below walks each sample's valid steps (no masks) with the paper's
formula R_{i<-j} = z_ij / (z_j + eps sign(z_j)) R_j on every sum, the forward states taken
from the float64 forward of rnn_reference.py (checked against onnxruntime in
test_rules_recurrent.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

import rnn_reference as ref
from rnn_models import Config, make, sequence_first, session

from onnxplain import Explainer
from onnxplain.compile import SEED, compile_explainer
from onnxplain.graph import Graph
from onnxplain.methods.relevance import ZENNIT, deep_taylor_composite, user_composite, zennit_composite
from onnxplain.rules import recurrent_scan
from onnxplain.rules.recurrent_lrp import recurrent_relevance


# ----------------------------------------------------------------------------- the reference
def stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def split(z_parts, total, r, eps):
    """Relevance r of each output j of `total` = sum of parts (+ whatever the parts leave out:
    the bias) shared in proportion: part_k * r / stab(total)."""
    s = r / stab(total, eps)
    return [p * s for p in z_parts]


def linear_relevance(W, x, R, h, den, r, eps):
    """z_j = sum_i W_ji x_i + sum_k R_jk h_k (+ bias): relevance of x and of h."""
    s = r / stab(den, eps)
    return (W * x[None, :] * s[:, None]).sum(0), (R * h[None, :] * s[:, None]).sum(0)


def arras_lrp(cfg, feeds, params, rel, eps, bias=True):
    """(R_x, R_h0, R_c0) batch-first, for relevance `rel` on the model's output."""
    op, D, H, T, N = cfg.op, cfg.D, cfg.H, cfg.T, cfg.N
    f = {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in {**feeds, **params}.items()}
    x = f["x"].transpose(1, 0, 2)
    h0 = f["h0"].transpose(1, 0, 2) if "h0" in f else None
    c0 = f["c0"].transpose(1, 0, 2) if "c0" in f else None
    record = {}
    ref.forward(op, x, f["W"], f["R"], f.get("B"), f.get("sl"), h0, c0, f.get("P"), direction=cfg.direction,
                record=record, **cfg.attrs)
    # The relevance of each output, split off the model's concatenated output.
    parts, at = {}, 0
    for name in ("Y", "Y_h", "Y_c"):
        if name not in cfg.outputs or (name == "Y_c" and op != "LSTM"):
            continue
        shape = (N, T, D, H) if name == "Y" else (N, D, H)
        size = int(np.prod(shape[1:]))
        parts[name] = rel[:, at:at + size].reshape(shape).astype(np.float64)
        at += size
    G = ref.GATES[op]
    B = f.get("B", np.zeros((D, 2 * G * H)))
    lens = f.get("sl", np.full(N, T))
    lbr = cfg.attrs.get("linear_before_reset", 0)
    rx = np.zeros((N, T, cfg.I))
    rh0, rc0 = np.zeros((N, D, H)), np.zeros((N, D, H))
    k = {"LSTM": 3, "GRU": 2, "RNN": 0}[op]
    for d in range(D):
        rev = cfg.direction == "reverse" or d == 1
        W, Rm = f["W"][d][k * H:(k + 1) * H], f["R"][d][k * H:(k + 1) * H]
        wb, rb = B[d, k * H:(k + 1) * H], B[d, G * H + k * H:G * H + (k + 1) * H]
        for n in range(N):
            steps = list(range(lens[n] - 1, -1, -1) if rev else range(lens[n]))
            rh = parts["Y_h"][n, d].copy() if "Y_h" in parts and lens[n] > 0 else np.zeros(H)
            rc = parts["Y_c"][n, d].copy() if "Y_c" in parts and lens[n] > 0 else np.zeros(H)
            for t in reversed(steps):
                s = record[(d, n, t)]
                if "Y" in parts:
                    rh = rh + parts["Y"][n, t, d]
                if op == "LSTM":
                    rc = rc + rh  # h = o * act(c): the gate o gets nothing
                    r_cprev, r_g = split([s["f"] * s["c_prev"], s["i"] * s["g"]], s["c"], rc, eps)
                    den = s["a"] if bias else s["a"] - wb - rb
                    r_x, rh = linear_relevance(W, s["x"], Rm, s["h_prev"], den, r_g, eps)
                    rc = r_cprev
                elif op == "GRU":
                    r_hprev, r_hh = split([s["z"] * s["h_prev"], (1 - s["z"]) * s["hh"]], s["h"], rh, eps)
                    if lbr:
                        den = s["a"] if bias else s["a"] - wb
                        sx = r_hh / stab(den, eps)
                        r_x = (W * s["x"][None, :] * sx[:, None]).sum(0)
                        r_v = s["r"] * s["v"] * sx  # the reset gate passes it all to v
                        den_v = s["v"] if bias else s["v"] - rb
                        _, r_h2 = linear_relevance(W, s["x"], Rm, s["h_prev"], den_v, r_v, eps)
                    else:
                        den = s["a"] if bias else s["a"] - wb - rb
                        r_x, r_h2 = linear_relevance(W, s["x"], Rm, s["r"] * s["h_prev"], den, r_hh, eps)
                    rh = r_hprev + r_h2
                else:
                    den = s["a"] if bias else s["a"] - wb - rb
                    r_x, rh = linear_relevance(W, s["x"], Rm, s["h_prev"], den, rh, eps)
                rx[n, t] += r_x
            rh0[n, d], rc0[n, d] = rh, rc
    return rx, rh0, rc0


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(params=["unrolled", "scan"])
def form(request, monkeypatch):
    """The rule's form: unrolled over the steps, or two Scans (long or open lengths)."""
    monkeypatch.setattr(recurrent_scan, "UNROLL_MAX", 10**6 if request.param == "unrolled" else 0)
    return request.param


def _relevance(cfg, composite, rel, seed=0, form=None):
    model, feeds, params = make(cfg, seed)
    graph = Graph(model).specialize({k: v.shape for k, v in feeds.items()})
    wrt = [k for k in ("x", "h0", "c0") if k in feeds]
    spec = compile_explainer(graph, composite, wrt, "out")
    if form is not None:
        assert any(n.op_type == "Scan" for n in spec.model.graph.node) == (form == "scan")
    m = sequence_first(spec.model) if cfg.layout else spec.model
    got = session(m).run([spec.attributions[w] for w in wrt], {**feeds, SEED: rel.astype(np.float32)})
    return dict(zip(wrt, got)), feeds, params


def _width(cfg):
    return sum(cfg.T * cfg.D * cfg.H if o == "Y" else cfg.D * cfg.H for o in cfg.outputs
               if o != "Y_c" or cfg.op == "LSTM")


CASES = [
    pytest.param(Config("LSTM"), id="LSTM"),
    pytest.param(Config("LSTM", direction="reverse", lens=[4, 2, 1]), id="LSTM-reverse-lengths"),
    pytest.param(Config("LSTM", direction="bidirectional", lens=[3, 0, 4], layout=1), id="LSTM-bidirectional-layout1"),
    pytest.param(Config("LSTM", peephole=True, attrs={"input_forget": 1, "clip": 0.9}, scale=1.2),
                 id="LSTM-peepholes-input-forget-clip"),
    pytest.param(Config("LSTM", outputs=("Y_h", "Y_c"), direction="bidirectional"), id="LSTM-final-states"),
    pytest.param(Config("GRU"), id="GRU"),
    pytest.param(Config("GRU", direction="bidirectional", lens=[2, 4, 1]), id="GRU-bidirectional-lengths"),
    pytest.param(Config("GRU", attrs={"linear_before_reset": 1}), id="GRU-linear-before-reset"),
    pytest.param(Config("GRU", attrs={"linear_before_reset": 1}, direction="reverse", lens=[3, 1, 4]),
                 id="GRU-linear-before-reset-reverse"),
    pytest.param(Config("LSTM", computed_weights=True, direction="bidirectional", lens=[4, 2, 3]),
                 id="LSTM-computed-weights"),
    pytest.param(Config("GRU", computed_weights=True, attrs={"linear_before_reset": 1}), id="GRU-computed-weights"),
    pytest.param(Config("RNN", direction="bidirectional"), id="RNN"),
    pytest.param(Config("RNN", attrs={"activations": ["Relu"]}, lens=[4, 3, 2]), id="RNN-relu"),
]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "zero-params-bias"])
@pytest.mark.parametrize("cfg", CASES)
def test_relevance_equals_arras_rule_in_numpy(cfg, bias, form):
    eps = 0.01  # large enough that float32 and float64 agree where a denominator is small
    rel = np.random.default_rng(3).normal(size=(cfg.N, _width(cfg)))
    got, feeds, params = _relevance(cfg, zennit_composite("lrp.epsilon", epsilon=eps, bias=bias), rel, form=form)
    rx, rh0, rc0 = arras_lrp(cfg, feeds, params, rel, eps, bias=bias)
    tol = dict(rtol=1e-4, atol=1e-5 * np.abs(rx).max())
    np.testing.assert_allclose(got["x"], rx, err_msg="relevance of X", **tol)
    np.testing.assert_allclose(got["h0"], rh0, err_msg="relevance of initial_h", **tol)
    if "c0" in got:
        np.testing.assert_allclose(got["c0"], rc0, err_msg="relevance of initial_c", **tol)


@pytest.mark.parametrize("cfg", [
    pytest.param(Config("LSTM", bias=False, direction="bidirectional", peephole=True), id="LSTM"),
    pytest.param(Config("GRU", bias=False, direction="bidirectional"), id="GRU"),
    pytest.param(Config("GRU", bias=False, attrs={"linear_before_reset": 1}), id="GRU-linear-before-reset"),
    pytest.param(Config("RNN", bias=False, direction="reverse"), id="RNN"),
])
def test_relevance_without_biases_is_conserved_onto_inputs_and_initial_states(cfg, form):
    rel = np.random.default_rng(4).uniform(0.1, 1.0, size=(cfg.N, _width(cfg)))
    got, _, _ = _relevance(cfg, zennit_composite("lrp.epsilon", epsilon=1e-9), rel, form=form)
    total = sum(v.reshape(cfg.N, -1).sum(1) for v in got.values())
    np.testing.assert_allclose(total, rel.sum(1), rtol=1e-4)
    assert all(np.abs(v).max() > 0 for v in got.values())


# ----------------------------------------------------------------------------- composites
def test_every_lrp_composite_maps_recurrent_operators_to_the_arras_rule():
    model, feeds, _ = make(Config("LSTM"))
    graph = Graph(model)
    node = next(n for n in graph.nodes if n.op_type == "LSTM")
    for composite in [zennit_composite(name) for name in ZENNIT] + [user_composite("Gemm:zplus")]:
        rule = composite.rule(node, graph)
        assert getattr(rule, "func", rule) is recurrent_relevance, composite.name
        for op in ("GRU", "RNN"):
            other = onnx.helper.make_node(op, list(node.input[:6]), ["y"], name="other")
            assert getattr(composite.rule(other, graph), "func", None) is recurrent_relevance


def test_deep_taylor_is_not_given_the_epsilon_rule_for_recurrences():
    """Deep Taylor (and excitation backprop) promise non-negative relevance, which the
    epsilon rule of the recurrence does not give: they keep the gradient there, as before."""
    model, _, _ = make(Config("LSTM"))
    graph = Graph(model)
    node = next(n for n in graph.nodes if n.op_type == "LSTM")
    rule = deep_taylor_composite().rule(node, graph)
    assert getattr(rule, "func", rule) is not recurrent_relevance


torch = pytest.importorskip("torch")


class Classifier(torch.nn.Module):
    def __init__(self, cell, **kw):
        super().__init__()
        self.rnn = cell(3, 5, batch_first=True, **kw)
        self.fc = torch.nn.Linear(5 * (2 if kw.get("bidirectional") else 1), 4)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


@pytest.mark.parametrize("cell,kw,steps", [("LSTM", {}, 6), ("GRU", {"bidirectional": True}, 6),
                                            ("LSTM", {"num_layers": 2}, 6), ("LSTM", {"bidirectional": True}, 120)],
                         ids=["LSTM", "GRU-bidirectional", "LSTM-two-layers", "LSTM-120-steps"])
def test_lrp_of_torch_recurrent_classifier_without_biases_sums_to_the_logit(cell, kw, steps, tmp_path):
    """Explainer(model).attribute(x, method=<every LRP composite>, target=logit seed) on an
    LSTM/GRU + Linear classifier with zero biases: the input relevance sums to the explained
    logit (the initial states are zeros); the composites without a first-layer rule for dense
    layers give the same relevance as lrp.epsilon."""
    torch.manual_seed(1)
    module = Classifier(getattr(torch.nn, cell), **kw).eval()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name:
                p.zero_()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, steps, 3),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    e = Explainer(str(path))
    x = np.random.default_rng(5).normal(size=(3, steps, 3)).astype(np.float32)
    logits = e.predict(x)
    seed = np.zeros_like(logits)
    seed[:, 2] = logits[:, 2]
    base = e.attribute(x, method="lrp.epsilon", target=seed)
    for name in ZENNIT:
        r = e.attribute(x, method=name, target=seed)
        np.testing.assert_allclose(r.reshape(3, -1).sum(1), logits[:, 2], rtol=1e-3, atol=1e-5, err_msg=name)
        if "flat" not in name:
            np.testing.assert_allclose(r, base, rtol=1e-5, atol=1e-7, err_msg=name)
    r = e.attribute(x, method="lrp", target=seed, rules="Gemm:epsilon")
    np.testing.assert_allclose(r, base, rtol=1e-5, atol=1e-7)
