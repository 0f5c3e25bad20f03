"""The operator test cases that ship with onnx as a corpus for the gradient rules.

`onnx.backend.test.case.node.collect_testcases()` yields ~1,900 small models, one or a few
per operator and attribute combination, with input data. For each case `check_case`:

- holds the inputs the operator's schema tags non-differentiable (indices, shapes, scales)
  fixed as constants, as exported models hold them, and differentiates the float ones;
- wraps the case so one scalar is explained, sum_k <seed_k, output_k> over its float outputs
  (fixed random seeds), which checks every output's backward path at once;
- casts the case to float64 where onnxruntime runs it so, else stays in float32;
- compiles the gradient explainer with onnxplain's compiler, runs it in one session (whose
  forward outputs also give the finite differences) and compares the gradient with central
  differences along random directions at the best of several steps.

A case ends as "passed", "refused" (a typed onnxplain error, with its message), "failed"
(a mismatch, a NaN, a zero gradient where the difference is not zero, an untyped error) or
"n/a" (no float differentiable input or output, or onnxruntime cannot run the case).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, defs, helper, numpy_helper

from onnxplain.compile import SEED, Composite, compile_explainer
from onnxplain.errors import OnnxplainError
from onnxplain.graph import Graph, model_opset, read_model

TOTAL = "backend_corpus.total"
_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE)
_NONDIFF = defs.OpSchema.DifferentiationCategory.NonDifferentiable
# The newest opset the installed onnxruntime runs: a case written for a newer one whose
# operator is unchanged since is run at this opset (otherwise it is n/a).
ORT_MAX_OPSET = 26
N_DIRECTIONS = 3
STEPS = {np.float64: (1e-3, 1e-4, 1e-5), np.float32: (1.0, 1e-1, 1e-2, 1e-3, 1e-4)}  # large steps: exact for linear maps
RTOL = {np.float64: 1e-4, np.float32: 1e-2}


@dataclass
class Result:
    name: str
    operator: str
    status: str  # passed | failed | refused | n/a
    detail: str = ""
    dtype: str = ""


def load_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        return [c for c in collect_testcases() if c.kind == "node"]


def _stem(name: str) -> str:
    return re.sub(r"_expanded(_ver\d+)?$", "", name)


def operators_of(cases) -> dict:
    """Case name -> the operator it tests: the op of a one-node case; an expanded
    (function-inlined) case belongs to the operator of the case it expands."""
    single = {}
    for c in cases:
        ops = [n for n in c.model.graph.node if n.op_type != "Constant"]
        if len(ops) == 1:
            single[c.name] = ops[0]
    out = {}
    for c in cases:
        node = single.get(c.name) or single.get(_stem(c.name))
        if node is not None:
            out[c.name] = node.op_type
        else:
            ops = [n.op_type for n in c.model.graph.node if n.op_type != "Constant"]
            out[c.name] = ops[-1] if ops else "Constant"
    return out, single


def _session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# Operators whose schemas tag every input non-differentiable although the map is smooth
# (linear) in these: their gradients are checked all the same.
DIFFERENTIABLE_DESPITE_TAGS = {"DFT": {0}, "STFT": {0, 2}, "AffineGrid": {0}, "Mod": {1}}
# Untagged float inputs that are shapes or boxes, held fixed like tagged ones.
FIXED_UNTAGGED = {"Upsample": {1}, "RoiAlign": {1}}


def _differentiable_inputs(case, node, opset, extra=()) -> set:
    """Graph inputs the operator's schema does not tag non-differentiable."""
    g = case.model.graph
    names = [i.name for i in g.input]
    if node is None:
        return set(names)
    try:
        schema = defs.get_schema(node.op_type, opset, node.domain)
    except Exception:
        return set(names)
    diff = set()
    for k, name in enumerate(node.input):
        if not name or not schema.inputs:
            continue
        formal = schema.inputs[min(k, len(schema.inputs) - 1)]
        if name in extra:
            diff.add(name)
            continue
        if k in FIXED_UNTAGGED.get(node.op_type, ()):
            continue
        if formal.differentiation_category != _NONDIFF or k in DIFFERENTIABLE_DESPITE_TAGS.get(node.op_type, ()):
            diff.add(name)
    return diff & set(names)


