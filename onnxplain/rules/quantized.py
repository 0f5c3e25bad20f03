"""Gradients of quantized operators by the straight-through convention.

A quantized model computes with integers that stand for real numbers: a tensor q of an
integer type with scale s and zero point z means s * (q - z). Rounding makes the model
piecewise constant, so its exact gradient is zero almost everywhere and useless. The
convention here (the one of quantization-aware training) explains the *dequantized* model:

- weights are their dequantized values s * (q - z);
- rounding is passed straight through (STE): Q(x) = round(x / s) + z differentiates as
  x / s, so a QuantizeLinear -> DequantizeLinear pair is the identity;
- clipping is not rounding: where the real value x / s + z lies outside the integer range
  [qmin, qmax] (before rounding) the output is saturated and the gradient is 0. This is the
  gradient of the float model in which each Q/DQ pair is Clip(x, s(qmin - z), s(qmax - z)).
  It is the choice that is right on real quantized models: onnxruntime's quantizer drops a
  ReLU (or Clip) in front of a quantizer whose range already starts at 0, so the clipping is
  that ReLU, and an unclipped STE would let gradient through it where the float model has
  none;
- integer operators (MatMulInteger, ConvInteger, QLinearConv, QGemm, ...) differentiate as
  their float counterparts on the dequantized inputs; where they requantize their output,
  the clipping above applies to the real result, recomputed in float;
- constant scales and zero points (weights' and static activations') are parameters: no
  gradient. Those computed from the input (DynamicQuantizeLinear's, whose scale covers the
  input so nothing is clipped) get their gradient too, with x / s read at the quantized
  point (y - z): then the pattern DynamicQuantizeLinear -> integer op -> product with the
  scales differentiates exactly as the float op with dequantized weights (the scale's terms
  cancel), and an explained scale gets its exact gradient. An operator whose rule cannot
  give a run-time parameter its gradient refuses it by name.

The gradient of an integer tensor is a float32 tensor in units of its integers (d/dq); the
gradient of a float tensor has that tensor's type (float16 islands get float16 gradients).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from ..errors import ModelError
from . import gradient_elementwise, gradient_linear, gradient_pool
from .base import attr, attrs, lookup
from .base import register as _register
from .gradient_linear import unbroadcast_to, varies
from .lrp import WithConstants

MS = "com.microsoft"
F32 = TensorProto.FLOAT
_FLOAT = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}

# Integer range of each quantized type (saturation limits of QuantizeLinear).
QRANGE = {
    TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127),
    TensorProto.UINT16: (0, 65535), TensorProto.INT16: (-32768, 32767),
    TensorProto.INT32: (-(2**31), 2**31 - 1),
}
for _name, _lim in (("UINT4", (0, 15)), ("INT4", (-8, 7)), ("UINT2", (0, 3)), ("INT2", (-2, 1))):
    if hasattr(TensorProto, _name):
        QRANGE[getattr(TensorProto, _name)] = _lim

CONVENTION = ("quantized operators explained by the straight-through convention: weights dequantized, "
              "rounding passed straight through, zero gradient where a value is clipped to the integer range")


def applies_to(comp) -> bool:
    """Whether the straight-through rules serve composite `comp`: gradient composites
    (and guided backprop / deconvnet, which change only ReLU's backward) yes; relevance
    composites (LRP, excitation: no fallback families) and DeepLIFT (whose rescale
    multipliers need the op's response to a reference input, which dynamic quantization
    computes with another scale) no: they would reach these rules through their gradient
    fallback and get numbers that are neither."""
    families = tuple(getattr(comp, "families", ("gradient",)))
    return bool(families) and "deeplift" not in families


# Operators whose gradient rules carry a gradient through integer (quantized) tensors: the
# quantized ones here, Cast and integer arithmetic (below), and the shape and routing ones,
# whose rules move the gradient without looking at the values' type. Any other consumer of
# a quantized tensor would drop its gradient (the float rules skip non-float inputs).
_INTEGER_AWARE = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                  "QLinearConv", "QLinearMatMul", "Cast", "CastLike", "Add", "Sum", "Sub", "Mul", "Neg"}
_INTEGER_ROUTING = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice", "Gather",
                    "Split", "Identity", "MaxPool", "Pad", "Expand", "Add", "Sum", "Sub", "Mul", "Neg", "Cast",
                    "CastLike"}
_MS_INTEGER_AWARE = {"QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu",
                     "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat", "QAttention"}


def _check_integer_consumers(b, node):
    """Refuse, by name, a consumer of this node's quantized outputs whose rule would drop
    their gradient: a silent zero, or with a run-time scale a wrong answer (its terms
    would not cancel)."""
    from ..compile import NON_DIFFERENTIABLE

    graph = b.graph
    todo = [o for o in node.output if o and graph.elem_type(o) not in (None,) and graph.elem_type(o) not in _FLOAT]
    seen = set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for c in graph.consumers.get(t, []):
            domain = c.domain if c.domain not in ("ai.onnx",) else ""
            if domain == "" and c.op_type in NON_DIFFERENTIABLE:
                continue
            aware = (domain == "" and (c.op_type in _INTEGER_AWARE or c.op_type in _INTEGER_ROUTING)) or \
                (domain == MS and c.op_type in _MS_INTEGER_AWARE)
            if not aware:
                raise ModelError(f"the quantized tensor '{t}' feeds {c.op_type} '{c.name}', whose gradient rule does "
                                 "not carry gradients through integer tensors; use a black-box method")
            if domain == "" and c.op_type in _INTEGER_ROUTING:
                todo.extend(o for o in c.output if o and graph.elem_type(o) is not None
                            and graph.elem_type(o) not in _FLOAT)


# Relevance (LRP composites, deep Taylor, excitation backprop) through a static QDQ model: the
# weights' DequantizeLinear of a constant is folded at load (canonize), and every other
# QuantizeLinear / DequantizeLinear with constant scale and zero point hands its relevance
# unchanged to its data input, as LRP's Pass rule does for an activation. A Q -> DQ pair
# is then the identity for relevance (the straight-through estimator); its clipping acts
# as the ReLU it replaces, which Pass serves too. Rounding moves the activations the rules
# read by at most half a step, the quantization error.
RELEVANCE_CONVENTION = ("quantized operators explained by the straight-through convention for relevance: weights "
                        "dequantized, each QuantizeLinear/DequantizeLinear passing relevance unchanged")
RELEVANCE_PASS = ("QuantizeLinear", "DequantizeLinear")


def is_relevance(comp) -> bool:
    """A relevance composite: one without gradient fallback families (RuleComposite, the
    transformer composites); their pass-through of Q/DQ is `relevance_pass`."""
    return comp is not None and not tuple(getattr(comp, "families", ("gradient",)))


def _static_params(graph, node) -> bool:
    return all(not name or graph.constant(name) is not None for name in node.input[1:3])


def relevance_pass(b, node, grads):
    """Relevance of a QuantizeLinear / DequantizeLinear output to its data input, unchanged
    (float32 on integer tensors, the data input's type on float ones)."""
    def kind(name):  # the type of a relevance of tensor `name`
        t = _elem(b, name)
        return t if t in _FLOAT else F32

    r, want = grads[0], kind(node.input[0])
    if kind(node.output[0]) != want:
        r = b.op("Cast", r, to=want)
    return [r] + [None] * (len(node.input) - 1)


def _gradient_methods_only(rule):
    def guarded(b, node, grads):
        comp = getattr(b, "composite", None)
        if is_relevance(comp) and node.op_type in RELEVANCE_PASS and node.domain in ("", "ai.onnx"):
            if not _static_params(b.graph, node):
                raise ModelError(f"method '{comp.name}': {node.op_type} '{node.name}' has a scale or zero point "
                                 "computed at run time; relevance passes only through static quantization")
            if getattr(b, "conventions", None) is None:
                b.conventions = set()
            b.conventions.add(RELEVANCE_CONVENTION)
            return relevance_pass(b, node, grads)
        if comp is not None and not applies_to(comp):
            raise ModelError(f"method '{comp.name}' is not defined on quantized operator {node.op_type} "
                             f"('{node.name}'): the straight-through convention serves gradient methods "
                             "(gradient, input_x_gradient, integrated_gradients, smoothgrad, guided_backprop, ...); "
                             "use one of them or a black-box method")
        _check_integer_consumers(b, node)
        # The conventions an explainer was compiled with, for its metadata (b.conventions).
        if getattr(b, "conventions", None) is None:
            b.conventions = set()
        b.conventions.add(CONVENTION)
        return rule(b, node, grads)

    guarded.__name__, guarded.__doc__, guarded.__wrapped__ = rule.__name__, rule.__doc__, rule
    # For the compiler's and `inspect`'s check of what a composite lacks (see applies_to).
    guarded.applies_to = applies_to
    guarded.describe = lambda comp, node, graph: (
        "straight-through gradient (weights dequantized, zero where clipped)" if applies_to(comp) else None)
    return guarded


def _passes_relevance(guarded):
    """`guarded` (a Q or DQ rule) also serving relevance composites, where its scale and
    zero point are constants: the compiler and `inspect` see it through these hooks."""
    guarded.applies_to = lambda comp: applies_to(comp) or is_relevance(comp)
    guarded.refuses = lambda comp, node, graph: is_relevance(comp) and not _static_params(graph, node)
    guarded.describe = lambda comp, node, graph: (
        "relevance passed unchanged (straight-through; weights dequantized)" if is_relevance(comp)
        else "straight-through gradient (weights dequantized, zero where clipped)" if applies_to(comp) else None)
    return guarded


def register(*op_types, domain: str = ""):
    def deco(rule):
        guarded = _gradient_methods_only(rule)
        _register(*op_types, domain=domain)(guarded)
        return guarded

    return deco


def has_quantized(graph) -> bool:
    """Whether a model computes with quantized operators (the convention then applies)."""
    return any(n.op_type in _QUANTIZED and (n.domain in ("", "ai.onnx", MS)) for n in graph.nodes)


# --------------------------------------------------------------------------- helpers


def _input(node, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _elem(b, name: str):
    return b.graph.elem_type(name) if name else None


def _to_f32(b, name: str) -> str:
    return name if _elem(b, name) == F32 else b.op("Cast", name, to=F32)


def _back_to(b, g: str, like: str) -> str:
    """Float32 gradient `g` in the type of forward tensor `like` (integers: stays float32)."""
    t = _elem(b, like)
    return b.op("Cast", g, to=t) if t in _FLOAT and t != F32 else g


def _qtype(b, zp: str, y: str, fallback: str = "", node=None) -> int:
    """The integer type of a quantized tensor: its zero point's, else its own, else the
    `output_dtype` attribute, else that of `fallback`, else uint8 (the ONNX default)."""
    for t in (_elem(b, zp), _elem(b, y)):
        if t:
            return t
    if node is not None and attr(node, "output_dtype", 0):
        return int(attr(node, "output_dtype"))
    return _elem(b, fallback) or TensorProto.UINT8


def _qrange(qtype: int, what: str):
    if qtype not in QRANGE:
        name = TensorProto.DataType.Name(qtype) if qtype in TensorProto.DataType.values() else str(qtype)
        raise ModelError(f"{what} quantizes to {name}; the straight-through gradient supports integer types only "
                         f"({', '.join(TensorProto.DataType.Name(t) for t in QRANGE)})")
    return QRANGE[qtype]


def _rank(b, name: str, what: str) -> int:
    s = b.shape(name)
    if s is None:
        raise ModelError(f"{what} is quantized per axis and the rank of '{name}' is unknown; "
                         "give the model static input ranks")
    return len(s)


def _param(b, p: str, like: str, axis: int = 1, block: int = 0, what: str = "", propagated: bool = False):
    """Scale or zero point `p` as a float32 tensor that broadcasts against `like`: a scalar
    per tensor, (C, 1, ..., 1) per axis, repeated over each block for blocked quantization.

    A parameter computed at run time from the input (DynamicQuantizeLinear's) must get its
    gradient too, or the straight-through terms of its producer do not cancel: rules that
    compute it pass `propagated`; the others refuse such a parameter by name."""
    if not p:
        return None
    v = b.constant(p)
    if v is None and not propagated and varies(b, p):
        raise ModelError(f"{what} takes the quantization parameter '{p}' computed from the input; its gradient "
                         "is not supported for this operator")
    if v is not None:
        v = np.asarray(v, dtype=np.float64)
        if v.size == 1 and not block:
            return b.const(np.float32(v.reshape(())))
        if not like:  # broadcasts as it is (a per-column vector against a matrix)
            return b.const(v.astype(np.float32))
        rank = _rank(b, like, what)
        ax = axis % rank
        if block:
            dim = b.shape(like)[ax]
            if not isinstance(dim, int):
                raise ModelError(f"{what} is quantized in blocks along axis {ax} of '{like}', whose size is not "
                                 "static; give the model static input shapes")
            v = np.repeat(v, block, axis=ax).take(np.arange(dim), axis=ax)
            return b.const(v.astype(np.float32))
        return b.const(v.astype(np.float32).reshape([-1] + [1] * (rank - 1 - ax)))
    if block:
        raise ModelError(f"{what} has run-time block quantization parameters; only constant ones are supported")
    t = _to_f32(b, p)
    shape = b.shape(p)
    if shape is not None and int(np.prod([d if isinstance(d, int) else 2 for d in shape])) == 1:
        return t
    if not like:
        return t
    rank = _rank(b, like, what)
    return b.op("Reshape", t, b.ints([-1] + [1] * (rank - 1 - axis % rank)))


def _const_param(b, p: str, what: str, default=0.0) -> np.ndarray:
    if not p:
        return np.asarray(default, dtype=np.float64)
    v = b.constant(p)
    if v is None:
        raise ModelError(f"{what}: the quantization parameter '{p}' is computed at run time; "
                         "only constant ones are supported here")
    return np.asarray(v, dtype=np.float64)


def _dequantize(b, x: str, s: str, zp: str | None) -> str:
    """s * (x - zp) in float32, emitted (x varies)."""
    xf = _to_f32(b, x)
    if zp is not None:
        xf = b.op("Sub", xf, zp)
    return b.mul(xf, s)


def _dequantized_const(w: np.ndarray, s: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """s * (w - zp) of a constant (weight), per tensor or per `axis`."""
    w = np.asarray(w, dtype=np.float64)
    shape = [1] * w.ndim
    if s.size > 1 or zp.size > 1:
        shape[axis % w.ndim] = -1
    return ((w - zp.reshape(shape if zp.size > 1 else ())) * s.reshape(shape if s.size > 1 else ())).astype(np.float32)


def _inside(b, real: str, s: str, zp: str | None, qtype: int, what: str) -> str:
    """Where real / s + zp lies in the integer range of `qtype` (the value is not clipped)."""
    lo, hi = _qrange(qtype, what)
    t = b.op("Div", real, s)
    if zp is not None:
        t = b.op("Add", t, zp)
    return b.op("And", b.op("GreaterOrEqual", t, b.const(np.float32(lo))),
                b.op("LessOrEqual", t, b.const(np.float32(hi))))


def _through_requantize(b, g: str, real: str, ys: str, yzp: str | None, qtype: int, what: str) -> str:
    """Gradient at the real result of an op whose output is requantized with (ys, yzp):
    g / ys where the result is not clipped, else 0 (float32)."""
    inside = _inside(b, real, ys, yzp, qtype, what)
    return b.op("Where", inside, b.op("Div", g, ys), b.const(np.float32(0)))


def _runtime_unbroadcast(b, g: str, target: str) -> str:
    """Sum `g` down to the shape of forward tensor `target` when static shapes are unknown
    (tensors after com.microsoft operators, which onnx's shape inference does not know): the
    target's shape is padded with leading 1s to g's rank, and the axes where the two differ
    are summed."""
    want = b.shape_of(target)
    have = b.shape_of(g)
    lead = b.op("Sub", b.op("Size", have), b.op("Size", want))
    ones = b.op("ConstantOfShape", b.op("Reshape", lead, b.ints([1])),
                value=onnx.numpy_helper.from_array(np.ones(1, np.int64)))
    padded = b.op("Concat", ones, want, axis=0)
    axes = b.squeeze(b.op("NonZero", b.op("Not", b.op("Equal", padded, have))), [0])
    g = b.op("ReduceSum", g, axes, keepdims=1, noop_with_empty_axes=1)
    return b.op("Reshape", g, want)


def _sum_to(b, g: str, out_shape, target: str) -> str:
    """`g` (the gradient of an elementwise result) summed to forward tensor `target`."""
    st = b.shape(target)
    if out_shape is not None and st is not None and tuple(out_shape) == tuple(st):
        return g
    if out_shape is not None and st is not None:
        try:
            return unbroadcast_to(b, g, out_shape, target)
        except ModelError:
            pass
    return _runtime_unbroadcast(b, g, target)


def _out_shape(b, node, *inputs):
    """The static shape of an elementwise result: the output's, else the common shape of
    `inputs` when they all have the same static shape."""
    s = b.shape(node.output[0])
    if s is not None:
        return s
    shapes = [b.shape(i) for i in inputs]
    if all(x is not None for x in shapes) and len(set(map(tuple, shapes))) == 1:
        return shapes[0]
    return None


class _FloatView(WithConstants):
    """The builder seen by a float rule run on a quantized node: emitted constants (the
    dequantized weights) are known with their values, and integer forward tensors have
    float32 gradients (so the rule's constants are float32, not uint8)."""

    def np_dtype(self, name):
        d = self._b.np_dtype(name)
        return d if d.kind == "f" else np.dtype(np.float32)

    def scalar_like(self, value, like):
        return self._b.const(value, self.np_dtype(like))


def _as_float_node(node, op_type: str, inputs: list, keep=None) -> onnx.NodeProto:
    """A copy of `node` as the float operator `op_type` with `inputs` (attributes kept,
    those in `keep` only where given)."""
    n = onnx.NodeProto()
    n.CopyFrom(node)
    n.op_type, n.domain = op_type, ""
    del n.input[:]
    n.input.extend(inputs)
    if keep is not None:
        kept = [a for a in n.attribute if a.name in keep]
        del n.attribute[:]
        n.attribute.extend(kept)
    return n


_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")
_POOL_ATTRS = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides", "dilations")


def _conv_adjoint(b, node, g: str, wf: np.ndarray, what: str) -> str:
    """The input gradient of Conv(x, wf) with node's geometry, x = node.input[0]. With x's
    spatial shape static, the float Conv rule; otherwise the run-time form below."""
    x = node.input[0]
    shape = b.shape(x)
    r = wf.ndim - 2
    if shape is not None and len(shape) == r + 2 and all(isinstance(d, int) for d in shape[2:]):
        wname = b.const(wf)
        conv = _as_float_node(node, "Conv", [x, wname], _CONV_ATTRS)
        return gradient_linear.conv(_FloatView(b, {wname: wf}), conv, [g])[0]
    return _transpose_at_run_time(b, node, g, wf, x, int(attr(node, "group", 1)), what)


def _transpose_at_run_time(b, node, g: str, wf: np.ndarray, like: str, group: int, what: str) -> str:
    """ConvTranspose(g, wf) with node's strides, dilations and begin pads, cropped or
    zero-padded at run time to the spatial size of `like`: the adjoint of a sliding window
    whose input size is not known when compiling (the part that stride and end padding
    leave unread gets zeros)."""
    r = wf.ndim - 2
    auto = attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        raise ModelError(f"the gradient of {what} with auto_pad={auto} needs the static spatial shape of its input; "
                         "give the model static input shapes")
    strides = [int(s) for s in attr(node, "strides", [1] * r)]
    dilations = [int(d) for d in attr(node, "dilations", [1] * r)]
    pads = [0] * (2 * r) if auto == "VALID" else [int(p) for p in attr(node, "pads", [0] * (2 * r))]
    gx = b.op("ConvTranspose", g, b.const(wf), group=group, kernel_shape=list(wf.shape[2:]),
              strides=strides, dilations=dilations, pads=pads[:r] + [0] * r)
    spatial = b.ints(list(range(2, 2 + r)))
    want = b.op("Slice", b.shape_of(like), b.ints([2]), b.ints([2 + r]))
    gx = b.op("Slice", gx, b.ints([0] * r), want, spatial)
    short = b.op("Sub", want, b.op("Slice", b.shape_of(gx), b.ints([2]), b.ints([2 + r])))
    return b.op("Pad", gx, b.op("Concat", b.ints([0] * (2 + r + 2)), short, axis=0))


def _average_pool_at_run_time(b, node, g: str, xd: str, what: str) -> str:
    """The adjoint of AveragePool(xd) (node's geometry) without static shapes: g divided by
    each window's count, spread back over the window by a ConvTranspose of ones with the
    channels folded into the batch."""
    if attr(node, "ceil_mode", 0):
        raise ModelError(f"the gradient of {what} with ceil_mode=1 needs the static spatial shape of its input; "
                         "give the model static input shapes")
    kernel = [int(k) for k in attr(node, "kernel_shape")]
    r = len(kernel)
    ones = np.ones([1, 1] + kernel, np.float32)
    if attr(node, "count_include_pad", 0):
        scaled = b.mul(g, b.const(np.float32(1.0 / np.prod(kernel))))
    else:
        # taps inside the input per window: a Conv of ones over a ones image, zero padded
        one = b.op("Add", b.mul(b.op("Slice", xd, b.ints([0]), b.ints([1]), b.ints([1])), b.const(np.float32(0))),
                   b.const(np.float32(1)))
        counts = b.op("Conv", one, b.const(ones), **{k: v for k, v in attrs(node).items()
                                                      if k in ("auto_pad", "dilations", "pads", "strides")})
        scaled = b.op("Div", g, counts)
    folded_shape = lambda t: b.op("Concat", b.ints([-1, 1]),  # noqa: E731
                                  b.op("Slice", b.shape_of(t), b.ints([2]), b.ints([2 + r])), axis=0)
    like = b.op("Reshape", xd, folded_shape(xd))
    gx = _transpose_at_run_time(b, node, b.op("Reshape", scaled, folded_shape(scaled)), ones, like, 1, what)
    return b.op("Reshape", gx, b.shape_of(xd))


# --------------------------------------------------------------------------- Q / DQ


def _param_gradient(b, t: str, p: str, like: str, axis: int, block: int, what: str):
    """Sum `t` (shaped like forward tensor `like`) to the shape of parameter `p`: all of it
    per tensor, all axes but `axis` per axis; None where p is absent or fixed. A parameter
    computed from the input (a dynamic scale) gets its exact gradient this way."""
    if not p or b.constant(p) is not None or not varies(b, p):
        return None
    shape = b.shape(p)
    if shape is not None and (len(shape) == 0 or (len(shape) == 1 and shape[0] == 1)):
        return b.op("Reshape", b.op("ReduceSum", t, keepdims=0), b.ints(list(shape) if shape else []))
    if block or shape is None or len(shape) != 1:
        raise ModelError(f"the gradient of {what} with respect to its run-time quantization parameter '{p}' "
                         "supports per-tensor and per-axis parameters only")
    rank = _rank(b, like, what)
    ax = axis % rank
    return b.reduce_sum(t, [i for i in range(rank) if i != ax], keepdims=False)


@_passes_relevance
@register("QuantizeLinear")
def quantize_linear(b, node, grads):
    # y = saturate(round(x / s) + z): d/dx = 1 / s where x / s + z is inside the range.
    # A run-time scale or zero point (rare) gets d/ds = -(y - z) / s (x / s read at the
    # quantized point, so that a Q/DQ pair sharing s cancels exactly) and d/dz = 1, inside.
    x, s, zp = node.input[0], node.input[1], _input(node, 2)
    what = f"QuantizeLinear '{node.name}'"
    axis, block = int(attr(node, "axis", 1)), int(attr(node, "block_size", 0))
    qtype = _qtype(b, zp, node.output[0], node=node)
    sf = _param(b, s, x, axis, block, what, propagated=True)
    zf = _param(b, zp, x, axis, block, what, propagated=True)
    inside = _inside(b, _to_f32(b, x), sf, zf, qtype, what)
    g = b.op("Where", inside, _to_f32(b, grads[0]), b.const(np.float32(0)))
    gx = _back_to(b, b.op("Div", g, sf), x)
    gs = gz = None
    if s and b.constant(s) is None:
        yq = b.op("Cast", node.output[0], to=F32)
        shifted = b.op("Sub", yq, zf) if zf is not None else yq
        gs = _param_gradient(b, b.op("Neg", b.op("Div", b.mul(g, shifted), sf)), s, x, axis, block, what)
        gs = _back_to(b, gs, s) if gs is not None else None
    if zp and b.constant(zp) is None:
        gz = _param_gradient(b, g, zp, x, axis, block, what)
    return [gx, gs, gz][: len(node.input)]


@_passes_relevance
@register("DequantizeLinear")
def dequantize_linear(b, node, grads):
    # x = s * (q - z): d/dq = s, and for a run-time scale or zero point (the outputs of
    # DynamicQuantizeLinear, say) d/ds = q - z and d/dz = -s, summed over what they scale.
    q, s, zp = node.input[0], node.input[1], _input(node, 2)
    what = f"DequantizeLinear '{node.name}'"
    axis, block = int(attr(node, "axis", 1)), int(attr(node, "block_size", 0))
    sf = _param(b, s, q, axis, block, what, propagated=True)
    g = _to_f32(b, grads[0])
    gq = b.mul(g, sf)
    gs = gz = None
    if s and b.constant(s) is None:
        zf = _param(b, zp, q, axis, block, what, propagated=True)
        shifted = b.op("Sub", _to_f32(b, q), zf) if zf is not None else _to_f32(b, q)
        gs = _param_gradient(b, b.mul(g, shifted), s, q, axis, block, what)
        gs = _back_to(b, gs, s) if gs is not None else None
    if zp and b.constant(zp) is None:
        gz = _param_gradient(b, b.op("Neg", gq), zp, q, axis, block, what)
    return [gq, gs, gz][: len(node.input)]


@register("DynamicQuantizeLinear")
def dynamic_quantize_linear(b, node, grads):
    # s = (max(x, 0) - min(x, 0)) / 255, z = round(-min(x, 0) / s), y = round(x / s) + z
    # over the whole tensor. Straight through: y = x / s + z and z = -min(x, 0) / s, with
    # x / s read at the quantized point (y - z), so that the patterns that dequantize y
    # again (DequantizeLinear(y, s, z); MatMulInteger then a product with s) cancel the
    # scale's terms exactly, and an explained scale gets its exact gradient: nonzero at the
    # input's largest and smallest elements only.
    gy, gs, gz = (list(grads) + [None] * 3)[:3]
    if gy is None and gs is None and gz is None:
        return [None]
    x, y, s, z = node.input[0], node.output[0], node.output[1], node.output[2]
    f0, f1 = b.const(np.float32(0)), b.const(np.float32(1))
    xf = _to_f32(b, x)
    positive = b.op("Greater", s, f0)
    safe = b.op("Where", positive, s, f1)
    flat = b.op("Reshape", xf, b.ints([-1]))
    where = b.op("Range", b.const(np.array(0, np.int64), np.int64), b.op("Size", flat),
                 b.const(np.array(1, np.int64), np.int64))

    def first(kind, active):  # one-hot of the first largest / smallest element, where it moves s
        idx = b.op(kind, flat, axis=0, keepdims=1)
        hot = b.op("Cast", b.op("Equal", where, idx), to=F32)
        return b.mul(hot, b.op("Cast", active, to=F32))

    mx, mn = b.reduce("ReduceMax", flat, [0], keepdims=False), b.reduce("ReduceMin", flat, [0], keepdims=False)
    dmx = first("ArgMax", b.op("Greater", mx, f0))
    dmn = first("ArgMin", b.op("Less", mn, f0))
    ds = b.mul(b.op("Sub", dmx, dmn), b.const(np.float32(1 / 255)))
    mn0 = b.op("Min", mn, f0)
    dz = b.op("Add", b.op("Neg", b.op("Div", dmn, safe)), b.op("Div", b.mul(mn0, ds), b.mul(safe, safe)))
    total = None
    coef_s = coef_z = None
    if gy is not None:
        gy = b.op("Reshape", _to_f32(b, gy), b.ints([-1]))
        total = b.op("Div", gy, safe)
        yq = b.op("Reshape", b.op("Sub", b.op("Cast", y, to=F32), b.op("Cast", z, to=F32)), b.ints([-1]))
        coef_s = b.op("Neg", b.op("Div", b.reduce_sum(b.mul(gy, yq), [0], keepdims=False), safe))
        coef_z = b.reduce_sum(gy, [0], keepdims=False)
    if gs is not None:
        gs = b.op("Reshape", _to_f32(b, gs), b.ints([]))
        coef_s = gs if coef_s is None else b.add(coef_s, gs)
    if gz is not None:
        gz = b.op("Reshape", _to_f32(b, gz), b.ints([]))
        coef_z = gz if coef_z is None else b.add(coef_z, gz)
    for coef, d in ((coef_s, ds), (coef_z, dz)):
        if coef is not None:
            term = b.mul(coef, d)
            total = term if total is None else b.add(total, term)
    # s is 0 only where x is all zero: then nothing but s moves, and s moves by |dx| / 255.
    gx = b.op("Where", positive, total, b.mul(ds, coef_s) if coef_s is not None else b.mul(ds, f0))
    return [_back_to(b, b.op("Reshape", gx, b.shape_of(x)), x)]


# --------------------------------------------------------------------------- rounding


ROUNDING = ("Floor", "Ceil", "Round")
_ACCUMULATING = ("Add", "Sum", "Sub")


def quantizes(graph, node) -> bool:
    """Whether a Floor/Ceil/Round quantizes: every consumer casts it to an integer type that
    is added to a computed integer tensor (through reshapes), as onnx.quantize writes a
    float bias quantized at run time, Div(b, s_x s_w) -> Floor -> Cast int32 -> Add to the
    ConvInteger accumulator. By the straight-through convention such a rounding (and its
    Cast) passes the gradient, so the dynamic scale's terms cancel as for the weights; any
    other rounding is piecewise constant."""
    if node.op_type not in ROUNDING or node.domain not in ("", "ai.onnx"):
        return False
    casts = graph.consumers.get(node.output[0], [])
    if not casts:
        return False
    for c in casts:
        t = graph.elem_type(c.output[0]) if c.op_type == "Cast" else None
        if t is None or t in _FLOAT:
            return False
        todo, added = [c.output[0]], False
        while todo:
            name = todo.pop()
            users = graph.consumers.get(name, [])
            if not users:
                return False
            for u in users:
                if u.op_type in ("Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand"):
                    todo.append(u.output[0])
                    continue
                if u.op_type not in _ACCUMULATING:
                    return False
                others = [i for i in u.input if i and i != name]
                if not any(graph.elem_type(i) not in (None, *_FLOAT) and graph.constant(i) is None for i in others):
                    return False
                added = True
        if not added:
            return False
    return True


@register(*ROUNDING)
def rounding(b, node, grads):
    # Served only where the rounding quantizes (else compile takes it as constant): the
    # straight-through estimator, round(v) differentiates as v.
    if grads[0] is None or not quantizes(b.graph, node):
        return [None]
    return [_back_to(b, grads[0], node.input[0])]


# --------------------------------------------------------------------------- Cast


_float_cast = gradient_elementwise.cast


@_register("Cast", "CastLike")
def cast(b, node, grads):
    # Float to float: back to the input's type (fp16/bf16 islands). From an integer type:
    # the values pass unchanged, and the gradient of the integer tensor is float32 (the
    # int32 accumulator of MatMulInteger cast to float, a uint8 widened to int32). To an
    # integer type from a float: truncation, piecewise constant, no gradient (as Floor).
    x, y = node.input[0], node.output[0]
    tx, ty = _elem(b, x), _elem(b, y)
    rest = [None] * (len(node.input) - 1)
    if tx is not None and tx not in _FLOAT and grads[0] is not None:
        return [_to_f32(b, grads[0]) if ty in _FLOAT and ty != F32 else grads[0]] + rest
    producer = b.graph.producer.get(x) if hasattr(b.graph, "producer") else None
    if ty is not None and ty not in _FLOAT and grads[0] is not None and producer is not None \
            and quantizes(b.graph, producer):
        return [_back_to(b, grads[0], x)] + rest  # a quantizing rounding's integers (see `quantizes`)
    return _float_cast(b, node, grads)


_float_arithmetic = {"Add": gradient_elementwise.add, "Sum": gradient_elementwise.add,
                     "Sub": gradient_elementwise.sub, "Mul": gradient_elementwise.mul, "Neg": gradient_elementwise.neg}


def _integer(b, name: str) -> bool:
    t = _elem(b, name)
    return t is not None and t not in _FLOAT


@_register("Add", "Sum", "Sub", "Mul", "Neg")
def arithmetic(b, node, grads):
    # Integer arithmetic on quantized values (an int32 bias added to MatMulInteger's
    # accumulator before the Cast, as some converters write it) is exact arithmetic on
    # integers that stand for reals: its gradient is the float one, in float32. The float
    # rules skip non-float inputs, which would cut the path there.
    ins = [i for i in node.input if i]
    if not any(_integer(b, i) for i in ins):
        return _float_arithmetic[node.op_type](b, node, grads)
    g = _to_f32(b, grads[0])
    y = node.output[0]
    out_shape = b.shape(y)

    def wanted(name):
        return bool(name) and b.constant(name) is None and varies(b, name)

    res = []
    for k, name in enumerate(node.input):
        if not wanted(name):
            res.append(None)
            continue
        if node.op_type == "Neg" or (node.op_type == "Sub" and k == 1):
            gk = b.op("Neg", g)
        elif node.op_type == "Mul":
            gk = b.mul(g, _to_f32(b, node.input[1 - k]))
        else:
            gk = g
        res.append(_sum_to(b, gk, out_shape, name) if node.op_type != "Neg" else gk)
    return res


class _Float32View:
    """The builder seen by a float rule that runs in float32 for a float16/bfloat16 tensor
    (onnxruntime's CPU ScatterElements cannot add in float16)."""

    def __init__(self, b):
        self._b = b

    def np_dtype(self, name):
        d = self._b.np_dtype(name)
        return np.dtype(np.float32) if d.itemsize < 4 or d.kind != "f" else d

    def zeros_like(self, x):
        zero = onnx.numpy_helper.from_array(np.zeros(1, dtype=self.np_dtype(x)))
        return self._b.op("ConstantOfShape", self._b.shape_of(x), value=zero)

    def scalar_like(self, value, like):
        return self._b.const(value, self.np_dtype(like))

    def __getattr__(self, key):
        return getattr(self._b, key)


# Rules that scatter-add the gradient (ScatterElements/ScatterND with reduction "add"),
# which onnxruntime's CPU kernels cannot do in float16: in a float16/bfloat16 island they
# run in float32 and their gradients are cast back to each input's type.
_SCATTERING = ("MaxPool", "Gather", "GatherElements", "GatherND", "TopK")
_HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _in_float32(op, rule):
    def wrapped(b, node, grads):
        if _elem(b, node.input[0]) not in _HALF:
            return rule(b, node, grads)
        g32 = [None if g is None else b.op("Cast", g, to=F32) for g in grads]
        out = rule(_Float32View(b), node, g32)
        return [g if g is None or _elem(b, name) not in _HALF else b.op("Cast", g, to=_elem(b, name))
                for g, name in zip(out, list(node.input) + [""] * len(out))]

    wrapped.__name__ = f"{op.lower()}_in_float32"
    return wrapped


for _op in _SCATTERING:
    _rule = lookup(_op)
    if _rule is not None:
        _register(_op)(_in_float32(_op, _rule))


# --------------------------------------------------------------------------- integer linear ops


def _matmul_grads(b, node, g: str, a: str, bm: str, af, bf, what: str, trans_a=0, trans_b=0, alpha=1.0,
                  ranks=None):
    """Gradients of z = alpha * A' @ B' (A' = A or A^T, B' = B or B^T) with respect to the
    dequantized operands af, bf (numpy arrays for constants, emitted names otherwise) of
    forward tensors a and bm; None where not needed (a constant)."""
    def name(v):
        return b.const(v) if isinstance(v, np.ndarray) else v

    def rank_of(v, t):
        if isinstance(v, np.ndarray):
            return v.ndim
        s = b.shape(t)
        if s is None:
            raise ModelError(f"the gradient of {what} needs the ranks of its operands; give the model static "
                             "input ranks")
        return len(s)

    def swap(v, rank):
        if isinstance(v, np.ndarray):
            return np.ascontiguousarray(np.swapaxes(v, -1, -2))
        return b.op("Transpose", v, perm=list(range(rank - 2)) + [rank - 1, rank - 2])

    need_a, need_b = bool(a) and varies(b, a), bool(bm) and varies(b, bm)
    if not (need_a or need_b):
        return None, None
    if alpha != 1.0:
        g = b.mul(g, b.const(np.float32(alpha)))
    ra, rb = ranks or (rank_of(af, a), rank_of(bf, bm))
    if ra < 2 or rb < 2 or (rb != 2 and rb != ra) or (need_b and rb != ra):
        raise ModelError(f"the gradient of {what} supports a constant 2-D right operand or operands of equal "
                         f"rank >= 2, got ranks {ra} and {rb}")
    ga = gb = None
    if need_a:  # dA' = g @ B'^T
        ga = b.op("MatMul", g, name(bf) if trans_b else name(swap(bf, rb)))
        ga = swap(ga, ra) if trans_a else ga
    if need_b:  # dB' = A'^T @ g
        gb = b.op("MatMul", name(af) if trans_a else name(swap(af, ra)), g)
        gb = swap(gb, rb) if trans_b else gb
    return ga, gb


def _operand(b, q: str, s: str, zp: str, axis_of_vector: int, what: str, runtime_ok: bool = False):
    """The dequantized value of operand q: a numpy array for a constant, else an emitted
    float32 tensor. A 1-D scale/zero point is per row (axis -2) of a left operand and per
    column (axis -1) of a right one."""
    v = b.constant(q)
    sv = _const_param(b, s, what, 1.0) if (not s or b.constant(s) is not None) else None
    zv = _const_param(b, zp, what) if (not zp or b.constant(zp) is not None) else None
    if v is not None and sv is not None and zv is not None:
        return _dequantized_const(v, sv, zv, axis_of_vector)

    def vec(p, pv):
        if not p:
            return None
        if pv is not None:
            if pv.size == 1:
                return b.const(np.float32(pv.reshape(())))
            return b.const((pv.reshape(-1, 1) if axis_of_vector == -2 else pv.reshape(-1)).astype(np.float32))
        if not runtime_ok and varies(b, p):
            raise ModelError(f"{what} takes the quantization parameter '{p}' computed from the input; its "
                             "gradient is not supported for this operator")
        t = _to_f32(b, p)
        shape = b.shape(p)
        if shape is not None and len(shape) == 1 and shape[0] != 1 and axis_of_vector == -2:
            t = b.unsqueeze(t, [-1])
        return t

    sf = vec(s, sv) if s else b.const(np.float32(1))
    return _dequantize(b, q, sf, vec(zp, zv))


def _zero_point_gradient(b, g: str, zp: str, q: str, axis: int, what: str):
    if not zp or b.constant(zp) is not None or not varies(b, zp):
        return None
    shape = b.shape(zp)
    if shape is not None and (len(shape) == 0 or (len(shape) == 1 and shape[0] == 1)):
        return b.op("Reshape", b.op("Neg", b.op("ReduceSum", g, keepdims=0)), b.ints(list(shape)))
    rank = _rank(b, q, what)
    if shape is None or len(shape) != 1 or rank != 2:
        raise ModelError(f"the gradient of {what} with respect to its run-time zero point '{zp}' supports "
                         "per-tensor zero points and per-row/column ones of matrices only")
    keep = axis % rank
    return b.op("Neg", b.reduce_sum(g, [1 - keep], keepdims=False))


@register("MatMulInteger")
def matmul_integer(b, node, grads):
    # y = (A - a_zp) @ (B - b_zp) in int32: the float MatMul of the shifted operands.
    a, bm = node.input[0], node.input[1]
    what = f"MatMulInteger '{node.name}'"
    af = _operand(b, a, "", _input(node, 2), -2, what, runtime_ok=True)
    bf = _operand(b, bm, "", _input(node, 3), -1, what, runtime_ok=True)
    ga, gb = _matmul_grads(b, node, _to_f32(b, grads[0]), a, bm, af, bf, what)
    # A run-time zero point (DynamicQuantizeLinear's) is subtracted from every element it
    # applies to: its gradient is minus their gradients' sum.
    gaz = _zero_point_gradient(b, ga, _input(node, 2), a, -2, what) if ga is not None else None
    gbz = _zero_point_gradient(b, gb, _input(node, 3), bm, -1, what) if gb is not None else None
    return [ga, gb, gaz, gbz][: len(node.input)]


@register("QLinearMatMul")
def qlinear_matmul(b, node, grads):
    a, bm = node.input[0], node.input[3]
    what = f"QLinearMatMul '{node.name}'"
    for p in (node.input[1], node.input[6]):
        v = b.constant(p)
        if v is not None and v.size > 1:
            raise ModelError(f"{what} has a per-row scale '{p}'; only per-tensor a and y scales are supported")
    af = _operand(b, a, node.input[1], _input(node, 2), -2, what)
    bf = _operand(b, bm, node.input[4], _input(node, 5), -1, what)
    real = b.op("MatMul", af if isinstance(af, str) else b.const(af), bf if isinstance(bf, str) else b.const(bf))
    ys, yzp = _param(b, node.input[6], "", what=what), _param(b, _input(node, 7), "", what=what)
    g = _through_requantize(b, _to_f32(b, grads[0]), real, ys, yzp, _qtype(b, _input(node, 7), node.output[0]), what)
    ga, gb = _matmul_grads(b, node, g, a, bm, af, bf, what)
    ga = _scaled_back(b, ga, node.input[1], a, what) if ga is not None else None
    gb = _scaled_back(b, gb, node.input[4], bm, what, axis=-1) if gb is not None else None
    return [ga, None, None, gb, None, None, None, None]


def _scaled_back(b, g_real: str, s: str, q: str, what: str, axis: int = 1) -> str:
    """From the gradient at a dequantized operand s * (q - z) to the gradient at q: times s
    (a 1-D s is per `axis` of q)."""
    return b.mul(g_real, _param(b, s, q, axis, what=what))


@register("QGemm", domain=MS)
def qgemm(b, node, grads):
    # y = alpha A' B' + C (C int32 with scale a_scale * b_scale), requantized with
    # (y_scale, y_zp) when y_scale is given, else a float output.
    a, bm = node.input[0], node.input[3]
    what = f"QGemm '{node.name}'"
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    alpha = float(attr(node, "alpha", 1.0))
    af = _operand(b, a, node.input[1], node.input[2], -1 if ta else -2, what)
    bf = _operand(b, bm, node.input[4], _input(node, 5), -2 if tb else -1, what)
    g = _to_f32(b, grads[0])
    ys = _input(node, 7)
    if ys:
        real = b.op("Gemm", af if isinstance(af, str) else b.const(af), bf if isinstance(bf, str) else b.const(bf),
                    transA=ta, transB=tb, alpha=alpha)
        c = _input(node, 6)
        if c:
            real = b.add(real, b.mul(_to_f32(b, c), b.mul(_param(b, node.input[1], "", what=what),
                                                           _param(b, node.input[4], "", what=what))))
        yzp = _input(node, 8)
        g = _through_requantize(b, g, real, _param(b, ys, "", what=what), _param(b, yzp, "", what=what),
                                _qtype(b, yzp, node.output[0], a), what)
    ga, gb = _matmul_grads(b, node, g, a, bm, af, bf, what, ta, tb, alpha, ranks=(2, 2))  # Gemm: matrices
    ga = _scaled_back(b, ga, node.input[1], a, what, axis=1 if ta else 0) if ga is not None else None
    gb = _scaled_back(b, gb, node.input[4], bm, what, axis=0 if tb else 1) if gb is not None else None
    return [ga, None, None, gb, None, None, None, None, None][: len(node.input)]


def _conv_weight(b, node, w: str, ws: str, wzp: str, what: str) -> np.ndarray:
    v = b.constant(w)
    if v is None:
        raise ModelError(f"the gradient of {what} needs a constant weight; '{w}' is computed at run time")
    return _dequantized_const(v, _const_param(b, ws, what, 1.0), _const_param(b, wzp, what), 0)


@register("ConvInteger")
def conv_integer(b, node, grads):
    # y = Conv(x - x_zp, w - w_zp) in int32: the float Conv of the shifted operands.
    what = f"ConvInteger '{node.name}'"
    wf = _conv_weight(b, node, node.input[1], "", _input(node, 3), what)
    gx = _conv_adjoint(b, node, _to_f32(b, grads[0]), wf, what)
    # x - x_zp is what is convolved (onnxruntime pads with the zero point: padding is 0 after
    # the shift), so a run-time zero point gets minus the sum of x's gradient.
    gz = _zero_point_gradient(b, gx, _input(node, 2), node.input[0], 0, what)
    return [gx, None, gz, None][: len(node.input)]


@register("QLinearConv")
def qlinear_conv(b, node, grads):
    # real = Conv(xs (x - x_zp), ws (w - w_zp)) + xs ws B, requantized with (ys, y_zp).
    x = node.input[0]
    what = f"QLinearConv '{node.name}'"
    xs, xzp, ys, yzp = node.input[1], node.input[2], node.input[6], _input(node, 7)
    wf = _conv_weight(b, node, node.input[3], node.input[4], node.input[5], what)
    xsf = _param(b, xs, x, what=what)
    xd = _dequantize(b, x, xsf, _param(b, xzp, x, what=what))
    real = b.op("Conv", xd, b.const(wf), **{k: v for k, v in attrs(node).items() if k in _CONV_ATTRS})
    bias = _input(node, 8)
    if bias:
        bv = b.constant(bias)
        if bv is None:
            raise ModelError(f"the gradient of {what} needs a constant bias; '{bias}' is computed at run time")
        scale = _const_param(b, xs, what, 1.0).reshape(()) * _const_param(b, node.input[4], what, 1.0).reshape(-1)
        real = b.add(real, b.const((bv * scale).astype(np.float32).reshape(-1, *([1] * (wf.ndim - 2)))))
    g = _through_requantize(b, _to_f32(b, grads[0]), real, _param(b, ys, "", what=what),
                            _param(b, yzp, "", what=what), _qtype(b, yzp, node.output[0], x), what)
    gx = _conv_adjoint(b, node, g, wf, what) if varies(b, x) else None
    return [b.mul(gx, xsf) if gx is not None else None] + [None] * (len(node.input) - 1)


def _qlinear_operand(b, node, i: int, what: str):
    """(forward tensor, float32 scale, dequantized value) of the quantized input that starts
    at node.input[i] as (q, scale, zero point)."""
    q, s, zp = node.input[i], node.input[i + 1], _input(node, i + 2)
    sf = _param(b, s, q, what=what)
    return q, sf, _dequantize(b, q, sf, _param(b, zp, q, what=what))


def _qlinear_out(b, node, g: str, real: str, i: int, what: str, like: str) -> str:
    """Gradient at the real result of a QLinear op whose output (scale, zero point) are
    node.input[i], node.input[i + 1]."""
    ys, yzp = node.input[i], _input(node, i + 1)
    return _through_requantize(b, _to_f32(b, g), real, _param(b, ys, "", what=what), _param(b, yzp, "", what=what),
                               _qtype(b, yzp, node.output[0], like), what)


@register("QLinearAdd", "QLinearMul", domain=MS)
def qlinear_add_mul(b, node, grads):
    # C = requantize(A_real + B_real) or requantize(A_real * B_real), broadcasting.
    what = f"{node.op_type} '{node.name}'"
    a, asf, ad = _qlinear_operand(b, node, 0, what)
    c, csf, cd = _qlinear_operand(b, node, 3, what)
    mul = node.op_type == "QLinearMul"
    real = b.op("Mul" if mul else "Add", ad, cd)
    g = _qlinear_out(b, node, grads[0], real, 6, what, a)
    out_shape = _out_shape(b, node, a, c)
    out = [None] * len(node.input)
    for j, (q, sf, other) in ((0, (a, asf, cd)), (3, (c, csf, ad))):
        if varies(b, q):
            gj = b.mul(g, other) if mul else g
            out[j] = b.mul(_sum_to(b, gj, out_shape, q), sf)
    return out


@register("QLinearSigmoid", "QLinearLeakyRelu", domain=MS)
def qlinear_activation(b, node, grads):
    what = f"{node.op_type} '{node.name}'"
    x, xsf, xd = _qlinear_operand(b, node, 0, what)
    if node.op_type == "QLinearSigmoid":
        real = b.op("Sigmoid", xd)
        local = b.mul(real, b.op("Sub", b.const(np.float32(1)), real))
    else:
        alpha = float(attr(node, "alpha", 0.01))
        real = b.op("LeakyRelu", xd, alpha=alpha)
        local = b.op("Where", b.op("Greater", xd, b.const(np.float32(0))), b.const(np.float32(1)),
                     b.const(np.float32(alpha)))
    g = _qlinear_out(b, node, grads[0], real, 3, what, x)
    return [b.mul(b.mul(g, local), xsf)] + [None] * (len(node.input) - 1)


@register("QLinearGlobalAveragePool", domain=MS)
def qlinear_global_average_pool(b, node, grads):
    # y = mean over the spatial axes (axis 1.. or 1..-1 with channels_last): each input
    # element gets g / (its count), the count from the sizes at run time.
    what = f"QLinearGlobalAveragePool '{node.name}'"
    x, xsf, xd = _qlinear_operand(b, node, 0, what)
    last = bool(attr(node, "channels_last", 0))
    rank = _rank(b, x, what) if b.shape(x) is not None else 4
    axes = list(range(1, rank - 1)) if last else list(range(2, rank))
    real = b.reduce("ReduceMean", xd, axes, keepdims=True)
    g = _qlinear_out(b, node, grads[0], real, 3, what, x)
    count = b.op("Div", b.op("Cast", b.op("Size", x), to=F32), b.op("Cast", b.op("Size", real), to=F32))
    return [b.mul(b.op("Div", b.op("Expand", g, b.shape_of(x)), count), xsf)] + [None] * (len(node.input) - 1)


@register("QLinearAveragePool", domain=MS)
def qlinear_average_pool(b, node, grads):
    what = f"QLinearAveragePool '{node.name}'"
    if attr(node, "channels_last", 0):
        raise ModelError(f"the gradient of {what} supports channels_last=0 only")
    x, xsf, xd = _qlinear_operand(b, node, 0, what)
    pool_attrs = {k: v for k, v in attrs(node).items() if k in _POOL_ATTRS}
    real = b.op("AveragePool", xd, **pool_attrs)
    g = _qlinear_out(b, node, grads[0], real, 3, what, x)
    shape = b.shape(x)
    if shape is not None and len(shape) > 2 and all(isinstance(d, int) for d in shape[2:]):
        pool = _as_float_node(node, "AveragePool", [x], _POOL_ATTRS)
        gx = gradient_pool.average_pool(_FloatView(b, {}), pool, [g])[0]
    else:  # after other com.microsoft operators, whose outputs onnx's shape inference cannot type
        gx = _average_pool_at_run_time(b, node, g, xd, what)
    return [b.mul(gx, xsf)] + [None] * (len(node.input) - 1)


@register("QLinearConcat", domain=MS)
def qlinear_concat(b, node, grads):
    # Y = requantize(Concat(X_i real)); inputs: Y_scale, Y_zp, then (X, scale, zp) triples.
    what = f"QLinearConcat '{node.name}'"
    axis = int(attr(node, "axis"))
    parts = [_qlinear_operand(b, node, i, what) for i in range(2, len(node.input), 3)]
    real = b.op("Concat", *[p[2] for p in parts], axis=axis)
    g = _qlinear_out(b, node, grads[0], real, 0, what, parts[0][0])
    out = [None] * len(node.input)
    start = b.ints([0])
    axes = b.ints([axis])
    for k, (q, sf, _) in enumerate(parts):
        size = b.op("Reshape", b.op("Gather", b.shape_of(q), b.ints([axis])), b.ints([1]))
        end = b.add(start, size)
        if varies(b, q):
            out[2 + 3 * k] = b.mul(b.op("Slice", g, start, end, axes), sf)
        start = end
    return out


@register("DynamicQuantizeMatMul", domain=MS)
def dynamic_quantize_matmul(b, node, grads):
    # Y = A @ (b_scale (B - b_zp)) + bias with A (float) quantized on the fly: the float
    # MatMul with the dequantized weight.
    a, bm = node.input[0], node.input[1]
    what = f"DynamicQuantizeMatMul '{node.name}'"
    bf = _operand(b, bm, node.input[2], _input(node, 3), -1, what)
    if not isinstance(bf, np.ndarray):
        raise ModelError(f"the gradient of {what} needs a constant weight '{bm}'")
    ga = b.op("MatMul", _to_f32(b, grads[0]), b.const(np.ascontiguousarray(bf.T)))
    return [_back_to(b, ga, a)] + [None] * (len(node.input) - 1)


@register("DynamicQuantizeLSTM", domain=MS)
def dynamic_quantize_lstm(b, node, grads):
    # An LSTM whose W [D, I, 4H] and R [D, H, 4H] are int8 with a scale and zero point per
    # direction (or per direction and column), X and h quantized on the fly (passed
    # straight through): the LSTM gradient with the dequantized weights, in the LSTM
    # operator's own layout [D, 4H, I] and [D, 4H, H].
    from . import recurrent

    what = f"DynamicQuantizeLSTM '{node.name}'"
    ins = list(node.input) + [""] * (12 - len(node.input))

    def weight(q, s, z):
        v = b.constant(q)
        if v is None:
            raise ModelError(f"the gradient of {what} needs constant weights; '{q}' is computed at run time")
        sv, zv = _const_param(b, s, what, 1.0), _const_param(b, z, what)
        shape = (-1, 1, v.shape[2]) if sv.size == v.shape[0] * v.shape[2] and sv.size > v.shape[0] else (-1, 1, 1)
        zr, sr = zv.reshape(shape if zv.size > 1 else ()), sv.reshape(shape if sv.size > 1 else ())
        wd = (v.astype(np.float64) - zr) * sr
        return np.ascontiguousarray(wd.transpose(0, 2, 1)).astype(np.float32)

    wd, rd = weight(ins[1], ins[8], ins[9]), weight(ins[2], ins[10], ins[11])
    wname, rname = b.const(wd), b.const(rd)
    lstm = _as_float_node(node, "LSTM", [ins[0], wname, rname] + ins[3:8])
    out = recurrent.recurrent_gradient(_FloatView(b, {wname: wd, rname: rd}), lstm, grads)
    return list(out[:8]) + [None] * (len(node.input) - min(len(out), 8))


@register("QAttention", domain=MS)
def qattention(b, node, grads):
    # Self-attention with quantized input and weight: QKV = X_d W_d + bias, per head
    # P = softmax(scale Q K^T + mask), O = P V. Recomputed in float from the dequantized
    # input, then differentiated (the input's rounding is passed straight through).
    what = f"QAttention '{node.name}'"
    ins = list(node.input) + [""] * (9 - len(node.input))
    x, w, bias, xs, ws, mask, xzp, wzp, past = ins
    if past or attr(node, "do_rotary", 0) or attr(node, "past_present_share_buffer", 0):
        raise ModelError(f"the gradient of {what} supports no past state and no rotary embedding")
    if len(grads) > 1 and grads[1] is not None:
        raise ModelError(f"the gradient of {what} does not differentiate its 'present' output")
    wv = b.constant(w)
    if wv is None or b.constant(bias) is None:
        raise ModelError(f"the gradient of {what} needs a constant weight and bias")
    heads = int(attr(node, "num_heads"))
    hidden = wv.shape[1] // 3
    size = hidden // heads
    scale = float(attr(node, "scale", 0.0) or 1.0 / np.sqrt(size))
    fill = float(attr(node, "mask_filter_value", -10000.0))
    wd = _dequantized_const(wv, _const_param(b, ws, what, 1.0), _const_param(b, wzp, what), 1)
    xsf = _param(b, xs, x, what=what, propagated=True)
    xzf = _param(b, xzp, x, what=what, propagated=True)
    xd = _dequantize(b, x, xsf, xzf)
    qkv = b.add(b.op("MatMul", xd, b.const(wd)), b.const(np.asarray(b.constant(bias), np.float32)))

    def per_head(t):  # (B, S, hidden) -> (B, heads, S, size)
        return b.op("Transpose", b.op("Reshape", t, b.ints([0, 0, heads, size])), perm=[0, 2, 1, 3])

    def split(t, k):
        return per_head(b.op("Slice", t, b.ints([k * hidden]), b.ints([(k + 1) * hidden]), b.ints([-1])))

    def merge(t):
        return b.op("Reshape", b.op("Transpose", t, perm=[0, 2, 1, 3]), b.ints([0, 0, hidden]))

    def swap(t):
        return b.op("Transpose", t, perm=[0, 1, 3, 2])

    q, k, v = split(qkv, 0), split(qkv, 1), split(qkv, 2)
    scores = b.mul(b.op("MatMul", q, swap(k)), b.const(np.float32(scale)))
    steps = b.op("Slice", b.shape_of(x), b.ints([1]), b.ints([2]))
    positions = b.op("Range", b.const(np.array(0, np.int64), np.int64), b.squeeze(steps, [0]),
                     b.const(np.array(1, np.int64), np.int64))
    zero, filled = b.const(np.float32(0)), b.const(np.float32(fill))
    if mask:
        mshape = b.shape(mask)
        if mshape is None:
            raise ModelError(f"the gradient of {what} needs the rank of its mask_index '{mask}'")
        if len(mshape) == 2:  # (batch, steps) of 1 (attend) and 0 (masked)
            keep = b.op("Cast", mask, to=F32)
            bias4 = b.unsqueeze(b.mul(b.op("Sub", b.const(np.float32(1)), keep), filled), [1, 2])
        elif len(mshape) == 1:  # end positions per sample, or ends then starts
            batch = b.op("Slice", b.shape_of(x), b.ints([0]), b.ints([1]))
            idx = b.op("Cast", mask, to=TensorProto.INT64)
            ends = b.unsqueeze(b.op("Slice", idx, b.ints([0]), batch), [1])
            valid = b.op("Less", b.unsqueeze(positions, [0]), ends)
            two = b.mul(batch, b.ints([2]))
            if isinstance(mshape[0], int) and isinstance(b.shape(x)[0], int) and mshape[0] == 2 * b.shape(x)[0]:
                starts = b.unsqueeze(b.op("Slice", idx, batch, two), [1])
                valid = b.op("And", valid, b.op("Not", b.op("Less", b.unsqueeze(positions, [0]), starts)))
            elif not (isinstance(mshape[0], int) and isinstance(b.shape(x)[0], int) and mshape[0] == b.shape(x)[0]):
                raise ModelError(f"the gradient of {what} needs to know whether mask_index '{mask}' holds ends or "
                                 "ends and starts: give the model a static batch size")
            bias4 = b.unsqueeze(b.op("Where", valid, zero, filled), [1, 2])
        else:
            raise ModelError(f"the gradient of {what} supports 1-D and 2-D mask_index, not rank {len(mshape)}")
        scores = b.add(scores, bias4)
    if attr(node, "unidirectional", 0):
        later = b.op("Greater", b.unsqueeze(positions, [0]), b.unsqueeze(positions, [1]))
        scores = b.add(scores, b.op("Where", later, filled, zero))
    p = b.op("Softmax", scores, axis=-1)
    go = per_head(_to_f32(b, grads[0]))
    gv = b.op("MatMul", swap(p), go)
    gp = b.op("MatMul", go, swap(v))
    gs = b.mul(b.mul(p, b.op("Sub", gp, b.reduce_sum(b.mul(gp, p), [-1]))), b.const(np.float32(scale)))
    gq, gk = b.op("MatMul", gs, k), b.op("MatMul", swap(gs), q)
    gqkv = b.op("Concat", merge(gq), merge(gk), merge(gv), axis=-1)
    gxd = b.op("MatMul", gqkv, b.const(np.ascontiguousarray(wd.T)))
    out = [b.mul(gxd, xsf)] + [None] * (len(node.input) - 1)
    # x_d = s (x - z): a run-time input scale and zero point (DynamicQuantizeLinear's) get
    # sum(g (x - z)) and -sum(g s).
    shifted = b.op("Sub", _to_f32(b, x), xzf) if xzf is not None else _to_f32(b, x)
    out[3] = _param_gradient(b, b.mul(gxd, shifted), xs, x, 1, 0, what)
    if xzp:
        out[6] = _param_gradient(b, b.op("Neg", out[0]), xzp, x, 1, 0, what)
    return out


_QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
              "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearSigmoid",
              "QLinearLeakyRelu", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat",
              "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "QAttention"}
