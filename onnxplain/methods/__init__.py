"""User-facing methods, registered by name (see `onnxplain methods`)."""

from . import cam, conductance, gradients, integrated, occlusion, perturbation, relevance, rise, smoothgrad, surrogate  # noqa: F401  (registration)
from .base import METHODS, Method, Option, get_method, register  # noqa: F401
from ..errors import OptionError

# Methods whose whole computation is one explainer pass: these can be exported as a
# standalone explainer model.
EXPORTABLE = {
    "gradient": gradients.GRADIENT,
    "input_x_gradient": gradients.GRADIENT,
    "guided_backprop": gradients.GUIDED,
    "deconvnet": gradients.DECONVNET,
    **relevance.EXPORTABLE,
}
# Exportable methods whose attribution is the backward result times the input.
TIMES_INPUT = {"input_x_gradient"}


def exportable(method: str, options: dict | None = None):
    """The composite of a single-pass method with its options, and whether its result is
    multiplied by the input. `lrp` (a user composite) is exportable given its rules."""
    m = get_method(method)
    if method not in EXPORTABLE and method != "lrp":
        raise OptionError(
            f"method '{method}' runs several passes and cannot be exported as one graph; "
            f"exportable: {', '.join(sorted(EXPORTABLE))}, lrp (with rules=...)"
        )
    opts = m.resolve(dict(options or {}))
    if method == "lrp" and not opts["rules"]:
        raise OptionError("method 'lrp' exports a user composite: give its rules (e.g. rules=Conv:gamma,first:zbox)")
    return _composite(method, opts) if options else EXPORTABLE[method], method in TIMES_INPUT


def _composite(method: str, o: dict):
    if method in relevance.ZENNIT:
        return relevance.zennit_composite(method, **{k: relevance._array_key(v) if k in ("low", "high") else v
                                                     for k, v in o.items()})
    if method == "lrp":
        return relevance.user_composite(**o)
    if method == "deep_taylor":
        return relevance.deep_taylor_composite(**o)
    if method in ("excitation_backprop", "contrastive_excitation_backprop"):
        return relevance.excitation_composite(method.startswith("contrastive"), o["stabilizer"])
    if method == "guided_backprop":
        return gradients.GUIDED_CLIP if o["clip_as_relu"] else gradients.GUIDED
    if method == "deconvnet":
        return gradients.DECONVNET_CLIP if o["clip_as_relu"] else gradients.DECONVNET
    return EXPORTABLE[method]
