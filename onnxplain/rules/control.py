"""Control flow: the exact backward of `If`, branch by branch.

An `If` reads the tensors of its enclosing scope implicitly, inside its branches. Its
backward is an `If` on the same condition whose branches each recompute their forward
body and run its backward (the rules of the composite, node by node, so the LRP and other
families apply inside the branches too), seeded by the gradients of the `If`'s outputs
(tensors of the enclosing scope of the backward `If`). Each branch outputs the gradient of
every differentiable outer tensor that either branch reads, zeros where it does not use it;
the compiler accumulates them through `Builder.implicit_grads`.

`Loop` and `Scan` have no rule: the compiler unrolls them into plain nodes where the input
shapes fix their length (canonize.unroll_loops), and refuses them with a typed error where
they do not.
"""

from __future__ import annotations

from ..errors import UnsupportedOperatorError
from ..graph import subgraph_op_types
from .base import attr, register
from .lrp import CONV, DENSE, LINEAR


@register("If")
def if_(b, node, grads):
    from ..compile import subgraph_backward
    from ..graph import implicit_inputs

    composite = b.composite
    if _refuses(composite, node, b.graph):
        err = UnsupportedOperatorError(["If"], composite.name)
        if not composite.key().startswith("deeplift"):
            err.args = (f"method '{composite.name}' gives the first or last linear layers rules of their own, and "
                        f"If node '{node.name}' holds linear layers in its branches, where those positions are not "
                        "defined; use a composite without position rules (lrp.epsilon, lrp.epsilon_plus, "
                        "lrp.epsilon_alpha2_beta1, excitation_backprop) or a black-box method",)
        raise err
    targets = [t for t in implicit_inputs(node)
               if t in b.depends and b.constant(t) is None and b.graph.is_float(t)]
    if targets:
        then_g = subgraph_backward(b, node, attr(node, "then_branch"), grads, targets, "then")
        else_g = subgraph_backward(b, node, attr(node, "else_branch"), grads, targets, "else")
        outs = b.op("If", node.input[0], outputs=len(targets), then_branch=then_g, else_branch=else_g)
        outs = [outs] if isinstance(outs, str) else outs
        b.implicit_grads.update(zip(targets, outs))
    return [None]


def _refuses(composite, node, graph) -> bool:
    # DeepLIFT's rescale rule compares each activation with its value on the baseline,
    # which the baseline copy of the forward graph does not compute inside a branch.
    if composite.key().startswith("deeplift"):
        return True
    # A composite with rules by position (first layers, last layers) decides positions on
    # the whole graph; a linear layer inside a branch has no place there.
    inside = subgraph_op_types(node)
    first = getattr(composite, "first", None) or {}
    kinds = {"conv": set(CONV), "dense": set(DENSE)}
    if any(inside & kinds.get(k, set(LINEAR)) for k in first):
        return True
    return bool(getattr(composite, "top", None) and inside & set(LINEAR)
                and _before_any_linear(graph, node, getattr(composite, "explained", None)))


def _before_any_linear(graph, node, explained) -> bool:
    """Whether `node` reaches the explained tensor (default: any output) through no linear
    node: then a linear layer inside it may be one of the last."""
    from ..graph import node_inputs

    stack, seen = [explained] if explained else list(graph.outputs), set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        n = graph.producer.get(t)
        if n is None or n.op_type in LINEAR:
            continue
        if n.name == node.name:
            return True
        stack.extend(i for i in node_inputs(n) if graph.constant(i) is None)
    return False


# Read by the compiler's check of what a composite cannot explain (and so by `inspect`).
if_.refuses = _refuses
