"""Relevance rules for transformers: AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et
al., ICML 2022), family "attnlrp".

The quantity propagated is relevance. Every rule here is one of four forms:
- linear in its dependent operands (linear layers, a product of two computed tensors, a
  scaling): R_k = x_k * VJP_k(R / stabilise(y)) / N for the N operands that depend on the
  attributed tensor -- the epsilon rule for one operand (a weight's bias absorbs its share,
  as in lrp.epsilon), the uniform-then-epsilon rule for two (each operand gets half);
- Softmax by its first-order Taylor decomposition at its input, R_x = x (R - s sum R);
- LayerNorm/RMSNorm with the variance held constant: linear in x (the centring, then a
  per-row scale), the epsilon rule on that linear map;
- element-wise non-linearities by the identity rule (R_x = R), or with `activation=
  "gradient"` by gradient x input, R_x = x f'(x) R / stabilise(f(x)).
Index-moving operators (reshapes, slices, gathers, concatenation) move relevance with the
elements (their gradient rule); residual sums are split in proportion.

The rules divide by stabilise(z) where the published rules do (lxt's explicit functions):
at the output of each linear layer (its bias included), residual sum and product of two
computed tensors. Where ONNX splits one of those maps into several nodes -- a MatMul and
its bias Add, attention scores scaled by a constant, masked by an Add and fed to the
Softmax -- the inner nodes do not divide again: a rule that gives its operand x the
relevance x * v records v (`Factored`), and the rule of x's producer takes R / stabilise(x)
as v. That saves four element-wise passes per split, most of them over the large
(batch, heads, queries, keys) attention tensors.
"""

from __future__ import annotations

import weakref

import numpy as np

from .. import groups
from ..errors import ModelError
from .base import attr, lookup, register
from .lrp import EPSILON, divide, pool_norm, stabilise

FAMILY = "attnlrp"

# Element-wise functions of one tensor: the identity rule.
NONLINEAR = (
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Swish", "Clip",
)
# Operators that only move, copy or select elements: relevance moves with them.
MOVING = (
    "Reshape", "Transpose", "Slice", "Gather", "GatherElements", "GatherND", "Concat", "Split", "Squeeze",
    "Unsqueeze", "Expand", "Flatten", "Identity", "Dropout", "Cast", "Pad", "Tile", "Where", "MaxPool",
    "ReduceMax", "GlobalMaxPool", "DepthToSpace", "SpaceToDepth", "CastLike",
)
PRODUCTS = ("MatMul", "Gemm", "Mul", "Div", "Einsum", "Conv", "ConvTranspose")
SUMS = ("Add", "Sub", "Sum")
POOLS = ("ReduceMean", "ReduceSum", "GlobalAveragePool", "AveragePool")


_DATA: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _data(graph) -> set:
    """Tensors computed from the model's data (its float inputs, its embedding outputs)."""
    if graph not in _DATA:
        from ..compile import _depends_on
        from ..graph import find_embeddings

        sources = [i for i in graph.inputs if graph.is_float(i)] + list(find_embeddings(graph))
        _DATA[graph] = _depends_on(graph, sources)
    return _DATA[graph]


def dependent(b, node) -> list:
    """Indices of the node's inputs that carry the data: computed from the attributed
    tensor or from the model's data. A product's shares do not change with the tensor
    attributed (a layer inside the model), and a mask computed from integer inputs alone
    takes none."""
    deps, data = b.depends, _data(b.graph)
    return [k for k, i in enumerate(node.input)
            if i and b.constant(i) is None and (not deps or i in deps or i in data)]


class Factored:
    """Relevance tensors the rules emitted as x * v inside one map: relevance name -> (x, v),
    x a forward tensor and v shaped like x. Kept per builder."""

    _by_builder: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self):
        self.factors: dict = {}

    @classmethod
    def of(cls, b) -> "Factored":
        if b not in cls._by_builder:
            cls._by_builder[b] = cls()
        return cls._by_builder[b]


def product(b, x: str, v: str) -> str:
    """The relevance x * v, recorded as such (v shaped like x)."""
    r = b.mul(x, v)
    Factored.of(b).factors[r] = (x, v)
    return r


def factor(b, r: str, x: str) -> str | None:
    """v where relevance r was recorded as x * v, else None. (A tensor read by several
    nodes gets the compiler's Sum of their relevances, never recorded: it is divided.)"""
    hit = Factored.of(b).factors.get(r)
    return hit[1] if hit is not None and hit[0] == x else None


