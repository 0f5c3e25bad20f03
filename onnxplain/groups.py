"""Groups: subgraphs that compute one function of one tensor, which a rule family may treat
as one operator.

Exporters decompose activations into several nodes (SiLU is Sigmoid and Mul, GELU is
Div/Erf/Add/Mul/Mul or Pow/Mul/Add/Tanh, Mish is Softplus/Tanh/Mul). Per-node rules are
then wrong for the rules that look at the whole function: DeepLIFT's rescale multiplier of
x * sigmoid(x) is not the product rule applied to its factors, and AttnLRP treats GELU and
SiLU by the identity rule. The compiler asks the composite whether it claims each group
found here; a claimed group is replaced by one synthetic node (domain `DOMAIN`, op_type
the group's kind) from the group's input to its output, served by the composite's rule.
The forward graph itself is never rewritten, so an exported explainer runs in any
onnxruntime whatever the model's opset.

A group is found by structure: the nodes between a tensor x and a node that combines two
tensors computed from x element-wise (a product, a quotient, a selection), closed so that
no tensor inside is read outside, each node element-wise with constants that do not
enlarge x. Its kind is then found by its constants: the group's function is evaluated on
a grid of points and compared with the known activations (`KINDS`), so any operand order
either exporter emits is recognised; an element-wise group of no known kind is
"elementwise".

Normalisations that exporters decompose (LayerNorm as ReduceMean/Sub/Pow/ReduceMean/Add/
Sqrt/Div, RMSNorm as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul) are groups too, through a
ReduceMean over the last axis: kinds "layernorm" and "rmsnorm" (else "norm") with
`elementwise` False, so that rules for element-wise functions (DeepLIFT's rescale) leave
them alone while relevance rules for transformers (AttnLRP's LayerNorm rule) can claim them.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper
from scipy import special

DOMAIN = "onnxplain.group"

# Element-wise operators: each output element depends on the same element of each input.
UNARY = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Sqrt", "Reciprocal",
    "Abs", "Neg", "Sin", "Cos", "Clip", "Identity", "Cast", "Floor", "Ceil", "Round", "Sign",
    "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Swish", "Shrink",
}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Sum", "Mean"}
COMPARISONS = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Not", "And", "Or", "IsNaN", "IsInf"}
# Members whose output is piecewise constant in x: nothing flows back through them.
CONSTANT_PIECES = COMPARISONS | {"Floor", "Ceil", "Round", "Sign"}
ELEMENTWISE = UNARY | BINARY | COMPARISONS
# Element-wise operators that are affine in their one computed input (for a constant other
# operand): every rule agrees with the gradient on them.
AFFINE = {"Add", "Sub", "Neg", "Identity", "Sum", "Mean"}
AFFINE_WITH_CONSTANT = {"Mul", "Div"}  # x * c, x / c (not c / x)
# Reconverging through these keeps per-node multipliers exact (a sum of differences is the
# difference of the sum); reconverging through any other node does not.
LINEAR_COMBINATION = {"Add", "Sub", "Sum", "Mean"}
MAX_NODES = 32  # larger element-wise regions are left to per-node rules


@dataclass(frozen=True, eq=False)
class Group:
    """Nodes (in topological order) computing `output` from `input` alone: element by
    element when `elementwise`, else a normalisation over the last axis."""

    kind: str
    input: str
    output: str
    nodes: tuple
    elementwise: bool = True

    @property
    def names(self) -> set:
        return {n.name for n in self.nodes}

    def inner_tensors(self) -> set:
        return {o for n in self.nodes for o in n.output if o and o != self.output}

    def node(self) -> onnx.NodeProto:
        """The synthetic node the compiler visits in place of the group's nodes."""
        return helper.make_node(self.kind, [self.input], [self.output], name=f"{DOMAIN}/{self.output}",
                                domain=DOMAIN)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def find(graph) -> dict:
    """The groups of `graph`, keyed by output tensor (cached per graph)."""
    if graph not in _CACHE:
        _CACHE[graph] = _find(graph)
    return _CACHE[graph]


