"""Output types of operators that onnx's shape inference does not know.

onnx types the default domain only: after an onnxruntime quantized operator
(com.microsoft QGemm, QLinearAdd, QLinearConcat, ...) or a scikit-learn one (ai.onnx.ml
SVMClassifier, Scaler, ...) no tensor downstream has a shape or an element type, and every
backward rule that needs one (a broadcast, a window, a rank) must refuse. `annotate` adds
the output type of each such node, computed from its inputs' types by the operator's own
definition, and re-runs inference until nothing more can be typed. It is meant to run
inside `graph.infer_types` (one call before onnx's inference); it reads only shapes,
element types and initializer dims, never weight values.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .attributes import attr

MS, ML = "com.microsoft", "ai.onnx.ml"


def _broadcast(a, b):
    if a is None or b is None:
        return None
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        out.append(y if x == 1 else x if y == 1 or x == y else (x if isinstance(x, str) or x is None else y))
    return tuple(out)


def _pool(shape, node, kernel=None):
    """Output shape of a sliding window (explicit pads or VALID, floor or ceil mode)."""
    if shape is None or len(shape) < 3:
        return None
    kernel = kernel or attr(node, "kernel_shape")
    r = len(kernel)
    auto = attr(node, "auto_pad", "NOTSET")
    strides = attr(node, "strides", [1] * r)
    dil = attr(node, "dilations", [1] * r)
    pads = [0] * (2 * r) if auto == "VALID" else attr(node, "pads", [0] * (2 * r))
    out = list(shape[:2])
    for i, h in enumerate(shape[2:]):
        if not isinstance(h, int):
            out.append(None)
            continue
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-h // strides[i]))
            continue
        span = h + pads[i] + pads[i + r] - ((kernel[i] - 1) * dil[i] + 1)
        o = (-(-span // strides[i]) if attr(node, "ceil_mode", 0) else span // strides[i]) + 1
        if attr(node, "ceil_mode", 0) and (o - 1) * strides[i] >= h + pads[i]:
            o -= 1
        out.append(o)
    return tuple(out)


def _first_rows(shape):
    return (shape[0],) if shape else (None,)


def _types(node, t):
    """[(elem_type, shape)] for node's outputs, or None where the inputs are not typed yet.
    `t(name)` gives (elem_type, shape, dims-of-initializer-or-None)."""
    op, ins = node.op_type, list(node.input)

    def shape(i):
        return t(ins[i])[1] if len(ins) > i and ins[i] else None

    def elem(i):
        return t(ins[i])[0] if len(ins) > i and ins[i] else None

    if node.domain == MS:
        if op == "QGemm":
            a, b = shape(0), shape(3)
            if a is None or b is None:
                return None
            m = a[1] if attr(node, "transA", 0) else a[0]
            n = b[0] if attr(node, "transB", 0) else b[1]
            quantized = len(ins) > 7 and ins[7]
            return [((elem(8) or elem(0)) if quantized else TensorProto.FLOAT, (m, n))]
        if op in ("QLinearAdd", "QLinearMul"):
            s = _broadcast(shape(0), shape(3))
            return None if s is None else [(elem(7) or elem(0), s)]
        if op in ("QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax"):
            return None if shape(0) is None else [(elem(4) or elem(0), shape(0))]
        if op == "QLinearGlobalAveragePool":
            s = shape(0)
            if s is None:
                return None
            if attr(node, "channels_last", 0):
                return [(elem(4) or elem(0), (s[0],) + (1,) * (len(s) - 2) + (s[-1],))]
            return [(elem(4) or elem(0), tuple(s[:2]) + (1,) * (len(s) - 2))]
        if op == "QLinearAveragePool":
            if attr(node, "channels_last", 0):
                return None
            s = _pool(shape(0), node)
            return None if s is None else [(elem(4) or elem(0), s)]
        if op == "QLinearConcat":
            parts = [shape(i) for i in range(2, len(ins), 3)]
            if any(p is None for p in parts):
                return None
            axis = attr(node, "axis") % len(parts[0])
            sizes = [p[axis] for p in parts]
            total = sum(sizes) if all(isinstance(d, int) for d in sizes) else None
            s = list(parts[0])
            s[axis] = total
            return [(elem(1) or elem(2), tuple(s))]
        if op == "QAttention":
            x, wdims = shape(0), t(ins[1])[2]
            if x is None or wdims is None:
                return None
            return [(TensorProto.FLOAT, tuple(x[:-1]) + (wdims[1] // 3,))]
        if op == "DynamicQuantizeLSTM":
            x = shape(0)
            if x is None or len(x) != 3:
                return None
            d = 2 if attr(node, "direction", "forward") == "bidirectional" else 1
            h = attr(node, "hidden_size")
            if h is None:
                return None
            t, n = x[0], x[1]
            state = (TensorProto.FLOAT, (d, n, h))
            return [(TensorProto.FLOAT, (t, d, n, h)), state, state]
        if op == "DynamicQuantizeMatMul" or op == "MatMulIntegerToFloat":
            a, b = shape(0), shape(1)
            if a is None or b is None or len(b) != 2:
                return None
            return [(TensorProto.FLOAT, tuple(a[:-1]) + (b[1],))]
        return None
    if node.domain == ML:
        x = shape(0)
        if x is None:
            return None
        labels = attr(node, "classlabels_ints") or attr(node, "classlabels_strings") or []
        label_type = TensorProto.INT64 if attr(node, "classlabels_ints") else TensorProto.STRING
        if op in ("Scaler", "Normalizer"):
            return [(TensorProto.FLOAT, x)]
        if op == "LinearRegressor":
            return [(TensorProto.FLOAT, _first_rows(x) + (int(attr(node, "targets", 1)),))]
        if op == "SVMRegressor":
            return [(TensorProto.FLOAT, _first_rows(x) + (1,))]
        if op == "LinearClassifier":
            rows = len(attr(node, "intercepts", []) or []) or len(labels)
            scores = 2 if rows == 1 and len(labels) == 2 else rows
            return [(label_type, _first_rows(x)), (TensorProto.FLOAT, _first_rows(x) + (scores,))]
        if op == "SVMClassifier":
            k = len(labels)
            probabilities = bool(attr(node, "prob_a"))
            scores = k if (probabilities or k == 2 or not attr(node, "vectors_per_class")) else k * (k - 1) // 2
            return [(label_type, _first_rows(x)), (TensorProto.FLOAT, _first_rows(x) + (scores,))]
        if op == "ArrayFeatureExtractor":
            dims = t(ins[1])[2] if len(ins) > 1 else None
            if dims is None:
                return None
            count = 1
            for d in dims:
                count *= d
            return [(elem(0), tuple(x[:-1]) + (count,))]
        return None
    return None


def annotate(model: onnx.ModelProto, infer=None, rounds: int = 64) -> int:
    """Add value_info for the outputs of com.microsoft quantized and ai.onnx.ml operators,
    re-inferring after each round so that the default-domain nodes after them are typed
    too. `infer(model)` is the shape inference to use (default onnx's, non-strict). Returns
    the number of value_infos added (0 where the model has no such operator)."""
    targets = [n for n in model.graph.node if n.domain in (MS, ML)]
    if not targets:
        return 0
    infer = infer or (lambda m: onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True))
    inits = {t.name: (t.data_type, tuple(t.dims)) for t in model.graph.initializer}
    added = 0
    for _ in range(rounds):
        inferred = infer(model)
        known = {}
        for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if tt is not None and tt.elem_type:
                known[vi.name] = (tt.elem_type, _shape(tt) if tt.HasField("shape") else None)
        for name, (dtype, dims) in inits.items():
            known[name] = (dtype, dims)

        def t(name):
            if name in inits:
                return inits[name][0], inits[name][1], inits[name][1]
            dtype, s = known.get(name, (None, None))
            return dtype, s, None

        new = []
        for node in targets:
            if all(not o or (o in known and known[o][1] is not None) for o in node.output):
                continue
            out = _types(node, t)
            if out is None:
                continue
            for name, (dtype, s) in zip(node.output, out):
                if name and dtype and (name not in known or known[name][1] is None):
                    new.append(helper.make_tensor_value_info(name, dtype, list(s)))
        if not new:
            break
        names = {vi.name for vi in new}
        keep = [vi for vi in model.graph.value_info if vi.name not in names]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep + new)
        added += len(new)
    return added


def _shape(tt):
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tuple(dims)