def over(b, r: str, z: str, epsilon: float, inner: bool) -> str:
    """R / stabilise(z) for the rule of a node with output z. An inner node of a map (a
    linear layer with its bias added after it, a scaling or mask of attention scores:
    `inner`, one operand carrying the data, the others constant or data-free) takes the
    factor v where R = z * v was recorded: the division is the map's, at its output."""
    v = factor(b, r, z) if inner else None
    return divide(b, r, z, epsilon) if v is None else v


def _gradient(b, node, s: str) -> list:
    rule = lookup(node, "gradient")
    if rule is None:
        raise ModelError(f"no gradient rule for {node.op_type}: the relevance rules need it as the adjoint")
    return list(rule(b, node, [s])) + [None] * len(node.input)


def linear_rule(b, node, grads, epsilon: float = EPSILON, constant=(), **_):
    """Epsilon rule on a map linear in each dependent operand (the others held fixed):
    R_k = x_k * VJP_k(R / stabilise(y)) / N over the N dependent operands not in `constant`;
    N = 2 is AttnLRP's uniform rule for a product of two computed tensors."""
    idx = [k for k in dependent(b, node) if k not in constant]
    if node.op_type == "Div" and 1 in idx:
        raise ModelError(f"Div '{node.name}' divides by a tensor computed from the attributed one; the relevance "
                         "rules for transformers handle such quotients inside a recognised group (a decomposed "
                         "LayerNorm or activation) only: explain a layer after it (layer=) or use a gradient method")
    if node.op_type in ("Conv", "ConvTranspose", "Gemm") and idx not in ([0], []):
        raise ModelError(f"{node.op_type} '{node.name}' has a computed weight; its relevance rule needs a constant one")
    out = [None] * len(node.input)
    if not idx:
        return out
    s = over(b, grads[0], node.output[0], epsilon, inner=len(idx) == 1 and not constant)
    if len(idx) > 1:
        s = b.mul(s, b.scalar_like(1.0 / len(idx), node.output[0]))
    vjp = _gradient(b, node, s)
    for k in idx:
        if vjp[k] is not None:
            out[k] = b.mul(node.input[k], vjp[k])
    return out


def sum_rule(b, node, grads, epsilon: float = EPSILON, **_):
    """Proportional split of a sum (residual connections, biases): R_k = x_k R / stabilise(y)
    for the operands that carry the data; constants (biases) and tensors computed from
    integer inputs alone (an attention mask) absorb the rest. An operand broadcast in the
    sum is constant along the broadcast axes, so its share is x_k times the summed ratio."""
    y = node.output[0]
    deps = set(dependent(b, node))
    s = over(b, grads[0], y, epsilon, inner=len(deps) == 1)
    out = []
    for k, x in enumerate(node.input):
        if k not in deps:
            out.append(None)
            continue
        v = s if b.shape(x) == b.shape(y) else b.unbroadcast(s, y, x)
        v = b.op("Neg", v) if node.op_type == "Sub" and k == 1 else v
        out.append(product(b, x, v) if len(deps) == 1 else b.mul(x, v))
    return out


def softmax_rule(b, node, grads, **_):
    """Taylor decomposition at the input: R_x = x * (R - s * sum R) over the softmax axes.
    Masked scores (-inf) hold no relevance."""
    x, s, r = node.input[0], node.output[0], grads[0]
    rank = b.rank(x)
    axis = int(attr(node, "axis", -1 if b.opset >= 13 else 1))
    axis = axis % rank
    # Before opset 13 softmax normalises over all axes from `axis` on.
    axes = [axis] if b.opset >= 13 else list(range(axis, rank))
    total = b.reduce_sum(r, axes, keepdims=True)
    inner = b.op("Sub", r, b.mul(s, total))
    # Masked scores (-inf) hold none, and so does a fully masked row, whose softmax is NaN
    # (SDPA exports then zero it by a Where): all its scores are -inf.
    masked, zero = b.op("IsInf", x), b.scalar_like(0.0, x)
    v = b.op("Where", masked, zero, inner)
    r_x = b.op("Where", masked, zero, b.mul(x, inner))
    Factored.of(b).factors[r_x] = (x, v)
    return [r_x]


def _centred_relevance(b, x: str, r_centred: str, centred: str, axes, epsilon: float) -> str:
    """x * C^T (R / stabilise(x - mean)) with C the centring map over `axes` (C^T = C)."""
    c = divide(b, r_centred, centred, epsilon)
    return b.mul(x, b.op("Sub", c, b.reduce("ReduceMean", c, axes, keepdims=True)))