def of(graph, node) -> Group | None:
    """The group a synthetic node stands for, or None for a node of the model."""
    if node.domain != DOMAIN:
        return None
    return find(graph).get(node.output[0])


def fold(graph, nodes: list, claims, keep=()) -> list:
    """`nodes` (topologically ordered) with each group that `claims(group)` accepts replaced
    by its synthetic node, at the place of the group's last node. A group is kept as nodes
    when a tensor inside it is attributed or explained (in `keep`), or when not all of it
    is on the path being explained."""
    found = find(graph)
    if not found:
        return nodes
    keep = set(keep)
    present = {n.name for n in nodes}
    last, inner = {}, set()
    for group in found.values():
        if group.nodes[-1].name not in present or group.inner_tensors() & keep or not claims(group):
            continue
        last[group.nodes[-1].name] = group
        inner |= group.names
    if not last:
        return nodes
    out = []
    for n in nodes:
        if n.name in last:
            out.append(last[n.name].node())
        elif n.name not in inner:
            out.append(n)
    return out


def computed_inputs(graph, node) -> list:
    """Indices of the node's inputs that are computed (not constants, not empty)."""
    return [k for k, i in enumerate(node.input) if i and graph.constant(i) is None]


def single_input(graph, node) -> int | None:
    """For an element-wise node with one computed input that the constants do not
    broadcast beyond its shape: that input's index, else None."""
    if node.op_type not in UNARY | BINARY or node.domain not in ("", "ai.onnx"):
        return None
    idx = computed_inputs(graph, node)
    if len(idx) != 1 or not graph.is_float(node.input[idx[0]]):
        return None
    if not _keeps_shape(graph, node, node.input[idx[0]]):
        return None
    return idx[0]


def is_affine(graph, node, index: int) -> bool:
    """Whether an element-wise node is affine in its computed input `index`."""
    if node.op_type in AFFINE:
        return True
    return node.op_type in AFFINE_WITH_CONSTANT and (node.op_type == "Mul" or index == 0)


# ----------------------------------------------------------------------------- finding
def _keeps_shape(graph, node, x: str) -> bool:
    """Constants of an element-wise node broadcast into x's shape without enlarging it."""
    xs = graph.shape(x)
    for i in node.input:
        if not i or graph.constant(i) is None:
            continue
        c = graph.constant(i)
        if node.op_type == "Clip" or c.size == 1:
            continue
        if xs is None or c.ndim > len(xs):
            return False
        for dc, dx in zip(c.shape[::-1], xs[::-1]):
            if dc != 1 and dc != dx:
                return False
    return True


def _find(graph) -> dict:
    # root[t]: the tensor t is an element-wise function of (itself when it is not).
    root, cone = {}, {}
    for node in graph.nodes:
        outs = [o for o in node.output if o]
        computed = [node.input[k] for k in computed_inputs(graph, node)]
        roots = {root.get(i, i) for i in computed}
        if (node.domain in ("", "ai.onnx") and len(outs) == 1 and len(roots) == 1 and computed
                and (node.op_type in ELEMENTWISE and _keeps_shape(graph, node, next(iter(roots)))
                     or _last_axis_mean(graph, node, next(iter(roots))))):
            r = next(iter(roots))
            root[outs[0]] = r
            cone.setdefault(r, []).append(node)
        # else: the node's outputs are roots of their own
    groups = {}
    for x, members in cone.items():
        if not graph.is_float(x):
            continue
        for group in _groups_from(graph, x, members):
            groups[group.output] = group
    return groups


def _reduce_axes(graph, node):
    if len(node.input) > 1 and node.input[1]:
        c = graph.constant(node.input[1])
        return None if c is None else [int(v) for v in np.asarray(c).reshape(-1)]
    for a in node.attribute:
        if a.name == "axes":
            return [int(v) for v in helper.get_attribute_value(a)]
    return None


