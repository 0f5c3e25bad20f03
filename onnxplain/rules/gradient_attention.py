"""Gradients of operators the standard defines by a function body: `Attention` (opset 23+),
`RotaryEmbedding` (opset 23).

The schema's function body, built for the node's attributes and input types (it is
context-dependent: 3-D or 4-D inputs, a boolean or additive mask, past key/value, causal
masking, softcap, grouped heads), is exactly the operator: its backward is the backward of
those primitive nodes, run by the composite's own rules (compile.subgraph_backward, as for an
`If` branch) and inlined here. The body's forward nodes are recomputed in the backward.
"""

from __future__ import annotations

import onnx
from onnx import defs, helper

from ..errors import ModelError, UnsupportedOperatorError
from .base import register


def _function(b, node) -> onnx.FunctionProto:
    """The schema's function body for this node, at the newest body version <= the model's opset."""
    try:
        schema = defs.get_schema(node.op_type, b.opset, node.domain)
    except Exception:
        raise UnsupportedOperatorError([node.op_type], "gradient") from None
    versions = [v for v in schema.context_dependent_function_opset_versions if v <= b.opset]
    plain = [v for v in schema.function_opset_versions if v <= b.opset]
    types = []
    for name in node.input:
        t = onnx.TypeProto()
        if name:
            t.tensor_type.elem_type = b.graph.elem_type(name) or onnx.TensorProto.FLOAT
            shape = b.shape(name)
            if shape is not None:
                t.tensor_type.shape.SetInParent()
                for d in shape:
                    dim = t.tensor_type.shape.dim.add()
                    if isinstance(d, int):
                        dim.dim_value = d
                    elif d:
                        dim.dim_param = str(d)
        types.append(t)
    full = onnx.NodeProto()
    full.CopyFrom(node)
    have = {a.name for a in node.attribute}
    for name, a in schema.attributes.items():
        if name not in have and a.default_value and a.default_value.type:
            full.attribute.append(a.default_value)
    fn = onnx.FunctionProto()
    if versions:
        text = schema.get_context_dependent_function_with_opset_version(
            max(versions), full.SerializeToString(), [t.SerializeToString() for t in types])
    elif plain:
        text = schema.get_function_with_opset_version(max(plain))
    else:
        raise UnsupportedOperatorError([node.op_type], "gradient")
    if not text:
        raise ModelError(f"{node.op_type} node '{node.name}': onnx builds no function body for its "
                         "attributes and input types, which the gradient is the backward of")
    fn.ParseFromString(text)
    return fn, full


def _body(b, node) -> onnx.GraphProto:
    """The function body as a graph without inputs of its own: the node's inputs are read
    from the enclosing scope, every internal tensor (the outputs too) gets a fresh prefix."""
    fn, full = _function(b, node)
    prefix = b.fresh(f"{node.op_type}_body") + "/"
    rename = {}
    for k, formal in enumerate(fn.input):
        rename[formal] = node.input[k] if k < len(node.input) else ""
    node_attrs = {a.name: a for a in full.attribute}

    def name(n: str) -> str:
        if n == "" or n in rename:
            return rename.get(n, "")
        return prefix + n

    nodes = []
    for inner in fn.node:
        out = onnx.NodeProto()
        out.CopyFrom(inner)
        del out.input[:]
        out.input.extend(name(i) for i in inner.input)
        del out.output[:]
        out.output.extend(name(o) for o in inner.output)
        out.name = prefix + (inner.name or f"n{len(nodes)}")
        del out.attribute[:]
        for a in inner.attribute:
            if a.ref_attr_name:
                if a.ref_attr_name not in node_attrs:
                    continue  # an optional attribute the node leaves unset
                ref = onnx.AttributeProto()
                ref.CopyFrom(node_attrs[a.ref_attr_name])
                ref.name = a.name
                out.attribute.append(ref)
            else:
                if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    raise ModelError(f"{node.op_type} node '{node.name}': its function body has a subgraph")
                out.attribute.append(a)
        nodes.append(out)
    outs = [helper.make_tensor_value_info(name(o), onnx.TensorProto.UNDEFINED, None) for o in fn.output]
    return helper.make_graph(nodes, f"{node.op_type}_body", [], outs)


def function_backward(b, node, grads):
    """The backward of `node` as the backward of its schema's function body, inlined."""
    if _refuses(b.composite, node):
        raise UnsupportedOperatorError([node.op_type], b.composite.name)
    targets = [t for t in node.input
               if t and t in b.depends and b.constant(t) is None and b.graph.is_float(t)]
    if not targets:
        return [None] * len(node.input)
    if (node.op_type == "Attention" and len(node.input) > 6 and node.input[6]
            and b.graph.elem_type(node.input[0]) == onnx.TensorProto.DOUBLE):
        # Measured: onnxruntime 1.31's double kernel with nonpad_kv_seqlen departs from the
        # operator's definition (by ~0.5 on onnx's causal cases; float32 agrees to 1e-7),
        # and the explainer's forward runs that kernel: the gradient would not be its own.
        raise ModelError(f"Attention node '{node.name}': onnxruntime's float64 kernel with nonpad_kv_seqlen "
                         "does not compute the operator as onnx defines it; run the model in float32")
    return body_backward(b, node, grads, _body(b, node), targets)


def body_backward(b, node, grads, body: onnx.GraphProto, targets):
    """The backward of `node` as that of `body`, a graph without inputs of its own that
    computes the node's outputs (in order) from its inputs (read from the enclosing scope),
    every internal name fresh: its nodes are recomputed and differentiated by the
    composite's rules, inlined. Returns the gradients of the node's inputs."""
    from ..compile import subgraph_backward

    gout = list(grads) + [None] * (len(body.output) - len(grads))
    named = onnx.NodeProto()
    named.CopyFrom(node)
    named.name = b.fresh(node.op_type)
    bw = subgraph_backward(b, named, body, gout, targets, "function")
    b.nodes.extend(bw.node)
    b.initializers.extend(bw.initializer)
    by_target = {t: vi.name for t, vi in zip(targets, bw.output)}
    # The body's gradient of a tensor read twice (self-attention's Q = K = V) is its total:
    # it goes to the first of its positions only.
    return [by_target.pop(t, None) if t else None for t in node.input]


def _refuses(composite, *_node_and_graph) -> bool:
    # As for If: DeepLIFT's rescale rule needs each inner activation on the baseline, which
    # the baseline copy of the forward graph does not compute inside the body.
    return composite.key().startswith("deeplift")


for _op in ("Attention", "RotaryEmbedding"):
    register(_op)(function_backward)
function_backward.refuses = _refuses
