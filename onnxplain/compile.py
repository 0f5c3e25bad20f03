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
from onnx import helper, numpy_helper

from . import groups
from .errors import ModelError, UnsupportedOperatorError
from .graph import BATCH, Graph, node_inputs, subgraphs
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
    # NMS selects box indices: downstream Gathers read the boxes and scores at them as constants.
    "NonMaxSuppression",
}


def non_differentiable(node, graph) -> bool:
    """Whether a node passes no gradient: the operators above, except a rounding that
    quantizes (explained straight through; rules/quantized.quantizes)."""
    if node.op_type not in NON_DIFFERENTIABLE:
        return False
    if node.op_type in ("Floor", "Ceil", "Round"):
        from .rules.quantized import quantizes

        return not quantizes(graph, node)
    return True


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

    def claims(self, group) -> bool:
        """Whether this composite gives a group of nodes found by `onnxplain.groups` (a
        decomposed activation) one rule of its own, served by `rule` on the group's node."""
        return False

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
    # The output carrying the explained tensor's values (compiled with `values`): what the
    # forward half computed anyway, read so that a caller needs no second forward pass.
    values: str | None = None


def _depends_on(graph: Graph, sources) -> set:
    """Tensors whose value depends on any of `sources` (through float-valued paths)."""
    dep = set(sources)
    for node in graph.nodes:
        if non_differentiable(node, graph):
            continue
        if any(i in dep for i in node_inputs(node)):
            dep.update(o for o in node.output if o)
    return dep


def _ancestors(graph: Graph, target) -> set:
    need = {target} if isinstance(target, str) else set(target)
    for node in reversed(graph.nodes):
        if any(o in need for o in node.output):
            need.update(node_inputs(node))
    return need


def active_nodes(graph: Graph, wrt, explained) -> list:
    """Nodes on a differentiable path from any `wrt` tensor to `explained` (a tensor or
    several), in topological order. Tensors that subgraphs read from the enclosing scope
    count as inputs of the node that holds the subgraph."""
    dep = _depends_on(graph, wrt)
    need = _ancestors(graph, explained)
    return [
        n for n in graph.nodes
        if not non_differentiable(n, graph)
        and any(o in need for o in n.output) and any(i in dep for i in node_inputs(n))
    ]


UNROLLED = ("Loop", "Scan")


def _missing(graph: Graph, composite: Composite, nodes, dep) -> set:
    """Operators among `nodes` without a rule in `composite`, those inside the subgraphs
    on the path included (a Loop/Scan body is unrolled, so its operators need rules)."""
    missing = set()
    for n in nodes:
        if n.op_type in UNROLLED and n.domain in ("", "ai.onnx"):
            from .canonize import loop_blocker

            if loop_blocker(graph, n) is not None:  # else the input shapes fix its length
                missing.add(n.op_type)
            body = subgraphs(n)[0]
            missing |= _missing_in_body(graph, composite, body, dep, with_inputs=True)
            continue
        rule = composite.rule(n, graph)
        if rule is None or getattr(rule, "refuses", lambda c, n, g: False)(composite, n, graph) \
                or not getattr(rule, "applies_to", lambda c: True)(composite):
            missing.add(n.op_type)
        if rule is not None:
            for body in subgraphs(n):
                missing |= _missing_in_body(graph, composite, body, dep)
    return missing


def _missing_in_body(graph, composite, body, dep, with_inputs=False) -> set:
    """Missing rules inside one body: its nodes that read (transitively) a differentiable
    outer tensor, or a body input for a loop body (its state and scanned elements)."""
    try:
        sub = _body_graph(graph, body)
    except ModelError:
        sub = None
    sources = {i for i in dep}
    if with_inputs:
        sources |= {vi.name for vi in body.input}
    missing = set()
    reach = set(sources)
    for n in body.node:
        if n.op_type in NON_DIFFERENTIABLE or not any(i in reach for i in node_inputs(n)):
            continue
        reach.update(o for o in n.output if o)
        if n.op_type in UNROLLED and n.domain in ("", "ai.onnx"):
            missing |= _missing_in_body(sub or graph, composite, subgraphs(n)[0], reach, with_inputs=True)
            continue
        rule = lookup(n, "gradient") if sub is None else composite.rule(n, sub)
        if rule is None or getattr(rule, "refuses", lambda c, n, g: False)(composite, n, sub or graph):
            missing.add(n.op_type)
        if rule is not None:
            for inner in subgraphs(n):
                missing |= _missing_in_body(sub or graph, composite, inner, reach)
    return missing