def _keepdims(node) -> int:
    for a in node.attribute:
        if a.name == "keepdims":
            return int(helper.get_attribute_value(a))
    return 1


def _last_axis_mean(graph, node, x: str) -> bool:
    """A ReduceMean over the last axis of x that keeps it (the statistics of a LayerNorm or
    an RMSNorm): row-wise, so a group through it is a normalisation, not element-wise."""
    if node.op_type != "ReduceMean" or not _keepdims(node):
        return False
    shape = graph.shape(x)
    axes = _reduce_axes(graph, node)
    return shape is not None and axes is not None and len(axes) == 1 and axes[0] in (-1, len(shape) - 1)


def _groups_from(graph, x: str, members: list) -> list:
    """Groups rooted at x among the element-wise nodes `members` computed from x."""
    produced = {o: n for n in members for o in n.output if o}
    by_name = {n.name: n for n in members}
    order = {n.name: k for k, n in enumerate(members)}

    def upstream(node) -> set:
        """Names of the members on paths from x to node (node included)."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            stack.extend(produced[i] for i in n.input if i in produced)
        return seen

    # A node that reads x (or tensors computed from it) through two or more inputs combines
    # them; unless it is a linear combination, everything between x and it is one group.
    regions = []
    for n in members:
        slots = [n.input[k] for k in computed_inputs(graph, n)]
        if len(slots) >= 2 and n.op_type not in LINEAR_COMBINATION:
            regions.append(upstream(n))
    merged = _merge(regions)
    outputs_of_graph = set(graph.outputs)
    result = []
    for region in merged:
        closed = _close(graph, region, by_name, upstream)
        if closed is None:
            result += _from_escape(graph, region, members, order)
            continue
        region = closed
        if len(region) > MAX_NODES:
            continue
        nodes = sorted((by_name[k] for k in region), key=lambda n: order[n.name])
        start, nodes = _fork(graph, x, nodes)
        row_wise = any(n.op_type == "ReduceMean" for n in nodes)
        if not row_wise:
            nodes = _absorb_scaling(graph, nodes, outputs_of_graph)
        y = _single_output(graph, nodes, outputs_of_graph)
        if y is None:
            continue
        if row_wise:
            result.append(Group(_norm_kind(graph, nodes, start, y), start, y, tuple(nodes), elementwise=False))
        else:
            result.append(Group(_kind(graph, nodes, start, y), start, y, tuple(nodes)))
    return result


def _from_escape(graph, region: set, members: list, order: dict) -> list:
    """Groups of a region that does not close because a leading chain's output is read
    outside it (a constant position embedding added before a LayerNorm whose input the
    residual sum reads too): the groups rooted at that tensor instead."""
    inside = [n for n in members if n.name in region]
    names = {n.name for n in inside}
    for n in sorted(inside, key=lambda n: -order[n.name]):
        t = n.output[0]
        if not any(c.name not in names for c in graph.consumers.get(t, [])):
            continue
        below, reach = [], {t}
        for m in inside:
            if order[m.name] > order[n.name] and any(i in reach for i in m.input):
                below.append(m)
                reach.update(o for o in m.output if o)
        found = _groups_from(graph, t, below) if below else []
        if found:
            return found
    return []


def _fork(graph, x: str, nodes: list) -> tuple:
    """The group starts where its paths fork: a leading chain (a bias Add before a GELU, a
    position embedding added before a LayerNorm) is the previous layer's, not the group's."""
    nodes = list(nodes)
    while len(nodes) > 1:
        readers = [n for n in nodes if x in n.input]
        head = readers[0] if len(readers) == 1 else None
        outs = [o for o in head.output if o] if head is not None else []
        if len(outs) != 1 or any(c not in nodes for c in graph.consumers.get(outs[0], [])) or outs[0] in graph.outputs:
            break
        x = outs[0]
        nodes.remove(head)
    return x, nodes


def _merge(regions: list) -> list:
    merged = []
    for r in regions:
        r = set(r)
        rest = []
        for m in merged:
            if m & r:
                r |= m
            else:
                rest.append(m)
        merged = rest + [r]
    return merged


def _close(graph, region: set, by_name: dict, upstream) -> set | None:
    """Grow the region until no tensor inside it but one is read outside: an element-wise
    reader (a member) joins with its path from x; any other reader makes it no group."""
    region = set(region)
    for _ in range(MAX_NODES):
        outside = []
        for name in region:
            for o in by_name[name].output:
                readers = [c for c in graph.consumers.get(o, []) if c.name not in region]
                if readers or o in graph.outputs:
                    outside.append((o, readers))
        if len(outside) <= 1:
            return region
        grew = False
        for o, readers in outside:
            for c in readers:
                if c.name in by_name:
                    region |= upstream(c)
                    grew = True
        if not grew:
            return None
    return None


def _absorb_scaling(graph, nodes: list, outputs_of_graph: set) -> list:
    """Take in a constant factor applied to the group's output (GELU's trailing 0.5,
    HardSwish's / 6), so that the group is the whole activation."""
    nodes = list(nodes)
    for _ in range(4):
        y = _single_output(graph, nodes, outputs_of_graph)
        if y is None or y in outputs_of_graph:
            break
        readers = graph.consumers.get(y, [])
        if len(readers) != 1:
            break
        n = readers[0]
        consts = [i for i in n.input if i and i != y and graph.constant(i) is not None]
        if (n.op_type not in ("Mul", "Div") or len(n.input) != 2 or len(consts) != 1
                or graph.constant(consts[0]).size != 1 or (n.op_type == "Div" and n.input[0] != y)):
            break
        nodes.append(n)
    return nodes


