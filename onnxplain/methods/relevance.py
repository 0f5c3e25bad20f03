"""Rule-based methods: LRP composites (Zennit's names and defaults), user-defined LRP
composites, deep Taylor decomposition, (contrastive) excitation backprop, and DeepLIFT.

A composite here is only a mapping from node to rule: by node name, by position (the first
linear layers reached from the input, the last ones before the explained tensor), by
operator, then by the kind of operator. Index-moving operators (reshapes, concatenation,
slicing, padding, MaxPool's winner-take-all) keep their gradient, which moves relevance
with the elements.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import warnings
import weakref
from pathlib import Path

import numpy as np

from .. import groups
from ..compile import Composite, _ancestors
from ..errors import OptionError
from ..graph import node_inputs, subgraph_op_types
from ..rules import deeplift as deeplift_rules
from ..rules import lrp
from ..rules.base import lookup
from ..rules.deeplift import Reference
from .base import Context, Option, non_negative, register
from .integrated import (LAYER_OPTIONS, baseline_ids_for, check_layer_options, check_moved, layer_value,
                         with_baseline_ids)

RESIDUAL = ("Add", "Sum", "Sub")
SCALING = ("Mul", "Div")
LINEAR_POOLS = lrp.POOLS + ("ReduceMean", "ReduceSum")
RECURRENT = ("LSTM", "GRU", "RNN")


def _family(spec: str) -> str:
    if spec == "gradient":
        return "gradient"
    if spec == "contrastive":
        return "excitation.contrastive"
    if spec == "deeplift":
        return "deeplift"
    return "lrp." + spec


def _bind(fn, params: dict):
    """`fn` with those of `params` that it accepts."""
    sig = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in sig.values()):
        kw = dict(params)
    else:
        kw = {k: v for k, v in params.items() if k in sig}
    return functools.partial(fn, **kw) if kw else fn


def first_linear_nodes(graph) -> set:
    """Names of the linear nodes reached first from the model's float inputs: no other
    linear node lies between them and the input."""
    passed = {x: False for x in graph.inputs if graph.is_float(x)}
    first = set()
    for node in graph.nodes:
        flags = [passed[i] for i in node_inputs(node) if i in passed]  # If branches' reads too
        if not flags:
            continue
        after = any(flags)
        if node.op_type in lrp.LINEAR:
            if not after:
                first.add(node.name)
            after = True
        elif subgraph_op_types(node) & set(lrp.LINEAR):
            after = True  # a linear layer inside a branch or loop body came first
        for o in node.output:
            if o:
                passed[o] = after
    return first


def last_linear_nodes(graph, explained: str | None) -> set:
    """Names of the linear nodes whose output reaches the explained tensor (default: any
    model output) through no other linear node."""
    targets = [explained] if explained else list(graph.outputs)
    last, seen, stack = set(), set(), list(targets)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = graph.producer.get(t)
        if node is None:
            continue
        if node.op_type in lrp.LINEAR:
            last.add(node.name)
            continue
        stack.extend(i for i in node_inputs(node) if graph.constant(i) is None)
    return last


class RuleComposite(Composite):
    """Which relevance rule serves which node.

    conv/dense: the rule of Conv-like and Gemm/MatMul layers; first: {"conv"|"dense": rule}
    for the first linear layers; top: a rule for the last linear layers; ops: {op: rule};
    nodes: {node name: rule}; params: rule keyword arguments (epsilon, stabilizer, gamma,
    alpha, beta, low, high, bias); activation/batchnorm/residual/maxpool: rules of those.
    """

    def __init__(self, name, conv="epsilon", dense="epsilon", first=None, top=None, ops=None, nodes=None,
                 params=None, activation="pass", batchnorm="pass", residual="norm", maxpool="gradient",
                 explained=None):
        super().__init__(name, ())
        self.conv, self.dense = conv, dense
        self.first, self.top = dict(first or {}), top
        self.ops, self.nodes = dict(ops or {}), dict(nodes or {})
        self.params = dict(params or {})
        self.activation, self.batchnorm, self.residual, self.maxpool = activation, batchnorm, residual, maxpool
        self.explained = explained
        self._positions = weakref.WeakKeyDictionary()

    # --- which rule name -----------------------------------------------------------------
    def _position(self, graph):
        if graph not in self._positions:
            self._positions[graph] = (first_linear_nodes(graph), last_linear_nodes(graph, self.explained))
        return self._positions[graph]

    def spec(self, node, graph) -> str:
        op = node.op_type
        if node.name in self.nodes:
            return self.nodes[node.name]
        if op in lrp.LINEAR:
            first, last = self._position(graph)
            kind = "conv" if op in lrp.CONV else "dense"
            if node.name in first and kind in self.first:
                return self._first_rule(self.first[kind], node, graph)
            if self.top and node.name in last:
                return self.top
            if op in self.ops:
                return self.ops[op]
            return self.conv if kind == "conv" else self.dense
        if op in self.ops:
            return self.ops[op]
        if op in RECURRENT and self.name.startswith("lrp"):
            # Arras et al. 2017: the epsilon rule on the linear maps, relevance to the
            # signal of every gated product (rules/recurrent_lrp.py).
            return "epsilon"
        if op in lrp.ACTIVATIONS:
            return self.activation
        if op == "BatchNormalization":
            return self.batchnorm
        if op in RESIDUAL:
            computed = [i for i in node.input if i and graph.constant(i) is None]
            return self.residual if len(computed) > 1 else "pass"
        if op in SCALING:
            return "pass"
        if op in LINEAR_POOLS:
            return "norm"
        if op == "MaxPool":
            return self.maxpool
        return "gradient"

    def _first_rule(self, spec, node, graph):
        if spec != "zbox_or_wsquare":
            return spec
        p = self.params
        if p.get("low") is not None or p.get("high") is not None:
            return "zbox"
        return "zbox" if lrp.preprocess_bounds(graph, node.input[0]) is not None else "wsquare"

    # --- the rule ------------------------------------------------------------------------
    def rule(self, node, graph):
        spec = self.spec(node, graph)
        fn = lookup(node, _family(spec))
        if fn is None:
            if spec in ("pass", "norm") or node.name not in self.nodes and node.op_type not in self.ops:
                # Kinds without an LRP rule of their own keep their gradient.
                return lookup(node, "gradient")
            raise OptionError(f"rule '{spec}' does not apply to {node.op_type} node '{node.name}'")
        return _bind(fn, self.rule_params(spec))

    def rule_params(self, spec: str) -> dict:
        p = dict(self.params)
        # Zennit: `epsilon` is the epsilon rule's; every other rule uses `stabilizer`.
        if spec != "epsilon" and "stabilizer" in p:
            p["epsilon"] = p["stabilizer"]
        p.pop("stabilizer", None)
        return {k: v for k, v in p.items() if v is not None or k in ("low", "high")}

    def key(self) -> str:
        def enc(v):
            if isinstance(v, np.ndarray):
                return hashlib.sha1(np.ascontiguousarray(v, dtype=np.float64).tobytes()).hexdigest() + str(v.shape)
            return v

        state = dict(conv=self.conv, dense=self.dense, first=self.first, top=self.top, ops=self.ops,
                     nodes=self.nodes, params={k: enc(v) for k, v in self.params.items()},
                     act=self.activation, bn=self.batchnorm, res=self.residual, mp=self.maxpool,
                     explained=self.explained)
        return self.name + json.dumps(state, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- Zennit's composites
ZENNIT = {
    # name: (conv rule, dense rule, first-layer rules)
    "lrp.epsilon": ("epsilon", "epsilon", None),
    "lrp.epsilon_plus": ("zplus", "epsilon", None),
    "lrp.epsilon_plus_flat": ("zplus", "epsilon", {"conv": "flat", "dense": "flat"}),
    "lrp.epsilon_gamma_box": ("gamma", "epsilon", {"conv": "zbox"}),
    "lrp.epsilon_alpha2_beta1": ("alpha_beta", "epsilon", None),
    "lrp.epsilon_alpha2_beta1_flat": ("alpha_beta", "epsilon", {"conv": "flat", "dense": "flat"}),
}
ZENNIT_CLASS = {
    "lrp.epsilon": "LayerMapComposite([(Linear, Epsilon())] + layer_map_base())",
    "lrp.epsilon_plus": "EpsilonPlus", "lrp.epsilon_plus_flat": "EpsilonPlusFlat",
    "lrp.epsilon_gamma_box": "EpsilonGammaBox", "lrp.epsilon_alpha2_beta1": "EpsilonAlpha2Beta1",
    "lrp.epsilon_alpha2_beta1_flat": "EpsilonAlpha2Beta1Flat",
}


def zennit_composite(name: str, epsilon=1e-6, stabilizer=1e-6, gamma=0.25, low=None, high=None, bias=True,
                     maxpool="winner") -> RuleComposite:
    conv, dense, first = ZENNIT[name]
    params = dict(epsilon=epsilon, stabilizer=stabilizer, bias=bias)
    if conv == "gamma":
        params.update(gamma=gamma, low=low, high=high)
    if conv == "alpha_beta":
        params.update(alpha=2.0, beta=1.0)
    return RuleComposite(name, conv, dense, first, params=params,
                         maxpool="norm" if maxpool == "smooth" else "gradient")


def _array_key(v):
    return v if v is None or isinstance(v, float) else np.asarray(v, dtype=np.float32)


EPSILON = Option("epsilon", 1e-6, float, "stabiliser of the epsilon rule (larger values absorb weak relevance)",
                 check=non_negative)
STABILIZER = Option("stabilizer", 1e-6, float, "stabiliser of the other rules' denominators", check=non_negative)
GAMMA = Option("gamma", 0.25, float, "weight of the added positive (or negative) parts in the gamma rule",
               check=non_negative)
LOW = Option("low", None, "array", "lowest input value for z-box: a number or one per channel "
             "(default: from the model's preprocessing, else each sample's minimum)")
HIGH = Option("high", None, "array", "highest input value for z-box: a number or one per channel "
              "(default: from the model's preprocessing, else each sample's maximum)")
BIAS = Option("bias", True, bool, "include the layers' biases in the rules (false: Zennit's zero_params='bias')")
MAXPOOL = Option("maxpool", "winner", str, "MaxPool: winner-take-all, or a smooth split in proportion to the "
                 "activations", choices=("winner", "smooth"))


def _options_for(name):
    opts = [EPSILON, STABILIZER, BIAS, MAXPOOL]
    if ZENNIT[name][0] == "gamma":
        opts[2:2] = [GAMMA, LOW, HIGH]
    return opts


def _make_zennit_method(name):
    def composite(**opts):
        return zennit_composite(name, **{k: _array_key(v) if k in ("low", "high") else v for k, v in opts.items()})

    def run(ctx, **opts):
        return ctx.backward(composite(**opts))[0]

    conv, dense, first = ZENNIT[name]
    what = f"LRP composite: {conv} for convolutions, {dense} for dense layers"
    if first:
        what += f", {first['conv']} for the first layer"
    register(name, what + ", pass for activations, norm for residual sums and average pools",
             options=_options_for(name), reference=f"Zennit {ZENNIT_CLASS[name]}", composite=composite)(run)


for _name in ZENNIT:
    _make_zennit_method(_name)


# ----------------------------------------------------------------------------- user composite
RULE_CHOICES = tuple(r for r in lrp.RULE_NAMES) + ("alpha1_beta0",)


def parse_rules(value) -> dict:
    """{"Conv": "gamma", "first": "zbox", "node:NAME": "flat", ...} from a dict, a string
    `Conv:gamma,first:zbox,node:NAME:flat`, or a path to a JSON file holding that dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        rules = dict(value)
    else:
        text = str(value).strip()
        if text.endswith(".json"):
            try:
                rules = json.loads(Path(text).read_text())
            except OSError as exc:
                raise OptionError(f"cannot read rules file {text}: {exc.strerror}") from None
            except ValueError as exc:
                raise OptionError(f"rules file {text} is not valid JSON: {exc}") from None
            if not isinstance(rules, dict):
                raise OptionError(f"rules file {text} must hold an object like {{\"Conv\": \"gamma\"}}")
        else:
            rules = {}
            for item in text.split(","):
                if not item.strip():
                    continue
                key, sep, rule = item.strip().rpartition(":")
                if not sep or not key:
                    raise OptionError(f"rules entry '{item}' must be KEY:RULE, e.g. Conv:gamma or first:zbox")
                rules[key.strip()] = rule.strip()
    for key, rule in rules.items():
        if rule not in RULE_CHOICES:
            raise OptionError(f"unknown rule '{rule}' for '{key}'; rules: {', '.join(RULE_CHOICES)}")
    return rules