def unsupported(graph: Graph, composite: Composite, wrt, explained: str) -> list[str]:
    """Operators on the explained path without a rule in `composite`, inside subgraphs too."""
    nodes = active_nodes(graph, wrt, explained)
    return sorted(_missing(graph, composite, nodes, _depends_on(graph, wrt)))


def _backward(b: Builder, graph: Graph, composite: Composite, nodes, grads: dict, dep) -> dict:
    """Emit the backward steps of `nodes` (topological order) into `b`, accumulating into
    `grads` (tensor -> list of gradient names, seeded by the caller).

    A rule of a node with subgraphs returns its explicit inputs' gradients as usual and
    puts those of the outer-scope tensors its bodies read into `b.implicit_grads`."""
    b.depends = dep
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
        b.implicit_grads = {}
        gin = rule(b, node, gout)
        if len(gin) < len(node.input):
            gin = list(gin) + [None] * (len(node.input) - len(gin))
        pairs = list(zip(node.input, gin)) + list(b.implicit_grads.items())
        b.implicit_grads = {}
        for name, g in pairs:
            if g is None or not name or name not in dep or graph.constant(name) is not None:
                continue
            grads.setdefault(name, []).append(g)
    return grads


def _unroll_active(graph: Graph, wrt, explained, method=None) -> Graph:
    """`graph` with the Loop and Scan nodes on the explained path unrolled and the Ifs on it
    whose condition the input shapes fix inlined (nested ones too, round by round), so that
    the plain rules apply to their nodes."""
    from .canonize import _static_value, fold_constants, inline_constant_ifs, unroll_loops

    for _ in range(16):
        active = active_nodes(graph, wrt, explained)
        loops = [n.name for n in active if n.op_type in UNROLLED and n.domain in ("", "ai.onnx")]
        if loops:
            try:
                model = unroll_loops(graph, loops)
            except ValueError as exc:
                err = UnsupportedOperatorError(["Loop" if str(exc).startswith("Loop") else "Scan"], method)
                err.args = (f"method '{method}': {exc}; white-box methods unroll the loops whose trip count (or "
                            "scanned length) the input shapes fix and whose end does not depend on the data; use a "
                            "black-box method (occlusion, rise, kernel_shap, lime) for this model",)
                raise err from None
            # Each iteration's shape arithmetic (Slice axes, Reshape targets) becomes constant,
            # as the rules want it.
            graph = Graph(fold_constants(model), initializers=graph.initializers)
            continue
        known: dict = {}
        conds = {n.input[0]: _static_value(graph, n.input[0], known, {}) for n in active
                 if n.op_type == "If" and n.domain in ("", "ai.onnx") and n.input}
        conds = {k: v for k, v in conds.items() if v is not None and np.asarray(v).size == 1}
        if not conds:
            return graph
        model = onnx.ModelProto()
        model.CopyFrom(graph.model)
        graph = Graph(inline_constant_ifs(model, conds), initializers=graph.initializers)
    raise ModelError("loops and branches nested more than 16 deep on the explained path cannot be unrolled")


