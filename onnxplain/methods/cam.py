"""Class activation maps: CAM, Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, Score-CAM and
guided Grad-CAM, at any 3-D, 4-D or 5-D tensor (`layer=`), with pytorch-grad-cam's formulas.

A CAM is a weighted sum of a layer's channels, sum_c w_c A_c, a map over the layer's
spatial axes; the methods differ in the weights. The layer defaults to the input of the
last global (average or max) pooling before the explained output, else to the last
3-D to 5-D tensor on the way to it. Channels come first (N, C, ...) unless the pooling
reduces axes 1..r-2 (channels last, as tf2onnx exports Keras models).

The map is returned as (N, 1, H, W) for an NCHW input ((N, H, W, 1) for NHWC): the
input's rank with a channel axis of one. A CAM has no per-channel values, so copying it
over the channels would fake them and multiply its sum by C; the size-one axis
broadcasts against the input (x * cam works) and draws like any attribution. With
upsample=False it is the map at the layer's resolution, (N, 1, h, w), keyed by the layer.
"""

from __future__ import annotations

import numpy as np

from ..compile import _ancestors, _depends_on
from ..errors import OptionError
from .base import Context, Option, register
from .blackbox import apply_axes, forward_scores, interp_matrix, layout, sample_feeds
from .gradients import GRADIENT, GUIDED

GLOBAL_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")
REDUCE_POOLS = ("ReduceMean", "ReduceMax", "ReduceSum")
PASS_THROUGH = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")
INTERPOLATIONS = ("bilinear", "nearest")

RELU = Option("relu", True, bool, "keep only the positive part of the map (Selvaraju et al.; Captum's "
                                  "relu_attributions)")
NORMALIZE = Option("normalize", False, bool, "min-max scale each map to [0, 1] before and after upsampling, "
                                             "as pytorch-grad-cam does")
INTERPOLATION = Option("interpolation", "bilinear", str, "upsampling: bilinear (pytorch-grad-cam, half-pixel "
                                                         "centres) or nearest (Captum's default)",
                       choices=INTERPOLATIONS)
UPSAMPLE = Option("upsample", True, bool, "upsample the map to the input's size (else: the layer's size)")
OPTIONS = [RELU, UPSAMPLE, NORMALIZE, INTERPOLATION]


# ----------------------------------------------------------------------------- the layer


def _axes(graph, node) -> tuple | None:
    """The axes a Reduce* node reduces (attribute before opset 18, input after)."""
    for a in node.attribute:
        if a.name == "axes":
            return tuple(a.ints)
    if len(node.input) > 1 and node.input[1]:
        v = graph.constant(node.input[1])
        return None if v is None else tuple(int(i) for i in np.ravel(v))
    return None


def _global_pool(graph, node) -> int | None:
    """The channel axis of the tensor `node` pools globally over its spatial axes, or None."""
    rank = len(graph.shape(node.input[0]) or ())
    if rank < 3:
        return None
    if node.op_type in GLOBAL_POOLS:
        return 1
    if node.op_type not in REDUCE_POOLS:
        return None
    axes = _axes(graph, node)
    if axes is None:
        return None
    axes = {a % rank for a in axes}
    if axes == set(range(2, rank)):
        return 1
    if axes == set(range(1, rank - 1)):
        return rank - 1
    return None


def default_layer(graph, explained: str) -> str:
    """The input of the last global pooling before `explained`, else the last 3-D to 5-D
    float tensor that depends on the inputs and feeds `explained`."""
    need = _ancestors(graph, explained)
    pools = [n for n in graph.nodes if n.output[0] in need and _global_pool(graph, n) is not None]
    if pools:
        return pools[-1].input[0]
    dep = _depends_on(graph, [i for i in graph.inputs if graph.is_float(i)])
    spatial = [o for n in graph.nodes for o in n.output
               if o in need and o in dep and graph.is_float(o) and len(graph.shape(o) or ()) in (3, 4, 5)]
    if not spatial:
        raise OptionError("the model has no 3-D to 5-D tensor before its output for a class activation map; "
                          "give one with layer= (`onnxplain inspect MODEL` lists the tensors)")
    return spatial[-1]


