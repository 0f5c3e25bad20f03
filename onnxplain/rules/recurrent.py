"""Exact vector-Jacobian products of the recurrent operators LSTM, GRU and RNN.

onnxruntime records none of a recurrence's internal states, so the backward graph first
recomputes them: per direction, the input projections of all steps in one MatMul, then the
steps one by one (gates, cell, hidden state). Backpropagation through time then runs over the
same steps in the opposite order and the per-step input gradients are projected back in one
MatMul. Short sequences are unrolled (the specialised input shape fixes the length); long or
open ones, with constant weights, run the same step code inside two Scans
(recurrent_scan.py), so the graph does not grow with the length.

What the operator does and the recomputation mirrors (checked against onnxruntime's
forward in the tests): a sample's steps past its `sequence_lens` hold the state and emit
zeros, a reverse direction starts at the sample's last valid step, and a sample of length
0 has final states of zero; `clip` bounds every gate's pre-activation (after the peephole
term); `input_forget` makes the forget gate 1 - input gate; the activations' alpha/beta
lists are consumed in order by the activations that take them, the others keep their
operator defaults. Kinks follow the element-wise rules (PyTorch's autograd): ReLU-like
units pass nothing at their kink, clip passes where |x| <= clip.

`Recurrence` holds the recomputation; the relevance rule of the LRP families
(recurrent_lrp.py) walks the same recorded steps.
"""

from __future__ import annotations

import numpy as np

from ..errors import ModelError, UnsupportedOperatorError
from .base import attr, register
from .gradient_linear import varies
from .recurrent_carry import carry_back

RECURRENT = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
# (alpha, beta) defaults of the activations that take them where the lists run out: those
# of the ONNX operators for LeakyRelu, HardSigmoid and Elu; onnxruntime's zeros for the
# others (ThresholdedRelu becomes Relu; Affine and ScaledTanh output 0).
TAKES = {"affine": (0.0, 0.0), "leakyrelu": (0.01, None), "thresholdedrelu": (0.0, None),
         "scaledtanh": (0.0, 0.0), "hardsigmoid": (0.2, 0.5), "elu": (1.0, None)}
KNOWN = {"sigmoid", "tanh", "relu", "softsign", "softplus"} | set(TAKES)


def _text(v):
    return v.decode() if isinstance(v, bytes) else str(v)


class Activation:
    """One activation of a recurrence, emitted forward and differentiated."""

    def __init__(self, name: str, alpha, beta):
        self.name, self.kind, self.alpha, self.beta = name, name.lower(), alpha, beta
        # The modified ReLU backward of guided backprop / deconvnet (None: the exact one).
        self.relu_mode = None

    def forward(self, b, x):
        k, a, c = self.kind, self.alpha, self.beta
        if k == "sigmoid":
            return b.op("Sigmoid", x)
        if k == "tanh":
            return b.op("Tanh", x)
        if k == "relu":
            return b.op("Relu", x)
        if k == "softsign":
            return b.op("Softsign", x)
        if k == "softplus":
            return b.op("Softplus", x)
        if k == "leakyrelu":
            return b.op("LeakyRelu", x, alpha=float(a))
        if k == "thresholdedrelu":
            return b.op("ThresholdedRelu", x, alpha=float(a))
        if k == "hardsigmoid":
            return b.op("HardSigmoid", x, alpha=float(a), beta=float(c))
        if k == "elu":
            return b.op("Elu", x, alpha=float(a))
        if k == "affine":
            return b.add(b.mul(x, b.scalar_like(a, x)), b.scalar_like(c, x))
        if k == "scaledtanh":
            return b.mul(b.op("Tanh", b.mul(x, b.scalar_like(c, x))), b.scalar_like(a, x))
        raise AssertionError(k)

    def backward(self, b, g, x, y):
        """g * f'(x), with y = f(x)."""
        k, a, c = self.kind, self.alpha, self.beta
        zero = b.scalar_like(0.0, x)
        if k == "sigmoid":
            return b.mul(g, b.mul(y, b.op("Sub", b.scalar_like(1.0, y), y)))
        if k == "tanh":
            return b.mul(g, b.op("Sub", b.scalar_like(1.0, y), b.mul(y, y)))
        if k == "relu":
            if self.relu_mode == "deconvnet":
                return b.op("Relu", g)
            if self.relu_mode == "guided":
                g = b.op("Relu", g)
            return b.op("Where", b.op("Greater", x, zero), g, zero)
        if k == "softsign":
            d = b.add(b.scalar_like(1.0, x), b.op("Abs", x))
            return b.op("Div", g, b.mul(d, d))
        if k == "softplus":
            return b.mul(g, b.op("Sigmoid", x))
        if k == "leakyrelu":
            return b.op("Where", b.op("Greater", x, zero), g, b.mul(g, b.scalar_like(a, x)))
        if k == "thresholdedrelu":
            return b.op("Where", b.op("Greater", x, b.scalar_like(a, x)), g, zero)
        if k == "hardsigmoid":
            inside = b.op("And", b.op("Greater", y, zero), b.op("Less", y, b.scalar_like(1.0, y)))
            return b.op("Where", inside, b.mul(g, b.scalar_like(a, x)), zero)
        if k == "elu":
            return b.op("Where", b.op("Greater", x, zero), g, b.mul(g, b.add(y, b.scalar_like(a, y))))
        if k == "affine":
            return b.mul(g, b.scalar_like(a, x))
        if k == "scaledtanh":
            t = b.op("Tanh", b.mul(x, b.scalar_like(c, x)))
            return b.mul(g, b.mul(b.op("Sub", b.scalar_like(1.0, t), b.mul(t, t)), b.scalar_like(a * c, t)))
        raise AssertionError(k)


