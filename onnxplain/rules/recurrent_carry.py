"""What the relevance (recurrent_lrp.py) and DeepLIFT (recurrent_deeplift.py) rules through
LSTM, GRU and RNN share around their own step: carrying what flows back through the states
over a direction's unrolled steps, and placing the results by the operator's inputs. The
exact gradient (recurrent.py) carries its states' gradients with `carry_back` too.
"""

from __future__ import annotations


def carry_back(rec, d, steps, y, yh, yc, step):
    """Direction d's unrolled steps, last first. y, yh, yc: what flows back into Y, Y_h and
    Y_c (None where nothing does). step(k, h_in, c_in) -> (h_prev, c_prev, signal) is step k
    of `steps`, given what reaches h_new (the step's own output included) and c_new. Steps
    past a sample's length take nothing and pass the carried state on unchanged.
    Returns (what reaches h0, what reaches c0 or None, {t: signal})."""
    b = rec.b
    y_d = rec.direction_part(y, d, axis=1)
    h = rec.final_part(yh, d) or rec.zero_state()
    c = (rec.final_part(yc, d) or rec.zero_state()) if rec.op == "LSTM" else None
    signal = {}
    for k in reversed(range(len(steps))):
        t, mask = steps[k]["t"], steps[k]["mask"]
        h_in = h
        yt = rec.step_part(y_d, t)
        if yt is not None:
            h_in = b.add(h_in, yt)
        c_in = c
        if mask is not None:
            h_in = b.op("Where", mask, h_in, b.scalar_like(0.0, h_in))
            if c_in is not None:
                c_in = b.op("Where", mask, c_in, b.scalar_like(0.0, c_in))
        h_prev, c_prev, signal[t] = step(k, h_in, c_in)
        if mask is None:
            h, c = h_prev, c_prev
        else:
            h = b.op("Where", mask, h_prev, h)
            c = b.op("Where", mask, c_prev, c) if rec.op == "LSTM" else None
    return h, c, signal


def scan_x(rec, signals, params, weight):
    """The x part from the backward Scans' signals, one per direction: sum of signal @ W,
    in X's layout; weight(p) is the direction's W."""
    b = rec.b
    x = b.sum([b.op("MatMul", sig, weight(p)) for sig, p in zip(signals, params)])
    return b.op("Transpose", x, perm=[1, 0, 2]) if rec.layout else x


def results(rec, node, x, h0s, c0s):
    """The rule's result: x for X (None where it is not wanted), the per-direction states'
    for initial_h and initial_c where they are wanted."""
    res = [None] * len(node.input)
    if x is not None:
        res[0] = x
    if rec.wants(rec.h0):
        res[5] = rec.stack_states(h0s)
    if rec.wants(rec.c0):
        res[6] = rec.stack_states(c0s)
    return res
