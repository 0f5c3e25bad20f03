"""Integrated gradients (Sundararajan et al. 2017), with Captum's integration rules."""

from __future__ import annotations

import numpy as np

from ..errors import InputError, OptionError
from ..compile import _ancestors
from .base import Option, positive, register
from ..resident import onehot_weights
from .gradients import GRADIENT

RULES = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def integration_points(n: int, rule: str):
    """(alphas, weights) on [0, 1] such that sum w f(alpha) approximates the integral."""
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (x + 1.0), 0.5 * w
    if rule == "riemann_trapezoid":
        if n < 2:
            raise OptionError("integrated_gradients with integration=riemann_trapezoid needs n_steps >= 2")
        # Captum's trapezoid: steps of 1/n with the two ends halved (the weights sum to
        # (n-1)/n, not 1). Kept so results compare one to one with Captum.
        w = np.full(n, 1.0 / n)
        w[0] = w[-1] = 0.5 / n
        return np.linspace(0.0, 1.0, n), w
    w = np.full(n, 1.0 / n)
    if rule == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), w
    if rule == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), w
    if rule == "riemann_middle":
        return np.linspace(0.5 / n, 1.0 - 0.5 / n, n), w
    raise OptionError(f"unknown integration method '{rule}'; one of {', '.join(RULES)}")


def baseline_like(baseline, x: np.ndarray, name: str) -> np.ndarray:
    """A baseline broadcast to x: a scalar, a per-channel vector, a single sample or a batch."""
    b = np.asarray(baseline, dtype=x.dtype)
    if b.ndim == 1 and x.ndim >= 2 and b.shape[0] == x.shape[1] and x.ndim > 2:
        b = b.reshape((1, -1) + (1,) * (x.ndim - 2))  # per channel, NCHW
    try:
        return np.broadcast_to(b, x.shape).astype(x.dtype)
    except ValueError:
        raise InputError(f"baseline of shape {b.shape} does not fit input '{name}' of shape {x.shape}") from None


# ----------------------------------------------------------------------------- baselines at a layer
# Token ids cannot move along a path: a model fed integer ids has its baseline formed at a
# layer (the embedding output) from baseline ids, or given at the layer itself.
INDEX_PRESERVING = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity")
PAD_ID = 0  # BERT's and most tokenizers' padding id


