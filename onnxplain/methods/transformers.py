"""Explanations of transformers: relevance (AttnLRP, CP-LRP) as rules in the explainer graph,
and attention explanations (rollout, generic attention, transformer attribution) from the
attention maps found in the graph.

An attention map is the output of a Softmax that a MatMul multiplies with the value
tensor (through reshapes, casts, dropout or a mask's Where), per head: eager attention
and SDPA exports both have one per layer, shaped (batch, heads, queries, keys).

The attention methods explain one row of a token-mixing matrix: the CLS token's, as the
papers do; for a ViT without a CLS token (a mean-pooled head) the mean of the rows, the
same reading carried over to a head on the mean of the tokens (explained_row).
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

    CP-LRP holds the attention probabilities constant in the products that read them, so
    no relevance reaches their Softmax from there; a Softmax read otherwise (no attention)
    takes AttnLRP's Taylor rule rather than silently stopping the relevance.

    epsilon: the stabiliser; gamma: CP-LRP's gamma rule on the linear layers with a constant
    weight (0: the epsilon rule); activation: "identity" (the relevance of an element-wise
    non-linearity passes unchanged) or "gradient" (gradient x input through it)."""

    def __init__(self, cp: bool = False, epsilon: float = lrp.EPSILON, gamma: float = 0.0,
                 activation: str = "identity"):
        super().__init__("lrp.cp_lrp" if cp else "lrp.attnlrp", ())
        self.cp, self.epsilon, self.gamma, self.activation = cp, float(epsilon), rules.parse_gamma(gamma), activation
        self._gammas: dict = {}  # id(graph) -> (graph, {node name: gamma}) (rules.layer_gammas: per layer or block)

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
        if op in ("Attention", "RotaryEmbedding"):
            # Defined by a function body, whose nodes these same rules propagate through
            # (rules/gradient_attention.function_backward runs the composite on it).
            return lookup(node, "gradient")
        gamma = self._layer_gamma(graph, node) if op in lrp.LINEAR and self.gamma else 0.0
        if gamma and _constant_weight(graph, node):
            return functools.partial(lrp.gamma_rule, gamma=gamma, epsilon=eps)
        if op in ("MatMul", "Einsum", "Mul") and self.cp:
            # Attention probabilities are constants: a product with them is linear in the
            # other operand (the values), which keeps all the relevance.
            held = tuple(k for k, i in enumerate(node.input)
                         if i and graph.constant(i) is None and rules.attention_probabilities(graph, i) is not None)
            if held:
                return functools.partial(rules.linear_rule, epsilon=eps, constant=held)
        fn = lookup(node, rules.FAMILY)
        return None if fn is None else _with_epsilon(fn, eps)

    def _layer_gamma(self, graph, node) -> float:
        hit = self._gammas.get(id(graph))
        if hit is None or hit[0] is not graph:
            layers = [n for n in graph.nodes if n.op_type in lrp.LINEAR and _constant_weight(graph, n)]
            hit = self._gammas[id(graph)] = (graph, rules.layer_gammas(graph, self.gamma, layers))
        return hit[1].get(node.name, 0.0)

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
          options=[EPSILON, Option("gamma", 0.0, "any", "gamma rule on the linear layers (0: epsilon rule): a "
                                   "number for all, a list with one per transformer block, or {layer name: gamma}",
                                   check=rules.check_gamma), ACTIVATION],
          reference="Ali et al., ICML 2022 (XAI for Transformers: conservative propagation)",
          composite=cp_lrp_composite)
def cp_lrp(ctx, epsilon, gamma, activation):
    return ctx.backward(cp_lrp_composite(epsilon, gamma, activation))[0]


# ----------------------------------------------------------------------------- attention maps
def attention_maps(graph) -> list:
    """The attention probabilities of the model, layer by layer: each Softmax output that a
    MatMul multiplies with a computed value tensor (eager and SDPA exports alike)."""
    found = []
    for node in graph.nodes:
        k = rules.value_product(graph, node)
        if k is None:
            continue
        probs = rules.attention_probabilities(graph, node.input[k])
        shape = graph.shape(node.input[k])
        if shape is not None and len(shape) == 4:
            # As the value product reads them: after the Where that zeroes a fully masked
            # (NaN) row of an SDPA export.
            probs = node.input[k]
        if probs not in found:
            found.append(probs)
    if not found:
        inside = sorted({n.op_type for n in graph.nodes if n.op_type in ("Attention", "MultiHeadAttention")})
        hint = (f"; this model computes attention inside {', '.join(inside)} operators, whose probabilities are "
                "no tensor of the graph: export it with an opset before 23 (or eager attention)") if inside else ""
        raise ModelError("no attention maps found: attention explanations need a Softmax whose output a MatMul "
                         "multiplies with the values (per head)" + hint)
    return found


