"""DeepLIFT's rescale rule through LSTM, GRU and RNN: multipliers that follow the signal,
not the gate.

DeepLIFT (Shrikumar et al. 2017) carries multipliers m with sum(dx * m_x) = dy * m_y for
every operation, dz = z - z0 being the difference from the baseline's value. A recurrence
multiplies computed tensors (gate * signal), for which the rescale rule has no answer of
its own; as Arras et al. 2017 do for LRP, each gated product hands its whole difference to
its signal: p = gate * signal gives m_signal = m_p * dp / dsignal, the gates get none.
Sums and the linear maps W x + R h + b pass multipliers as gradients (the bias has no
difference), element-wise activations take the rescale multiplier dy / dx (through a clip
too, read from the pre-activation). Per step:

- LSTM: h = o * act(c) -> c; c = f * c_prev + i * g -> c_prev and g; g's linear map -> x
  and h_prev;
- GRU: h = (1 - z) * hh + z * h_prev -> hh and h_prev; hh's linear map -> x and r * h_prev
  (whose difference goes to h_prev) or, with linear_before_reset, r * (R_h h_prev + b) ->
  its linear map -> h_prev;
- RNN: h = act(W x + R h_prev + b): rescale, then the linear map.

Every step telescopes, so the inputs' and initial states' dx * m sum to the outputs' dy * m
(summation-to-delta), with one exception: where a signal did not move (|dsignal| < 1e-10)
its product's difference, if any, is a gate's alone, and the multiplier is the gate's
value (the gradient), as DeepLIFT takes the gradient where a nonlinearity's input did not
move. That happens when a signal is the same for the input and the baseline, e.g. a
constant non-zero initial state; states that are inputs take the baseline like any input.

Both runs (input and baseline) are recomputed step by step, unrolled: the rule needs the
static sequence length and takes at most MAX_STEPS steps (the graph grows with them).
"""

from __future__ import annotations

import copy

from ..errors import UnsupportedOperatorError
from .base import register
from .deeplift import TINY, ZERO, _rescale
from .recurrent import RECURRENT, Recurrence

MAX_STEPS = 256


def _baseline_recurrence(rec, reference):
    """A view of `rec` whose recomputed steps are the baseline's."""
    b = rec.b
    ref = copy.copy(rec)
    x = reference.of(b, rec.X)
    ref.x = b.op("Transpose", x, perm=[1, 0, 2]) if rec.layout else x
    ref.x_flat = None
    ref.h0c = rec._state_first(reference.of(b, rec.h0)) if rec.h0 else ""
    ref.c0c = rec._state_first(reference.of(b, rec.c0)) if rec.c0 else ""
    return ref


def _delta(b, s, s0, key):
    return b.op("Sub", s[key], s0[key])


