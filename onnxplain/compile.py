"""The compiler: forward graph + composite -> explainer ONNX model.

It walks the graph backwards from the explained tensor, asks the composite for each node's
rule, lets the rule emit the node's backward step, accumulates fan-out, and returns one
model whose inputs are the model's inputs plus a seed and whose outputs are the model's
outputs, the attributions and the requested activations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .errors import ModelError, UnsupportedOperatorError
from .graph import BATCH, Graph
from .rules import base
from .rules.base import Builder, lookup

SEED = "onnxplain.seed"
META_KEY = "onnxplain.explainer"

# Operators that carry no information backward: their outputs are integer-valued or
# piecewise constant, so their gradient is zero almost everywhere.
NON_DIFFERENTIABLE = {
    "Shape", "Size", "ArgMax", "ArgMin", "NonZero", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Sign", "Floor", "Ceil",
    "Round", "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike",
}


class Composite:
    """Which rule serves which node. The base composite maps each operator to the rule of
    the first family in `families` that has one."""

    def __init__(self, name: str, families=("gradient",)):
        self.name = name
        self.families = tuple(families)

    def rule(self, node: onnx.NodeProto, graph: Graph):
        for family in self.families:
            r = lookup(node, family)
            if r is not None:
                return r
        return None

    def key(self) -> str:
        return self.name


@dataclass
class Explainer:
    """A compiled explainer model and how to feed and read it."""

    model: onnx.ModelProto
    seed: str
    explained: str
    attributions: dict  # forward tensor -> output name
    activations: dict = field(default_factory=dict)  # forward tensor -> output name
    forward_outputs: list = field(default_factory=list)
    # With the seed formed in the graph (the predicted class), `seed` is not fed and this
    # output gives the class each row explained.
    predicted: str | None = None


def _depends_on(graph: Graph, sources) -> set:
    """Tensors whose value depends on any of `sources` (through float-valued paths)."""
    dep = set(sources)
    for node in graph.nodes:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if any(i in dep for i in node.input if i):
            dep.update(o for o in node.output if o)
    return dep


def _ancestors(graph: Graph, target: str) -> set:
    need = {target}
    for node in reversed(graph.nodes):
        if any(o in need for o in node.output):
            need.update(i for i in node.input if i)
    return need


def active_nodes(graph: Graph, wrt, explained: str) -> list:
    """Nodes on a differentiable path from any `wrt` tensor to `explained`, in topological order."""
    dep = _depends_on(graph, wrt)
    need = _ancestors(graph, explained)
    return [
        n for n in graph.nodes
        if n.op_type not in NON_DIFFERENTIABLE
        and any(o in need for o in n.output) and any(i in dep for i in n.input if i)
    ]


def unsupported(graph: Graph, composite: Composite, wrt, explained: str) -> list[str]:
    return sorted({n.op_type for n in active_nodes(graph, wrt, explained) if composite.rule(n, graph) is None})


def compile_explainer(graph: Graph, composite: Composite, wrt, explained: str, activations=(),
                      method: str | None = None, times_input: bool = False,
                      predicted_seed: bool = False) -> Explainer:
    """Compile `graph` plus the backward pass of `composite` into one model. With
    `times_input`, each attribution output is multiplied by its tensor's value (input x
    gradient as one graph). With `predicted_seed`, the seed is not an input but the one-hot
    of each row's largest explained value (the predicted class, for an explained tensor
    shaped (batch, classes)), so explaining the prediction takes one run, not two."""
    wrt = list(dict.fromkeys(wrt))
    known = set(graph.tensor_names())
    for t in list(wrt) + [explained] + list(activations):
        if t not in known:
            raise ModelError(f"tensor '{t}' is not in the model; `onnxplain inspect MODEL` lists its tensors")
    nodes = active_nodes(graph, wrt, explained)
    missing = sorted({n.op_type for n in nodes if composite.rule(n, graph) is None})
    if missing:
        raise UnsupportedOperatorError(missing, method or composite.name)

    b = Builder(graph)
    dep = _depends_on(graph, wrt)
    grads: dict[str, list[str]] = {explained: [SEED]}
    for node in reversed(nodes):
        gout = [b.sum(grads[o]) if grads.get(o) else None for o in node.output]
        if all(g is None for g in gout):
            continue
        # Fold the accumulated sums back so later readers of a fan-out see one tensor.
        for o, g in zip(node.output, gout):
            if g is not None:
                grads[o] = [g]
        b.current = node.name
        rule = composite.rule(node, graph)
        gin = rule(b, node, gout)
        if len(gin) < len(node.input):
            gin = list(gin) + [None] * (len(node.input) - len(gin))
        for name, g in zip(node.input, gin):
            if g is None or not name or name not in dep or graph.constant(name) is not None:
                continue
            grads.setdefault(name, []).append(g)

    b.current = "out"
    attributions, activations_out = {}, {}
    out_vis = []
    for i, t in enumerate(wrt):
        name = f"onnxplain.attribution.{i}"
        src = b.sum(grads[t]) if grads.get(t) else b.zeros_like(t)
        if times_input:
            prod = f"onnxplain/out/attr_x_input_{i}"
            b.nodes.append(helper.make_node("Mul", [src, t], [prod], name=prod))
            src = prod
        b.nodes.append(helper.make_node("Identity", [src], [name], name=f"onnxplain/out/attr_{i}"))
        attributions[t] = name
        out_vis.append(_value_info(graph, t, name))
    for i, t in enumerate(activations):
        name = f"onnxplain.activation.{i}"
        b.nodes.append(helper.make_node("Identity", [t], [name], name=f"onnxplain/out/act_{i}"))
        activations_out[t] = name
        out_vis.append(_value_info(graph, t, name))

    fwd = graph.model.graph
    seed_vi = _value_info(graph, explained, SEED)
    seed_inputs, predicted = [seed_vi], None
    if predicted_seed:
        shape = graph.shape(explained)
        if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
            raise ModelError(f"a seed formed in the graph needs an explained tensor shaped (batch, classes); "
                             f"'{explained}' has shape {shape}")
        b.current = "seed"
        predicted = "onnxplain.predicted"
        values = b.const(np.array([0, 1]), b.np_dtype(explained))
        # First in the backward graph: every rule that reads the seed comes after.
        b.nodes[0:0] = [
            helper.make_node("ArgMax", [explained], [predicted], name="onnxplain/seed/argmax", axis=1, keepdims=0),
            helper.make_node("OneHot", [predicted, b.ints([shape[1]]), values], [SEED], name="onnxplain/seed/onehot",
                             axis=-1),
        ]
        seed_inputs = []
        out_vis.append(helper.make_tensor_value_info(predicted, onnx.TensorProto.INT64, [shape[0]]))
    bw_nodes, bw_inits = _prune(b, [vi.name for vi in out_vis])
    g = helper.make_graph(
        list(fwd.node) + bw_nodes,
        f"{fwd.name or 'model'}_explainer",
        list(fwd.input) + seed_inputs,
        list(fwd.output) + out_vis,
        initializer=list(fwd.initializer) + bw_inits,
        value_info=list(fwd.value_info),
    )
    model = helper.make_model(g, opset_imports=list(graph.model.opset_import), producer_name="onnxplain")
    model.ir_version = graph.model.ir_version
    info = {
        "composite": composite.key(), "method": method, "times_input": times_input,
        "seed": None if predicted_seed else SEED, "predicted": predicted, "explained": explained,
        "attributions": attributions, "activations": activations_out,
    }
    helper.set_model_props(model, {META_KEY: json.dumps(info)})
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"internal error: the compiled explainer is invalid ({str(exc).splitlines()[0]})") from None
    return Explainer(model, None if predicted_seed else SEED, explained, attributions, activations_out,
                     list(graph.outputs), predicted)


def _prune(b: Builder, outputs) -> tuple[list, list]:
    """The emitted nodes and constants the outputs need. Rules may emit gradients nobody
    reads (a weight's, an unused branch's), and onnxruntime runs every node it is given."""
    needed = set(outputs)
    keep = []
    for node in reversed(b.nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    return keep, [t for t in b.initializers if t.name in needed]


def _value_info(graph: Graph, tensor: str, name: str):
    elem = graph.elem_type(tensor) or onnx.TensorProto.FLOAT
    shape = graph.shape(tensor)
    if shape is not None:
        shape = [d if d is not None else None for d in shape]
    return helper.make_tensor_value_info(name, elem, shape)


__all__ = ["Composite", "Explainer", "compile_explainer", "active_nodes", "unsupported", "SEED", "BATCH", "base"]
