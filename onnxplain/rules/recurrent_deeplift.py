"""DeepLIFT's rescale rule through LSTM, GRU and RNN.

DeepLIFT (Shrikumar et al. 2017) carries multipliers m with sum(dx * m_x) = dy * m_y for
every operation, dz = z - z0 being the difference from the baseline's value. Through a
recurrence: the linear maps W x + R h + b and the sums pass multipliers as gradients (a bias
has no difference); each activation takes its rescale multiplier dy / dpre, read from the
pre-activation before any clip (the clipped derivative where it did not move); and each
element-wise product of two computed tensors (gate * signal) is split exactly between its
factors, d(a c) = mean(c) da + mean(a) dc, the means over the input's and the baseline's
values (the two factors' Shapley values; the rescale rule has none for products). So the
attributions of the input and the initial states sum to the outputs' difference from the
baseline (summation-to-delta), with multipliers bounded as gradients are.

Not the rule of the LRP composites (Arras et al. 2017: the gates get nothing): as multipliers,
"all of d(gate * signal) to the signal" is d(product) / d(signal), unbounded where the signal
barely moves while its gate does; measured on a 24-step LSTM, attributions of 3e8 cancelling
each other for an output difference of 0.15. Gates are inputs' functions here like any other.

Both runs (input and baseline) are recomputed step by step: unrolled for short sequences,
and for long or open lengths as a forward Scan per run and one backward Scan over both runs'
records (recurrent_scan.py), so the graph does not grow with the length.
"""

from __future__ import annotations

import copy

from .base import register
from .deeplift import ZERO, _rescale
from .recurrent import RECURRENT, Recurrence
from .recurrent_carry import carry_back, results, scan_x
from .recurrent_scan import applies, scan_backward


def _baseline_recurrence(rec, reference):
    """A view of `rec` whose recomputed steps are the baseline's."""
    b = rec.b
    ref = copy.copy(rec)
    x = reference.of(b, rec.X)
    # The baseline is expanded to the input's shape at run time, which onnxruntime's shape
    # inference cannot tie to the batch: tied here (Recurrence.anchor), as session setup
    # grows fast with the fresh dimensions every step would otherwise create.
    ref.x = rec.anchor(b.op("Transpose", x, perm=[1, 0, 2]) if rec.layout else x, "tni")
    ref.x_flat = None
    ref.h0c = rec.anchor(rec._state_first(reference.of(b, rec.h0)), "dnh") if rec.h0 else ""
    ref.c0c = rec.anchor(rec._state_first(reference.of(b, rec.c0)), "dnh") if rec.c0 else ""
    return ref


def _delta(b, s, s0, key):
    return b.op("Sub", s[key], s0[key])


def _product(b, m, s, s0, a, c):
    """(a's, c's multiplier) in the product a * c of two step values, for m = the product's:
    d(a c) = mean(c) da + mean(a) dc exactly (means of the input's and the baseline's
    values), the two factors' Shapley values."""
    def mean(k):
        return b.mul(b.add(s[k], s0[k]), b.scalar_like(0.5, s[k]))

    return b.mul(m, mean(c)), b.mul(m, mean(a))


def _activation(rec, m, s, s0, key, act):
    """The multiplier of gate `key`'s pre-activation (before its clip) from that of its
    output: m * dy / dpre, the clipped derivative where the pre-activation did not move."""
    b = rec.b
    grad = rec.unclip(act.backward(b, m, s[key + "_x"], s[key]), s[key + "_keep"])
    return _rescale(b, m, grad, _delta(b, s, s0, key + "_pre"), _delta(b, s, s0, key))


