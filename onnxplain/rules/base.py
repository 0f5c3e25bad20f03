"""The rule registry and the builder that rules emit backward nodes with.

A rule is a function `rule(b, node, grads) -> list` registered for one operator in one
family. `b` is a `Builder`, `node` the forward NodeProto, `grads` the name of the incoming
gradient (or relevance) for each of the node's outputs (None where nothing flows back).
It returns, for each of the node's inputs, the name of the outgoing tensor, or None where
nothing flows (non-differentiable inputs such as shapes and indices).

Subgraphs (If branches) read tensors of the enclosing scope without listing them as
inputs. The rule of a node with subgraphs returns its explicit inputs' gradients as usual
and puts those of the outer-scope tensors into `b.implicit_grads` (tensor -> gradient
name), which the compiler empties before each rule and accumulates after it. For such
rules the compiler also sets `b.composite` (the composite being compiled, to emit the
bodies' backward with) and `b.depends` (the tensors that depend on the attributed ones).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import attributes
from ..errors import ModelError

Rule = Callable[["Builder", onnx.NodeProto, list], list]

# (family, key) -> rule, where key is the op_type for the default ONNX domain and
# "domain::op_type" for any other (com.microsoft::QGemm, ai.onnx.ml::Scaler): operators of
# different domains may share a name and not a meaning. Families: "gradient" (exact
# vector-Jacobian products) and the modified backward passes (guided_backprop, deconvnet,
# lrp rules, ...), which fall back to "gradient" for the operators they leave alone.
RULES: dict[tuple[str, str], Rule] = {}


def rule_key(op_type: str, domain: str = "") -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}::{op_type}"


def register(*op_types: str, family: str = "gradient", domain: str = ""):
    def deco(fn: Rule) -> Rule:
        for op in op_types:
            RULES[(family, rule_key(op, domain))] = fn
        return fn

    return deco


def lookup(op, family: str = "gradient", domain: str | None = None) -> Rule | None:
    """The rule for `op`: a NodeProto (its own domain counts) or an op_type string (the
    default domain unless `domain` is given)."""
    if isinstance(op, onnx.NodeProto):
        op, domain = op.op_type, op.domain if domain is None else domain
    return RULES.get((family, rule_key(op, domain or "")))


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# The rules import it from here; it lives in attributes so that contrib_types (which graph.py
# imports) reads attributes the same way without importing the rules package.
attr = attributes.attr


class Builder:
    """Emits ONNX nodes and constants into the explainer under construction.

    Forward tensors keep their names; every emitted tensor gets a fresh one. The helpers
    hide opset differences (ReduceMean/ReduceMax take axes as an input from opset 18 on).
    """

    def __init__(self, graph, prefix: str = "onnxplain"):
        self.graph = graph
        self.opset = graph.opset
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict = {}
        # Large constants are shared by identity: a rule that uses the same array twice
        # (W+ in a forward and in an adjoint) or a weight of the model itself emits no copy.
        self._by_id: dict = {}
        self._model_ids: dict | None = None
        self.current = "bw"  # name of the forward node being processed, for readable names
        self.implicit_grads: dict[str, str] = {}  # see the module docstring (subgraphs)
        self.composite = None
        self.depends: set = set()

    # --- naming and emission ---------------------------------------------------------------
    def fresh(self, hint: str = "t") -> str:
        self._count += 1
        return f"{self.prefix}/{self.current}/{hint}_{self._count}"

    def op(self, op_type: str, *inputs, outputs: int = 1, domain: str = "", **attributes):
        names = [self.fresh(op_type) for _ in range(outputs)]
        ins = ["" if i is None else i for i in inputs]
        attributes = {k: v for k, v in attributes.items() if v is not None}
        self.nodes.append(
            helper.make_node(op_type, ins, names, name=self.fresh(op_type + "_node"), domain=domain, **attributes)
        )
        return names[0] if outputs == 1 else names

    def _shared(self, value, dtype) -> str | None:
        """The name of a tensor already holding array `value` (this very object), if any."""
        if not isinstance(value, np.ndarray) or value.dtype != np.dtype(dtype):
            return None
        hit = self._by_id.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        if self._model_ids is None:
            self._model_ids = {id(a): (a, n) for n, a in self.graph.constants().items()
                               if isinstance(a, np.ndarray) and a.size > 16}
        hit = self._model_ids.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        return None

    def const(self, value, dtype=np.float32) -> str:
        """A constant tensor; scalars and small vectors are shared by value, larger arrays
        by identity (the same array object gives the same tensor, a model weight its own)."""
        shared = self._shared(value, dtype)
        if shared is not None:
            return shared
        arr = np.asarray(value, dtype=dtype)
        key = None
        if arr.size <= 16:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._consts:
                return self._consts[key]
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(arr, name))
        if key is not None:
            self._consts[key] = name
        elif isinstance(value, np.ndarray) and arr is value:
            self._by_id[id(value)] = (value, name)
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1), np.int64)

    def scalar_like(self, value, like: str) -> str:
        """A scalar constant with the element type of tensor `like`."""
        return self.const(value, self.np_dtype(like))

    # --- forward tensor facts ------------------------------------------------------------
    def shape(self, name: str) -> tuple | None:
        return self.graph.shape(name)

    def rank(self, name: str) -> int:
        s = self.graph.shape(name)
        if s is None:
            raise ModelError(f"the rank of tensor '{name}' is unknown; give the model static input ranks")
        return len(s)

    def constant(self, name: str) -> np.ndarray | None:
        return self.graph.constant(name) if name else None

    def np_dtype(self, name: str):
        t = self.graph.elem_type(name)
        return np.dtype(helper.tensor_dtype_to_np_dtype(t)) if t else np.dtype(np.float32)

    # --- opset-aware helpers ---------------------------------------------------------------
    def reduce(self, kind: str, x: str, axes, keepdims: bool = True) -> str:
        axes = [int(a) for a in axes]
        if not axes:
            return x
        if kind == "ReduceSum" or self.opset >= 18:
            return self.op(kind, x, self.ints(axes), keepdims=int(keepdims))
        return self.op(kind, x, axes=axes, keepdims=int(keepdims))

    def reduce_sum(self, x: str, axes, keepdims: bool = True) -> str:
        return self.reduce("ReduceSum", x, axes, keepdims)

    def squeeze(self, x: str, axes) -> str:
        return self.op("Squeeze", x, self.ints(axes))

    def unsqueeze(self, x: str, axes) -> str:
        return self.op("Unsqueeze", x, self.ints(axes))

    def shape_of(self, x: str) -> str:
        return self.op("Shape", x)

    def reshape_like(self, g: str, like: str) -> str:
        return self.op("Reshape", g, self.shape_of(like))

    def zeros_like(self, x: str) -> str:
        """A zero gradient for forward tensor `x`: of x's float type, float32 where x is an
        integer tensor (a quantized one: its gradient is a float tensor)."""
        dtype = self.np_dtype(x)
        zero = numpy_helper.from_array(np.zeros(1, dtype=dtype if dtype.kind == "f" else np.float32))
        return self.op("ConstantOfShape", self.shape_of(x), value=zero)

    def positions(self, x: str) -> str:
        """An int64 tensor shaped like `x` holding each element's row-major flat index, at
        run time: pushed through an index-selecting forward op (Slice, Gather...), it says
        where every selected element came from, for the scatter that is that op's adjoint."""
        n = self.op("Reshape", self.op("Size", x), self.ints([]))
        flat = self.op("Range", self.const(np.array(0, np.int64), np.int64), n,
                       self.const(np.array(1, np.int64), np.int64))
        return self.op("Reshape", flat, self.shape_of(x))

    def scatter_to(self, g: str, positions: str, like: str) -> str:
        """Add each element of `g` at flat index `positions` (as from `positions`) of a zero
        tensor shaped like forward tensor `like`."""
        flat = self.ints([-1])
        zeros = self.op("Reshape", self.zeros_like(like), flat)
        half = self.graph.elem_type(like) in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
        if half:  # onnxruntime's CPU scatter cannot add in float16: add in float32
            zeros = self.op("Cast", zeros, to=onnx.TensorProto.FLOAT)
            g = self.op("Cast", g, to=onnx.TensorProto.FLOAT)
        out = self.op("ScatterElements", zeros, self.op("Reshape", positions, flat), self.op("Reshape", g, flat),
                      axis=0, reduction="add")
        if half:
            out = self.op("Cast", out, to=self.graph.elem_type(like))
        return self.reshape_like(out, like)

    def mul(self, a: str, b: str) -> str:
        return self.op("Mul", a, b)

    def add(self, a: str, b: str) -> str:
        return self.op("Add", a, b)

    def sum(self, names: list[str]) -> str:
        names = [n for n in names if n]
        if len(names) == 1:
            return names[0]
        return self.op("Sum", *names)

    def cast_like(self, x: str, like: str) -> str:
        return self.op("Cast", x, to=self.graph.elem_type(like) or onnx.TensorProto.FLOAT)

    def unbroadcast(self, g: str, out: str, inp: str) -> str:
        """Sum gradient `g` (shaped like forward tensor `out`) down to the shape of `inp`.

        Numpy broadcasting aligns shapes on the right; every axis `inp` lacks, or has as 1
        where `out` has more, was broadcast and its gradient is a sum.
        """
        so, si = self.shape(out), self.shape(inp)
        if so is None or si is None:
            return self.unbroadcast_at_run_time(g, None, inp)
        lead = len(so) - len(si)
        axes = list(range(lead))
        for k, di in enumerate(si):
            do = so[lead + k]
            if di == do:
                continue
            if di == 1:
                axes.append(lead + k)
            elif isinstance(di, int) and isinstance(do, int):
                raise ModelError(f"shapes {si} and {so} do not broadcast")
            else:
                return self.unbroadcast_at_run_time(g, lead, inp)
        if not axes:
            return g
        r = self.reduce_sum(g, axes, keepdims=True)
        if lead:
            r = self.squeeze(r, list(range(lead)))
        return r

    def unbroadcast_at_run_time(self, g: str, lead: int | None, inp: str) -> str:
        """Where static shapes cannot tell (a symbolic dim facing a fixed one, or a rank
        unknown at compile time: lead None), the broadcast axes are those where the sizes
        differ at run time, the input's shape padded on the left with ones."""
        want = self.shape_of(inp)
        if lead is None:
            missing = self.op("Sub", self.op("Size", self.shape_of(g)), self.op("Size", want))
            ones = self.op("ConstantOfShape", self.op("Reshape", missing, self.ints([1])),
                           value=numpy_helper.from_array(np.ones(1, np.int64)))
            want = self.op("Concat", ones, want, axis=0)
        elif lead:
            want = self.op("Concat", self.ints([1] * lead), want, axis=0)
        differs = self.op("Not", self.op("Equal", want, self.shape_of(g)))
        axes = self.squeeze(self.op("NonZero", differs), [0])
        g = self.op("ReduceSum", g, axes, keepdims=1, noop_with_empty_axes=1)
        return self.reshape_like(g, inp)
