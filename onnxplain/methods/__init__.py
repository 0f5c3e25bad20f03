"""User-facing methods, registered by name (see `onnxplain methods`)."""

from . import gradients, integrated, occlusion, perturbation, rise, smoothgrad, surrogate  # noqa: F401  (registration)
from .base import METHODS, Method, Option, get_method, register  # noqa: F401
from ..errors import OptionError

# Methods whose whole computation is one explainer pass: these can be exported as a
# standalone explainer model.
EXPORTABLE = {
    "gradient": gradients.GRADIENT,
    "input_x_gradient": gradients.GRADIENT,
    "guided_backprop": gradients.GUIDED,
    "deconvnet": gradients.DECONVNET,
}


def exportable(method: str):
    get_method(method)
    if method not in EXPORTABLE:
        raise OptionError(
            f"method '{method}' runs several passes and cannot be exported as one graph; "
            f"exportable: {', '.join(sorted(EXPORTABLE))}"
        )
    return EXPORTABLE[method]