def _body_graph(outer: Graph, body: onnx.GraphProto) -> Graph:
    """A Graph of one subgraph: its own inputs, and the outer-scope tensors it reads as
    further inputs (constants of the outer scope stay constants, sharing their arrays)."""
    from .graph import graph_outer_reads

    reads = graph_outer_reads(body)
    consts = {r: outer.constant(r) for r in reads if outer.constant(r) is not None}
    inputs = list(body.input)
    inits = []
    for r in reads:
        if r in consts:
            v = consts[r]
            if v.nbytes <= 1 << 16:  # small ones (shapes, axes) feed shape inference
                inits.append(numpy_helper.from_array(v, r))
                continue
            # A weight's data stays in `consts`: Graph takes the arrays given and reads dims.
            stub = onnx.TensorProto(name=r, data_type=helper.np_dtype_to_tensor_dtype(v.dtype))
            stub.dims.extend(v.shape)
            inits.append(stub)
        else:
            inputs.append(helper.make_tensor_value_info(r, outer.elem_type(r) or onnx.TensorProto.FLOAT,
                                                        outer.shape(r)))
    inits += list(body.initializer)
    g = helper.make_graph(list(body.node), body.name or "body", inputs, list(body.output), initializer=inits,
                          value_info=list(body.value_info))
    model = helper.make_model(g, opset_imports=list(outer.model.opset_import))
    model.ir_version = max(outer.model.ir_version, 4)
    return Graph(model, initializers=consts)


def subgraph_backward(b: Builder, node: onnx.NodeProto, body: onnx.GraphProto, gout, targets, tag: str):
    """The backward of one body (an If branch, no inputs of its own) as a subgraph.

    gout: the gradient names of the node's outputs (outer-scope tensors of the result);
    targets: the outer-scope tensors whose gradients the subgraph outputs, in order (zeros
    where this body does not use them). The body's forward nodes are recomputed inside it,
    since their values live only in the forward node's scope. Constants the backward needs
    go to `b`'s scope."""
    sub = _body_graph(b.graph, body)
    composite = b.composite
    outs = [vi.name for vi in body.output]
    seeded = [o for o, g in zip(outs, gout) if g is not None]
    sources = [t for t in sub.inputs if t in b.depends]
    sub = _unroll_active(sub, sources, seeded, composite.name)
    dep = _depends_on(sub, sources)
    nodes = active_nodes(sub, sources, seeded)
    missing = sorted(_missing(sub, composite, nodes, dep))
    if missing:
        raise UnsupportedOperatorError(missing, composite.name)
    sb = Builder(sub, prefix=f"{b.prefix}/{node.name}/{tag}")
    sb.composite = composite
    grads: dict[str, list[str]] = {}
    for o, g in zip(outs, gout):
        if g is not None:
            grads.setdefault(o, []).append(g)
    _backward(sb, sub, composite, nodes, grads, dep)
    sb.current = "out"
    results = []
    for t in targets:
        g = sb.sum(grads[t]) if grads.get(t) else sb.zeros_like(t)
        results.append(sb.op("Identity", g))
    bw, inits = _prune(sb, results, sub.nodes)
    b.initializers.extend(inits)
    read = {i for n in bw for i in node_inputs(n)}
    own = [t for t in body.initializer if t.name in read]
    vis = [helper.make_tensor_value_info(r, b.graph.elem_type(t) or onnx.TensorProto.FLOAT, b.graph.shape(t))
           for r, t in zip(results, targets)]
    return helper.make_graph(bw, f"{node.name}_{tag}_backward", [], vis, initializer=own)