def _step(rec, s, s0, p, d, m_h, m_c):
    """One step's multipliers: from those of h_new (m_h, the step's own output included)
    and c_new (m_c) to those of h_prev and c_prev, and those of the pre-activations
    (N, G*H) in the operator's gate order, whose product with W is the multiplier of x."""
    b = rec.b
    m_cprev = None
    if rec.op == "LSTM":
        f_act, g_act, h_act = rec.acts[d]
        m_o, m_hc = _product(b, m_h, s, s0, "o", "hc")  # h = o * act(c)
        grad_c = h_act.backward(b, m_hc, s["c_new"], s["hc"])
        m_c = b.add(m_c, _rescale(b, m_hc, grad_c, _delta(b, s, s0, "c_new"), _delta(b, s, s0, "hc")))
        m_po = _activation(rec, m_o, s, s0, "o", f_act)
        if rec.P:
            m_c = b.add(m_c, b.mul(m_po, p["Po"]))
        m_f, m_cprev = _product(b, m_c, s, s0, "f", "c_prev")  # c = f * c_prev + i * g
        m_i, m_g = _product(b, m_c, s, s0, "i", "g")
        if rec.input_forget:  # f = 1 - i
            m_i = b.op("Sub", m_i, m_f)
            m_pf = b.mul(m_f, b.scalar_like(0.0, m_f))
        else:
            m_pf = _activation(rec, m_f, s, s0, "f", f_act)
        m_pi = _activation(rec, m_i, s, s0, "i", f_act)
        if rec.P:
            m_cprev = b.add(m_cprev, b.mul(m_pi, p["Pi"]))
            if not rec.input_forget:
                m_cprev = b.add(m_cprev, b.mul(m_pf, p["Pf"]))
        m_pc = _activation(rec, m_g, s, s0, "g", g_act)
        m_a = b.op("Concat", m_pi, m_po, m_pf, m_pc, axis=1)
        m_hprev = b.op("MatMul", m_a, p["R"])
    elif rec.op == "GRU":
        f_act, g_act = rec.acts[d]
        # h = (1 - z) * hh + z * h_prev
        m_z, m_hprev = _product(b, m_h, s, s0, "z", "h_prev")
        s["one_minus_z"] = b.op("Sub", b.scalar_like(1.0, s["z"]), s["z"])
        s0["one_minus_z"] = b.op("Sub", b.scalar_like(1.0, s0["z"]), s0["z"])
        m_omz, m_hh = _product(b, m_h, s, s0, "one_minus_z", "hh")
        m_z = b.op("Sub", m_z, m_omz)
        m_ph = _activation(rec, m_hh, s, s0, "hh", g_act)
        if rec.lbr:  # u = r * (h_prev R_h^T + b)
            m_r, m_v = _product(b, m_ph, s, s0, "r", "v")
            m_hprev = b.add(m_hprev, b.op("MatMul", m_v, p["R_h"]))
        else:  # u = (r * h_prev) R_h^T
            m_r, m_hp = _product(b, b.op("MatMul", m_ph, p["R_h"]), s, s0, "r", "h_prev")
            m_hprev = b.add(m_hprev, m_hp)
        m_zr = b.op("Concat", _activation(rec, m_z, s, s0, "z", f_act), _activation(rec, m_r, s, s0, "r", f_act),
                    axis=1)
        m_hprev = b.add(m_hprev, b.op("MatMul", m_zr, p["R_zr"]))
        m_a = b.op("Concat", m_zr, m_ph, axis=1)
    else:
        m_a = _activation(rec, m_h, s, s0, "hh", rec.acts[d][0])
        m_hprev = b.op("MatMul", m_a, p["R"])
    return m_hprev, m_cprev, m_a


def _record_keys(rec):
    """The step values `_step` reads, recorded by the Scan form for both runs."""
    def gate(k):
        return [k, k + "_x", k + "_pre"] + ([k + "_keep"] if rec.clip is not None else [])

    if rec.op == "LSTM":
        keys = ["c_prev", "c_new", "hc"] + gate("o") + gate("i") + gate("g")
        return keys + (["f"] if rec.input_forget else gate("f"))
    if rec.op == "GRU":
        return ["h_prev"] + gate("z") + gate("r") + gate("hh") + (["v"] if rec.lbr else [])
    return gate("hh")


@register(*RECURRENT, family="deeplift")
def recurrent_deeplift(b, node, grads, reference=ZERO):
    rec = Recurrence(b, node)
    ref = _baseline_recurrence(rec, reference)
    my, myh, myc = rec.output_grads(grads)
    want_x = rec.wants(rec.X)
    if applies(rec):  # long or open lengths: two runs recorded by forward Scans, one backward Scan
        signals, mh0s, mc0s, params = scan_backward(rec, my, myh, myc, _record_keys(rec), _step, ref=ref)
        mx = scan_x(rec, signals, params, lambda p: p["W"]) if want_x else None
        return results(rec, node, mx, mh0s, mc0s)
    mx, mh0s, mc0s = [], [], []
    for d in range(rec.D):
        p, steps = rec.run(d)
        _, steps0 = ref.run(d)
        m_h, m_c, signal = carry_back(
            rec, d, steps, my, myh, myc,
            lambda k, m_in, mc_in: _step(rec, steps[k], steps0[k], p, d, m_in, mc_in))
        mh0s.append(m_h)
        mc0s.append(m_c)
        if want_x:
            mx.append(b.op("MatMul", rec.by_time(signal, rec.G * rec.H), p["W"]))
    return results(rec, node, rec.to_sequence(b.sum(mx), rec.I) if want_x else None, mh0s, mc0s)


def _describe(comp, node, graph=None):
    return ("rescale multipliers on the activations, products of gate and signal split as "
            "d(a c) = mean(c) da + mean(a) dc (summation-to-delta holds)")


recurrent_deeplift.describe = _describe
