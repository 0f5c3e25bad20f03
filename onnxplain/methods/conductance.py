"""Internal-neuron attributions built on integrated gradients: layer conductance, neuron
conductance, IPNA (image-patch neuron attribution), and the pruning study of Lundstrom,
Huang & Razaviyayn (ICML 2022).

All of them chain two gradients along the path x(t) = x' + t (x - x'): dF/dy at the layer
y, and how y moves with the input. Conductance (Captum `LayerConductance`) takes the
second as the change of y between consecutive path points, so one explainer pass that
returns both the layer gradient and the layer activation suffices:

    cond_j = sum_k dF/dy_j(x(t_k)) * (y_j(x(t_{k+1})) - y_j(x(t_k)))

IPNA restricts the input's move to a box B of pixels: the change of y is taken when only
the box moves, from x(t_k) to x(t_k) + (t_{k+1} - t_k) (x - x') 1_B,

    ipna_j = sum_k dF/dy_j(x(t_k)) * (y_j(x(t_k) + (t_{k+1} - t_k) (x - x') 1_B) - y_j(x(t_k)))

the finite-difference form of sum_{i in B} neuron_conductance_j(i), exactly as Captum's
conductance is that of the full sum; with B the whole input it is the conductance. It
costs one pass of 2 n_steps + 1 rows, not one integrated-gradients run per neuron.

Neuron conductance (Captum `NeuronConductance`) attributes to the inputs through one
neuron or one channel: a layer-gradient pass picks dF/dy at the neuron, then a pass from
the layer back to the input sends exactly that as the seed.
"""

from __future__ import annotations

import numpy as np

from ..errors import OptionError
from .base import Option, positive, register
from .blackbox import layout
from .gradients import GRADIENT
from .integrated import RULES, baseline_like, integration_points


def _options(integration: str):
    return [
        Option("n_steps", 50, int, "number of integration points", check=positive),
        Option("integration", integration, str, "integration rule (Captum's default for this method)",
               choices=RULES),
        Option("baseline", 0.0, "array", "reference input: a number, per-channel values, or an array"),
    ]


def _need_layer(ctx) -> str:
    if ctx.layer is None:
        raise OptionError(f"method '{ctx.method}' attributes through a layer: give layer=TENSOR "
                          "(--layer on the CLI; `onnxplain inspect MODEL` lists the tensors)")
    return ctx.layer


def _bases(ctx, baseline) -> dict:
    if not ctx.inputs:
        # Token ids cannot move along a path: every point of it would be the input, and
        # every conductance zero.
        ints = ", ".join(k for k in ctx.feeds if ctx.feeds[k].dtype.kind in "iu")
        raise OptionError(f"method '{ctx.method}' moves the model's float inputs from a baseline, and this model "
                          f"has none (its inputs {ints} are integers); for a model fed token ids, use "
                          "integrated_gradients or deeplift with layer=THE_EMBEDDING_OUTPUT and baseline_ids=IDS "
                          "(or layer_baseline=VALUE)")
    return {k: baseline_like(baseline, ctx.feeds[k], k) for k in ctx.inputs}


def _chained(ctx, layer: str, points, starts, ends) -> np.ndarray:
    """sum over pairs (a, b) of dF/dy(slot a) * (y(slot b) - y(slot a)), per sample.

    Rows are slot-major (row = slot * n + sample); points(slots, samples) gives the model
    inputs of those rows. A slot with starts[s] opens a pair with its gradient and
    activation; a slot with ends[s] closes the sample's open pair with its activation.
    """
    n = ctx.n
    pend_g = pend_y = total = None

    def rows(start, stop):
        r = np.arange(start, stop)
        slot, sample = r // n, r % n
        feeds = {k: v[sample] for k, v in ctx.feeds.items()}
        feeds.update(points(slot, sample))
        return feeds, ctx.seed[sample]

    def consume(start, stop, attrs, acts):
        nonlocal pend_g, pend_y, total
        g, y = attrs[layer].astype(np.float64), acts[layer].astype(np.float64)
        if total is None:
            pend_g = np.zeros((n,) + g.shape[1:])
            pend_y = np.zeros_like(pend_g)
            total = np.zeros_like(pend_g)
        r = np.arange(start, stop)
        slot, sample = r // n, r % n
        for s in np.unique(slot):
            sel = slot == s
            idx = sample[sel]
            if ends[s]:
                total[idx] += pend_g[idx] * (y[sel] - pend_y[idx])
            if starts[s]:
                pend_g[idx], pend_y[idx] = g[sel], y[sel]

    ctx.backward_rows(GRADIENT, len(starts) * n, rows, consume, label=ctx.method)
    return total.astype(np.float32)


