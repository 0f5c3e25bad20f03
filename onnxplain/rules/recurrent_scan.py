"""The gradient of LSTM/GRU/RNN as two ONNX Scans instead of an unrolled graph, for long or
open sequence lengths: a forward Scan recomputes the steps and stacks what the backward
reads, a second Scan runs backpropagation through time over those records in the opposite
order. The step bodies are the unrolled rule's own (recurrent.py), emitted into the Scan
bodies; the graph no longer grows with the sequence length.

The bodies read nothing from the outer graph (whose pruning follows explicit inputs only):
constant weights are Constant nodes in them, computed ones (a DequantizeLinear's output)
pass through as Scan states. A weight that needs its own gradient takes the unrolled form.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .base import Builder

# Above this many steps the Scan form is used: the unrolled graph has ~40 nodes per step and
# direction, and onnxruntime's session setup grows faster than that (a 300-step bidirectional
# LSTM: 23k nodes, 11-44 s; as Scans: 36 nodes, 0.1 s).
UNROLL_MAX = 16

_ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE,
         np.dtype(np.float16): TensorProto.FLOAT16}


class _Body(Builder):
    """A builder whose nodes go into a Scan body; constants are Constant nodes in it."""

    def __init__(self, outer, dtype):
        self.outer, self.graph, self.opset = outer, outer.graph, outer.opset
        self.prefix, self.current = outer.prefix, outer.current
        self.nodes, self.initializers = [], []
        self._consts, self._by_id, self._model_ids = {}, {}, {}
        self.dtype = np.dtype(dtype)

    def fresh(self, hint: str = "t") -> str:
        return self.outer.fresh(hint)

    def const(self, value, dtype=np.float32) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size <= 16 else None
        if key is not None and key in self._consts:
            return self._consts[key]
        name = self.fresh("const")
        self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_node",
                                           value=numpy_helper.from_array(arr)))
        if key is not None:
            self._consts[key] = name
        return name

    def np_dtype(self, name):
        return self.dtype

    def shape(self, name):
        return self.outer.shape(name)

    def constant(self, name):
        return self.outer.constant(name)


def _vi(name, elem, rank):
    return helper.make_tensor_value_info(name, elem, [None] * rank)


def _graph(body, inputs, outputs, name):
    return helper.make_graph(body.nodes, name, inputs, outputs)


def applies(rec, want=None) -> bool:
    """Whether the backward pass of `rec` takes the Scan form (want: which weights need
    a gradient)."""
    if rec.T is not None and rec.T <= UNROLL_MAX:
        return False
    return not (want and any(want[k] for k in ("W", "R", "B", "P")))


WEIGHTS = (("W", 3), ("R", 3), ("B", 2), ("P", 2))


class _Weights:
    """Computed weights as Scan states: while a body is built, `rec`'s weight names are its
    state inputs; `states` are the outer tensors, `inputs`/`outputs` the body's."""

    def __init__(self, rec, body, elem):
        self.rec, self.saved = rec, {}
        self.states, self.inputs, self.outputs = [], [], []
        for key, rank in WEIGHTS:
            name = getattr(rec, key)
            if name and rec.b.constant(name) is None:
                inner = body.fresh(key + "_in")
                self.saved[key] = name
                self.states.append(name)
                self.inputs.append(_vi(inner, elem, rank))
                self.outputs.append((inner, rank))
                setattr(rec, key, inner)

    def restore(self):
        for key, name in self.saved.items():
            setattr(self.rec, key, name)

    def out_vis(self, body, elem):
        return [_vi(body.op("Identity", inner), elem, rank) for inner, rank in self.outputs]


# Per operator: the step values the backward reads, as (key, kind, rank); kind "f" float or
# "b" bool; keys ending in _keep exist only with clip.
def _record_keys(rec):
    keys = ["h_prev"]
    if rec.op == "RNN":
        keys += ["hh", "hh_x", "hh_keep"]
    elif rec.op == "GRU":
        keys += ["z", "z_x", "z_keep", "r", "r_x", "r_keep", "hh", "hh_x", "hh_keep"]
        keys += ["v"] if rec.lbr else ["rh"]
    else:
        keys += ["c_prev", "c_new", "hc", "i", "i_x", "i_keep", "g", "g_x", "g_keep", "o", "o_x", "o_keep", "f"]
        if not rec.input_forget:
            keys += ["f_x", "f_keep"]
    if rec.clip is None:
        keys = [k for k in keys if not k.endswith("_keep")]
    return keys


