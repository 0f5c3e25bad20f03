"""User-facing methods, registered by name (see `onnxplain methods`)."""

from . import cam, conductance, drise, gradients, integrated, occlusion, perturbation, relevance, rise, smoothgrad, surrogate  # noqa: F401  (registration)
from . import transformers  # noqa: F401  (registration)
from .base import METHODS, Method, Option, get_method, register  # noqa: F401
from ..errors import OptionError



def exportable(method: str, options: dict | None = None):
    """The composite of a single-pass method with its options, and whether its result is
    multiplied by the input: what the method registered (its `composite`)."""
    m = get_method(method)
    if m.composite is None:
        raise OptionError(
            f"method '{method}' runs several passes and cannot be exported as one graph; "
            f"exportable: {', '.join(sorted(EXPORTABLE))}, lrp (with rules=...)"
        )
    return m.composite(**m.resolve(dict(options or {}))), m.times_input


def _exportable_as_is() -> dict:
    """Single-pass methods that export with their default options (a user `lrp` composite
    needs its rules)."""
    out = {}
    for name, m in METHODS.items():
        if m.composite is None:
            continue
        try:
            out[name] = m.composite(**m.resolve({}))
        except OptionError:
            continue
    return out


# Methods whose whole computation is one explainer pass, by name: each exports as a
# standalone explainer model.
EXPORTABLE = _exportable_as_is()
