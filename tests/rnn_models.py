"""Small recurrent test models: one LSTM/GRU/RNN node fed by batch-first inputs (transposed to
the node's layout, as exporters do), whose outputs Y, Y_h and Y_c are flattened and
concatenated into one (batch, K) output, so one seed explains all of them at once.
`expected` computes that output with the float64 reference of rnn_reference.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import rnn_reference as ref

F32 = np.float32


@dataclass
class Config:
    op: str
    direction: str = "forward"
    layout: int = 0
    lens: list | None = None  # one per sample; None: no sequence_lens input
    h0: bool = True
    c0: bool = True
    peephole: bool = False
    bias: bool = True
    attrs: dict = field(default_factory=dict)  # clip, activations, input_forget, ...
    T: int = 4
    N: int = 3
    I: int = 3
    H: int = 3
    outputs: tuple = ("Y", "Y_h", "Y_c")
    params_as_inputs: bool = False  # W, R, B, P fed as graph inputs (to differentiate them)
    computed_weights: bool = False  # W, R, B, P computed from initializers (as DequantizeLinear's are)
    scale: float = 0.6

    @property
    def D(self):
        return 2 if self.direction == "bidirectional" else 1

    @property
    def G(self):
        return ref.GATES[self.op]


def make(cfg: Config, seed: int = 0):
    """(model, feeds, params): params are the node's weight arrays (W, R, B, P)."""
    rng = np.random.default_rng(seed)
    D, G, H, I, T, N = cfg.D, cfg.G, cfg.H, cfg.I, cfg.T, cfg.N
    s = cfg.scale
    params = {"W": rng.normal(scale=s, size=(D, G * H, I)).astype(F32),
              "R": rng.normal(scale=s, size=(D, G * H, H)).astype(F32)}
    if cfg.bias:
        params["B"] = rng.normal(scale=s, size=(D, 2 * G * H)).astype(F32)
    if cfg.peephole:
        params["P"] = rng.normal(scale=s, size=(D, 3 * H)).astype(F32)
    feeds = {"x": rng.normal(size=(N, T, I)).astype(F32)}
    nodes, inputs = [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, I])]
    lstm = cfg.op == "LSTM"

    def batch_first_state(name):
        feeds[name] = rng.normal(size=(N, D, H)).astype(F32)
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", D, H]))
        if cfg.layout:
            return name
        nodes.append(helper.make_node("Transpose", [name], [name + "_t"], perm=[1, 0, 2]))
        return name + "_t"

    x = "x"
    if not cfg.layout:
        nodes.append(helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0, 2]))
        x = "x_t"
    names = [x, "W", "R", "B" if cfg.bias else ""]
    if cfg.lens is not None:
        feeds["sl"] = np.asarray(cfg.lens, np.int32)
        inputs.append(helper.make_tensor_value_info("sl", TensorProto.INT32, ["N"]))
    names.append("sl" if cfg.lens is not None else "")
    names.append(batch_first_state("h0") if cfg.h0 else "")
    if lstm:
        names.append(batch_first_state("c0") if cfg.c0 else "")
        names.append("P" if cfg.peephole else "")
    while names[-1] == "":
        names.pop()
    outs = [o if o in cfg.outputs else "" for o in ("Y", "Y_h", "Y_c")[: 3 if lstm else 2]]
    while outs[-1] == "":
        outs.pop()
    nodes.append(helper.make_node(cfg.op, names, outs, name="rnn", hidden_size=H, direction=cfg.direction,
                                  layout=cfg.layout, **cfg.attrs))
    flat = []
    for o in outs:
        if not o:
            continue
        src = o
        if not cfg.layout:
            perm = [2, 0, 1, 3] if o == "Y" else [1, 0, 2]
            nodes.append(helper.make_node("Transpose", [o], [o + "_b"], perm=perm))
            src = o + "_b"
        nodes.append(helper.make_node("Flatten", [src], [o + "_f"], axis=1))
        flat.append(o + "_f")
    nodes.append(helper.make_node("Concat", flat, ["out"], axis=1))
    inits = []
    for k, v in params.items():
        if cfg.params_as_inputs:
            inputs.append(helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)))
        elif cfg.computed_weights:
            inits.append(numpy_helper.from_array(v * F32(2), k + "_raw"))
            if "half" not in [t.name for t in inits]:
                inits.append(numpy_helper.from_array(np.array(0.5, F32), "half"))
            nodes.insert(0, helper.make_node("Mul", [k + "_raw", "half"], [k]))
        else:
            inits.append(numpy_helper.from_array(v, k))
    width = sum(T * D * H if o == "Y" else D * H for o in outs if o)
    g = helper.make_graph(nodes, "rnn", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", width])],
                          initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, feeds, params


def expected(cfg: Config, feeds: dict, params: dict) -> np.ndarray:
    """The model's output in float64 from the reference forward."""
    f = {k: np.asarray(v, np.float64) if v.dtype.kind == "f" else v for k, v in {**feeds, **params}.items()}
    x = f["x"] if cfg.layout else f["x"].transpose(1, 0, 2)

    def state(name):
        if name not in f:
            return None
        return f[name] if cfg.layout else f[name].transpose(1, 0, 2)

    outs = ref.forward(cfg.op, x, f["W"], f["R"], f.get("B"), f.get("sl"), state("h0"), state("c0"), f.get("P"),
                       layout=cfg.layout, direction=cfg.direction, **cfg.attrs)
    n = x.shape[0] if cfg.layout else x.shape[1]
    flat = []
    for name, v in zip(("Y", "Y_h", "Y_c"), outs):
        if name not in cfg.outputs:
            continue
        if not cfg.layout:
            v = v.transpose(2, 0, 1, 3) if name == "Y" else v.transpose(1, 0, 2)
        flat.append(v.reshape(n, -1))
    return np.concatenate(flat, axis=1)


def numeric(cfg, feeds, params, seed_arr, wrt: str, eps: float = 1e-6) -> np.ndarray:
    """Central differences in float64 of sum(seed * output) w.r.t. feed or parameter `wrt`."""
    src = feeds if wrt in feeds else params
    base = np.asarray(src[wrt], np.float64)
    grad = np.zeros(base.shape)
    for idx in np.ndindex(base.shape):
        vals = []
        for sgn in (1, -1):
            x = base.copy()
            x[idx] += sgn * eps
            f2, p2 = dict(feeds), dict(params)
            (f2 if wrt in feeds else p2)[wrt] = x
            vals.append(float((seed_arr * expected(cfg, f2, p2)).sum()))
        grad[idx] = (vals[0] - vals[1]) / (2 * eps)
    return grad


def session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def sequence_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every layout-1 recurrent node is a layout-0 node between Transposes:
    onnxruntime's CPU kernels run layout 0 only, so this is how a layout-1 explainer is run."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    out_nodes = []
    for node in g.node:
        layout = next((a for a in node.attribute if a.name == "layout"), None)
        if node.op_type not in ("LSTM", "GRU", "RNN") or layout is None or layout.i == 0:
            out_nodes.append(node)
            continue
        layout.i = 0
        for k in (0, 5, 6):
            if len(node.input) > k and node.input[k]:
                t = node.input[k] + "__seqfirst"
                out_nodes.append(helper.make_node("Transpose", [node.input[k]], [t], perm=[1, 0, 2]))
                node.input[k] = t
        after = []
        for k, o in enumerate(node.output):
            if not o:
                continue
            t = o + "__seqfirst"
            after.append(helper.make_node("Transpose", [t], [o], perm=[2, 0, 1, 3] if k == 0 else [1, 0, 2]))
            node.output[k] = t
        out_nodes.append(node)
        out_nodes.extend(after)
    del g.node[:]
    g.node.extend(out_nodes)
    return m