def _activations(node, op: str, directions: int) -> list:
    """[(f, g, h) per direction] as Activation objects, alpha/beta consumed in order by the
    activations that take them."""
    what = f"{op} '{node.name}'"
    names = [_text(n) for n in (attr(node, "activations") or [])]
    per = len(DEFAULT_ACTIVATIONS[op])
    if not names:
        names = list(DEFAULT_ACTIVATIONS[op]) * directions
    if len(names) != per * directions:
        raise ModelError(f"{what} lists {len(names)} activations; it needs {per * directions} "
                         f"({per} per direction)")
    alphas = list(attr(node, "activation_alpha") or [])
    betas = list(attr(node, "activation_beta") or [])
    out = []
    for n in names:
        k = n.lower()
        if k not in KNOWN:
            raise UnsupportedOperatorError([f"{op} with activation {n}"])
        a, c = TAKES.get(k, (None, None))
        if a is not None and alphas:
            a = float(alphas.pop(0))
        if c is not None and betas:
            c = float(betas.pop(0))
        out.append(Activation(n, a, c))
    return [out[d * per:(d + 1) * per] for d in range(directions)]


def _input(node, i: int) -> str:
    return node.input[i] if len(node.input) > i and node.input[i] else ""


class Recurrence:
    """One LSTM/GRU/RNN node: its attributes, its inputs in the sequence-first layout, and
    the recomputation of its steps per direction."""

    def __init__(self, b, node):
        self.b, self.node, self.op = b, node, node.op_type
        op, what = self.op, f"{node.op_type} '{node.name}'"
        self.what = what
        self.G = GATES[op]
        direction = _text(attr(node, "direction", "forward"))
        if direction not in ("forward", "reverse", "bidirectional"):
            raise ModelError(f"{what} has an unknown direction '{direction}'")
        self.D = 2 if direction == "bidirectional" else 1
        self.reverse = [direction == "reverse" or d == 1 for d in range(self.D)]
        self.layout = int(attr(node, "layout", 0))
        clip = attr(node, "clip")
        self.clip = None if clip is None else float(clip)
        self.input_forget = bool(attr(node, "input_forget", 0)) if op == "LSTM" else False
        self.lbr = bool(attr(node, "linear_before_reset", 0)) if op == "GRU" else False
        self.acts = _activations(node, op, self.D)
        self.X, self.W, self.R = node.input[0], node.input[1], node.input[2]
        self.B, self.lens, self.h0 = _input(node, 3), _input(node, 4), _input(node, 5)
        self.c0 = _input(node, 6) if op == "LSTM" else ""
        self.P = _input(node, 7) if op == "LSTM" else ""
        shape = b.shape(self.X)
        t_axis = 1 if self.layout else 0
        if shape is None or len(shape) != 3 or not isinstance(shape[2], int):
            raise ModelError(f"the backward pass of {what} needs the static input size of '{self.X}' (got shape "
                             f"{shape}); give the model static input shapes (only the batch axis may be symbolic)")
        self.I = int(shape[2])
        self.T = int(shape[t_axis]) if isinstance(shape[t_axis], int) else None
        self.shape = shape
        hidden = attr(node, "hidden_size")
        rshape = b.shape(self.R)
        if hidden is None:
            if rshape is None or not isinstance(rshape[-1], int):
                raise ModelError(f"{what} has no hidden_size and '{self.R}' no static shape")
            hidden = rshape[-1]
        self.H = int(hidden)
        self.dtype = b.np_dtype(self.X)
        self._vals: dict = {}
        # Sequence-first views, shared by all directions.
        self.x = b.op("Transpose", self.X, perm=[1, 0, 2]) if self.layout else self.X
        self.h0c = self._state_first(self.h0)
        self.c0c = self._state_first(self.c0)
        self.x_flat = b.op("Reshape", self.x, b.ints([-1, self.I]))
        self.zeros = self.ones = None
        self.col = None
        if self.lens:
            self.col = b.unsqueeze(self.lens, [1])
            self.nonempty = b.op("Greater", self.col, b.const(np.zeros((), b.np_dtype(self.lens)), b.np_dtype(self.lens)))

    # --- tensors ---------------------------------------------------------------------------
    def _state_first(self, name):
        if not name:
            return ""
        return self.b.op("Transpose", name, perm=[1, 0, 2]) if self.layout else name

    def value(self, name):
        if not name:
            return None
        if name in self._vals:
            return self._vals[name]
        return self.b.constant(name)

    def const(self, arr) -> str:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        name = self.b.const(arr, self.dtype)
        self._vals[name] = arr
        return name

    def take(self, name, d: int) -> str:
        """Direction d of a (D, ...) parameter."""
        v = self.value(name)
        if v is not None:
            return self.const(v[d])
        return self.b.op("Gather", name, self.b.const(np.array(d, np.int64), np.int64), axis=0)

    def rows(self, name, start: int, stop: int, axis: int = 0) -> str:
        v = self.value(name)
        if v is not None:
            return self.const(np.take(v, range(start, stop), axis=axis))
        b = self.b
        return b.op("Slice", name, b.ints([start]), b.ints([stop]), b.ints([axis]))

    def transposed(self, name) -> str:
        v = self.value(name)
        if v is not None:
            return self.const(v.T)
        return self.b.op("Transpose", name, perm=[1, 0])

    def add(self, a, c):
        """a + c, where either may be None (zero) or a constant folded at compile time."""
        if a is None or c is None:
            return a if c is None else c
        va, vc = self.value(a), self.value(c)
        if va is not None and vc is not None:
            return self.const(va + vc)
        return self.b.add(a, c)

    def batch_ones(self) -> str:
        """(N,) ones whose batch axis onnxruntime's shape inference knows to be X's.

        Shapes computed at run time (ConstantOfShape, Reshape to a Shape) give tensors an
        unknown batch axis; every node that then meets a tensor with the known one gets a
        fresh symbolic dimension, and onnxruntime's session setup grows quadratically with
        their number (a 200-step LSTM took minutes). So zeros are built by broadcasting
        from X, and incoming gradients are re-tied to X's batch axis (`anchor`)."""
        if self.ones is None:
            b = self.b
            zero = b.const(np.array(0, np.int64), np.int64)
            v = b.op("Gather", b.op("Gather", self.x, zero, axis=0), zero, axis=1)
            one = b.scalar_like(1.0, self.x)
            self.ones = b.op("Where", b.op("IsNaN", v), one, one)
        return self.ones

    def zero_state(self) -> str:
        if self.zeros is None:
            col = self.b.unsqueeze(self.batch_ones(), [1])
            self.zeros = self.b.mul(col, self.const(np.zeros((1, self.H))))
        return self.zeros

    def anchor(self, g, letters: str):
        """g, with its batch axis (letter n) tied to X's by a product with ones."""
        if g is None:
            return None
        return self.b.op("Einsum", self.batch_ones(), g, equation=f"n,{letters}->{letters}")

    def mask(self, t: int):
        """(N, 1) bool: whether step t is within each sample's length (None: no lengths)."""
        if not self.lens:
            return None
        b = self.b
        return b.op("Less", b.const(np.array(t, b.np_dtype(self.lens)), b.np_dtype(self.lens)), self.col)

    def clipped(self, x):
        if self.clip is None:
            return x, None
        b = self.b
        lo, hi = b.scalar_like(-self.clip, x), b.scalar_like(self.clip, x)
        return b.op("Clip", x, lo, hi), b.op("LessOrEqual", b.op("Abs", x), hi)

    def unclip(self, g, keep):
        return g if keep is None else self.b.op("Where", keep, g, self.b.scalar_like(0.0, g))

    def static_length(self, why: str) -> int:
        if self.T is None:
            raise ModelError(
                f"{why} of {self.what} needs the static sequence length of '{self.X}' (got shape {self.shape}); "
                "give the model inputs with a fixed sequence length (only the batch axis may be symbolic)"
            )
        return self.T

    def time_steps(self, d: int):
        T = self.static_length("the unrolled backward pass")
        return range(T - 1, -1, -1) if self.reverse[d] else range(T)

    # --- the forward recomputation -------------------------------------------------------------
    def params(self, d: int) -> dict:
        """Direction d's weights: W (GH, I), R (GH, H) and their slices, biases (GH,) each."""
        H, G = self.H, self.G
        p = {"W": self.take(self.W, d), "R": self.take(self.R, d)}
        p["Wb"] = p["Rb"] = None
        if self.B:
            bd = self.take(self.B, d)
            p["Wb"], p["Rb"] = self.rows(bd, 0, G * H), self.rows(bd, G * H, 2 * G * H)
        if self.op == "GRU":
            p["R_zr"], p["R_h"] = self.rows(p["R"], 0, 2 * H), self.rows(p["R"], 2 * H, 3 * H)
            p["Rt_zr"], p["Rt_h"] = self.transposed(p["R_zr"]), self.transposed(p["R_h"])
            if p["Rb"] is not None:
                p["Rb_zr"], p["Rb_h"] = self.rows(p["Rb"], 0, 2 * H), self.rows(p["Rb"], 2 * H, 3 * H)
            else:
                p["Rb_zr"] = p["Rb_h"] = None
        else:
            p["Rt"] = self.transposed(p["R"])
        if self.P:
            pd = self.take(self.P, d)
            p["Pi"], p["Po"], p["Pf"] = (self.rows(pd, k * H, (k + 1) * H) for k in range(3))
        return p

    def projection(self, d: int, p: dict) -> str:
        """X W^T + the biases that add outside any gate product, for all steps: (T, N, GH)."""
        b = self.b
        bias = p["Wb"]
        if self.op == "GRU":
            if p["Rb"] is not None:
                rest = p["Rb_zr"]
                if not self.lbr:
                    rest = p["Rb"]
                elif self.value(rest) is not None:
                    rest = self.const(np.concatenate([self.value(rest), np.zeros(self.H, self.dtype)]))
                else:
                    rest = b.op("Concat", rest, self.const(np.zeros(self.H)), axis=0)
                bias = self.add(bias, rest)
        else:
            bias = self.add(bias, p["Rb"])
        xw = b.op("MatMul", self.x, self.transposed(p["W"]))
        return xw if bias is None else b.add(xw, bias)

    def initial(self, which: str, d: int) -> str:
        src = self.h0c if which == "h" else self.c0c
        if not src:
            return self.zero_state()
        return self.b.op("Gather", src, self.b.const(np.array(d, np.int64), np.int64), axis=0)

    def run(self, d: int) -> tuple[dict, list]:
        """Recompute direction d: (params, steps in processing order), each step a dict of
        the tensors the backward passes read."""
        b = self.b
        p = self.params(d)
        xw = self.projection(d, p)
        h = self.initial("h", d)
        c = self.initial("c", d) if self.op == "LSTM" else None
        steps = []
        for t in self.time_steps(d):
            s = {"t": t, "h_prev": h, "c_prev": c, "mask": self.mask(t)}
            s["xw"] = b.op("Gather", xw, b.const(np.array(t, np.int64), np.int64), axis=0)
            getattr(self, "_step_" + self.op.lower())(s, p, d)
            m = s["mask"]
            if m is None:
                h, c = s["h_new"], s.get("c_new")
            else:
                h = b.op("Where", m, s["h_new"], h)
                c = b.op("Where", m, s["c_new"], c) if c is not None else None
            steps.append(s)
        return p, steps

    def _gate(self, s, key, pre, act):
        s[key + "_pre"] = pre
        x, s[key + "_keep"] = self.clipped(pre)
        s[key + "_x"] = x
        s[key] = act.forward(self.b, x)
        return s[key]

    def _step_rnn(self, s, p, d):
        b = self.b
        s["a"] = b.add(s["xw"], b.op("MatMul", s["h_prev"], p["Rt"]))
        s["h_new"] = self._gate(s, "hh", s["a"], self.acts[d][0])

    def _step_gru(self, s, p, d):
        b, H = self.b, self.H
        f, g = self.acts[d]
        xz, xr, xh = b.op("Split", s["xw"], b.ints([H, H, H]), axis=1, outputs=3)
        hzr = b.op("MatMul", s["h_prev"], p["Rt_zr"])
        hz, hr = b.op("Split", hzr, b.ints([H, H]), axis=1, outputs=2)
        z = self._gate(s, "z", b.add(xz, hz), f)
        r = self._gate(s, "r", b.add(xr, hr), f)
        s["xh"] = xh
        if self.lbr:
            v = b.op("MatMul", s["h_prev"], p["Rt_h"])
            s["v"] = v if p["Rb_h"] is None else b.add(v, p["Rb_h"])
            s["u"] = b.mul(r, s["v"])
        else:
            s["rh"] = b.mul(r, s["h_prev"])
            s["u"] = b.op("MatMul", s["rh"], p["Rt_h"])
        s["a"] = b.add(xh, s["u"])
        hh = self._gate(s, "hh", s["a"], g)
        # h = (1 - z) hh + z h_prev
        s["zh"] = b.mul(z, s["h_prev"])
        s["zhh"] = b.mul(b.op("Sub", b.scalar_like(1.0, z), z), hh)
        s["h_new"] = b.add(s["zhh"], s["zh"])

    def _step_lstm(self, s, p, d):
        b, H = self.b, self.H
        f, g, h_act = self.acts[d]
        s["a"] = b.add(s["xw"], b.op("MatMul", s["h_prev"], p["Rt"]))
        ai, ao, af, ac = b.op("Split", s["a"], b.ints([H] * 4), axis=1, outputs=4)
        c = s["c_prev"]
        i = self._gate(s, "i", b.add(ai, b.mul(p["Pi"], c)) if self.P else ai, f)
        if self.input_forget:
            s["f"] = b.op("Sub", b.scalar_like(1.0, i), i)
        else:
            self._gate(s, "f", b.add(af, b.mul(p["Pf"], c)) if self.P else af, f)
        s["ac"] = ac
        gg = self._gate(s, "g", ac, g)
        s["fc"] = b.mul(s["f"], c)
        s["ig"] = b.mul(i, gg)
        s["c_new"] = b.add(s["fc"], s["ig"])
        o = self._gate(s, "o", b.add(ao, b.mul(p["Po"], s["c_new"])) if self.P else ao, f)
        s["hc"] = h_act.forward(b, s["c_new"])
        s["h_new"] = b.mul(o, s["hc"])

    # --- layouts of the outputs' gradients and the inputs' ----------------------------------------
    def output_grads(self, grads):
        """(gY as (T, D, N, H) or None, gY_h as (D, N, H) or None, gY_c likewise)."""
        b = self.b
        gy = grads[0] if grads else None
        if gy is not None and self.layout:
            gy = b.op("Transpose", gy, perm=[1, 2, 0, 3])
        finals = []
        for k in (1, 2):
            g = grads[k] if len(grads) > k else None
            if g is not None and self.layout:
                g = b.op("Transpose", g, perm=[1, 0, 2])
            finals.append(self.anchor(g, "dnh"))
        return self.anchor(gy, "tdnh"), finals[0], finals[1]

    def direction_part(self, g, d: int, axis: int = 0):
        if g is None:
            return None
        return self.b.op("Gather", g, self.b.const(np.array(d, np.int64), np.int64), axis=axis)

    def final_part(self, g, d: int):
        """Direction d of a final state's gradient; a sample of length 0 has final states of
        zero whatever its initial state, so nothing flows back from them."""
        g = self.direction_part(g, d)
        if g is None or not self.lens:
            return g
        return self.b.op("Where", self.nonempty, g, self.b.scalar_like(0.0, g))

    def step_part(self, gy_d, t: int):
        if gy_d is None:
            return None
        return self.b.op("Gather", gy_d, self.b.const(np.array(t, np.int64), np.int64), axis=0)

    def by_time(self, per_step: dict, width: int) -> str:
        """Per-step (N, width) tensors keyed by t, stacked in time order as (T*N, width)."""
        return self.b.op("Concat", *[per_step[t] for t in range(self.T)], axis=0)

    def to_sequence(self, flat: str, width: int) -> str:
        """(T*N, width) -> the layout of X: (T, N, width), or (N, T, width) for layout 1."""
        b = self.b
        seq = b.op("Reshape", flat, b.ints([self.T, -1, width]))
        return b.op("Transpose", seq, perm=[1, 0, 2]) if self.layout else seq

    def stack_states(self, per_dir: list) -> str:
        """[(N, H)] per direction -> the layout of initial_h: (D, N, H) or (N, D, H)."""
        b = self.b
        axis = 1 if self.layout else 0
        parts = [b.unsqueeze(x, [axis]) for x in per_dir]
        return parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=axis)

    def stack_params(self, per_dir: list) -> str:
        b = self.b
        parts = [b.unsqueeze(x, [0]) for x in per_dir]
        return parts[0] if len(parts) == 1 else b.op("Concat", *parts, axis=0)

    def wants(self, name) -> bool:
        return bool(name) and self.b.constant(name) is None and varies(self.b, name)


