"""onnxplain: explain the decisions of any ONNX model."""

from .errors import InputError, ModelError, OnnxplainError, OptionError, UnsupportedOperatorError
from .explainer import Explainer
from .methods import METHODS

__version__ = "0.1.0"
__all__ = [
    "Explainer", "METHODS", "OnnxplainError", "ModelError", "InputError", "OptionError",
    "UnsupportedOperatorError", "__version__",
]
