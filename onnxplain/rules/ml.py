"""Exact vector-Jacobian products of the differentiable ai.onnx.ml operators: the ones
skl2onnx writes for scalers, normalizers, linear models and support vector machines.

Their outputs are float32 whatever the input type; gradients go back in the input's float
type, and an integer input gets none (it cannot move). Each operator works on rows: a
(N, C) input, one sample per row. A part that is not differentiable (a class label, a
one-class SVM's +-1, Platt-scaled SVM probabilities) is refused by name.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..errors import ModelError
from .base import attr, register

ML = "ai.onnx.ml"
_FLOAT = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def _floats(node, name, default=()):
    return np.asarray(attr(node, name, list(default)), dtype=np.float64)


def _to_input(b, g: str, x: str):
    """Gradient `g` (float32) in the float type of input `x`; None for an integer input."""
    t = b.graph.elem_type(x)
    if t is not None and t not in _FLOAT:
        return None
    return g if t in (None, TensorProto.FLOAT) else b.op("Cast", g, to=t)


def _x32(b, x: str) -> str:
    t = b.graph.elem_type(x)
    return x if t in (None, TensorProto.FLOAT) else b.op("Cast", x, to=TensorProto.FLOAT)


def _c(b, v) -> str:
    return b.const(np.asarray(v, dtype=np.float32))


def _row_sum(b, t: str) -> str:
    return b.reduce_sum(t, [-1], keepdims=True)


@register("Scaler", domain=ML)
def scaler(b, node, grads):
    # y = (x - offset) * scale, per column (or one value for all).
    scale = _floats(node, "scale", [1.0])
    return [_to_input(b, b.mul(grads[0], _c(b, scale if scale.size > 1 else scale.reshape(()))), node.input[0])]


@register("Normalizer", domain=ML)
def normalizer(b, node, grads):
    # y = x / n(x) per row, n = max(x) (MAX), sum |x| (L1) or sqrt(sum x^2) (L2):
    # dx = (g - n'(x) * sum(g * y)) / n, with n' = e_argmax, sign(x) or y.
    g, x, y = grads[0], _x32(b, node.input[0]), node.output[0]
    norm = attr(node, "norm", "MAX")
    if norm == "MAX":
        n = b.reduce("ReduceMax", x, [-1])
        # the first maximum of each row takes the whole derivative (ties: onnxruntime's choice)
        idx = b.op("ArgMax", x, axis=-1, keepdims=1)
        width = b.op("Slice", b.shape_of(x), b.ints([-1]), b.ints([2**62]))
        dn = b.op("OneHot", idx, width, _c(b, [0.0, 1.0]), axis=-1)
        dn = b.op("Squeeze", dn, b.ints([-2]))
    elif norm == "L1":
        n = b.reduce_sum(b.op("Abs", x), [-1])
        dn = b.op("Sign", x)
    elif norm == "L2":
        n = b.op("Sqrt", b.reduce_sum(b.mul(x, x), [-1]))
        dn = y
    else:
        raise ModelError(f"Normalizer '{node.name}' has unknown norm '{norm}'")
    # A zero row stays zero (onnxruntime divides by nothing there): no gradient.
    zero = _c(b, 0.0)
    safe = b.op("Where", b.op("Equal", n, zero), _c(b, 1.0), n)
    gx = b.op("Div", b.op("Sub", g, b.mul(dn, _row_sum(b, b.mul(g, y)))), safe)
    gx = b.op("Where", b.op("Equal", n, zero), zero, gx)
    return [_to_input(b, gx, node.input[0])]


def _post_transform_back(b, node, g: str, y: str) -> str:
    """The gradient at the raw scores z of y = post_transform(z), from y itself."""
    post = attr(node, "post_transform", "NONE")
    if post == "NONE":
        return g
    if post == "LOGISTIC":
        return b.mul(g, b.mul(y, b.op("Sub", _c(b, 1.0), y)))
    if post in ("SOFTMAX", "SOFTMAX_ZERO"):
        # SOFTMAX_ZERO leaves zero scores at zero: y = 0 there, and the formula gives 0.
        return b.mul(y, b.op("Sub", g, _row_sum(b, b.mul(g, y))))
    if post == "PROBIT":
        # y = sqrt(2) erfinv(2z - 1) = Phi^-1(z): dy/dz = sqrt(2 pi) exp(y^2 / 2)
        # (onnxruntime's erfinv is an approximation whose slope agrees to ~1e-3)
        return b.mul(g, b.mul(_c(b, np.sqrt(2 * np.pi)), b.op("Exp", b.mul(b.mul(y, y), _c(b, 0.5)))))
    raise ModelError(f"{node.op_type} '{node.name}' has unknown post_transform '{post}'")


def _linear(b, node, g: str, y: str, rows: int) -> list:
    """x @ W^T + b followed by the post-transform: dx = dz @ W."""
    x = node.input[0]
    coef = _floats(node, "coefficients")
    width = b.shape(x)[-1] if b.shape(x) is not None and isinstance(b.shape(x)[-1], int) else None
    if rows <= 0 or coef.size % rows:
        raise ModelError(f"{node.op_type} '{node.name}': {coef.size} coefficients do not form {rows} rows")
    w = coef.reshape(rows, -1)
    if width is not None and w.shape[1] != width:
        raise ModelError(f"{node.op_type} '{node.name}': coefficients for {w.shape[1]} features, input has {width}")
    dz = _post_transform_back(b, node, g, y)
    return [_to_input(b, b.op("MatMul", dz, _c(b, w)), x)]


@register("LinearClassifier", domain=ML)
def linear_classifier(b, node, grads):
    # Outputs: the label (no gradient) and the scores post_transform(x W^T + b).
    g = grads[1] if len(grads) > 1 else None
    if g is None:
        return [None]
    labels = attr(node, "classlabels_ints") or attr(node, "classlabels_strings") or []
    rows = len(_floats(node, "intercepts")) or len(labels)
    if rows == 1 and len(labels) == 2:
        raise ModelError(f"LinearClassifier '{node.name}' scores two classes with one coefficient row; "
                         "its derived score column is not supported (skl2onnx writes two rows)")
    return _linear(b, node, g, node.output[1], rows)


@register("LinearRegressor", domain=ML)
def linear_regressor(b, node, grads):
    return _linear(b, node, grads[0], node.output[0], int(attr(node, "targets", 1)))


def _kernel_gradient(b, node, x: str, a: str, sv: np.ndarray, what: str) -> str:
    """d/dx of sum_s a[n, s] K(x_n, sv_s), for weights `a` of shape (N, S)."""
    kind = attr(node, "kernel_type", "LINEAR")
    params = list(_floats(node, "kernel_params", [0.0, 0.0, 0.0])) + [0.0, 0.0, 0.0]
    gamma, c0, degree = float(params[0]), float(params[1]), float(params[2])
    if kind == "LINEAR":
        return b.op("MatMul", a, _c(b, sv))
    dots = b.op("MatMul", x, _c(b, sv.T))
    if kind == "RBF":
        # K = exp(-gamma |x - sv|^2): dK/dx = -2 gamma K (x - sv)
        d2 = b.add(b.op("Sub", _row_sum(b, b.mul(x, x)), b.mul(dots, _c(b, 2.0))), _c(b, (sv * sv).sum(axis=1)))
        a = b.mul(a, b.op("Exp", b.mul(d2, _c(b, -gamma))))
        gx = b.op("Sub", b.mul(_row_sum(b, a), x), b.op("MatMul", a, _c(b, sv)))
        return b.mul(gx, _c(b, -2.0 * gamma))
    inner = b.add(b.mul(dots, _c(b, gamma)), _c(b, c0))
    if kind == "POLY":
        local = b.mul(_c(b, degree), b.op("Pow", inner, _c(b, degree - 1.0)))
    elif kind == "SIGMOID":
        t = b.op("Tanh", inner)
        local = b.op("Sub", _c(b, 1.0), b.mul(t, t))
    else:
        raise ModelError(f"{what} has unknown kernel_type '{kind}'")
    return b.mul(b.op("MatMul", b.mul(a, local), _c(b, sv)), _c(b, gamma))


def _support_vectors(node, width, what):
    sv = _floats(node, "support_vectors")
    if sv.size == 0:
        return None
    if width is None:
        raise ModelError(f"the gradient of {what} needs the static number of features of its input")
    return sv.reshape(-1, width)


def _width(b, x):
    s = b.shape(x)
    return s[-1] if s is not None and isinstance(s[-1], int) else None


@register("SVMRegressor", domain=ML)
def svm_regressor(b, node, grads):
    # y = sum_s coef_s K(x, sv_s) + rho; with no support vectors, the linear x . coef + rho.
    what = f"SVMRegressor '{node.name}'"
    if attr(node, "one_class", 0):
        raise ModelError(f"{what} is a one-class SVM: its output is a +-1 decision with no gradient; "
                         "use a black-box method")
    if attr(node, "post_transform", "NONE") != "NONE":
        raise ModelError(f"{what} has post_transform {attr(node, 'post_transform')}; only NONE is supported")
    x = node.input[0]
    coef = _floats(node, "coefficients")
    sv = _support_vectors(node, _width(b, x), what)
    g = grads[0]
    if sv is None:
        return [_to_input(b, b.mul(g, _c(b, coef)), x)]
    return [_to_input(b, _kernel_gradient(b, node, _x32(b, x), b.mul(g, _c(b, coef)), sv, what), x)]


@register("SVMClassifier", domain=ML)
def svm_classifier(b, node, grads):
    # One-vs-one decision values: for classes i < j, d_ij = sum over i's support vectors of
    # coef[j-1, s] K(x, sv_s) + sum over j's of coef[i, s] K(x, sv_s) + rho_ij, i.e. scores
    # = K @ C + rho for a (S, pairs) matrix C. With two classes onnxruntime writes the
    # scores [-d, d]. Probabilities (Platt scaling) and the label are not differentiated.
    what = f"SVMClassifier '{node.name}'"
    g = grads[1] if len(grads) > 1 else None
    if g is None:
        return [None]
    if attr(node, "prob_a") or attr(node, "prob_b"):
        raise ModelError(f"the gradient of {what} does not support Platt-scaled probabilities (prob_a/prob_b); "
                         "export the SVC with probability=False, or use a black-box method")
    if attr(node, "post_transform", "NONE") != "NONE":
        raise ModelError(f"{what} has post_transform {attr(node, 'post_transform')}; only NONE is supported")
    x = node.input[0]
    sv = _support_vectors(node, _width(b, x), what)
    counts = [int(v) for v in attr(node, "vectors_per_class", [])]
    if sv is None or not counts or sum(counts) != len(sv):
        raise ModelError(f"the gradient of {what} supports support-vector mode (vectors_per_class given) only")
    k = len(counts)
    coef = _floats(node, "coefficients").reshape(k - 1, len(sv))
    starts = np.concatenate([[0], np.cumsum(counts)])
    pairs = []
    for i in range(k):
        for j in range(i + 1, k):
            col = np.zeros(len(sv))
            col[starts[i]:starts[i + 1]] = coef[j - 1, starts[i]:starts[i + 1]]
            col[starts[j]:starts[j + 1]] = coef[i, starts[j]:starts[j + 1]]
            pairs.append(col)
    cmat = np.stack(pairs, axis=1)  # (S, pairs)
    if k == 2:
        cmat = np.concatenate([-cmat, cmat], axis=1)
    a = b.op("MatMul", g, _c(b, cmat.T))  # (N, S): each support vector's weight in g . scores
    return [_to_input(b, _kernel_gradient(b, node, _x32(b, x), a, sv, what), x)]


@register("ArrayFeatureExtractor", domain=ML)
def array_feature_extractor(b, node, grads):
    # Y = X[..., indices]: the gradient adds each selected column back where it came from.
    x, idx = node.input
    indices = b.constant(idx)
    if indices is None:
        raise ModelError(f"the gradient of ArrayFeatureExtractor '{node.name}' needs constant indices")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    width = _width(b, x)
    if width is not None:
        onehot = np.zeros((len(indices), width), np.float32)
        np.add.at(onehot, (np.arange(len(indices)), indices % width), 1.0)
        return [_to_input(b, b.op("MatMul", grads[0], _c(b, onehot)), x), None]
    # X's width unknown (after another ai.onnx.ml operator, which onnx's shape inference
    # does not type): scatter-add the columns into zeros shaped like X at run time.
    if np.any(indices < 0):
        raise ModelError(f"the gradient of ArrayFeatureExtractor '{node.name}' with negative indices needs the "
                         f"static width of '{x}'")
    g = grads[0]
    where = b.op("Expand", b.const(indices, np.int64), b.shape_of(g))
    zeros = b.op("ConstantOfShape", b.shape_of(x), value=__import__("onnx").numpy_helper.from_array(
        np.zeros(1, np.float32)))
    out = b.op("ScatterElements", zeros, where, g, axis=-1, reduction="add")
    return [_to_input(b, out, x), None]


@register("FeatureVectorizer", domain=ML)
def feature_vectorizer(b, node, grads):
    # Y = the inputs' columns side by side, input i contributing inputdimensions[i] columns.
    dims = [int(d) for d in attr(node, "inputdimensions", [])]
    if len(dims) != len(node.input):
        raise ModelError(f"FeatureVectorizer '{node.name}' gives {len(dims)} input dimensions for "
                         f"{len(node.input)} inputs")
    out, start = [], 0
    for x, d in zip(node.input, dims):
        width = _width(b, x)
        if width != d:
            raise ModelError(f"the gradient of FeatureVectorizer '{node.name}' needs input '{x}' to have exactly "
                             f"{d} static columns (got {width}); padding and truncation are not supported")
        part = b.op("Slice", grads[0], b.ints([start]), b.ints([start + d]), b.ints([-1]))
        out.append(_to_input(b, part, x))
        start += d
    return out
