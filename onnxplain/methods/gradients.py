"""Single-pass gradient methods: the gradient, its absolute/squared forms, input times
gradient, and the modified-ReLU backward passes (guided backprop, deconvnet)."""

from __future__ import annotations

import numpy as np

from ..compile import Composite
from .base import Option, register

GRADIENT = Composite("gradient")
GUIDED = Composite("guided_backprop", ("guided_backprop", "gradient"))
DECONVNET = Composite("deconvnet", ("deconvnet", "gradient"))
# Captum and Zennit modify ReLU only; ReLU6 networks (MobileNet, EfficientNet-Lite) export
# it as Clip(0, 6), which `clip_as_relu` treats as a rectifier too.
GUIDED_CLIP = Composite("guided_backprop_clip", ("guided_backprop_clip", "guided_backprop", "gradient"))
DECONVNET_CLIP = Composite("deconvnet_clip", ("deconvnet_clip", "deconvnet", "gradient"))
CLIP_AS_RELU = Option("clip_as_relu", False, bool,
                      "also modify Clip(0, max) (ReLU6) as a ReLU; the references modify ReLU only")

CHANNEL_AXIS = Option("channel_axis", 1, int, "axis of the channels to take the maximum over (-1 for NHWC)")


@register("gradient", "d(seed . output)/d input: the plain gradient", reference="Captum Saliency(abs=False)",
          composite=lambda: GRADIENT)
def gradient(ctx):
    return ctx.backward(GRADIENT)[0]


@register("saliency", "absolute gradient, maximum over channels (Simonyan et al. 2014)",
          options=[CHANNEL_AXIS], reference="Simonyan et al. 2014")
def saliency(ctx, channel_axis):
    grads = ctx.backward(GRADIENT)[0]
    out = {}
    for t, g in grads.items():
        a = np.abs(g)
        if a.ndim >= 3:
            # One value per location, shared by its channels: the attribution keeps the
            # input's shape (the contract) while showing Simonyan's channel maximum.
            a = np.broadcast_to(a.max(axis=channel_axis, keepdims=True), a.shape).copy()
        out[t] = a
    return out


@register("sensitivity", "squared gradient: sensitivity analysis (Montavon et al. 2017)",
          reference="Montavon et al. 2017")
def sensitivity(ctx):
    return {t: g * g for t, g in ctx.backward(GRADIENT)[0].items()}


@register("input_x_gradient", "input times gradient: simple Taylor decomposition",
          reference="Captum InputXGradient", composite=lambda: GRADIENT, times_input=True)
def input_x_gradient(ctx):
    grads = ctx.backward(GRADIENT)[0]
    acts = ctx.activations()
    return {t: acts[t] * g for t, g in grads.items()}


def _guided(clip_as_relu=False):
    return GUIDED_CLIP if clip_as_relu else GUIDED


def _deconvnet(clip_as_relu=False):
    return DECONVNET_CLIP if clip_as_relu else DECONVNET


@register("guided_backprop", "gradient with ReLUs passing only positive gradient of active units",
          options=[CLIP_AS_RELU], reference="Captum GuidedBackprop", composite=_guided)
def guided_backprop(ctx, clip_as_relu):
    return ctx.backward(_guided(clip_as_relu))[0]


@register("deconvnet", "gradient with ReLUs applied to the backward signal (Zeiler & Fergus 2014)",
          options=[CLIP_AS_RELU], reference="Captum Deconvolution", composite=_deconvnet)
def deconvnet(ctx, clip_as_relu):
    return ctx.backward(_deconvnet(clip_as_relu))[0]