def layernorm_rule(b, node, grads, epsilon: float = EPSILON, **_):
    """LayerNormalization with the variance held constant: y = scale (x - mean) / sigma + B is
    linear in x. The affine part keeps R (y - B) / y (the bias absorbs the rest, as the
    epsilon rule), the per-row 1/sigma and the scale pass it, the centring takes the epsilon
    rule."""
    x, y, r = node.input[0], node.output[0], grads[0]
    rank = b.rank(x)
    axis = int(attr(node, "axis", -1)) % rank
    axes = list(range(axis, rank))
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None:
        r = b.mul(r, b.op("Div", b.op("Sub", y, bias), stabilise(b, y, epsilon)))
    centred = b.op("Sub", x, b.reduce("ReduceMean", x, axes, keepdims=True))
    return [_centred_relevance(b, x, r, centred, axes, epsilon)] + [None] * (len(node.input) - 1)


def rmsnorm_rule(b, node, grads, **_):
    """RMSNormalization with the mean square held constant: a per-row scale, R_x = R."""
    return [grads[0]] + [None] * (len(node.input) - 1)


def identity_rule(b, node, grads, **_):
    """Element-wise non-linearity: relevance passes unchanged to its input."""
    return [grads[0]] + [None] * (len(node.input) - 1)


def group_rule(b, node, grads, group: groups.Group, epsilon: float = EPSILON, activation: str = "identity", **_):
    """A decomposed activation or normalisation found by `onnxplain.groups`, as one node."""
    r = grads[0]
    if group.kind == "layernorm":
        x = group.input
        axes = [b.rank(x) - 1]
        centred = b.op("Sub", x, b.reduce("ReduceMean", x, axes, keepdims=True))
        return [_centred_relevance(b, x, r, centred, axes, epsilon)]
    if group.kind == "rmsnorm":
        return [r]
    if not group.elementwise:
        raise ModelError(f"the normalisation ending at '{group.output}' is neither a LayerNorm nor an RMSNorm")
    if activation == "gradient":
        from .deeplift import group_gradient

        return [b.mul(group.input, group_gradient(b, group, divide(b, r, group.output, epsilon)))]
    return [r]


def activation_gradient(b, node, grads, epsilon: float = EPSILON, **_):
    """Gradient x input through an element-wise function: R_x = x f'(x) R / stabilise(f(x))."""
    s = divide(b, grads[0], node.output[0], epsilon)
    g = _gradient(b, node, s)[0]
    return [b.mul(node.input[0], g)] + [None] * (len(node.input) - 1)


register(*PRODUCTS, family=FAMILY)(linear_rule)
register("Softmax", family=FAMILY)(softmax_rule)
register("LayerNormalization", family=FAMILY)(layernorm_rule)
register("RMSNormalization", family=FAMILY)(rmsnorm_rule)
register(*NONLINEAR, family=FAMILY)(identity_rule)
register(*SUMS, family=FAMILY)(sum_rule)
register(*POOLS, family=FAMILY)(pool_norm)


# ----------------------------------------------------------------------------- CP-LRP's gamma per layer
def parse_gamma(value):
    """CP-LRP's gamma= as given: a number (every linear layer), a list (one per transformer
    block, in order) or a dict {layer name: gamma}; on the command line a number, a comma
    list or JSON. Returns a float, a tuple of floats or a dict of floats."""
    import json

    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "[{":
            value = json.loads(text)
        elif "," in text:
            value = [v for v in text.split(",") if v.strip()]
        else:
            value = float(text)
    if isinstance(value, dict):
        out = {str(k): float(v) for k, v in value.items()}
    elif isinstance(value, (list, tuple, np.ndarray)):
        out = tuple(float(v) for v in value)
        if not out:
            raise ValueError("an empty list of gammas")
    else:
        out = float(value)
    values = out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else (out,)
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise ValueError("every gamma must be a finite number >= 0")
    return out


def check_gamma(value) -> str | None:
    try:
        parse_gamma(value)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def module_path(node) -> str:
    """The torch module a node was exported from, as a dotted path ('blocks.0.qkv'): from
    dynamo's name scopes, or from a TorchScript node name ('/blocks.0/qkv/MatMul'); '' if
    neither tells."""
    import json

    for prop in getattr(node, "metadata_props", ()):
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [str(v) for v in json.loads(prop.value.replace("'", '"')) if v]
            except ValueError:
                break
            path = ""
            for scope in scopes:  # the innermost module: each scope extends the one before
                if not path or scope.startswith(path + "."):
                    path = scope
                else:
                    break
            return path
    name = node.name or ""
    if name.startswith("/") and name.count("/") >= 2:
        return ".".join(p for p in name.strip("/").split("/")[:-1] if p)
    return ""


