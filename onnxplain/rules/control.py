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
from .base import attr, register


@register("If")
def if_(b, node, grads):
    from ..compile import subgraph_backward
    from ..graph import implicit_inputs

    composite = b.composite
    if _refuses(composite):
        raise UnsupportedOperatorError(["If"], composite.name)
    targets = [t for t in implicit_inputs(node)
               if t in b.depends and b.constant(t) is None and b.graph.is_float(t)]
    if targets:
        then_g = subgraph_backward(b, node, attr(node, "then_branch"), grads, targets, "then")
        else_g = subgraph_backward(b, node, attr(node, "else_branch"), grads, targets, "else")
        outs = b.op("If", node.input[0], outputs=len(targets), then_branch=then_g, else_branch=else_g)
        outs = [outs] if isinstance(outs, str) else outs
        b.implicit_grads.update(zip(targets, outs))
    return [None]


def _refuses(composite) -> bool:
    # DeepLIFT's rescale rule compares each activation with its value on the baseline,
    # which the baseline copy of the forward graph does not compute inside a branch.
    return composite.key().startswith("deeplift")


# Read by the compiler's check of what a composite cannot explain (and so by `inspect`).
if_.refuses = _refuses