def scan_gradient(rec, gy, gyh, gyc, want_x):
    """(dX in the node's layout or None, [dh0 per direction], [dc0 per direction])."""
    from .recurrent import _step_backward

    def step(rec, s, p, d, dh, dc):
        out = _step_backward(rec, s, p, d, dh, dc)
        return out["dh"], out.get("dc"), out["dx"]

    per_step, dh0s, dc0s, params = scan_backward(rec, gy, gyh, gyc, _record_keys(rec), step)
    dx = None
    if want_x:
        dx = rec.b.sum([rec.b.op("MatMul", g, p["W"]) for g, p in zip(per_step, params)])  # (T, N, GH) @ (GH, I)
        if rec.layout:
            dx = rec.b.op("Transpose", dx, perm=[1, 0, 2])
    return dx, dh0s, dc0s


def _masks(rec):
    """(T, N, 1) bool: which steps are within each sample's length; None without lengths."""
    if not rec.lens:
        return None
    b = rec.b
    lens_t = b.np_dtype(rec.lens)
    length = b.op("Slice", b.shape_of(rec.x), b.ints([0]), b.ints([1]), b.ints([0]))
    length = b.op("Cast", b.squeeze(length, [0]), to=helper.np_dtype_to_tensor_dtype(lens_t))
    steps = b.op("Range", b.const(np.array(0, lens_t), lens_t), length, b.const(np.array(1, lens_t), lens_t))
    return b.op("Less", b.unsqueeze(steps, [1, 2]), b.unsqueeze(rec.col, [0]))


def _forward_records(rec, d, keys, masks, elem):
    """A forward Scan of direction d recomputing `rec`'s steps: (outer weights, {key: the
    records of every step, (T, N, .) in time order})."""
    b = rec.b
    lstm = rec.op == "LSTM"
    rev = int(rec.reverse[d])
    p = rec.params(d)
    xw = rec.projection(d, p)
    h0, c0 = rec.initial("h", d), rec.initial("c", d) if lstm else None
    fwd = _Body(b, rec.dtype)
    fw = _Weights(rec, fwd, elem)
    rec.b = fwd
    try:
        pb = rec.params(d)
        names = {"h": fwd.fresh("h_in"), "c": fwd.fresh("c_in"), "xw": fwd.fresh("xw_in"), "m": fwd.fresh("m_in")}
        s = {"h_prev": names["h"], "c_prev": names["c"] if lstm else None, "xw": names["xw"],
             "mask": names["m"] if masks is not None else None}
        getattr(rec, "_step_" + rec.op.lower())(s, pb, d)
        m = s["mask"]
        h_out = s["h_new"] if m is None else fwd.op("Where", m, s["h_new"], s["h_prev"])
        outs = [fwd.op("Identity", h_out)]
        if lstm:
            outs.append(fwd.op("Identity", s["c_new"] if m is None else fwd.op("Where", m, s["c_new"], s["c_prev"])))
        state_vis = [_vi(o, elem, 2) for o in outs] + fw.out_vis(fwd, elem)
        outs = [fwd.op("Identity", s[k]) for k in keys]
    finally:
        rec.b = b
        fw.restore()
    ins = [_vi(names["h"], elem, 2)] + ([_vi(names["c"], elem, 2)] if lstm else []) + fw.inputs
    ins += [_vi(names["xw"], elem, 2)] + ([_vi(names["m"], TensorProto.BOOL, 2)] if masks is not None else [])
    out_vis = state_vis + [_vi(o, TensorProto.BOOL if k.endswith("_keep") else elem, 2) for o, k in zip(outs, keys)]
    body = _graph(fwd, ins, out_vis, "forward_steps")
    scan_ins = [h0] + ([c0] if lstm else []) + fw.states + [xw] + ([masks] if masks is not None else [])
    n_scan = 1 + (masks is not None)
    res = b.op("Scan", *scan_ins, outputs=len(out_vis), body=body, num_scan_inputs=n_scan,
               scan_input_directions=[rev] * n_scan, scan_output_directions=[rev] * len(keys))
    return p, dict(zip(keys, res[len(state_vis):]))