def channel_axis(graph, layer: str) -> int:
    """1, unless the layer is pooled over axes 1..r-2 (channels last)."""
    for node in graph.consumers.get(layer, []):
        axis = _global_pool(graph, node)
        if axis is not None:
            return axis
    return 1


def _layer_ctx(ctx) -> tuple[Context, str, int]:
    """A context whose wrt is the CAM layer, the layer, and its channel axis."""
    graph = ctx.graph
    layer = ctx.layer or default_layer(graph, ctx.explained)
    shape = graph.shape(layer)
    if shape is not None and len(shape) not in (3, 4, 5):
        raise OptionError(f"method '{ctx.method}' needs a layer with channels and 1 to 3 spatial axes "
                          f"(N, C, ...); '{layer}' has shape {_fmt(shape)}")
    lctx = ctx.with_wrt([layer])
    return lctx, layer, channel_axis(graph, layer)


def _channels_first(a: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.asarray(a, dtype=np.float64), axis, 1)


def _gradients(ctx):
    """Layer activations and gradients, channels first (float64), and the layer name."""
    lctx, layer, axis = _layer_ctx(ctx)
    grads, acts = lctx.backward(GRADIENT)
    return _channels_first(acts[layer], axis), _channels_first(grads[layer], axis), layer


# ----------------------------------------------------------------------------- maps


def _spatial(a) -> tuple:
    return tuple(range(2, a.ndim))


def _expand(w, a):
    return w.reshape(w.shape + (1,) * (a.ndim - 2))


def _minmax(cams: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's scale_cam_image: (m - min) / (1e-7 + max(m - min)) per map."""
    flat = cams.reshape(len(cams), -1)
    flat = flat - flat.min(axis=1, keepdims=True)
    flat = flat / (1e-7 + flat.max(axis=1, keepdims=True))
    return flat.reshape(cams.shape)


def resize_matrix(n_out: int, n_in: int, mode: str, align_corners: bool = False) -> np.ndarray:
    """(n_out, n_in) resampling as torch.nn.functional.interpolate does it."""
    if mode == "nearest":
        m = np.zeros((n_out, n_in))
        m[np.arange(n_out), np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(int), n_in - 1)] = 1.0
        return m
    if not align_corners:
        return interp_matrix(n_out, n_in)
    m = np.zeros((n_out, n_in))
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def resize(maps: np.ndarray, size, mode: str = "bilinear", align_corners: bool = False) -> np.ndarray:
    """(B, *spatial) maps resampled to `size`, separably along each spatial axis."""
    mats = [resize_matrix(o, i, mode, align_corners)[None] for o, i in zip(size, maps.shape[1:])]
    return apply_axes(maps, mats)


def _image_input(ctx, layer_rank: int) -> tuple[str, int | None, tuple]:
    """The input the map is upsampled to: name, channel axis, spatial size."""
    for name in ctx.inputs:
        shape = ctx.feeds[name].shape
        channel, spatial = layout(shape)
        if channel is not None and len(spatial) == layer_rank - 2:
            return name, channel, tuple(shape[a] for a in spatial)
    raise OptionError(f"method '{ctx.method}' upsamples to an input with {layer_rank - 2} spatial axes and "
                      "channels, and the model has none; use upsample=false")


def finish(ctx, cams: np.ndarray, layer: str, relu: bool, upsample: bool, normalize: bool,
           interpolation: str) -> dict:
    """ReLU, optional min-max scaling, upsampling to the input; (N, *spatial) -> the result dict."""
    if relu:
        cams = np.maximum(cams, 0.0)
    if normalize:
        cams = _minmax(cams)
    if not upsample:
        return {layer: cams[:, None].astype(np.float32)}
    name, channel, size = _image_input(ctx, cams.ndim + 1)
    cams = resize(cams, size, interpolation)
    if normalize:  # pytorch-grad-cam scales again after resizing
        cams = _minmax(np.maximum(cams, 0.0) if relu else cams)
    return {name: np.expand_dims(cams, channel).astype(np.float32)}