def _maps(ctx, values: dict, names: list) -> list:
    out = []
    for t in names:
        a = np.asarray(values[t], dtype=np.float64)
        if a.ndim == 3:
            a = a[:, None]  # one head
        if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
            raise ModelError(f"attention map '{t}' has shape {a.shape[1:]} per sample; attention explanations need "
                             "(heads, tokens, tokens)")
        out.append(a)
    if len({a.shape[-1] for a in out}) != 1:
        raise ModelError("the attention maps differ in their number of tokens; they cannot be rolled out")
    return out


def _fuse(a: np.ndarray, how: str) -> np.ndarray:
    return {"mean": np.mean, "max": np.max, "min": np.min}[how](a, axis=1)


def rollout(maps: list, head_fusion: str = "mean") -> np.ndarray:
    """Abnar & Zuidema: the product over layers of 0.5 A + 0.5 I (heads fused, rows
    renormalised), first layer rightmost."""
    n, t = maps[0].shape[0], maps[0].shape[-1]
    out = np.broadcast_to(np.eye(t), (n, t, t)).copy()
    for a in maps:
        a = 0.5 * _fuse(a, head_fusion) + 0.5 * np.eye(t)
        a = a / a.sum(-1, keepdims=True)
        out = a @ out
    return out


def relevance_rollout(terms: list) -> np.ndarray:
    """Chefer et al.: R = I; for each layer R += mean_heads(term+) R, the term of a layer
    (batch, heads, tokens, tokens) being dA * A (generic attention) or dA * R_A."""
    n, t = terms[0].shape[0], terms[0].shape[-1]
    out = np.broadcast_to(np.eye(t), (n, t, t)).copy()
    for term in terms:
        out = out + np.maximum(term, 0.0).mean(axis=1) @ out
    return out