# --------------------------------------------------------------------------- gradient
def _step_backward(rec, s, p, d, dh, dc):
    """One step's backward: from the gradients of h_new (dh) and c_new (dc) to those of
    h_prev and c_prev, the gate pre-activations (for X, W, B) and the recurrent terms."""
    b = rec.b
    out = {}
    if rec.op == "RNN":
        da = rec.unclip(rec.acts[d][0].backward(b, dh, s["hh_x"], s["hh"]), s["hh_keep"])
        out.update(dx=da, dr=[(da, s["h_prev"])], drb=da, dh=b.op("MatMul", da, p["R"]))
        return out
    if rec.op == "GRU":
        f, g = rec.acts[d]
        z, hh, h = s["z"], s["hh"], s["h_prev"]
        dhh = b.mul(dh, b.op("Sub", b.scalar_like(1.0, z), z))
        dz = b.mul(dh, b.op("Sub", h, hh))
        dh_prev = b.mul(dh, z)
        dah = rec.unclip(g.backward(b, dhh, s["hh_x"], hh), s["hh_keep"])
        if rec.lbr:
            dr = b.mul(dah, s["v"])
            dv = b.mul(dah, s["r"])
            dh_prev = b.add(dh_prev, b.op("MatMul", dv, p["R_h"]))
            rterm = (dv, h)
        else:
            drh = b.op("MatMul", dah, p["R_h"])
            dr = b.mul(drh, h)
            dh_prev = b.add(dh_prev, b.mul(drh, s["r"]))
            rterm = (dah, s["rh"])
        daz = rec.unclip(f.backward(b, dz, s["z_x"], z), s["z_keep"])
        dar = rec.unclip(f.backward(b, dr, s["r_x"], s["r"]), s["r_keep"])
        dzr = b.op("Concat", daz, dar, axis=1)
        dh_prev = b.add(dh_prev, b.op("MatMul", dzr, p["R_zr"]))
        out.update(dx=b.op("Concat", dzr, dah, axis=1), dr=[(dzr, h), rterm],
                   drb=b.op("Concat", dzr, rterm[0], axis=1), dh=dh_prev)
        return out
    f, g, h_act = rec.acts[d]
    c_prev, c_new = s["c_prev"], s["c_new"]
    do = b.mul(dh, s["hc"])
    dcn = h_act.backward(b, b.mul(dh, s["o"]), c_new, s["hc"])
    dcn = dcn if dc is None else b.add(dc, dcn)
    dxo = rec.unclip(f.backward(b, do, s["o_x"], s["o"]), s["o_keep"])
    if rec.P:
        dcn = b.add(dcn, b.mul(dxo, p["Po"]))
    dfg = b.mul(dcn, c_prev)
    dc_prev = b.mul(dcn, s["f"])
    di = b.mul(dcn, s["g"])
    dg = b.mul(dcn, s["i"])
    if rec.input_forget:
        di = b.op("Sub", di, dfg)
        dxf = b.op("Mul", dfg, b.scalar_like(0.0, dfg))
    else:
        dxf = rec.unclip(f.backward(b, dfg, s["f_x"], s["f"]), s["f_keep"])
    dxi = rec.unclip(f.backward(b, di, s["i_x"], s["i"]), s["i_keep"])
    dxc = rec.unclip(g.backward(b, dg, s["g_x"], s["g"]), s["g_keep"])
    if rec.P:
        dc_prev = b.add(dc_prev, b.mul(dxi, p["Pi"]))
        if not rec.input_forget:
            dc_prev = b.add(dc_prev, b.mul(dxf, p["Pf"]))
        out["dp"] = [b.mul(dxi, c_prev), b.mul(dxo, c_new), b.mul(dxf, c_prev)]
    da = b.op("Concat", dxi, dxo, dxf, dxc, axis=1)
    out.update(dx=da, dr=[(da, s["h_prev"])], drb=da, dh=b.op("MatMul", da, p["R"]), dc=dc_prev)
    return out