def _weighted(acts, weights) -> np.ndarray:
    return (_expand(weights, acts) * acts).sum(axis=1)


# ----------------------------------------------------------------------------- methods


@register("grad_cam", "channels weighted by their spatially averaged gradient (Selvaraju et al. 2017)",
          options=OPTIONS, reference="pytorch-grad-cam GradCAM; Captum LayerGradCam")
def grad_cam(ctx, relu, upsample, normalize, interpolation):
    a, g, layer = _gradients(ctx)
    return finish(ctx, _weighted(a, g.mean(axis=_spatial(g))), layer, relu, upsample, normalize, interpolation)


@register("grad_cam_pp", "Grad-CAM++: positive gradients weighted by the closed-form alphas "
          "(Chattopadhyay et al. 2018)", options=OPTIONS, reference="pytorch-grad-cam GradCAMPlusPlus")
def grad_cam_pp(ctx, relu, upsample, normalize, interpolation):
    a, g, layer = _gradients(ctx)
    sp = _spatial(g)
    g2 = g * g
    # eq. 19 with exp(score) as the output: second and third derivatives are powers of g
    alpha = g2 / (2.0 * g2 + _expand(a.sum(axis=sp), a) * g2 * g + 1e-6)
    alpha = np.where(g != 0, alpha, 0.0)
    weights = (np.maximum(g, 0.0) * alpha).sum(axis=sp)
    return finish(ctx, _weighted(a, weights), layer, relu, upsample, normalize, interpolation)


@register("xgrad_cam", "XGrad-CAM: gradients weighted by the normalised activations (Fu et al. 2020)",
          options=OPTIONS, reference="pytorch-grad-cam XGradCAM")
def xgrad_cam(ctx, relu, upsample, normalize, interpolation):
    a, g, layer = _gradients(ctx)
    sp = _spatial(g)
    weights = (g * a / (_expand(a.sum(axis=sp), a) + 1e-7)).sum(axis=sp)
    return finish(ctx, _weighted(a, weights), layer, relu, upsample, normalize, interpolation)


@register("layer_cam", "LayerCAM: activations weighted element-wise by the positive gradient (Jiang et al. 2021)",
          options=OPTIONS, reference="pytorch-grad-cam LayerCAM")
def layer_cam(ctx, relu, upsample, normalize, interpolation):
    a, g, layer = _gradients(ctx)
    return finish(ctx, (np.maximum(g, 0.0) * a).sum(axis=1), layer, relu, upsample, normalize, interpolation)


@register("cam", "CAM: channels weighted by the class's weights of the linear layer after global average "
          "pooling (Zhou et al. 2016)", options=OPTIONS, reference="Zhou et al. 2016")
def cam(ctx, relu, upsample, normalize, interpolation):
    graph = ctx.graph
    layer = ctx.layer or default_layer(graph, ctx.explained)
    weights = head_weights(graph, layer, ctx.explained)  # (classes, C)
    seed = ctx.seed.reshape(ctx.n, -1).astype(np.float64)
    if seed.shape[1] != weights.shape[0]:
        raise OptionError(f"cam: the explained output has {seed.shape[1]} values but the linear head "
                          f"{weights.shape[0]} classes")
    acts = _channels_first(ctx.forward([layer])[layer], channel_axis(graph, layer))
    if acts.shape[1] != weights.shape[1]:
        raise OptionError(f"cam: layer '{layer}' has {acts.shape[1]} channels but the linear head takes "
                          f"{weights.shape[1]}")
    return finish(ctx, _weighted(acts, seed @ weights), layer, relu, upsample, normalize, interpolation)