def compile_explainer(graph: Graph, composite: Composite, wrt, explained: str, activations=(),
                      method: str | None = None, times_input: bool = False,
                      predicted_seed: bool = False, values: bool = False) -> Explainer:
    """Compile `graph` plus the backward pass of `composite` into one model. With
    `times_input`, each attribution output is multiplied by its tensor's value (input x
    gradient as one graph). With `predicted_seed`, the seed is not an input but the one-hot
    of each row's largest explained value (the predicted class, for an explained tensor
    shaped (batch, classes)), so explaining the prediction takes one run, not two. With
    `values`, the explained tensor's values are an output too (`Explainer.values`): the
    predicted class and its score come out of the run that explains them."""
    wrt = list(dict.fromkeys(wrt))
    known = set(graph.tensor_names())
    for t in list(wrt) + [explained] + list(activations):
        if t not in known:
            raise ModelError(f"tensor '{t}' is not in the model; `onnxplain inspect MODEL` lists its tensors")
    graph = _unroll_active(graph, wrt, explained, method or composite.name)
    nodes = active_nodes(graph, wrt, explained)
    # A claimed group is one node from its input to its output; its inner nodes are skipped.
    nodes = groups.fold(graph, nodes, composite.claims, keep=list(wrt) + [explained])
    dep = _depends_on(graph, wrt)
    missing = sorted(_missing(graph, composite, nodes, dep))
    if missing:
        err = UnsupportedOperatorError(missing, method or composite.name)
        quantized = sorted({n.op_type for n in nodes if (r := composite.rule(n, graph)) is not None
                            and not getattr(r, "applies_to", lambda c: True)(composite)})
        if quantized:  # say why: the rules exist, for other methods
            err.args = (f"method '{method or composite.name}' is not defined on quantized operator(s) "
                        f"{', '.join(quantized)}: the straight-through convention serves gradient methods (gradient, "
                        "input_x_gradient, integrated_gradients, smoothgrad, guided_backprop, ...); use one of them "
                        f"or a black-box method" + (f"; no rule either for {', '.join(o for o in missing if o not in quantized)}"
                                                     if set(missing) - set(quantized) else ""),)
        raise err

    b = Builder(graph)
    b.composite = composite
    grads: dict[str, list[str]] = {explained: [SEED]}
    _backward(b, graph, composite, nodes, grads, dep)

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
        out_vis.append((t, name))
    for i, t in enumerate(activations):
        name = f"onnxplain.activation.{i}"
        b.nodes.append(helper.make_node("Identity", [t], [name], name=f"onnxplain/out/act_{i}"))
        activations_out[t] = name
        out_vis.append((t, name))

    fwd = graph.model.graph
    fwd_outputs = [vi for vi in fwd.output]
    untyped = [vi.name for vi in fwd_outputs if vi.type.HasField("tensor_type")
               and not vi.type.tensor_type.HasField("shape")]
    types = _declared_types(graph, [t for t, _ in out_vis] + [explained] + untyped)
    out_vis = [_value_info(types, t, name) for t, name in out_vis]
    fwd_outputs = [_value_info(types, vi.name, vi.name) if vi.name in untyped else vi for vi in fwd_outputs]
    seed_vi = _value_info(types, explained, SEED)
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
    values_out = None
    if values:
        values_out = explained if explained in {vi.name for vi in fwd_outputs} else "onnxplain.values"
        if values_out != explained:
            b.current = "out"
            b.nodes.append(helper.make_node("Identity", [explained], [values_out], name="onnxplain/out/values"))
            out_vis.append(_value_info(types, explained, values_out))
    bw_nodes, bw_inits = _prune(b, [vi.name for vi in out_vis])
    bw_nodes = _masks_from_relu_outputs(fwd.node, bw_nodes, bw_inits)
    g = helper.make_graph(
        list(fwd.node) + bw_nodes,
        f"{fwd.name or 'model'}_explainer",
        list(fwd.input) + seed_inputs,
        fwd_outputs + out_vis,
        initializer=list(fwd.initializer) + bw_inits,
        value_info=list(fwd.value_info),
    )
    model = helper.make_model(g, opset_imports=list(graph.model.opset_import), producer_name="onnxplain")
    # IR 3 wanted every initializer listed as an input; from 4 on an initializer is a
    # constant unless listed. The opsets used fix the least IR version onnxruntime accepts.
    model.ir_version = max(graph.model.ir_version, 4,
                           helper.find_min_ir_version_for(list(graph.model.opset_import), ignore_unknown=True))
    info = {
        "composite": composite.key(), "method": method, "times_input": times_input,
        "seed": None if predicted_seed else SEED, "predicted": predicted, "explained": explained,
        "attributions": attributions, "activations": activations_out,
        # Conventions the rules followed where the model is not differentiable as it stands
        # (quantized operators: straight-through rounding), stated to whoever reads it.
        "conventions": sorted(getattr(b, "conventions", None) or ()),
    }
    helper.set_model_props(model, {META_KEY: json.dumps(info)})
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"internal error: the compiled explainer is invalid ({str(exc).splitlines()[0]})") from None
    return Explainer(model, None if predicted_seed else SEED, explained, attributions, activations_out,
                     list(graph.outputs), predicted, values_out)


