"""Relevance through LSTM, GRU and RNN: the rule of Arras et al. 2017 ("Explaining recurrent
neural network predictions in sentiment analysis").

Relevance follows the signal, not the gate. A gated product gate * signal hands its whole
relevance to the signal; the gates (LSTM's input, forget and output gates, GRU's update and
reset gates) get none. Sums split in proportion to their terms and the linear maps
W x + R h + b by the epsilon rule (the bias absorbs its share; `bias=False` leaves it out
of the denominators, Zennit's zero_params='bias'). Element-wise activations pass relevance
unchanged. So, per step:

- LSTM: h = o * act(c) gives all of R(h) to c; c = f * c_prev + i * g splits R(c) between
  c_prev and g; g's linear map splits R(g) between x and h_prev.
- GRU: h = (1 - z) * hh + z * h_prev splits R(h) between h_prev and hh; hh's linear map splits
  R(hh) between x and r * h_prev (whose relevance goes to h_prev) or, with
  linear_before_reset, r * (R_h h_prev + b), whose relevance goes through that linear map.
- RNN: h = act(W x + R h_prev + b): the epsilon rule.

Steps past a sample's length pass the carried relevance on unchanged; a sample of length 0
has final states of zero, so their relevance stays there. What reaches the initial states
is their relevance (zero when they are zero). The forward states are recomputed as for the
gradient (recurrent.py), unrolled or, for long or open lengths, in Scans (recurrent_scan.py).
"""

from __future__ import annotations

from .base import register
from .lrp import EPSILON, divide
from .recurrent import RECURRENT, Recurrence
from .recurrent_carry import carry_back, results, scan_x
from .recurrent_scan import applies, scan_backward


def _signal_weights(rec, p):
    """(W, R, bias) of the signal's linear map: LSTM's cell gate, GRU's candidate, RNN's
    whole map; W (H, I), R (H, H), bias (H,) or None."""
    H = rec.H
    k = {"LSTM": 3, "GRU": 2, "RNN": 0}[rec.op]
    w = rec.rows(p["W"], k * H, (k + 1) * H)
    r = rec.rows(p["R"], k * H, (k + 1) * H)
    wb = None if p["Wb"] is None else rec.rows(p["Wb"], k * H, (k + 1) * H)
    rb = None if p["Rb"] is None else rec.rows(p["Rb"], k * H, (k + 1) * H)
    return w, r, wb, rb


def _without(b, z, bias):
    return z if bias is None else b.op("Sub", z, bias)


def _step(rec, s, p, d, r_h, r_c, epsilon, bias):
    """One step's relevance: from that of h_new (r_h, including the step's own output) and
    c_new (r_c) to that of h_prev and c_prev, and the signal's s = R / stabilise(z) whose
    product with W and x is the relevance of x."""
    b = rec.b
    w, r, wb, rb = _signal_weights(rec, p)
    c_prev_r = None
    if rec.op == "LSTM":
        # h = o * act(c): all of h's relevance goes to c.
        r_c = b.add(r_c, r_h)
        s1 = divide(b, r_c, s["c_new"], epsilon)
        c_prev_r = b.mul(s["fc"], s1)
        r_g = b.mul(s["ig"], s1)
        z = s["ac"] if bias else _without(b, s["ac"], rec.add(wb, rb))
        s2 = divide(b, r_g, z, epsilon)
        h_prev_r = b.mul(s["h_prev"], b.op("MatMul", s2, r))
    elif rec.op == "GRU":
        s1 = divide(b, r_h, s["h_new"], epsilon)
        h_prev_r = b.mul(s["zh"], s1)
        r_hh = b.mul(s["zhh"], s1)
        if rec.lbr:
            z = s["a"] if bias else _without(b, s["a"], wb)
            s2 = divide(b, r_hh, z, epsilon)
            r_v = b.mul(s["u"], s2)  # r * v: the gate r passes it all to v
            v = s["v"] if bias else _without(b, s["v"], rb)
            s3 = divide(b, r_v, v, epsilon)
            h_prev_r = b.add(h_prev_r, b.mul(s["h_prev"], b.op("MatMul", s3, r)))
        else:
            z = s["a"] if bias else _without(b, s["a"], rec.add(wb, rb))
            s2 = divide(b, r_hh, z, epsilon)
            # (r * h_prev) R_h^T: the product's relevance goes to h_prev.
            h_prev_r = b.add(h_prev_r, b.mul(s["rh"], b.op("MatMul", s2, r)))
    else:
        z = s["a"] if bias else _without(b, s["a"], rec.add(wb, rb))
        s2 = divide(b, r_h, z, epsilon)
        h_prev_r = b.mul(s["h_prev"], b.op("MatMul", s2, r))
    return h_prev_r, c_prev_r, s2


def _record_keys(rec):
    if rec.op == "LSTM":
        return ["h_prev", "c_new", "fc", "ig", "ac"]
    if rec.op == "GRU":
        return ["h_prev", "h_new", "zh", "zhh", "a"] + (["u", "v"] if rec.lbr else ["rh"])
    return ["h_prev", "a"]


@register(*RECURRENT, family="lrp.epsilon")
def recurrent_relevance(b, node, grads, epsilon: float = EPSILON, bias: bool = True):
    rec = Recurrence(b, node)
    ry, ryh, ryc = rec.output_grads(grads)
    want_x = rec.wants(rec.X)
    if applies(rec):
        def step(rec, s, p, d, r_h, r_c):
            return _step(rec, s, p, d, r_h, r_c, epsilon, bias)

        signals, rh0s, rc0s, params = scan_backward(rec, ry, ryh, ryc, _record_keys(rec), step)
        per_x = scan_x(rec, signals, params, lambda p: _signal_weights(rec, p)[0])
    else:
        rx, rh0s, rc0s = [], [], []
        for d in range(rec.D):
            p, steps = rec.run(d)
            w = _signal_weights(rec, p)[0]
            rh, rc, signal = carry_back(
                rec, d, steps, ry, ryh, ryc,
                lambda k, r_h, r_c: _step(rec, steps[k], p, d, r_h, r_c, epsilon, bias))
            rh0s.append(rh)
            rc0s.append(rc)
            if want_x:
                rx.append(b.op("MatMul", rec.by_time(signal, rec.H), w))
        per_x = rec.to_sequence(b.sum(rx), rec.I) if want_x else None
    return results(rec, node, b.mul(rec.X, per_x) if want_x else None, rh0s, rc0s)


def _describe(comp, node, graph=None):
    return ("Arras et al. 2017: each gated product's relevance to its signal, none to the gates; the epsilon "
            "rule on the linear maps")


recurrent_relevance.describe = _describe


# DeepLIFT's multipliers through recurrences use the same signal weights (registered on import).
from . import recurrent_deeplift  # noqa: E402,F401