def scan_backward(rec, gy, gyh, gyc, keys, step, ref=None):
    """Per direction: a forward Scan recording `keys` of every step, then a Scan over the
    records in the opposite order carrying (h, c) quantities: `step(rec, s, p, d, h, c)`
    gets a step's records `s`, the body's weights `p` and the carried h (plus the step's
    own incoming h quantity) and c, masked to the step's validity, and returns those for
    h_prev and c_prev and one per-step output. With `ref` (a Recurrence on other inputs: a
    baseline's), its steps are recorded too and `step(rec, s, s0, p, d, h, c)` gets both.
    Returns ([per-step outputs (T, N, .) in time order], [final h], [final c], [outer
    weights]) per direction."""
    b = rec.b
    elem = _ELEM.get(np.dtype(rec.dtype), TensorProto.FLOAT)
    lstm = rec.op == "LSTM"
    masks = _masks(rec)
    outs_per_dir, h_finals, c_finals, params = [], [], [], []
    for d in range(rec.D):
        rev = int(rec.reverse[d])
        p, records = _forward_records(rec, d, keys, masks, elem)
        params.append(p)
        records0 = _forward_records(ref, d, keys, masks, elem)[1] if ref is not None else None

        # --- backward: carried quantities in, one per-step output out
        gy_d = rec.direction_part(gy, d, axis=1)
        dh = rec.final_part(gyh, d) or rec.zero_state()
        dc = (rec.final_part(gyc, d) or rec.zero_state()) if lstm else None
        bwd = _Body(b, rec.dtype)
        bw = _Weights(rec, bwd, elem)
        rec.b = bwd
        try:
            pb = rec.params(d)
            s = {k: bwd.fresh(k + "_in") for k in keys}
            s0 = {k: bwd.fresh(k + "_ref_in") for k in keys} if ref is not None else None
            for k in ("hh", "z", "r", "i", "f", "g", "o"):
                s.setdefault(k + "_keep", None)
            dh_name, dc_name = bwd.fresh("dh_in"), bwd.fresh("dc_in")
            gy_name, m_name = bwd.fresh("gy_in"), bwd.fresh("m_in")
            m = m_name if masks is not None else None
            s["mask"] = m
            dh_in = dh_name if gy_d is None else bwd.add(dh_name, gy_name)
            dc_in = dc_name if lstm else None
            if m is not None:
                zero = bwd.scalar_like(0.0, dh_name)
                dh_in = bwd.op("Where", m, dh_in, zero)
                dc_in = bwd.op("Where", m, dc_in, zero) if lstm else None
            if ref is None:
                h_prev, c_prev, y = step(rec, s, pb, d, dh_in, dc_in)
            else:
                h_prev, c_prev, y = step(rec, s, s0, pb, d, dh_in, dc_in)
            dh_out = h_prev if m is None else bwd.op("Where", m, h_prev, dh_name)
            bouts = [bwd.op("Identity", dh_out)]
            if lstm:
                bouts.append(bwd.op("Identity", c_prev if m is None else bwd.op("Where", m, c_prev, dc_name)))
            bout_vis = [_vi(o, elem, 2) for o in bouts] + bw.out_vis(bwd, elem)
            bout_vis.append(_vi(bwd.op("Identity", y), elem, 2))
        finally:
            rec.b = b
            bw.restore()
        bins = [_vi(dh_name, elem, 2)] + ([_vi(dc_name, elem, 2)] if lstm else []) + bw.inputs
        bins += [_vi(s[k], TensorProto.BOOL if k.endswith("_keep") else elem, 2) for k in keys]
        scanned = [records[k] for k in keys]
        if ref is not None:
            bins += [_vi(s0[k], TensorProto.BOOL if k.endswith("_keep") else elem, 2) for k in keys]
            scanned += [records0[k] for k in keys]
        if gy_d is not None:
            bins.append(_vi(gy_name, elem, 2))
            scanned.append(gy_d)
        if masks is not None:
            bins.append(_vi(m_name, TensorProto.BOOL, 2))
            scanned.append(masks)
        body = _graph(bwd, bins, bout_vis, "backward_steps")
        back = 1 - rev  # the opposite order of the forward's
        res = b.op("Scan", dh, *([dc] if lstm else []), *bw.states, *scanned, outputs=len(bout_vis), body=body,
                   num_scan_inputs=len(scanned), scan_input_directions=[back] * len(scanned),
                   scan_output_directions=[back])
        h_finals.append(res[0])
        c_finals.append(res[1] if lstm else None)
        outs_per_dir.append(res[-1])
    return outs_per_dir, h_finals, c_finals, params