def _masks_from_relu_outputs(fwd_nodes, bw_nodes, bw_inits) -> list:
    """Backward `Greater(x, 0)` on the input x of a forward `y = Relu(x)` reads y instead:
    y > 0 exactly where x > 0 (NaN and -0 included), so no value changes. Read by nothing
    but its Relu, x lets onnxruntime fuse the Relu into the Conv before it and keep the
    forward pass in its blocked (NCHWc) layout, as in plain inference; read by the backward
    pass, x pins an unfused Relu between two layout conversions at every layer."""
    relu_of = {n.input[0]: n.output[0] for n in fwd_nodes if n.op_type == "Relu" and n.domain in ("", "ai.onnx")}
    zeros = {t.name for t in bw_inits if not t.dims and t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                                                         onnx.TensorProto.FLOAT16)
             and float(numpy_helper.to_array(t)) == 0.0}
    out = []
    for n in bw_nodes:
        if n.op_type == "Greater" and n.domain in ("", "ai.onnx") and n.input[0] in relu_of and n.input[1] in zeros:
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.input[0] = relu_of[n.input[0]]
            n = m
        out.append(n)
    return out


def _prune(b: Builder, outputs, before=()) -> tuple[list, list]:
    """The emitted nodes (after the nodes `before`) and constants the outputs need. Rules
    may emit gradients nobody reads (a weight's, an unused branch's), and onnxruntime runs
    every node it is given. What subgraphs read from this scope counts as read."""
    needed = set(outputs)
    keep = []
    for node in reversed(list(before) + b.nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node_inputs(node))
    keep.reverse()
    return keep, [t for t in b.initializers if t.name in needed]


def _declared_types(graph: Graph, tensors) -> dict:
    """(elem_type, shape) of each tensor, for the explainer's declared inputs and outputs:
    onnx.checker requires a shape (a rank) on each. Where shape inference gave none (Loop
    outputs, fp16 islands, custom operators), one forward run on a one-row dummy batch
    tells the rank and type; its axes are left unnamed."""
    types = {t: (graph.elem_type(t), graph.shape(t)) for t in tensors}
    unknown = [t for t, (e, s) in types.items() if s is None or not e]
    if unknown:
        for t, arr in _probe(graph, unknown).items():
            e, s = types[t]
            types[t] = (e or helper.np_dtype_to_tensor_dtype(arr.dtype), s if s is not None else (None,) * arr.ndim)
    return types


def _probe(graph: Graph, tensors) -> dict:
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in tensors)
    feeds = {}
    for name in graph.inputs:
        elem = graph.elem_type(name) or onnx.TensorProto.FLOAT
        shape = [d if isinstance(d, int) else 1 for d in (graph.shape(name) or ())]
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        feeds[name] = (np.ones if np.dtype(dtype).kind == "f" else np.zeros)(shape, dtype=dtype)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        values = sess.run(list(tensors), feeds)
    except Exception as exc:
        raise ModelError(f"the types of {', '.join(tensors)} are unknown to shape inference and a trial run "
                         f"failed ({str(exc).splitlines()[0]}); give the model static input shapes") from None
    return {t: np.asarray(v) for t, v in zip(tensors, values)}


def _value_info(types: dict, tensor: str, name: str):
    elem, shape = types[tensor]
    return helper.make_tensor_value_info(name, elem or onnx.TensorProto.FLOAT, shape)


__all__ = ["Composite", "Explainer", "compile_explainer", "active_nodes", "unsupported", "SEED", "BATCH", "base"]