def _explicit(comp, node) -> bool:
    """Whether a relevance composite names the gradient for this node itself (rules=LSTM:gradient)."""
    return "gradient" in (getattr(comp, "ops", {}).get(node.op_type), getattr(comp, "nodes", {}).get(node.name))


def refuses(comp, node, graph=None) -> bool:
    """Whether composite `comp` would only reach the exact gradient of a recurrence through
    its gradient fallback, which its method does not define:

    - relevance composites without a recurrent rule of their own (deep Taylor, excitation
      backprop and its contrastive variant; the LRP composites have Arras et al.'s rule,
      recurrent_lrp.py): both methods are derived for networks of non-negative (ReLU)
      activations, whose z+ shares are a probability or a root-point decomposition; an
      LSTM's states are tanh-valued, signed, and its gates multiply two computed tensors;
    - DeepLIFT (deeplift family), should its own rule (recurrent_deeplift.py) not serve:
      its multipliers need every step's response to the baseline, which the gradient is not
      (input x gradient does not sum to the output's difference from the baseline).
    A composite that names the gradient for the node (rules=LSTM:gradient) gets it."""
    if comp is None:
        return False
    families = tuple(getattr(comp, "families", ("gradient",)))
    relevance = not families
    return (relevance or "deeplift" in families) and not _explicit(comp, node)


