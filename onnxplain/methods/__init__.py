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


def exportable(method: str):
    """The composite of a single-pass method, and whether its result is multiplied by the input."""
    get_method(method)
    if method not in EXPORTABLE:
        raise OptionError(
            f"method '{method}' runs several passes and cannot be exported as one graph; "
            f"exportable: {', '.join(sorted(EXPORTABLE))}"
        )
    return EXPORTABLE[method], method in TIMES_INPUT