def _check_rules(v):
    try:
        parse_rules(v)
    except OptionError as exc:
        return str(exc)
    return None


def user_composite(rules, epsilon=1e-6, stabilizer=1e-6, gamma=0.25, alpha=2.0, beta=1.0, low=None, high=None,
                   bias=True, maxpool="winner") -> RuleComposite:
    rules = parse_rules(rules)
    lrp.check_alpha_beta(alpha, beta)
    first, ops, nodes = {}, {}, {}
    conv = dense = "epsilon"
    rename = {"alpha1_beta0": "zplus"}
    for key, rule in rules.items():
        rule = rename.get(rule, rule)
        if key == "first":
            first = {"conv": rule, "dense": rule}
        elif key.startswith("node:"):
            nodes[key[5:]] = rule
        elif key in ("conv", "linear", "dense", "default"):
            if key in ("conv", "linear", "default"):
                conv = rule
            if key in ("dense", "linear", "default"):
                dense = rule
        else:
            ops[key] = rule
    params = dict(epsilon=epsilon, stabilizer=stabilizer, gamma=gamma, alpha=alpha, beta=beta,
                  low=_array_key(low), high=_array_key(high), bias=bias)
    name = "lrp:" + json.dumps(rules, sort_keys=True)
    return RuleComposite(name, conv, dense, first, ops=ops, nodes=nodes, params=params,
                         maxpool="norm" if maxpool == "smooth" else "gradient")