def describe(comp, node, graph=None):
    """What serves a recurrence under `comp` (for `inspect`): None where it is refused."""
    if refuses(comp, node):
        return None
    families = tuple(getattr(comp, "families", ("gradient",)))
    acts = [n.lower() for n in (_text(v) for v in (attr(node, "activations") or []))]
    relu = "relu" in acts
    if "guided_backprop" in families or "deconvnet" in families:
        kind = "guided backprop" if "guided_backprop" in families else "deconvnet"
        if relu:
            return f"exact gradient, the modified ReLU backward of {kind} at its Relu activations"
        return f"exact gradient ({kind} modifies ReLU backward only; no Relu activation inside)"
    if not families:
        return "exact gradient (named by the composite's rules)"
    return "exact gradient"


@register(*RECURRENT)
def recurrent_gradient(b, node, grads, relu_mode=None):
    comp = getattr(b, "composite", None)
    if refuses(comp, node):
        raise UnsupportedOperatorError([node.op_type], getattr(comp, "name", None))
    if relu_mode is None:  # from the composite, for rules that reach this one (DynamicQuantizeLSTM's)
        families = tuple(getattr(comp, "families", ()) or ())
        relu_mode = "guided" if "guided_backprop" in families else "deconvnet" if "deconvnet" in families else None
    rec = Recurrence(b, node)
    for per_direction in rec.acts:
        for act in per_direction:
            act.relu_mode = relu_mode
    H, G = rec.H, rec.G
    gy, gyh, gyc = rec.output_grads(grads)
    want_x = rec.wants(rec.X)
    want = {k: rec.wants(getattr(rec, k)) for k in ("W", "R", "B", "P", "h0", "c0")}
    res = [None] * len(node.input)
    from .recurrent_scan import applies, scan_gradient

    if applies(rec, want):
        res[0], dh0s, dc0s = scan_gradient(rec, gy, gyh, gyc, want_x)
        if want["h0"]:
            res[5] = rec.stack_states(dh0s)
        if want["c0"]:
            res[6] = rec.stack_states(dc0s)
        return res
    dxs, dws, drs, dbs, dps, dh0s, dc0s = [], [], [], [], [], [], []
    for d in range(rec.D):
        p, steps = rec.run(d)

        def step(k, dh_in, dc_in, p=p, steps=steps, d=d):
            out = _step_backward(rec, steps[k], p, d, dh_in, dc_in)
            return out["dh"], out.get("dc"), out

        # The states' gradients carried back over the steps as the relevance rules carry
        # theirs; each step's outputs come back last step first.
        dh, dc, outs = carry_back(rec, d, steps, gy, gyh, gyc, step)
        da_x = {t: out["dx"] for t, out in outs.items()}
        da_rb = {t: out["drb"] for t, out in outs.items()}
        r_terms = [out["dr"] for out in outs.values()]
        dp = [out.get("dp") for out in outs.values()]
        dh0s.append(dh)
        dc0s.append(dc)
        flat = rec.by_time(da_x, G * H) if (want_x or want["W"] or want["B"]) else None
        if want_x:
            dxs.append(b.op("MatMul", flat, p["W"]))
        if want["W"]:
            dws.append(b.op("MatMul", b.op("Transpose", flat, perm=[1, 0]), rec.x_flat))
        if want["R"]:
            dws_r = []
            for k in range(len(r_terms[0])):
                ga = b.op("Concat", *[r[k][0] for r in r_terms], axis=0)
                hs = b.op("Concat", *[r[k][1] for r in r_terms], axis=0)
                dws_r.append(b.op("MatMul", b.op("Transpose", ga, perm=[1, 0]), hs))
            drs.append(dws_r[0] if len(dws_r) == 1 else b.op("Concat", *dws_r, axis=0))
        if want["B"]:
            wb = b.reduce_sum(flat, [0], keepdims=False)
            rb = b.reduce_sum(rec.by_time(da_rb, G * H), [0], keepdims=False)
            dbs.append(b.op("Concat", wb, rb, axis=0))
        if want["P"]:
            parts = []
            for k in range(3):
                acc = b.op("Sum", *[x[k] for x in dp]) if len(dp) > 1 else dp[0][k]
                parts.append(b.reduce_sum(acc, [0], keepdims=False))
            dps.append(b.op("Concat", *parts, axis=0))
    if want_x:
        res[0] = rec.to_sequence(b.sum(dxs), rec.I)
    if want["W"]:
        res[1] = rec.stack_params(dws)
    if want["R"]:
        res[2] = rec.stack_params(drs)
    if want["B"]:
        res[3] = rec.stack_params(dbs)
    if want["h0"]:
        res[5] = rec.stack_states(dh0s)
    if want["c0"]:
        res[6] = rec.stack_states(dc0s)
    if want["P"]:
        res[7] = rec.stack_params(dps)
    return res


recurrent_gradient.refuses = refuses
recurrent_gradient.describe = describe


# Guided backprop and deconvnet change ReLU's backward only (Springenberg et al. 2014; Zeiler
# and Fergus 2014): through a recurrence that is its exact gradient, except at Relu
# activations inside it, which take the modified rule as a ReLU node would. (Captum hooks
# nn.ReLU modules only, so its GuidedBackprop keeps torch's RNN(nonlinearity='relu') exact.)
@register(*RECURRENT, family="guided_backprop")
def recurrent_guided(b, node, grads):
    return recurrent_gradient(b, node, grads, relu_mode="guided")


@register(*RECURRENT, family="deconvnet")
def recurrent_deconvnet(b, node, grads):
    return recurrent_gradient(b, node, grads, relu_mode="deconvnet")


recurrent_guided.describe = recurrent_deconvnet.describe = describe