def _path(ctx, bases, alphas, moves=None):
    """points(slots, samples) on the straight path, plus optional per-slot box moves."""

    def points(slot, sample):
        out = {}
        for k, b in bases.items():
            x, b = ctx.feeds[k][sample], b[sample]
            shape = (-1,) + (1,) * (x.ndim - 1)
            p = b + alphas[slot].reshape(shape) * (x - b)
            if moves is not None and k in moves:
                step, box = moves[k]
                p = p + (step[slot].reshape(shape) * box) * (x - b)
            out[k] = p.astype(x.dtype)
        return out

    return points


@register("conductance", "flow of the integrated gradients through each neuron of a layer; sums to the "
          "integrated-gradients total (Dhamdhere et al. 2018)", options=_options("gausslegendre"),
          reference="Captum LayerConductance")
def conductance(ctx, n_steps, integration, baseline):
    layer = _need_layer(ctx)
    alphas, _ = integration_points(n_steps + 1, integration)  # Captum: n_steps + 1 points
    slots = len(alphas)
    starts = np.arange(slots) < slots - 1
    ends = np.arange(slots) > 0
    return {layer: _chained(ctx, layer, _path(ctx, _bases(ctx, baseline), alphas), starts, ends)}


def image_box(ctx, box) -> tuple[str, np.ndarray]:
    """The image input a box x1,y1,x2,y2 (pixels, end-exclusive) refers to, and the box as a
    0/1 mask broadcastable to that input."""
    if box is None or len(box) != 4:
        raise OptionError(f"method '{ctx.method}' needs box=x1,y1,x2,y2 (pixels of the model input, "
                          "x along the width, end-exclusive)")
    for name in ctx.inputs:
        shape = ctx.feeds[name].shape
        channel, spatial = layout(shape)
        if channel is None or len(spatial) != 2:
            continue
        h, w = (shape[a] for a in spatial)
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise OptionError(f"box {','.join(map(str, box))} is not inside the input's {w}x{h} pixels "
                              "(need 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height)")
        mask = np.zeros((h, w), dtype=np.float32)
        mask[y1:y2, x1:x2] = 1.0
        return name, np.expand_dims(mask, channel - 1)
    raise OptionError(f"method '{ctx.method}' needs an image input (N, C, H, W) or (N, H, W, C) for its box")


@register("ipna", "image-patch neuron attribution: each neuron's share of the integrated gradients inside "
          "a box of the input (Lundstrom et al. 2022); layer-shaped, sum the spatial axes for channels",
          options=_options("gausslegendre") + [
              Option("box", None, "ints", "x1,y1,x2,y2: the patch in pixels of the model input (end-exclusive)")],
          reference="Lundstrom, Huang & Razaviyayn, ICML 2022")
def ipna(ctx, n_steps, integration, baseline, box):
    layer = _need_layer(ctx)
    name, mask = image_box(ctx, box)
    t, _ = integration_points(n_steps + 1, integration)
    # slots P_0, Q_0, P_1, Q_1, ..., P_{n-1}, Q_{n-1}: P on the path, Q = P with the box moved on
    alphas = np.repeat(t[:-1], 2)
    steps = np.zeros_like(alphas)
    steps[1::2] = np.diff(t)
    slots = np.arange(len(alphas))
    points = _path(ctx, _bases(ctx, baseline), alphas, {name: (steps, mask)})
    return {layer: _chained(ctx, layer, points, slots % 2 == 0, slots % 2 == 1)}