def head_weights(graph, layer: str, explained: str) -> np.ndarray:
    """(classes, channels) weights of a `layer -> global average pooling -> linear -> explained`
    head; an OptionError naming what differs otherwise."""
    hint = "; CAM needs global average pooling followed by one linear layer: use grad_cam, which needs neither"
    pools = [n for n in graph.consumers.get(layer, []) if _global_pool(graph, n) is not None
             and n.op_type in ("GlobalAveragePool", "ReduceMean")]
    if not pools:
        raise OptionError(f"cam: layer '{layer}' is not followed by global average pooling{hint}")
    t = pools[0].output[0]
    while True:
        users = graph.consumers.get(t, [])
        if len(users) != 1:
            raise OptionError(f"cam: the pooled tensor '{t}' does not feed exactly one linear layer{hint}")
        node = users[0]
        if node.op_type not in PASS_THROUGH:
            break
        t = node.output[0]
    w = graph.constant(node.input[1]) if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 else None
    if w is None or w.ndim != 2 or node.input[0] != t:
        raise OptionError(f"cam: the pooling is followed by {node.op_type} '{node.name}', "
                          f"not a linear layer with constant weights{hint}")
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        if "transA" in attrs and attrs["transA"].i:
            raise OptionError(f"cam: Gemm '{node.name}' transposes its input{hint}")
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        w = alpha * (w if "transB" in attrs and attrs["transB"].i else w.T)
    else:
        w = w.T
    out = node.output[0]
    # a constant bias added after a MatMul is still the same linear head
    users = graph.consumers.get(out, [])
    if out != explained and len(users) == 1 and users[0].op_type == "Add" and any(
            graph.constant(i) is not None for i in users[0].input):
        out = users[0].output[0]
    if out != explained:
        raise OptionError(f"cam: the linear layer '{node.name}' does not produce the explained output "
                          f"'{explained}'{hint}")
    return np.asarray(w, dtype=np.float64)


@register("score_cam", "Score-CAM: channels weighted by the softmax of the scores of the input masked by each "
          "upsampled channel (Wang et al. 2020); forward passes only", options=OPTIONS,
          reference="pytorch-grad-cam ScoreCAM")
def score_cam(ctx, relu, upsample, normalize, interpolation):
    graph = ctx.graph
    layer = ctx.layer or default_layer(graph, ctx.explained)
    acts = _channels_first(ctx.forward([layer])[layer], channel_axis(graph, layer))
    n, c = acts.shape[:2]
    name, channel, size = _image_input(ctx, acts.ndim)
    # pytorch-grad-cam upsamples the masks with UpsamplingBilinear2d: corners aligned
    mats = [resize_matrix(o, i, "bilinear", align_corners=True)[None] for o, i in zip(size, acts.shape[2:])]
    x = ctx.feeds[name]

    def masks(rows):
        sample, k = rows % n, rows // n
        m = apply_axes(acts[sample, k], mats)
        flat = m.reshape(len(rows), -1)
        lo = flat.min(axis=1).reshape((-1,) + (1,) * (m.ndim - 1))
        hi = flat.max(axis=1).reshape(lo.shape)
        return np.expand_dims((m - lo) / (hi - lo + 1e-8), channel)

    def rows(start, stop):
        r = np.arange(start, stop)
        sample = r % n
        masked = (x[sample] * masks(r)).astype(x.dtype)
        return sample_feeds(ctx, sample, {name: masked}), sample

    scores = forward_scores(ctx, n * c, rows, label="score-cam").reshape(c, n).T
    weights = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    return finish(ctx, _weighted(acts, weights), layer, relu, upsample, normalize, interpolation)


@register("guided_grad_cam", "guided backprop times the upsampled Grad-CAM (Selvaraju et al. 2017)",
          options=[RELU, NORMALIZE, INTERPOLATION], reference="Captum GuidedGradCam")
def guided_grad_cam(ctx, relu, normalize, interpolation):
    maps = grad_cam(ctx, relu, True, normalize, interpolation)
    name, m = next(iter(maps.items()))
    ictx = ctx.with_wrt(list(ctx.inputs))
    guided = ictx.backward(GUIDED)[0][name]
    return {name: (guided * m).astype(np.float32)}


def _fmt(shape) -> str:
    return "(" + ", ".join("?" if not isinstance(d, int) else str(d) for d in shape) + ")"