@register("lrp", "LRP with a user-defined composite: rules per operator (Conv:gamma), per node "
          "(node:NAME:flat) and for the first layer (first:zbox); epsilon elsewhere",
          options=[Option("rules", "", "any", "KEY:RULE pairs separated by commas, or a .json file; keys: an "
                          "operator, first, node:NAME, conv, dense, linear; rules: " + ", ".join(RULE_CHOICES),
                          check=_check_rules),
                   EPSILON, STABILIZER, GAMMA,
                   Option("alpha", 2.0, float, "alpha of the alpha-beta rule", check=non_negative),
                   Option("beta", 1.0, float, "beta of the alpha-beta rule (alpha - beta = 1)", check=non_negative),
                   LOW, HIGH, BIAS, MAXPOOL],
          reference="Zennit NameLayerMapComposite", composite=lambda **o: _exported_user_composite(**o))
def lrp_custom(ctx, rules, epsilon, stabilizer, gamma, alpha, beta, low, high, bias, maxpool):
    return ctx.backward(user_composite(rules, epsilon, stabilizer, gamma, alpha, beta, low, high, bias, maxpool))[0]


def _exported_user_composite(rules, **options):
    if not rules:
        raise OptionError("method 'lrp' exports a user composite: give its rules (e.g. rules=Conv:gamma,first:zbox)")
    return user_composite(rules, **options)