def _product(b, m, s, s0, prod, signal, gate):
    """(signal's, gate's multiplier) in product `prod` = gate * signal (keys of the step),
    for m = prod's: m * dprod / dsignal to the signal; where the signal did not move, the
    product's difference is the gate's (m * dprod / dgate to it), the signal keeps the
    gradient (its difference is zero)."""
    d_sig, d_gate, d_prod = _delta(b, s, s0, signal), _delta(b, s, s0, gate), _delta(b, s, s0, prod)
    m_signal = _rescale(b, m, b.mul(m, s[gate]), d_sig, d_prod)
    still = b.op("Less", b.op("Abs", d_sig), b.scalar_like(TINY, d_sig))
    m_gate = _rescale(b, m, b.mul(m, s[signal]), d_gate, d_prod)
    return m_signal, b.op("Where", still, m_gate, b.scalar_like(0.0, m))


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
    b, H = rec.b, rec.H
    m_cprev = None
    if rec.op == "LSTM":
        f_act, g_act, h_act = rec.acts[d]
        # h = o * act(c): act(c) rescaled onto c; o only where act(c) did not move.
        m_hc, m_o = _product(b, m_h, s, s0, "h_new", "hc", "o")
        grad_c = h_act.backward(b, m_hc, s["c_new"], s["hc"])
        m_c = b.add(m_c, _rescale(b, m_hc, grad_c, _delta(b, s, s0, "c_new"), _delta(b, s, s0, "hc")))
        m_po = _activation(rec, m_o, s, s0, "o", f_act)
        if rec.P:
            m_c = b.add(m_c, b.mul(m_po, p["Po"]))
        # c = f * c_prev + i * g
        m_cprev, m_f = _product(b, m_c, s, s0, "fc", "c_prev", "f")
        m_g, m_i = _product(b, m_c, s, s0, "ig", "g", "i")
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
        s["one_minus_z"] = b.op("Sub", b.scalar_like(1.0, s["z"]), s["z"])
        s0["one_minus_z"] = b.op("Sub", b.scalar_like(1.0, s0["z"]), s0["z"])
        m_hprev, m_z = _product(b, m_h, s, s0, "zh", "h_prev", "z")
        m_hh, m_omz = _product(b, m_h, s, s0, "zhh", "hh", "one_minus_z")
        m_z = b.op("Sub", m_z, m_omz)
        m_ph = _activation(rec, m_hh, s, s0, "hh", g_act)
        if rec.lbr:
            m_v, m_r = _product(b, m_ph, s, s0, "u", "v", "r")  # u = r * (h_prev R_h^T + b)
            m_hprev = b.add(m_hprev, b.op("MatMul", m_v, p["R_h"]))
        else:
            m_rh = b.op("MatMul", m_ph, p["R_h"])  # (r * h_prev) R_h^T
            m_hp2, m_r = _product(b, m_rh, s, s0, "rh", "h_prev", "r")
            m_hprev = b.add(m_hprev, m_hp2)
        m_zr = b.op("Concat", _activation(rec, m_z, s, s0, "z", f_act), _activation(rec, m_r, s, s0, "r", f_act),
                    axis=1)
        m_hprev = b.add(m_hprev, b.op("MatMul", m_zr, p["R_zr"]))
        m_a = b.op("Concat", m_zr, m_ph, axis=1)
    else:
        m_a = _activation(rec, m_h, s, s0, "hh", rec.acts[d][0])
        m_hprev = b.op("MatMul", m_a, p["R"])
    return m_hprev, m_cprev, m_a


@register(*RECURRENT, family="deeplift")
def recurrent_deeplift(b, node, grads, reference=ZERO):
    rec = Recurrence(b, node)
    if rec.T is None or rec.T > MAX_STEPS:
        err = UnsupportedOperatorError([node.op_type], "deeplift")
        err.args = (f"method 'deeplift' recomputes {rec.what} step by step for the input and the baseline, which "
                    f"needs a static sequence length of at most {MAX_STEPS} steps (got shape {rec.shape}); give inputs "
                    "with a fixed, shorter length, or use a black-box method",)
        raise err
    ref = _baseline_recurrence(rec, reference)
    my, myh, myc = rec.output_grads(grads)
    want_x = rec.wants(rec.X)
    mx, mh0s, mc0s = [], [], []
    for d in range(rec.D):
        p, steps = rec.run(d)
        _, steps0 = ref.run(d)
        my_d = rec.direction_part(my, d, axis=1)
        m_h = rec.final_part(myh, d) or rec.zero_state()
        m_c = (rec.final_part(myc, d) or rec.zero_state()) if rec.op == "LSTM" else None
        signal = {}
        for s, s0 in zip(reversed(steps), reversed(steps0)):
            t, mask = s["t"], s["mask"]
            m_in = m_h
            myt = rec.step_part(my_d, t)
            if myt is not None:
                m_in = b.add(m_in, myt)
            mc_in = m_c
            if mask is not None:
                m_in = b.op("Where", mask, m_in, b.scalar_like(0.0, m_in))
                if mc_in is not None:
                    mc_in = b.op("Where", mask, mc_in, b.scalar_like(0.0, mc_in))
            m_hprev, m_cprev, signal[t] = _step(rec, s, s0, p, d, m_in, mc_in)
            if mask is None:
                m_h, m_c = m_hprev, m_cprev
            else:
                m_h = b.op("Where", mask, m_hprev, m_h)
                m_c = b.op("Where", mask, m_cprev, m_c) if rec.op == "LSTM" else None
        mh0s.append(m_h)
        mc0s.append(m_c)
        if want_x:
            mx.append(b.op("MatMul", rec.by_time(signal, rec.G * rec.H), p["W"]))
    res = [None] * len(node.input)
    if want_x:
        res[0] = rec.to_sequence(b.sum(mx), rec.I)
    if rec.wants(rec.h0):
        res[5] = rec.stack_states(mh0s)
    if rec.wants(rec.c0):
        res[6] = rec.stack_states(mc0s)
    return res


def _describe(comp, node, graph=None):
    return ("rescale multipliers through each gated product to its signal, none to the gates (Arras et al.'s "
            "rule for LRP, as differences from the baseline)")


recurrent_deeplift.describe = _describe