def patch_grid(tokens: int, size: tuple) -> tuple:
    """(prefix, rows, cols) of a ViT's token sequence on an image of `size` (H, W): one CLS
    token before a rows x cols grid of patches of the image's aspect (prefix 1), or the grid
    alone (prefix 0: a ViT without a CLS token, whose head averages the tokens, as DeiT-style
    GAP heads and many timm models do). The two cannot both fit: grids of one aspect hold
    h*w*k^2 patches (h:w the reduced aspect), and no two of those differ by one."""
    h, w = size
    for prefix in (1, 0):
        n = tokens - prefix
        rows = int(round(np.sqrt(n * h / w))) if n > 0 else 0
        if rows and n % rows == 0 and rows * w == (n // rows) * h:
            return prefix, rows, n // rows
    raise ModelError(f"{tokens} tokens are neither a CLS token and a grid of patches of the image's aspect "
                     f"({h}x{w}) nor such a grid alone; a ViT with more prefix tokens (distillation or register "
                     "tokens) is not supported")


def explained_row(matrix: np.ndarray, query) -> np.ndarray:
    """The row of a (batch, tokens, tokens) token-mixing matrix R (R[i, j]: how much input
    token j makes up output token i) that the explained output reads: row `query`, or with
    "mean" the mean over rows. The mean is the published methods' reading of a head on the
    CLS token carried over to a head on the mean of the tokens: that head reads
    (1/T) sum_i x_i, a linear reading, so its row of R is (1/T) sum_i R[i, :]."""
    return matrix.mean(axis=1) if query == "mean" else matrix[:, int(query)]


def _scores(ctx, matrix: np.ndarray, query, upsample: bool, interpolation: str) -> dict:
    """The explained row of a (batch, tokens, tokens) matrix: per-token scores keyed by the
    id input for a token model; for an image model the row's patch part on the patch grid,
    upsampled to the image, keyed by the image input, (batch, 1, H, W). query "auto" is the
    CLS token (0), or for a ViT without one the mean over the token rows."""
    from .blackbox import layout
    from .cam import resize

    t = matrix.shape[-1]
    images = [n for n in ctx.inputs if len(ctx.feeds[n].shape) == 4]
    if images:
        name = images[0]
        channel, spatial = layout(ctx.feeds[name].shape)
        size = tuple(ctx.feeds[name].shape[a] for a in spatial)
        prefix, rows, cols = patch_grid(t, size)
        row = explained_row(matrix, ("0" if prefix else "mean") if query == "auto" else query)
        grid = row[:, prefix:].reshape(-1, rows, cols)
        if not upsample:
            return {name: grid[:, None].astype(np.float32)}
        return {name: np.expand_dims(resize(grid, size, interpolation), channel or 1).astype(np.float32)}
    row = explained_row(matrix, "0" if query == "auto" else query)
    ids = [n for n in ctx.feeds if ctx.feeds[n].ndim == 2 and ctx.feeds[n].shape[1] == t
           and ctx.feeds[n].dtype.kind in "iu"]
    # The ids an embedding table is indexed by, before masks and segment ids.
    ids.sort(key=lambda n: not any(c.op_type == "Gather" and n in c.input[1:] for c in ctx.graph.consumers.get(n, [])))
    name = ids[0] if ids else ctx.wrt[0]
    return {name: row.astype(np.float32)}


def _map_values(ctx):
    names = attention_maps(ctx.graph)
    return names, _maps(ctx, ctx.forward(names), names)


QUERY = Option("query", "auto", str, "the query token whose row is read: an index (0: the CLS token), mean (the "
               "mean over token rows), or auto: 0, but mean for a ViT without a CLS token (a square grid of patch "
               "tokens, mean-pooled)")
UPSAMPLE = Option("upsample", True, bool, "for an image model, upsample the patch grid to the image")
INTERPOLATION = Option("interpolation", "bilinear", str, "upsampling", choices=("bilinear", "nearest"))


def _check_query(q):
    if q in ("mean", "auto"):
        return None
    try:
        int(q)
    except ValueError:
        return "must be a token index or 'mean'"
    return None


QUERY.check = _check_query


@register("attention_rollout", "attention rollout: the product over layers of the head-averaged attention plus "
          "the identity (residual); the query token's row as per-token scores, or for a ViT the CLS row (the mean "
          "row without a CLS token) on the patch grid upsampled to the image",
          options=[Option("head_fusion", "mean", str, "how heads are fused", choices=("mean", "max", "min")),
                   QUERY, UPSAMPLE, INTERPOLATION],
          reference="Abnar & Zuidema, ACL 2020")
def attention_rollout(ctx, head_fusion, query, upsample, interpolation):
    _, maps = _map_values(ctx)
    return _scores(ctx, rollout(maps, head_fusion), query, upsample, interpolation)


def _map_gradients(ctx, names, composite):
    values = ctx.with_wrt(names).backward(composite)[0]
    return _maps(ctx, values, names)


@register("generic_attention", "gradient-weighted attention rolled out: R += mean_heads((dA * A)+) R over layers, "
          "the gradient of the target at each attention map",
          options=[QUERY, UPSAMPLE, INTERPOLATION], reference="Chefer et al., ICCV 2021 (generic attention)")
def generic_attention(ctx, query, upsample, interpolation):
    from .gradients import GRADIENT

    names, maps = _map_values(ctx)
    grads = _map_gradients(ctx, names, GRADIENT)
    return _scores(ctx, relevance_rollout([g * a for g, a in zip(grads, maps)]), query, upsample, interpolation)


@register("transformer_attribution", "relevance-weighted attention rolled out: R += mean_heads((dA * R_A)+) R over "
          "layers, R_A the AttnLRP relevance of each attention map",
          options=[EPSILON, QUERY, UPSAMPLE, INTERPOLATION],
          reference="Chefer et al., CVPR 2021 (transformer attribution)")
def transformer_attribution(ctx, epsilon, query, upsample, interpolation):
    from .gradients import GRADIENT

    names, maps = _map_values(ctx)
    grads = _map_gradients(ctx, names, GRADIENT)
    relevance = _map_gradients(ctx, names, attnlrp_composite(epsilon))
    terms = [g * r for g, r in zip(grads, relevance)]
    return _scores(ctx, relevance_rollout(terms), query, upsample, interpolation)