# ----------------------------------------------------------------------------- deep Taylor, EB
def deep_taylor_composite(low=None, high=None, stabilizer=1e-6) -> RuleComposite:
    return RuleComposite("deep_taylor", "zplus", "zplus", {"conv": "zbox_or_wsquare", "dense": "zbox_or_wsquare"},
                         params=dict(stabilizer=stabilizer, low=_array_key(low), high=_array_key(high)))


@register("deep_taylor", "deep Taylor decomposition: z+ in hidden layers, z-box first for a bounded input "
          "(low/high given or known from the preprocessing), w-square first otherwise",
          options=[Option("low", None, "array", "lowest input value (a number or one per channel); with high, "
                          "makes the first layer z-box"),
                   Option("high", None, "array", "highest input value (a number or one per channel)"),
                   STABILIZER],
          reference="Montavon et al. 2017", composite=deep_taylor_composite)
def deep_taylor(ctx, low, high, stabilizer):
    return ctx.backward(deep_taylor_composite(low, high, stabilizer))[0]


def excitation_composite(contrastive=False, stabilizer=1e-6, explained=None) -> RuleComposite:
    # z+ without bias: the winning probability is passed on only through excitatory inputs and
    # conserved exactly (Zennit's ExcitationBackprop with zero_params='bias').
    return RuleComposite("contrastive_excitation_backprop" if contrastive else "excitation_backprop",
                         "zplus", "zplus", top="contrastive" if contrastive else None,
                         params=dict(stabilizer=stabilizer, bias=False), explained=explained)