def _single_output(graph, nodes: list, outputs_of_graph: set) -> str | None:
    names = {n.name for n in nodes}
    out = []
    for n in nodes:
        for o in n.output:
            if o and (o in outputs_of_graph or any(c.name not in names for c in graph.consumers.get(o, []))):
                out.append(o)
    return out[0] if len(out) == 1 else None


# ----------------------------------------------------------------------------- kinds
def _sigmoid(x):
    return special.expit(x)


def _softplus(x):
    return np.logaddexp(0.0, x)


KINDS = {
    "silu": lambda x: x * _sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + special.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
    "gelu_sigmoid": lambda x: x * _sigmoid(1.702 * x),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "hardswish": lambda x: x * np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "softplus": _softplus,
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "square": lambda x: x * x,
}
GRID = np.concatenate([np.linspace(-6.0, 6.0, 97), [-30.0, -12.5, 12.5, 30.0]])


def _kind(graph, nodes: list, x: str, y: str) -> str:
    values = _evaluate(graph, nodes, x, GRID)
    if values is None or y not in values:
        return "elementwise"
    v = np.asarray(values[y], dtype=np.float64)
    if v.shape != GRID.shape:
        return "elementwise"
    for kind, f in KINDS.items():
        ref = f(GRID)
        # float32 constants (1/sqrt 2, 0.044715) and kernels: a few 1e-6 relative.
        if np.all(np.abs(v - ref) <= 1e-4 * (1.0 + np.abs(ref))):
            return kind
    # x * sigmoid(beta x): swish with a learned or fixed beta
    with np.errstate(all="ignore"):
        near = (GRID != 0) & (np.abs(GRID) <= 3)
        s = v[near] / GRID[near]
        if np.all((s > 0) & (s < 1)):
            beta = np.median(special.logit(s) / GRID[near])
            if np.all(np.abs(v - GRID * _sigmoid(beta * GRID)) <= 1e-4 * (1.0 + np.abs(v))):
                return "swish"
    return "elementwise"


