"""Finite-difference checks of compiled gradients, shared by the rule tests.

`check_gradient` compiles the gradient explainer of a model (float32, as users run it)
and compares it with central differences of seed . output computed on a float64 copy of
the model where onnxruntime has double kernels for its operators, else on float32 with a
larger step and tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxplain import Explainer


def node_model(op_type, inputs: dict, attrs=None, consts: dict | None = None, n_outputs: int = 1,
               opset: int = 17, domain: str = "", fixed=()) -> onnx.ModelProto:
    """A one-node model. `inputs`: name -> example array (graph inputs, differentiated,
    batched along a first axis "N" -- except those named in `fixed`, declared with their
    whole static shape: a fed weight or bias, shared by every sample);
    `consts`: name -> array (initializers). Input order is the node's: inputs, then consts,
    unless `order` is given in attrs as '_order'."""
    attrs = dict(attrs or {})
    order = attrs.pop("_order", list(inputs) + list(consts or {}))
    outs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, order, outs, domain=domain, **attrs)
    g_in = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype),
                                          list(v.shape) if k in fixed else ["N"] + list(v.shape[1:]))
            for k, v in inputs.items()]
    g_out = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (consts or {}).items()]
    g = helper.make_graph([node], "t", g_in, g_out, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    m = onnx.shape_inference.infer_shapes(m)
    # Output types must be concrete for onnxruntime.
    vis = {vi.name: vi for vi in m.graph.value_info}
    for o in m.graph.output:
        if o.type.tensor_type.elem_type == TensorProto.UNDEFINED and o.name in vis:
            o.CopyFrom(vis[o.name])
        elif o.type.tensor_type.elem_type == TensorProto.UNDEFINED:
            o.type.tensor_type.elem_type = TensorProto.FLOAT
    return m


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    return m


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def numeric_gradient(model, feeds: dict, wrt: str, seed: np.ndarray, output: str | None = None,
                     eps: float | None = None, max_elements: int = 400, rng=None):
    """Central differences of sum(seed * output) w.r.t. input `wrt`, on up to
    `max_elements` randomly chosen elements. Returns (indices, values, double)."""
    try:
        sess = _session(to_double(model))
        dtype, double = np.float64, True
        sess.run(None, {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()})
    except Exception:
        sess = _session(model)
        dtype, double = np.float32, False
    eps = eps if eps is not None else (1e-6 if double else 1e-2)
    out_name = output or sess.get_outputs()[0].name
    base = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in feeds.items()}
    x = base[wrt]
    rng = rng or np.random.default_rng(0)
    flat = np.arange(x.size)
    if x.size > max_elements:
        flat = rng.choice(x.size, max_elements, replace=False)
    vals = []
    for i in flat:
        idx = np.unravel_index(i, x.shape)
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        fp = sess.run([out_name], {**base, wrt: xp})[0]
        fm = sess.run([out_name], {**base, wrt: xm})[0]
        vals.append(float((seed.astype(np.float64) * (fp.astype(np.float64) - fm.astype(np.float64))).sum() / (2 * eps)))
    return flat, np.array(vals), double


def check_gradient(model, feeds: dict, wrt: str | None = None, rtol=None, atol=None, seed_rng: int = 0,
                   output=None, eps: float | None = None):
    """Assert that onnxplain's gradient of seed . output equals finite differences.

    For operators linear in the input, pass a large `eps` (1.0) and tight tolerances: the
    differences are then exact even in float32."""
    e = Explainer(model, canonize=False)
    out_name = output or e.outputs[0]
    y = e.predict(feeds, output=out_name)
    seed = np.random.default_rng(seed_rng).normal(size=y.shape).astype(np.float32)
    attr = e.attribute(feeds if len(feeds) > 1 else next(iter(feeds.values())), method="gradient",
                       target=seed, output=out_name, probability=True, wrt=wrt)
    wrt = wrt or e.float_inputs[0]
    got = attr[wrt] if isinstance(attr, dict) else attr
    if got.shape == (len(y),) + feeds[wrt].shape and got.shape != feeds[wrt].shape:
        # An input shared by every sample is attributed per sample: the batch's gradient
        # is their sum.
        got = got.sum(0)
    flat, num, double = numeric_gradient(model, feeds, wrt, seed, output=out_name, eps=eps)
    rtol = rtol if rtol is not None else (1e-4 if double else 3e-2)
    atol = atol if atol is not None else (1e-4 if double else 3e-2)
    np.testing.assert_allclose(got.reshape(-1)[flat], num, rtol=rtol, atol=atol,
                               err_msg=f"gradient mismatch (finite differences in {'float64' if double else 'float32'})")
    return got