def neuron_index(neuron, shape: tuple, method: str) -> tuple:
    """A channel (c,) or a full index of the layer (without the batch axis), checked."""
    dims = tuple(shape[1:])
    if neuron is None:
        raise OptionError(f"method '{method}' needs neuron=C (a channel) or a full index such as 3,2,2")
    if len(neuron) not in (1, len(dims)):
        raise OptionError(f"neuron={','.join(map(str, neuron))}: give a channel or an index with {len(dims)} "
                          f"entries for the layer's shape {dims}")
    for i, d in zip(neuron, dims):
        if not -d <= i < d:
            raise OptionError(f"neuron={','.join(map(str, neuron))} is out of range for the layer's shape {dims}")
    return tuple(int(i) % d for i, d in zip(neuron, dims))


@register("neuron_conductance", "integrated gradients of the inputs through one neuron (or channel) of a "
          "layer (Dhamdhere et al. 2018)", options=_options("riemann_trapezoid") + [
              Option("neuron", None, "ints", "the neuron: a channel C or a full index such as 3,2,2")],
          reference="Captum NeuronConductance")
def neuron_conductance(ctx, n_steps, integration, baseline, neuron):
    layer = _need_layer(ctx)
    shape = _layer_shape(ctx, layer)
    index = (slice(None),) + neuron_index(neuron, shape, ctx.method)
    alphas, weights = integration_points(n_steps, integration)
    bases = _bases(ctx, baseline)
    points = _path(ctx, bases, alphas)
    n = ctx.n
    picked = []  # dF/dy at the neuron, per row (slot-major)

    def rows(start, stop):
        r = np.arange(start, stop)
        feeds = {k: v[r % n] for k, v in ctx.feeds.items()}
        feeds.update(points(r // n, r % n))
        return feeds, ctx.seed[r % n]

    ctx.backward_rows(GRADIENT, n_steps * n, rows, lambda s, e, attrs, _a: picked.append(attrs[layer][index]),
                      label="neuron conductance: layer")
    picked = np.concatenate(picked)

    # The layer is now the explained tensor; the seed is dF/dy kept at the neuron only.
    spec, session = ctx.compiled(GRADIENT, wrt=ctx.inputs, explained=layer)
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in bases.items()}

    def seeds(start, stop):
        feeds, _ = rows(start, stop)
        seed = np.zeros((stop - start,) + shape[1:], dtype=np.float32)
        seed[index] = picked[start:stop]
        return feeds, seed

    def accumulate(start, stop, attrs, _acts):
        r = np.arange(start, stop)
        w = weights[r // n]
        for k, g in attrs.items():
            np.add.at(total[k], r % n, w.reshape((-1,) + (1,) * (g.ndim - 1)) * g)

    ctx.backward_rows_with(spec, session, n_steps * n, seeds, accumulate, label="neuron conductance: input")
    return {k: (total[k] * (ctx.feeds[k] - bases[k])).astype(np.float32) for k in ctx.inputs}


def _layer_shape(ctx, layer) -> tuple:
    shape = ctx.shape(layer)
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        one = {k: v[:1] for k, v in ctx.feeds.items()}
        shape = ctx.forward([layer], one)[layer].shape
    return tuple(shape)


# ----------------------------------------------------------------------------- pruning study

RANKINGS = ("ipna", "conductance")


def prune_channels(model, layer: str, channels, axis: int = 1):
    """A copy of `model` (ModelProto) whose consumers of `layer` see it with `channels` zeroed:
    a Mul by a constant 0/1 channel mask is inserted after the tensor."""
    import onnx
    from onnx import helper, numpy_helper

    from ..graph import Graph

    g = Graph(model)
    shape = g.shape(layer)
    if shape is None or not isinstance(shape[axis], int):
        raise OptionError(f"cannot prune '{layer}': its channel count is not known from the model")
    mask = np.ones([1] * len(shape), dtype=np.float32).repeat(shape[axis], axis=axis)
    mask[(0,) * axis + (list(channels),)] = 0.0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    pruned, mask_name = f"{layer}/onnxplain.pruned", f"{layer}/onnxplain.channel_mask"
    at = 0  # right after the producer, so the nodes stay topologically sorted
    for i, node in enumerate(out.graph.node):
        if layer in node.output:
            at = i + 1
        for j, name in enumerate(node.input):
            if name == layer:
                node.input[j] = pruned
    out.graph.initializer.append(numpy_helper.from_array(mask, mask_name))
    out.graph.node.insert(at, helper.make_node("Mul", [layer, mask_name], [pruned], name="onnxplain/prune"))
    return out


def prune_study(model, x, layer: str, box, target=None, ks=(1, 2, 4, 8, 16), n_steps: int = 50,
                integration: str = "gausslegendre", baseline=0.0, output=None, probability: bool = False,
                providers=None, memory_budget=None) -> dict:
    """The experiment of Lundstrom et al. (2022): rank the channels of `layer` by IPNA for
    `box` and by conductance, zero the top k of each ranking in the graph, and measure the
    integrated gradients (at the input) inside and outside the box as k grows.

    model: a path, bytes, ModelProto or Explainer. x: the input batch (channels are ranked
    by their scores summed over the batch and pruned for all of it). target: as in
    `attribute` (default: the class the unpruned model predicts, kept fixed while pruning).
    Returns a dict with the rankings and, per ranking and k, the attribution inside and
    outside the box (and their sum) and each sample's explained score (`scores`: the
    target's logit, or probability, of the pruned model), next to the unpruned values (k = 0).
    """
    from ..explainer import Explainer

    e = model if isinstance(model, Explainer) else Explainer(model, providers=providers, memory_budget=memory_budget)
    feeds = e.feeds(x)
    ks = sorted({int(k) for k in ks})
    if layer not in set(e.graph.tensor_names()):
        raise OptionError(f"unknown layer '{layer}'; `onnxplain inspect MODEL` lists the model's tensors")
    if target is None:
        explained = e.explained_tensor(output, probability)
        target = e.seed_for(feeds, explained, None).reshape(len(next(iter(feeds.values()))), -1).argmax(1)
        target = [int(t) for t in target]
    common = dict(target=target, output=output, probability=probability, n_steps=n_steps,
                  integration=integration, baseline=baseline)
    scores = {
        "ipna": e.attribute(feeds, method="ipna", layer=layer, box=box, **common),
        "conductance": e.attribute(feeds, method="conductance", layer=layer, **common),
    }
    channels = scores["ipna"].shape[1]
    bad = [k for k in ks if not 0 < k <= channels]
    if bad:
        raise OptionError(f"k={','.join(map(str, bad))}: layer '{layer}' has {channels} channels; "
                          f"give k between 1 and {channels}")
    orders = {r: np.argsort(-s.reshape(s.shape[0], channels, -1).sum(axis=(0, 2)), kind="stable").tolist()
              for r, s in scores.items()}

    n = len(next(iter(feeds.values())))
    targets = target if isinstance(target, list) else [target] * n

    def measure(explainer):
        # The explained score of each sample, pruned or not: what the integrated gradients
        # of the row distribute (up to the baseline's score).
        logits = np.asarray(explainer.predict(feeds, explainer.explained_tensor(output, probability))).reshape(n, -1)
        scores = [float(logits[i, t]) for i, t in enumerate(targets)]
        ig = explainer.attribute(feeds, method="integrated_gradients", **common)
        ig = next(iter(ig.values())) if isinstance(ig, dict) else ig
        ctx = _BoxContext(explainer, feeds)
        _, mask = image_box(ctx, box)
        channel, _ = layout(ig.shape)
        per_pixel = ig.sum(axis=channel, keepdims=True)
        inside = float((per_pixel * mask).sum())
        total = float(per_pixel.sum())
        return {"inside": inside, "outside": total - inside, "total": total, "scores": scores}

    base = measure(e)
    rows = [{"ranking": "none", "k": 0, "pruned": [], **base}]
    for ranking in RANKINGS:
        for k in ks:
            pruned = orders[ranking][:k]
            m = prune_channels(e.graph.model, layer, pruned)
            sub = Explainer(m, providers=e.providers, memory_budget=e.memory_budget, canonize=False)
            rows.append({"ranking": ranking, "k": k, "pruned": [int(c) for c in pruned], **measure(sub)})
    return {
        "layer": layer, "box": list(box), "target": target, "n_steps": n_steps, "channels": channels,
        "rankings": orders,
        "channel_scores": {r: s.reshape(s.shape[0], channels, -1).sum(axis=(0, 2)).tolist() for r, s in scores.items()},
        "unpruned": base, "rows": rows,
    }


class _BoxContext:
    """What `image_box` reads: the float inputs and the feeds."""

    method = "prune-study"

    def __init__(self, explainer, feeds):
        self.inputs = explainer.float_inputs
        self.feeds = feeds