@register("excitation_backprop", "marginal winning probability, top-down through excitatory connections: "
          "non-negative, summing to the seed's mass; use layer= for a mid-level map",
          options=[STABILIZER], reference="Zhang et al. 2016; Zennit ExcitationBackprop(zero_params='bias')",
          composite=lambda stabilizer=1e-6: excitation_composite(False, stabilizer))
def excitation_backprop(ctx, stabilizer):
    return ctx.backward(excitation_composite(False, stabilizer))[0]


def _contrastive_composite(stabilizer=1e-6, saliency_layer=None, contrast_layer=None, non_negative_contrast=False,
                           positive=None):
    if saliency_layer:
        raise OptionError("saliency_layer reads the map at a layer and upsamples it, which an exported graph "
                          "does not do: export without it and read the attribution at that layer (--layer)")
    if non_negative_contrast or positive:
        raise OptionError("non_negative_contrast and positive clip a map between passes, which an exported graph "
                          "does not do: export without them and clip the attribution it returns")
    # Without truncation the contrast formed at a deeper contrast_layer is the same map (see
    # contrastive_excitation_backprop): the one-pass graph serves it.
    return excitation_composite(True, stabilizer)


CONTRAST_LAYER = Option("contrast_layer", None, str,
                        "the tensor where target minus dual is formed and propagated on from (TorchRay's "
                        "contrast_layer, e.g. the last feature map); default: the explained layer's input. The "
                        "same map wherever it is formed, unless non_negative_contrast")
NON_NEGATIVE_CONTRAST = Option("non_negative_contrast", False, bool,
                               "keep only the positive part of the contrast at contrast_layer before propagating "
                               "it on (TorchRay's Probe.non_negative_contrast)")
POSITIVE = Option("positive", None, bool,
                  "keep only the map's positive part: where the target's evidence beats its dual's (the read-out "
                  "of the paper and of TorchRay); default: yes at a saliency_layer, no at the input (the signed "
                  "convention tested against Zennit)")


@register("contrastive_excitation_backprop", "excitation backprop of the target minus that of its dual "
          "(negated output weights), formed below the explained neuron or at contrast_layer; saliency_layer= "
          "reads it at a mid layer, summed over channels, its positive part upsampled to the input (the "
          "paper's maps)",
          options=[STABILIZER, Option("saliency_layer", None, str, "a 4-D tensor to read the map at (TorchRay's "
                                      "saliency_layer; `onnxplain inspect` lists them); default: the input"),
                   CONTRAST_LAYER, NON_NEGATIVE_CONTRAST, POSITIVE],
          reference="Zhang et al. 2016; TorchRay contrastive_excitation_backprop",
          composite=_contrastive_composite)
def contrastive_excitation_backprop(ctx, stabilizer, saliency_layer=None, contrast_layer=None,
                                    non_negative_contrast=False, positive=None):
    composite = excitation_composite(True, stabilizer, ctx.explained)
    saliency_layer = saliency_layer or None  # '' from the CLI: the map at the input
    contrast_layer = contrast_layer or None
    if non_negative_contrast and not contrast_layer:
        raise OptionError("non_negative_contrast truncates the contrast where it is formed: give contrast_layer=T "
                          "too (e.g. the last feature map; `onnxplain inspect MODEL` lists the layers)")
    inputs = {t: ctx.feeds[t].shape for t in ctx.wrt if t in ctx.feeds}
    if saliency_layer:
        layer_shape = ctx.shape(saliency_layer) if saliency_layer in ctx.graph.tensor_names() else None
        if layer_shape is None or len(layer_shape) != 4 or not inputs or any(len(s) != 4 for s in inputs.values()):
            raise OptionError(f"saliency_layer '{saliency_layer}' must be a 4-D (batch, channels, H, W) tensor of a "
                              "model with (batch, channels, H, W) inputs; `onnxplain inspect MODEL` lists the layers")
    read = [saliency_layer] if saliency_layer else list(ctx.wrt)
    if contrast_layer:
        _check_contrast_layer(ctx, contrast_layer, read)
        # TorchRay's passes: target and dual to the contrast layer (one pass here: their
        # difference, as the top rule forms it), then on down from there.
        contrast = ctx.with_wrt([contrast_layer]).backward(composite)[0][contrast_layer]
        if non_negative_contrast:
            contrast = np.maximum(contrast, 0.0)
        below = Context(ctx.explainer, None, None, read, contrast_layer, ctx.method, _from=ctx)
        below._seed = contrast  # the relevance at the contrast layer, batch first
        maps = below.backward(excitation_composite(False, stabilizer, contrast_layer))[0]
    else:
        maps = (ctx.with_wrt(read) if saliency_layer else ctx).backward(composite)[0]
    if not saliency_layer:
        return {t: np.maximum(a, 0.0) for t, a in maps.items()} if positive else maps
    summed = np.asarray(maps[saliency_layer], np.float32).sum(axis=1)
    if positive is None or positive:
        summed = np.maximum(summed, 0.0)
    from PIL import Image

    out = {}
    for t, shape in inputs.items():
        h, w = shape[2], shape[3]
        out[t] = np.stack([np.asarray(Image.fromarray(m).resize((w, h), Image.BILINEAR)) for m in summed])[:, None]
    return out


