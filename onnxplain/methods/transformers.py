"""Explanations of transformers: relevance (AttnLRP, CP-LRP) as rules in the explainer graph,
and attention explanations (rollout, generic attention, transformer attribution) from the
attention maps found in the graph.

An attention map is the output of a Softmax that a MatMul multiplies with the value
tensor (through reshapes, casts, dropout or a mask's Where), per head: eager attention
and SDPA exports both have one per layer, shaped (batch, heads, queries, keys).
"""

from __future__ import annotations

import functools
import json

import numpy as np

from .. import groups
from ..compile import SEED, Composite
from ..errors import ModelError, OptionError
from ..rules import attnlrp as rules
from ..rules import lrp
from ..rules.base import lookup
from .base import Option, non_negative, register


class TransformerComposite(Composite):
    """AttnLRP (cp=False) or CP-LRP (cp=True) rules for every operator of a transformer.

    epsilon: the stabiliser; gamma: CP-LRP's gamma rule on the linear layers with a constant
    weight (0: the epsilon rule); activation: "identity" (the relevance of an element-wise
    non-linearity passes unchanged) or "gradient" (gradient x input through it)."""

    def __init__(self, cp: bool = False, epsilon: float = lrp.EPSILON, gamma: float = 0.0,
                 activation: str = "identity"):
        super().__init__("lrp.cp_lrp" if cp else "lrp.attnlrp", ())
        self.cp, self.epsilon, self.gamma, self.activation = cp, float(epsilon), float(gamma), activation

    def claims(self, group) -> bool:
        return group.elementwise or group.kind in ("layernorm", "rmsnorm")

    def _rule(self, node, graph):
        eps = self.epsilon
        group = groups.of(graph, node)
        if group is not None:
            return functools.partial(rules.group_rule, group=group, epsilon=eps, activation=self.activation)
        if node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op in rules.NONLINEAR:
            if self.activation == "gradient":
                return functools.partial(rules.activation_gradient, epsilon=eps)
            return rules.identity_rule
        if op in rules.MOVING:
            return lookup(node, "gradient")
        if op == "Softmax" and self.cp:
            return rules.no_relevance  # the attention probabilities are constants
        if op in lrp.LINEAR and self.gamma and _constant_weight(graph, node):
            return functools.partial(lrp.gamma_rule, gamma=self.gamma, epsilon=eps)
        if op == "MatMul" and self.cp:
            k = rules.value_product(graph, node)
            if k is not None:
                return functools.partial(rules.linear_rule, epsilon=eps, constant=(k,))
        fn = lookup(node, rules.FAMILY)
        return None if fn is None else _with_epsilon(fn, eps)

    def rule(self, node, graph):
        fn = self._rule(node, graph)
        return None if fn is None else functools.partial(_from_output, fn)

    def key(self) -> str:
        return self.name + json.dumps(dict(epsilon=self.epsilon, gamma=self.gamma, activation=self.activation))


def _from_output(fn, b, node, grads):
    """The relevance of the explained tensor is its value times the seed (AttnLRP's and
    lxt's start), so that with zero biases the total relevance is the explained logit."""
    grads = [b.mul(g, o) if g == SEED else g for g, o in zip(grads, node.output)]
    return fn(b, node, grads)


def _with_epsilon(fn, eps):
    return functools.partial(fn, epsilon=eps)


def _constant_weight(graph, node) -> bool:
    if node.op_type == "MatMul":
        return sum(graph.constant(i) is not None for i in node.input) == 1
    return len(node.input) > 1 and graph.constant(node.input[1]) is not None


EPSILON = Option("epsilon", 1e-6, float, "stabiliser of the epsilon rule's denominators", check=non_negative)
ACTIVATION = Option("activation", "identity", str, "element-wise non-linearities (GELU, SiLU): the identity "
                    "rule, or gradient x input", choices=("identity", "gradient"))


def attnlrp_composite(epsilon=1e-6, activation="identity"):
    return TransformerComposite(False, epsilon, 0.0, activation)


def cp_lrp_composite(epsilon=1e-6, gamma=0.0, activation="identity"):
    return TransformerComposite(True, epsilon, gamma, activation)


@register("lrp.attnlrp", "AttnLRP: epsilon rule on linear layers, softmax by its Taylor decomposition at the input, "
          "uniform rule on products of two computed tensors (attention scores, attention x values, gates), "
          "LayerNorm/RMSNorm with the variance held constant, identity rule on GELU/SiLU, proportional "
          "residual sums; for token models at the embedding output",
          options=[EPSILON, ACTIVATION], reference="Achtibat et al., ICML 2024 (AttnLRP)",
          composite=attnlrp_composite)
def attnlrp(ctx, epsilon, activation):
    return ctx.backward(attnlrp_composite(epsilon, activation))[0]


@register("lrp.cp_lrp", "CP-LRP (conservative propagation): attention probabilities and the LayerNorm scale held "
          "constant, so relevance flows through the value path only; epsilon (or gamma=) on linear layers, "
          "identity rule on GELU/SiLU",
          options=[EPSILON, Option("gamma", 0.0, float, "gamma rule on the linear layers (0: epsilon rule)",
                                   check=non_negative), ACTIVATION],
          reference="Ali et al., ICML 2022 (XAI for Transformers: conservative propagation)",
          composite=cp_lrp_composite)
def cp_lrp(ctx, epsilon, gamma, activation):
    return ctx.backward(cp_lrp_composite(epsilon, gamma, activation))[0]