def _parse_ids(value):
    """None, an id for every position, a list of ids, an array (.npy on the CLI), or a dict
    {integer input: ids}."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, bool):
        raise ValueError(f"token ids are integers, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(".npy"):
            from ..io import load_array

            value = load_array(text)
        else:
            value = [v for v in text.replace("(", "").replace(")", "").split(",") if v.strip()]
            value = [float(v) for v in value]
            value = value[0] if len(value) == 1 else value
    a = np.asarray(value)
    if a.dtype.kind == "f":
        if not np.all(np.equal(np.round(a), a)):
            raise ValueError(f"token ids are integers, got {value!r}")
    elif a.dtype.kind not in "iu":
        raise ValueError(f"token ids are integers, got {value!r}")
    return a.astype(np.int64)


def _check_ids(v):
    try:
        _parse_ids(v)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


BASELINE_IDS = Option("baseline_ids", None, "any", "with layer=: token ids whose value at the layer is the "
                      "baseline (an id for every position, or one sample's ids; in Python also {input: ids}); they "
                      "replace the token-id input (the one indexing the largest embedding table) while the other "
                      "integer inputs (attention mask, positions, types) stay; default: the PAD id 0 for a model "
                      "with no float inputs", check=_check_ids)
KEEP_IDS = Option("keep_ids", None, "ints", "token ids kept from the input in the baseline, e.g. 101,102 for "
                  "BERT's CLS and SEP (Captum's recipe keeps the special tokens)")
LAYER_BASELINE = Option("layer_baseline", None, "array", "with layer=: the baseline at the layer itself (a number, "
                        "one value per last-axis feature, or an array shaped like the layer); instead of the "
                        "baseline of the inputs")
LAYER_OPTIONS = [BASELINE_IDS, KEEP_IDS, LAYER_BASELINE]


def embedding_lookups(graph, ids: str) -> list[tuple[str, int]]:
    """(Gather output, table rows) for each Gather that looks integer input `ids` up in a
    constant 2-D float table, through casts and reshapes."""
    found, stack, seen = [], [ids], set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        for c in graph.consumers.get(t, []):
            if c.op_type in INDEX_PRESERVING and c.input[0] == t:
                stack.extend(o for o in c.output if o)
            elif c.op_type == "Gather" and len(c.input) > 1 and c.input[1] == t:
                table = graph.constant(c.input[0])
                if table is not None and table.dtype.kind == "f" and table.ndim == 2:
                    found.append((c.output[0], table.shape[0]))
    return found


def token_inputs(graph, layer: str | None = None) -> dict:
    """{integer input: rows of the embedding table it indexes} for the integer inputs that
    index a constant float table with a Gather (through casts and reshapes), those the layer
    depends on when one is given."""
    found = {}
    for name in graph.inputs:
        if not graph.is_float(name):
            lookups = embedding_lookups(graph, name)
            if lookups:
                found[name] = max(rows for _, rows in lookups)
    if layer is not None:
        above = _ancestors(graph, layer)
        found = {k: v for k, v in found.items() if k in above}
    return found




def check_layer_options(ctx, baseline_ids, keep_ids, layer_baseline) -> None:
    """The baseline-at-a-layer options need a layer, and one way of forming it."""
    given = [k for k, v in (("baseline_ids", baseline_ids), ("keep_ids", keep_ids),
                            ("layer_baseline", layer_baseline)) if v is not None]
    if given and ctx.layer is None:
        raise OptionError(f"option {', '.join(given)} of method '{ctx.method}' forms the baseline at a layer: give "
                          "layer=TENSOR too (the embedding output for a model fed token ids)")
    if layer_baseline is not None and (baseline_ids is not None or keep_ids is not None):
        raise OptionError(f"method '{ctx.method}': give either layer_baseline (the baseline at the layer) or "
                          "baseline_ids/keep_ids (ids whose embedding is the baseline), not both")


def baseline_ids_for(ctx, baseline_ids) -> dict:
    """{integer input: baseline ids} for a layer attribution of a model fed token ids: the
    given dict, or `baseline_ids` for the input indexing the largest embedding table."""
    if ctx.layer is None:
        return {}
    if baseline_ids is None:
        # A model with float inputs moves those; its integer inputs stay unless ids are given.
        if ctx.inputs:
            return {}
        baseline_ids = PAD_ID
    ids = _parse_ids(baseline_ids)
    ints = [k for k in ctx.feeds if ctx.feeds[k].dtype.kind in "iu"]
    if isinstance(ids, dict):
        bad = [k for k in ids if k not in ints]
        if bad:
            raise OptionError(f"option baseline_ids of method '{ctx.method}': {', '.join(map(str, bad))} is not an "
                              f"integer input of the model (its integer inputs: {', '.join(ints) or 'none'})")
        return {k: _parse_ids(v) for k, v in ids.items()}
    tokens = token_inputs(ctx.explainer.graph, ctx.layer)
    tokens = {k: v for k, v in tokens.items() if k in ints}
    if not tokens:
        return {}
    largest = max(tokens.values())
    return {k: ids for k, v in tokens.items() if v == largest}


def _fit(value, like: np.ndarray, option: str, method: str, where: str) -> np.ndarray:
    """`value` (one value, one sample's values, or like's shape) broadcast to `like`, in its
    dtype; a shape that does not fit is refused naming the option and `where` it goes."""
    v = np.asarray(value, dtype=like.dtype)
    if 0 < v.ndim == like.ndim - 1:
        v = v[None]
    try:
        return np.ascontiguousarray(np.broadcast_to(v, like.shape))
    except ValueError:
        raise OptionError(f"option {option} of method '{method}': shape {v.shape} does not fit {where} "
                          f"of shape {like.shape}") from None


def ids_like(ids: np.ndarray, x: np.ndarray, name: str, method: str) -> np.ndarray:
    """Baseline ids broadcast to the input x: one id, one sample's ids, or x's shape."""
    return _fit(ids, x, "baseline_ids", method, f"input '{name}'")


def with_baseline_ids(ctx, feeds: dict, ids: dict, keep_ids=None) -> dict:
    """`feeds` with the token inputs replaced by their baseline ids (the ids in `keep_ids`
    kept from the input)."""
    out = dict(feeds)
    for name, v in ids.items():
        x = ctx.feeds[name]
        ref = ids_like(v, x, name, ctx.method)
        if keep_ids:
            ref = np.where(np.isin(x, np.asarray(keep_ids, dtype=x.dtype)), x, ref)
        out[name] = ref
    return out


def layer_value(ctx, value, act: np.ndarray) -> np.ndarray:
    """A baseline given at the layer, broadcast to the layer's activations `act`."""
    return _fit(value, act, "layer_baseline", ctx.method, f"layer '{ctx.layer}'")


def check_moved(ctx, tensor: str, act: np.ndarray, base: np.ndarray, ids: dict) -> None:
    """Refuse a baseline that equals the input at the attributed tensor: every attribution
    would be zero, which says nothing about the model."""
    if act.shape != base.shape or not np.array_equal(act, base):
        return
    if ctx.layer is None:
        hint = "give a baseline different from the input (option baseline)"
    else:
        ints = [k for k in ctx.feeds if ctx.feeds[k].dtype.kind in "iu"]
        if ids:
            hint = (f"the baseline ids give the same value there as the input's ids: give other baseline_ids "
                    f"(for {', '.join(ids)}) or layer_baseline=VALUE")
        elif ints and not ctx.inputs:
            hint = (f"the model is fed integers ({', '.join(ints)}), which a baseline cannot move unless they index "
                    "an embedding the layer depends on: give layer_baseline=VALUE (a baseline at the layer), or "
                    "baseline_ids={input: ids} for the input the layer depends on")
        else:
            hint = "the layer does not depend on the inputs the baseline moves: give layer_baseline=VALUE"
    raise OptionError(f"method '{ctx.method}': the baseline equals the input at '{tensor}', so every attribution "
                      f"would be zero; {hint}")