def _check_contrast_layer(ctx, layer: str, read: list):
    """The contrast layer must carry all of the explained layer's relevance to where the map
    is read: below the explained (classifier) layer, above the read tensors, and on every
    path between them (a tensor inside a residual branch would drop the skip path's share)."""
    g = ctx.graph
    hint = "; `onnxplain inspect MODEL` lists the layers"
    if layer not in set(g.tensor_names()):
        raise OptionError(f"contrast_layer '{layer}' is not a tensor of the model{hint}")
    tops = last_linear_nodes(g, ctx.explained)
    top_inputs = {i for n in g.nodes if n.name in tops for i in n.input[:1]}
    if layer not in _ancestors(g, top_inputs):
        raise OptionError(f"contrast_layer '{layer}' must lie below the explained layer whose weights the dual "
                          f"negates (its input or an earlier tensor){hint}")
    above = _ancestors(g, layer)
    missing = [t for t in read if t not in above]
    if missing:
        raise OptionError(f"contrast_layer '{layer}' does not depend on {', '.join(missing)}: give a contrast layer "
                          f"above the saliency layer (or the input){hint}")
    reach = {ctx.explained}
    for node in reversed(g.nodes):
        if any(o in reach and o != layer for o in node.output):
            reach.update(node_inputs(node))
    bypass = [t for t in read if t in reach and t != layer]
    if bypass:
        raise OptionError(f"contrast_layer '{layer}' is not on every path from the explained output to "
                          f"{', '.join(bypass)} (a tensor inside a residual branch?): give a block output{hint}")


# ----------------------------------------------------------------------------- DeepLIFT
class DeepLiftComposite(Composite):
    """The rescale rule on element-wise nonlinearities (one multiplier for each decomposed
    activation group) and MaxPool; gradients elsewhere."""

    def __init__(self, baseline=0.0, ids=None, keep_ids=None, at=None):
        super().__init__("deeplift", ("deeplift", "gradient"))
        self.reference = Reference(baseline, ids, keep_ids, at)

    def claims(self, group) -> bool:
        # A normalisation group (decomposed LayerNorm, RMSNorm) is claimed to take its exact
        # gradient as one function, as LayerNormalization itself does (and Captum's DeepLift
        # for nn.LayerNorm), not the rescale rule on its inner Pow and Sqrt.
        return True

    def rule(self, node, graph):
        group = groups.of(graph, node)
        if group is not None and group.elementwise:
            return functools.partial(deeplift_rules.group_rule, group=group, reference=self.reference)
        if group is not None:
            return functools.partial(deeplift_rules.group_gradient_rule, group=group)
        fn = lookup(node, "deeplift")
        if fn is not None:
            return functools.partial(fn, reference=self.reference)
        index = groups.single_input(graph, node)
        if index is not None and not groups.is_affine(graph, node, index) and lookup(node, "gradient"):
            # Any other element-wise nonlinearity (Erf, Exp, Pow(x, 3), Mish, c / x, ...).
            return functools.partial(deeplift_rules.elementwise, reference=self.reference, index=index)
        return lookup(node, "gradient")

    def key(self) -> str:
        return "deeplift:" + self.reference.key()