def _to_double(model):
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
            if node.op_type in ("Cast", "RandomNormalLike", "EyeLike") and a.name in ("to", "dtype") \
                    and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
    return m


def _wrap(model, feeds: dict, wrt: list, outputs: list, rng):
    """The case with fixed inputs as initializers and one scalar output TOTAL =
    sum_k sum(seed_k * output_k)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    keep = []
    for vi in g.input:
        if vi.name in wrt:
            keep.append(vi)
        elif vi.name in feeds and not any(t.name == vi.name for t in g.initializer):
            g.initializer.append(numpy_helper.from_array(np.asarray(feeds[vi.name]), vi.name))
            if m.ir_version < 4:
                keep.append(vi)
    del g.input[:]
    g.input.extend(keep)
    parts = []
    for k, (name, shape, elem) in enumerate(outputs):
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        seed = np.asarray(rng.normal(size=shape), dtype=dtype)
        sname = f"backend_corpus.seed_{k}"
        g.initializer.append(numpy_helper.from_array(seed, sname))
        prod = f"backend_corpus.prod_{k}"
        g.node.append(helper.make_node("Mul", [name, sname], [prod]))
        red = f"backend_corpus.sum_{k}"
        g.node.append(helper.make_node("ReduceSum", [prod], [red], keepdims=0))
        if elem != outputs[0][2]:
            cast = red + "_cast"
            g.node.append(helper.make_node("Cast", [red], [cast], to=outputs[0][2]))
            red = cast
        parts.append(red)
    g.node.append(helper.make_node("Sum", parts, [TOTAL]))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(TOTAL, outputs[0][2], []))
    # The expected outputs give every output's shape, which shape inference cannot always.
    del g.value_info[:]
    for k, (name, shape, elem) in enumerate(outputs):
        g.value_info.append(helper.make_tensor_value_info(name, elem, list(shape)))
        g.value_info.append(helper.make_tensor_value_info(f"backend_corpus.prod_{k}", elem, list(shape)))
        g.value_info.append(helper.make_tensor_value_info(f"backend_corpus.sum_{k}", elem, []))
    return m


def _lower_opset(model):
    """A case written for an opset newer than onnxruntime runs, imported at ORT_MAX_OPSET
    (the check is then against what onnxruntime computes for the operator's version there);
    None where the model is not valid at that opset."""
    if model_opset(model) <= ORT_MAX_OPSET:
        return model
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for imp in m.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = ORT_MAX_OPSET
    m.ir_version = min(m.ir_version, 11)
    try:
        onnx.checker.check_model(m)
        onnx.shape_inference.infer_shapes(m, strict_mode=True)
    except Exception:
        return None
    return m


def check_case(case, operator: str, node, seed: int = 0, extra=()) -> Result:
    r = Result(case.name, operator, "n/a")
    g = case.model.graph
    if not case.data_sets:
        r.detail = "no data"
        return r
    inputs, expected = case.data_sets[0]
    inputs = [np.asarray(a) if isinstance(a, np.generic) else a for a in inputs]
    expected = [np.asarray(a) if isinstance(a, np.generic) else a for a in expected]
    if any(not isinstance(a, np.ndarray) for a in list(inputs) + list(expected)):
        r.detail = "non-tensor inputs or outputs"
        return r
    model = _lower_opset(case.model)
    if model is None:
        r.detail = f"opset {model_opset(case.model)}: onnxruntime runs up to {ORT_MAX_OPSET}"
        return r
    names = [i.name for i in g.input]
    feeds = dict(zip(names, inputs))
    diff = _differentiable_inputs(case, node, model_opset(case.model), extra)
    elems = {i.name: i.type.tensor_type.elem_type for i in g.input}
    wrt = [n for n in names if n in diff and elems[n] in _FLOATS and n in feeds and feeds[n].size > 0]
    outs = [(o.name, a.shape, o.type.tensor_type.elem_type) for o, a in zip(g.output, expected)
            if o.type.tensor_type.elem_type in _FLOATS and a.size > 0]
    if not wrt or not outs:
        r.detail = "no float differentiable input" if not wrt else "no float output"
        return r
    try:
        model = read_model(model)
    except OnnxplainError as exc:
        return Result(case.name, operator, "refused", str(exc)[:300])
    rng = np.random.default_rng(seed)
    wrapped = _wrap(model, feeds, wrt, outs, rng)
    dtype = np.float32
    try:
        _session(wrapped).run([TOTAL], {k: feeds[k] for k in wrt})
    except Exception as exc:
        r.detail = f"onnxruntime cannot run the case: {str(exc).splitlines()[0][:200]}"
        return r
    native = np.float64 if all(elems[n] == TensorProto.DOUBLE for n in wrt) else np.float32
    candidates = [(wrapped, native)]
    if all(elems[n] == TensorProto.FLOAT for n in wrt):
        candidates.insert(0, (_to_double(wrapped), np.float64))
    for m, dt in candidates:
        fx = {k: np.asarray(feeds[k], dtype=dt if elems[k] == TensorProto.FLOAT else feeds[k].dtype) for k in wrt}
        try:
            _session(m).run([TOTAL], fx)
        except Exception:
            continue
        try:
            spec = compile_explainer(Graph(m), Composite("gradient"), wrt, TOTAL, method="gradient")
        except OnnxplainError as exc:
            return Result(case.name, operator, "refused", str(exc)[:300], np.dtype(dt).name)
        except Exception as exc:  # an untyped error is a bug
            return Result(case.name, operator, "failed", f"untyped {type(exc).__name__}: {str(exc)[:300]}",
                          np.dtype(dt).name)
        try:
            sess = _session(spec.model)
        except Exception as exc:
            if dt is np.float64 and len(candidates) > 1:
                continue  # a backward node without a double kernel: check in float32
            return Result(case.name, operator, "failed", f"explainer does not load: {str(exc)[:300]}",
                          np.dtype(dt).name)
        dtype = dt
        break
    else:
        r.detail = "onnxruntime cannot run the case in float32 or float64"
        return r
    return _compare(case, operator, sess, spec, fx, wrt, dtype, rng)


def _compare(case, operator, sess, spec, fx, wrt, dtype, rng) -> Result:
    res = Result(case.name, operator, "failed", dtype=np.dtype(dtype).name)
    one = np.ones((), dtype=dtype)
    attr_names = [spec.attributions[w] for w in wrt]
    try:
        grads = sess.run(attr_names, {**fx, SEED: one})
    except Exception as exc:
        res.detail = f"explainer run failed: {str(exc).splitlines()[0][:300]}"
        return res
    for w, gr in zip(wrt, grads):
        if gr.shape != fx[w].shape:
            res.detail = f"gradient of '{w}' has shape {gr.shape}, the input {fx[w].shape}"
            return res

    def total(feed):
        return float(sess.run([TOTAL], {**feed, SEED: one})[0])

    for w, gr in zip(wrt, grads):
        if not np.all(np.isfinite(gr)):
            # Acceptable only where the derivative is unbounded: differences that grow as h shrinks.
            v = np.where(np.isfinite(gr), 0, 1).astype(dtype)
            fds = [abs(total({**fx, w: np.asarray(fx[w] + h * v, dtype=fx[w].dtype)}) - total(fx)) / h
                   for h in STEPS[dtype]]
            if fds[-1] > 3 * fds[0]:
                res.status, res.detail = "n/a", "the derivative is unbounded at the case's input"
            else:
                res.detail = f"non-finite gradient for '{w}'"
            return res

    try:
        f0 = total(fx)
    except Exception as exc:
        res.detail = f"the explainer's forward output fails: {str(exc).splitlines()[0][:300]}"
        return res
    if not np.isfinite(f0):
        res.status, res.detail = "n/a", "the case's output is not finite at its input"
        return res
    worst, kinks = 0.0, 0
    for _ in range(N_DIRECTIONS):
        vs = {w: np.asarray(rng.normal(size=fx[w].shape), dtype=dtype) for w in wrt}
        ad = sum(float((gr.astype(np.float64) * vs[w]).sum()) for w, gr in zip(wrt, grads))
        scale = max(abs(ad), 1e-3 * sum(float(np.linalg.norm(gr) * np.linalg.norm(vs[w]))
                                         for w, gr in zip(wrt, grads)), 1e-6)
        best, best_fd, sides = np.inf, None, []
        for h in STEPS[dtype]:
            fp = total({w: np.asarray(fx[w] + h * vs[w], dtype=fx[w].dtype) for w in wrt})
            fm = total({w: np.asarray(fx[w] - h * vs[w], dtype=fx[w].dtype) for w in wrt})
            fd = (fp - fm) / (2 * h)
            if not np.isfinite(fd):
                continue
            sides.append(((f0 - fm) / h, (fp - f0) / h))
            err = abs(fd - ad) / max(scale, abs(fd) if ad == 0 else 0)
            if err < best:
                best, best_fd = err, fd
        if best_fd is None:
            res.status, res.detail = "n/a", "the case's output is not finite around its input"
            return res
        if best <= RTOL[dtype]:
            worst = max(worst, best)
            continue
        kind = _non_smooth(sides, ad, scale, RTOL[dtype])
        if kind == "kink":
            kinks += 1  # the case's input lies on a kink; the gradient is a one-sided derivative or between
            continue
        if kind == "jump":
            res.status, res.detail = "n/a", "the case's input lies on a discontinuity of the operator"
            return res
        zero = all(not np.any(gr) for gr in grads)
        res.detail = (("silent zero gradient: " if zero else "") +
                      f"directional derivative {ad:.6g}, finite difference {best_fd:.6g} "
                      f"(relative error {best:.2g})")
        return res
    res.status = "passed"
    res.detail = f"worst relative error {worst:.1e}" + (f"; {kinks} direction(s) across a kink" if kinks else "")
    return res


def _non_smooth(sides, ad, scale, rtol):
    """Whether one-sided differences show a kink (left and right derivatives differ, and the
    gradient lies between them) or a jump (the differences grow like 1/h)."""
    (l0, r0), (l1, r1) = sides[0], sides[-1]
    if max(abs(l1), abs(r1)) > 20 * max(abs(l0), abs(r0), scale):
        return "jump"
    for left, right in sides:
        lo, hi = min(left, right), max(left, right)
        if hi - lo > rtol * scale and lo - rtol * scale <= ad <= hi + rtol * scale:
            return "kink"
    return None


def run_all(cases=None, only=None):
    cases = cases if cases is not None else load_cases()
    ops, single = operators_of(cases)
    out = []
    for c in cases:
        if only is not None and ops[c.name] not in only:
            continue
        node = single.get(c.name) or single.get(_stem(c.name))
        out.append(check_case(c, ops[c.name], node))
    return out


def check_model(m, inputs: dict, node=None, extra=(), seed: int = 0) -> Result:
    """check_case for a hand-made model with graph inputs `inputs` (name -> array),
    differentiated where `node`'s schema allows (all of them without a node) and in `extra`."""
    from types import SimpleNamespace

    inferred = onnx.shape_inference.infer_shapes(m)
    vis = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for o in m.graph.output:
        if o.name in vis and vis[o.name].type.tensor_type.elem_type:
            o.CopyFrom(vis[o.name])
        else:
            o.type.tensor_type.elem_type = TensorProto.FLOAT
        if not o.type.tensor_type.HasField("shape"):
            o.type.tensor_type.shape.SetInParent()
    expected = _session(m).run(None, inputs)
    case = SimpleNamespace(name=f"hand_{m.graph.name}", model=m, data_sets=[(list(inputs.values()), expected)])
    return check_case(case, m.graph.name, node, seed=seed, extra=extra)


def check_node(op_type, inputs: dict, attrs=None, consts: dict | None = None, opset: int = 18,
               n_outputs: int = 1, seed: int = 0, extra=()) -> Result:
    """check_model for a one-node model: `inputs` are graph inputs, `consts` initializers
    (held fixed); the node's inputs are `inputs` then `consts`, or attrs['_order']."""
    attrs = dict(attrs or {})
    order = attrs.pop("_order", list(inputs) + list(consts or {}))
    outs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, order, outs, **attrs)
    g_in = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
            for k, v in inputs.items()]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in (consts or {}).items()]
    g = helper.make_graph([node], op_type, g_in, [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None)
                                                  for o in outs], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return check_model(m, inputs, node, extra=extra, seed=seed)