def _norm_kind(graph, nodes: list, x: str, y: str) -> str:
    """layernorm: (x - mean) / sqrt(var + eps); rmsnorm: x / sqrt(mean(x^2) + eps), over
    the last axis (eps one of the group's scalar constants); else "norm". The scale and
    shift that usually follow are their own nodes, outside the group."""
    shape = graph.shape(x)
    d = shape[-1] if shape and isinstance(shape[-1], int) else 5
    rows = np.random.default_rng(0).normal(size=(6, d)) * 3.0 + 0.5
    values = _evaluate(graph, nodes, x, rows)
    if values is None or y not in values or np.shape(values[y]) != rows.shape:
        return "norm"
    v = np.asarray(values[y], dtype=np.float64)
    eps = {0.0} | {float(c) for n in nodes for i in n.input if i and (c := _scalar(graph, i)) is not None}
    centred = rows - rows.mean(-1, keepdims=True)
    for e in sorted(eps):
        for kind, ref in (("layernorm", centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + e)),
                          ("rmsnorm", rows / np.sqrt((rows ** 2).mean(-1, keepdims=True) + e))):
            if np.all(np.abs(v - ref) <= 1e-5 * (1.0 + np.abs(ref))):
                return kind
    return "norm"


def _scalar(graph, name):
    c = graph.constant(name)
    if c is None or c.size != 1:
        return None
    return np.float64(c.reshape(()))


_NUMPY = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    "Max": np.maximum, "Min": np.minimum, "Neg": np.negative, "Abs": np.abs, "Exp": np.exp, "Log": np.log,
    "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Erf": special.erf, "Tanh": np.tanh, "Sigmoid": _sigmoid,
    "Softplus": _softplus, "Relu": lambda v: np.maximum(v, 0.0), "Identity": lambda v: v,
    "Softsign": lambda v: v / (1.0 + np.abs(v)), "Sin": np.sin, "Cos": np.cos,
    "Mish": lambda v: v * np.tanh(_softplus(v)),
    "Greater": np.greater, "Less": np.less, "GreaterOrEqual": np.greater_equal, "LessOrEqual": np.less_equal,
    "Equal": np.equal, "Not": np.logical_not, "Where": np.where,
}


def _evaluate(graph, nodes: list, x: str, grid: np.ndarray) -> dict | None:
    """The group's tensors for x = grid, where every constant is a scalar and every operator
    is one numpy can evaluate; else None (the kind is then not named)."""
    values = {x: grid.astype(np.float64)}
    with np.errstate(all="ignore"):
        for n in nodes:
            args = []
            for i in n.input:
                if not i:
                    args.append(None)
                elif i in values:
                    args.append(values[i])
                else:
                    s = _scalar(graph, i)
                    if s is None:
                        return None
                    args.append(s)
            op = n.op_type
            if op == "Clip":
                lo = args[1] if len(args) > 1 and args[1] is not None else -np.inf
                hi = args[2] if len(args) > 2 and args[2] is not None else np.inf
                a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
                lo, hi = a.get("min", lo), a.get("max", hi)
                out = np.clip(args[0], lo, hi)
            elif op == "HardSigmoid":
                a = {at.name: helper.get_attribute_value(at) for at in n.attribute}
                out = np.clip(a.get("alpha", 0.2) * args[0] + a.get("beta", 0.5), 0.0, 1.0)
            elif op == "HardSwish":
                out = args[0] * np.clip(args[0] / 6.0 + 0.5, 0.0, 1.0)
            elif op == "Cast":
                out = args[0]
            elif op == "ReduceMean":
                axes = _reduce_axes(graph, n)
                if axes is None:
                    return None
                try:  # the grid has fewer axes than the tensor: then no kind is named
                    out = np.mean(args[0], axis=tuple(axes), keepdims=bool(_keepdims(n)))
                except (ValueError, np.exceptions.AxisError):
                    return None
            elif op in _NUMPY and not n.attribute and len(args) <= (3 if op == "Where" else 2):
                try:
                    out = _NUMPY[op](*args)
                except (TypeError, ValueError):
                    return None
            else:
                return None
            values[n.output[0]] = np.asarray(out)
    return values


__all__ = ["DOMAIN", "Group", "find", "of", "fold", "single_input", "is_affine", "computed_inputs", "KINDS"]