OPTIONS = [
    Option("n_steps", 50, int, "number of integration points", check=positive),
    # DESIGN.md names this option `method`, as Captum does; in Python that keyword is taken
    # by attribute(method=...), so it is `integration` everywhere.
    Option("integration", "gausslegendre", str, "integration rule", choices=RULES),
    Option("baseline", 0.0, "array", "reference input: a number, per-channel values, or an array (.npy on the CLI)"),
] + LAYER_OPTIONS


@register("integrated_gradients", "path integral of gradients from a baseline to the input",
          options=OPTIONS, reference="Captum IntegratedGradients; LayerIntegratedGradients with layer=")
def integrated_gradients(ctx, n_steps, integration, baseline, baseline_ids=None, keep_ids=None,
                         layer_baseline=None):
    check_layer_options(ctx, baseline_ids, keep_ids, layer_baseline)
    alphas, weights = integration_points(n_steps, integration)
    inputs = ctx.inputs
    x = {k: ctx.feeds[k] for k in inputs}
    base = {k: baseline_like(baseline, x[k], k) for k in inputs}
    n = ctx.n
    total = {t: None for t in ctx.wrt}

    def consume(start, stop, attrs, _acts):
        idx = np.arange(start, stop)
        step, sample = idx // n, idx % n
        for t, g in attrs.items():
            w = weights[step].reshape((-1,) + (1,) * (g.ndim - 1))
            acc = np.zeros((n,) + g.shape[1:], dtype=np.float64)
            np.add.at(acc, sample, w * g)
            total[t] = acc if total[t] is None else total[t] + acc

    if ctx.layer is not None:
        # Layer integrated gradients: the layer's value moves on the straight line from its
        # value at the baseline to its value at the input, while every path that bypasses
        # the layer sees the real input (Captum's LayerIntegratedGradients).
        layer = ctx.layer
        act_x = ctx.activations()[layer]
        ids = {} if layer_baseline is not None else baseline_ids_for(ctx, baseline_ids)
        if layer_baseline is not None:
            act_b = layer_value(ctx, layer_baseline, act_x)
        else:
            act_b = ctx.activations(with_baseline_ids(ctx, {**ctx.feeds, **base}, ids, keep_ids))[layer]
        check_moved(ctx, layer, act_x, act_b, ids)

        def layer_rows(start, stop):
            idx = np.arange(start, stop)
            step, sample = idx // n, idx % n
            a = alphas[step].astype(act_x.dtype).reshape((-1,) + (1,) * (act_x.ndim - 1))
            value = act_b[sample] + a * (act_x[sample] - act_b[sample])
            return {k: v[sample] for k, v in ctx.feeds.items()}, value, ctx.seed[sample]

        ctx.backward_rows_cut(GRADIENT, n_steps * n, layer_rows, consume, label="layer integrated gradients")
        return {layer: (total[layer] * (act_x - act_b)).astype(np.float32)}

    def rows(start, stop):
        idx = np.arange(start, stop)
        step, sample = idx // n, idx % n
        a = alphas[step].astype(np.float32)
        feeds = dict(ctx.feeds)
        for k in inputs:
            shape = (-1,) + (1,) * (x[k].ndim - 1)
            feeds[k] = base[k][sample] + a.reshape(shape) * (x[k][sample] - base[k][sample])
        feeds = {k: (v[sample] if k not in inputs else v) for k, v in feeds.items()}
        return feeds, ctx.seed[sample]

    act_x = ctx.activations()
    act_b = ctx.activations({**ctx.feeds, **base})
    if all(np.array_equal(act_x[t], act_b[t]) for t in ctx.wrt):
        check_moved(ctx, ctx.wrt[0], act_x[ctx.wrt[0]], act_b[ctx.wrt[0]], {})

    def device_rows(start, stop):  # the same rows, built on the device: base + alpha (x - base)
        idx = np.arange(start, stop)
        step, sample = idx // n, idx % n
        return sample, sample, alphas[step], onehot_weights(sample, n, weights[step])

    moved = {k: (base[k], x[k] - base[k]) for k in inputs}
    sums = ctx.backward_resident(GRADIENT, moved, n_steps * n, device_rows, label="integrated gradients")
    if sums is not None:
        total = sums[0]
    else:
        ctx.backward_rows(GRADIENT, n_steps * n, rows, consume, label="integrated gradients")
    return {t: (total[t] * (act_x[t] - act_b[t])).astype(np.float32) for t in ctx.wrt}
