"""Activation maximization: the input that maximises a class score or a neuron.

Gradient ascent on the input (Erhan et al. 2009; Simonyan et al. 2014) with the usual
regularisers: L2 decay, a gaussian blur every few steps, random jitter (the input is
rolled by a few pixels before each gradient and rolled back after), and clipping to the
range the preprocessing can produce. Or ascent on the code of a generator model
(code -> input; Nguyen et al. 2016): generator and model are merged into one ONNX graph
and its gradient with respect to the code is compiled like any other.

This is a function and a command, not a method of `Explainer.attribute`: what it returns
is a synthesised input, not an attribution of the given x, so drawing it as a heatmap or
scoring it with attribution metrics would be wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..compile import Composite, compile_explainer
from ..errors import InputError, ModelError, OptionError
from ..runtime import Session
from .base import Method, Option, non_negative, positive

GRADIENT = Composite("gradient")


def _neuron(value):
    if value is None or isinstance(value, tuple):
        return value
    tensor, sep, channel = str(value).rpartition(",")
    if not sep or not tensor.strip():
        raise ValueError("give the neuron as TENSOR,CHANNEL (e.g. /relu1/Relu_output_0,3)")
    return tensor.strip(), int(channel)


OPTIONS = Method("activation_maximization", None, "the input that maximises a class score or a neuron", {o.name: o for o in [
    Option("n_iter", 200, int, "gradient ascent steps", check=positive),
    Option("lr", 0.05, float, "step size, as a fraction of the input range per step", check=positive),
    Option("l2", 1e-3, float, "L2 decay: the input (or code) shrinks by this fraction per step", check=non_negative),
    Option("blur_every", 4, int, "blur the input every this many steps (0: never)", check=non_negative),
    Option("blur_sigma", 0.5, float, "gaussian blur sigma in pixels", check=non_negative),
    Option("jitter", 2, int, "random roll of up to this many pixels before each gradient", check=non_negative),
    Option("seed", 0, int, "random seed of the start point and the jitter"),
    Option("neuron", None, "any", "maximise a channel's spatial mean instead of a class: TENSOR,CHANNEL"),
    Option("generator", None, "any", "ONNX model code -> input: ascend in its code space"),
    Option("clip", True, bool, "clip the input to the range of the preprocessing"),
]})


@dataclass
class Maximized:
    """The result: `input` (1, *input shape) in the model's input space, the score of the
    objective at each step (`scores`, measured on the jittered input), its value on the
    start point and on the result, and the generator `code` in code mode."""

    input: np.ndarray
    scores: list
    initial: float
    final: float
    objective: str
    code: np.ndarray | None = None
    stuck: bool = False  # the gradient was zero at every step (a dead unit): nothing moved
    range: tuple | None = field(default=None, repr=False)


def input_range(pre, channels: int):
    """(low, high) per channel: the model inputs that pixels 0..255 map to; None if unknown."""
    if pre is None:
        return None
    mean = np.asarray(pre.mean if pre.mean is not None else (0.0,), dtype=np.float32)
    std = np.asarray(pre.std if pre.std is not None else (1.0,), dtype=np.float32)
    lo, hi = (0.0 - mean) / std, (255.0 * pre.scale - mean) / std
    lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
    return np.broadcast_to(lo, (channels,)).copy(), np.broadcast_to(hi, (channels,)).copy()


def activation_maximization(explainer, target=None, output=None, probability: bool = False, pre=None,
                            x0=None, **options) -> Maximized:
    """Gradient ascent on the input (or a generator's code) of `explainer`'s model.

    target: a class index of the explained output (required unless option `neuron`);
    pre: the Preprocess that gives the input range for clipping and the start point
    (default: the model's metadata); x0: a start input (default: small noise around the
    middle of the range). Options: see `OPTIONS` (n_iter, lr, l2, blur_every, blur_sigma,
    jitter, seed, neuron, generator, clip).
    """
    from ..io import Preprocess
    from ..runtime import steps

    opts = OPTIONS.resolve(options)
    neuron = _option(_neuron, opts["neuron"], "neuron")
    if neuron is None and target is None:
        raise OptionError("give a target class to maximise, or option neuron=TENSOR,CHANNEL")
    if neuron is not None and target is not None:
        raise OptionError("give either a target class or option neuron, not both")
    if pre is None and explainer.preprocess_metadata():
        pre = Preprocess.from_metadata(explainer.preprocess_metadata())
    model_input, shape = _image_input(explainer)
    rng = np.random.default_rng(opts["seed"])
    bounds = input_range(pre, shape[1]) if pre is not None and len(shape) == 4 else None

    nhwc = pre is not None and pre.layout == "nhwc" and len(shape) == 4
    axes = (1, 2) if nhwc else (2, 3)

    def per_channel(v):
        return np.asarray(v).reshape((1, 1, 1, -1) if nhwc else (1, -1, 1, 1))

    problem = explainer
    if opts["generator"] is not None:
        problem, code_input, image_tensor = _compose(opts["generator"], explainer, model_input)
        code_shape = tuple(d if isinstance(d, int) else 1 for d in problem.inputs[code_input])
        start = {code_input: (rng.normal(size=code_shape) if x0 is None else np.asarray(x0)).astype(np.float32)}
        wrt = code_input
    else:
        if x0 is None:
            mid = 0.0 if bounds is None else per_channel((bounds[0] + bounds[1]) / 2)
            width = 1.0 if bounds is None else per_channel(bounds[1] - bounds[0])
            x0 = mid + 0.05 * width * rng.normal(size=shape)
        start = {model_input: np.asarray(x0, dtype=np.float32).reshape(shape)}
        wrt = model_input

    if neuron is not None:
        explained, what = neuron[0], f"mean of channel {neuron[1]} of {neuron[0]}"
        if explained not in set(problem.graph.tensor_names()):
            raise OptionError(f"unknown neuron tensor '{explained}'; `onnxplain inspect MODEL` lists the tensors")
    else:
        explained = problem.explained_tensor(output, probability)
        what = f"{'probability' if probability else 'score'} of " + (
            f"class {target}" if str(target).strip().lstrip("-").isdigit() else f"target {target}")
    feeds = problem.feeds(start)
    seed = _seed(problem, feeds, explained, target, neuron)
    step = _Ascent(problem, feeds, wrt, explained, seed)

    x = feeds[wrt].copy()
    spatial = x.ndim == 4 and opts["generator"] is None
    width = 1.0 if bounds is None else per_channel(bounds[1] - bounds[0])
    low, high = (None, None) if bounds is None else (per_channel(bounds[0]), per_channel(bounds[1]))
    initial = step.score(x)
    scores, moved = [], False
    for i in steps(opts["n_iter"], "maximize"):  # a progress bar on a terminal
        shift = tuple(rng.integers(-opts["jitter"], opts["jitter"] + 1, size=2)) if spatial and opts["jitter"] else (0, 0)
        rolled = np.roll(x, shift, axis=axes) if shift != (0, 0) else x
        score, grad = step(rolled)
        scores.append(score)
        grad = np.roll(grad, (-shift[0], -shift[1]), axis=axes) if shift != (0, 0) else grad
        # A normalised step: the same progress whatever the scale of the gradient.
        rms = float(np.sqrt(np.mean(grad * grad)))
        moved = moved or rms > 0
        x = x + opts["lr"] * (width if spatial else 1.0) * grad / (rms + 1e-12)
        x = x * (1.0 - opts["l2"])
        if spatial and opts["blur_every"] and opts["blur_sigma"] > 0 and (i + 1) % opts["blur_every"] == 0:
            from scipy.ndimage import gaussian_filter

            sigma = [opts["blur_sigma"] if a in axes else 0.0 for a in range(4)]
            x = gaussian_filter(x, sigma=sigma, mode="reflect")
        if spatial and opts["clip"] and bounds is not None:
            x = np.clip(x, low, high)
        x = x.astype(np.float32)
    final = step.score(x)
    if opts["generator"] is not None:
        # The generator's output unclipped: it is what the model scored.
        image = problem.forward({wrt: x}, [image_tensor])[image_tensor]
        return Maximized(image, scores, initial, final, what, code=x, range=bounds, stuck=not moved)
    return Maximized(x, scores, initial, final, what, range=bounds, stuck=not moved)


class _Ascent:
    """One compiled pass giving the objective and its gradient with respect to `wrt`."""

    def __init__(self, explainer, feeds, wrt, explained, seed):
        graph = explainer.plan(feeds).graph
        self.spec = compile_explainer(graph, GRADIENT, [wrt], explained, activations=[explained],
                                      method="activation_maximization")
        self.session = Session(self.spec.model, explainer.providers, explainer.memory_budget, explainer.threads)
        self.feeds, self.wrt, self.seed = feeds, wrt, seed

    def __call__(self, x):
        feeds = dict(self.feeds)
        feeds[self.wrt] = x
        feeds[self.spec.seed] = self.seed
        attr = self.spec.attributions[self.wrt]
        value = self.spec.activations[self.spec.explained]
        out = self.session.run(feeds, [attr, value])
        grad = out[attr].astype(np.float64)
        if not np.all(np.isfinite(grad)):
            raise InputError("the gradient became non-finite during activation maximization; lower lr")
        return float(np.sum(out[value] * self.seed)), grad

    def score(self, x) -> float:
        return self(x)[0]


def _option(parse, value, name):
    try:
        return parse(value)
    except (ValueError, TypeError) as exc:
        raise OptionError(f"option {name}={value!r} of method 'activation_maximization': {exc}") from None


def _image_input(explainer):
    floats = explainer.float_inputs
    if len(explainer.graph.inputs) != 1 or len(floats) != 1:
        raise InputError("activation maximization needs a model with one float input")
    name = floats[0]
    shape = explainer.inputs[name]
    if shape is None or not all(isinstance(d, int) for d in shape[1:]):
        raise InputError(f"input '{name}' has no fixed shape {shape}; activation maximization needs one")
    return name, (1,) + tuple(shape[1:])


def _seed(problem, feeds, explained, target, neuron):
    if neuron is None:
        # Any target form (a class, step:T:C of a sequence output, a seed); the compiled
        # explainer takes the seed in the explained tensor's own layout.
        seed = problem.seed_for(feeds, explained, target)
        axis = problem.plan(feeds).axis(explained)
        return np.ascontiguousarray(np.moveaxis(seed, 0, axis)) if axis else seed
    shape = problem._explained_shape(feeds, explained)
    if len(shape) < 2 or not -shape[1] <= neuron[1] < shape[1]:
        raise OptionError(f"neuron channel {neuron[1]} is out of range for tensor '{explained}' of shape {shape}")
    seed = np.zeros(shape, dtype=np.float32)
    seed[:, neuron[1]] = 1.0 / max(1, int(np.prod(shape[2:])))  # the channel's spatial mean
    return seed


def _compose(generator, explainer, model_input):
    """One Explainer on generator -> model (the generator's names prefixed 'generator/')."""
    import onnx
    from onnx import compose, version_converter

    from ..explainer import Explainer
    from ..graph import read_model

    gen = read_model(generator)
    model = explainer.source
    if len(gen.graph.output) != 1 or len(gen.graph.input) != 1:
        raise ModelError("a generator must have one input (the code) and one output (the model's input)")
    opset = {o.domain or "": o.version for o in model.opset_import}
    gen_opset = {o.domain or "": o.version for o in gen.opset_import}
    try:
        if gen_opset.get("", opset.get("")) != opset.get(""):
            gen = version_converter.convert_version(gen, opset[""])
        gen = compose.add_prefix(gen, "generator/")
        gen.ir_version = model.ir_version
        merged = compose.merge_models(gen, model, io_map=[(gen.graph.output[0].name, model_input)])
    except Exception as exc:
        raise ModelError(f"cannot chain the generator into the model: {str(exc).splitlines()[0]}") from None
    merged.ir_version = model.ir_version
    del merged.metadata_props[:]
    try:
        onnx.checker.check_model(merged)
    except Exception as exc:
        raise ModelError(f"the generator does not fit the model: {str(exc).splitlines()[0]}") from None
    e = Explainer(merged, providers=explainer.providers, memory_budget=explainer.memory_budget)
    return e, e.graph.inputs[0], gen.graph.output[0].name


def to_image(x, pre=None, bounds=None) -> np.ndarray:
    """A (1,C,H,W) or (C,H,W) model input as a uint8 HxWx3 picture: the preprocessing undone,
    or (without one) the input's own range stretched to 0..255."""
    a = np.asarray(x, dtype=np.float64)
    while a.ndim > 3:
        a = a[0]
    if a.ndim != 3:
        raise InputError(f"cannot draw an input of shape {np.shape(x)} as a picture")
    nhwc = pre is not None and pre.layout == "nhwc"
    a = a if nhwc else a.transpose(1, 2, 0)
    if pre is not None:
        mean = np.asarray(pre.mean if pre.mean is not None else (0.0,))
        std = np.asarray(pre.std if pre.std is not None else (1.0,))
        a = (a * std + mean) / pre.scale
        if pre.bgr:
            a = a[..., ::-1]
    else:
        lo, hi = a.min(), a.max()
        a = (a - lo) / (hi - lo if hi > lo else 1.0) * 255.0
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)