def _blocks(paths: dict) -> tuple[str, dict]:
    """The module list holding the transformer blocks ('blocks', 'bert.encoder.layer') and
    each layer's block index, read off the module paths: the prefix most layers share
    before an integer component."""
    import collections
    import re

    found = {}
    for name, path in paths.items():
        m = re.match(r"^(.*?)\.?(\d+)(\.|$)", path) if path else None
        if m:
            found[name] = (m.group(1), int(m.group(2)))
    if not found:
        return "", {}
    container = collections.Counter(c for c, _ in found.values()).most_common(1)[0][0]
    return container, {n: i for n, (c, i) in found.items() if c == container}


def layer_gammas(graph, gamma, layers) -> dict:
    """{node name: gamma} for the linear layers `layers` (nodes with a constant weight):
    a number applies to all; a list gives block k's layers gamma[k] and the layers outside
    the blocks (patch embedding, head) the epsilon rule; a dict names layers by module path
    (a key selects that module and the modules under it, the longest key winning), by
    node name or by weight name. A list whose length is not the number of blocks, or a key
    that selects no layer, is an error (never silently the epsilon rule)."""
    from ..errors import OptionError

    gamma = parse_gamma(gamma)
    if isinstance(gamma, float):
        return {n.name: gamma for n in layers}
    paths = {n.name: module_path(n) for n in layers}
    if isinstance(gamma, tuple):
        container, index = _blocks(paths)
        blocks = sorted(set(index.values()))
        if len(blocks) != len(gamma):
            where = (f"{len(blocks)} blocks under '{container}' ({', '.join(f'{container}.{i}' for i in blocks)})"
                     if blocks else "no blocks (no layer's module path has an index)")
            raise OptionError(f"gamma= lists {len(gamma)} values, one per transformer block; the model has {where}. "
                              "Give that many, or a dict {layer name: gamma}")
        rank = {b: k for k, b in enumerate(blocks)}
        return {n: gamma[rank[index[n]]] for n in paths if n in index}
    out, best, unused = {}, {}, set(gamma)
    for node in layers:
        names = [node.name] + [i for i in node.input[1:] if i]
        path = paths[node.name]
        for key, g in gamma.items():
            if path and (path == key or path.startswith(key + ".")):
                score = len(key) + 1000  # a module path match is the most specific kind
            elif any(key in n for n in names):
                score = len(key)
            else:
                continue
            unused.discard(key)
            if score > best.get(node.name, -1):
                best[node.name], out[node.name] = score, g
    if unused:
        known = sorted({p for p in paths.values() if p}) or sorted(paths)
        raise OptionError(f"gamma= names {', '.join(sorted(unused))}, which select no linear layer; layers: "
                          + ", ".join(known[:12]) + (" ..." if len(known) > 12 else ""))
    return out


def attention_probabilities(graph, name: str, depth: int = 8) -> str | None:
    """The Softmax output that tensor `name` is (through reshapes, casts, dropout, masking
    by a Where), or None."""
    for _ in range(depth):
        node = graph.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Softmax":
            return node.output[0]
        if node.op_type in ("Reshape", "Transpose", "Cast", "Dropout", "Identity", "Squeeze", "Unsqueeze", "Expand"):
            name = node.input[0]
        elif node.op_type == "Where":
            # A mask's Where (zeroing fully masked rows): the branch that is the softmax.
            found = [attention_probabilities(graph, i, depth - 1) for i in node.input[1:]
                     if graph.constant(i) is None]
            found = [f for f in found if f is not None]
            return found[0] if len(found) == 1 else None
        else:
            return None
    return None


def value_product(graph, node) -> int | None:
    """For a MatMul (or two-operand Einsum) of attention probabilities with values: the
    probabilities' index."""
    if node.op_type not in ("MatMul", "Einsum") or len(node.input) != 2:
        return None
    for k in (0, 1):
        if attention_probabilities(graph, node.input[k]) is not None and graph.constant(node.input[1 - k]) is None:
            return k
    return None


__all__ = ["FAMILY", "linear_rule", "sum_rule", "softmax_rule", "product", "factor", "over", "layernorm_rule",
           "rmsnorm_rule", "identity_rule", "group_rule", "activation_gradient", "parse_gamma", "check_gamma",
           "module_path", "layer_gammas", "attention_probabilities", "value_product", "MOVING", "NONLINEAR"]