@register("deeplift", "DeepLIFT rescale rule: (x - baseline) times the multipliers (y - y0)/(x - x0) of the "
          "nonlinearities (one per decomposed activation such as SiLU or GELU), chained through linear layers",
          options=[Option("baseline", 0.0, "array", "the reference input: a number, one per channel, or one "
                          "sample (.npy on the CLI)")] + LAYER_OPTIONS,
          reference="Captum DeepLift; LayerDeepLift with layer=")
def deeplift(ctx, baseline, baseline_ids=None, keep_ids=None, layer_baseline=None):
    check_layer_options(ctx, baseline_ids, keep_ids, layer_baseline)
    layer = ctx.layer
    ids = {} if layer_baseline is not None else baseline_ids_for(ctx, baseline_ids)
    acts = ctx.activations()
    base = with_baseline_ids(ctx, _baseline_feeds(ctx, baseline), ids, keep_ids)
    if layer is not None and layer_baseline is not None:
        ref = {layer: layer_value(ctx, layer_baseline, acts[layer])}
    else:
        ref = ctx.activations(base)
    if all(np.array_equal(acts[t], ref[t]) for t in ctx.wrt):
        check_moved(ctx, ctx.wrt[0], acts[ctx.wrt[0]], ref[ctx.wrt[0]], ids)
    at = (layer, np.asarray(layer_baseline)) if layer is not None and layer_baseline is not None else None
    composite = DeepLiftComposite(baseline, ids, keep_ids, at)
    loose = no_multiplier(ctx.explainer.graph, composite, ctx.wrt, ctx.explained)
    if loose:
        warnings.warn(f"deeplift has no rescale rule for {', '.join(loose)} on the explained path: the gradient "
                      "is used there, as in Captum's DeepLift, so the attributions need not sum to the output's "
                      "difference from the baseline", stacklevel=3)
    try:
        multipliers = ctx.backward(composite)[0]
    except ValueError as exc:
        what = "layer_baseline" if "baseline at" in str(exc) else "baseline_ids" if "ids" in str(exc) else "baseline"
        raise OptionError(f"option {what} of method 'deeplift': {exc}") from None
    return {t: (acts[t] - ref[t]) * m for t, m in multipliers.items()}


# Nonlinear operators on more than one element that the rescale rule does not cover.
ROW_WISE = ("Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
            "LpNormalization", "MeanVarianceNormalization", "RMSNormalization", "LRN", "ReduceMax", "ReduceMin",
            "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "ReduceSumSquare",
            "GlobalMaxPool", "GlobalLpPool", "LpPool", "TopK")
PRODUCTS = ("Mul", "Div", "Pow", "MatMul", "Gemm", "Einsum", "Max", "Min", "Where", "Conv", "ConvTranspose")


def no_multiplier(graph, composite, wrt, explained) -> list:
    """Operator types on the explained path where DeepLIFT falls back to the gradient:
    normalisations and other nonlinear functions of many elements, and products (or
    selections) of two computed tensors outside a recognised group (attention scores, gates)."""
    from ..compile import active_nodes

    nodes = groups.fold(graph, active_nodes(graph, wrt, explained), composite.claims, keep=list(wrt) + [explained])
    # A product with a tensor that does not depend on the attributed one (an attention mask)
    # is linear in what is attributed.
    moving = set(wrt) | {o for n in nodes for o in n.output if o}
    found = set()
    for n in nodes:
        g = groups.of(graph, n)
        if g is not None:
            if not g.elementwise:
                found.add(f"{g.kind} (decomposed, ending at '{g.output}')")
            continue
        if n.op_type in ROW_WISE or n.op_type in PRODUCTS and sum(i in moving for i in n.input) >= 2:
            found.add(n.op_type)
    return sorted(found)


def _baseline_feeds(ctx, baseline) -> dict:
    feeds = {}
    for name, x in ctx.feeds.items():
        if x.dtype.kind != "f":
            feeds[name] = x
            continue
        v = np.asarray(baseline, dtype=x.dtype)
        if 0 < v.ndim < x.ndim - 1:
            v = v.reshape((-1,) + (1,) * (x.ndim - 2))
        try:
            feeds[name] = np.ascontiguousarray(np.broadcast_to(v, x.shape))
        except ValueError:
            raise OptionError(f"option baseline of method 'deeplift': shape {v.shape} does not fit input "
                              f"'{name}' of shape {x.shape}") from None
    return feeds
