"""onnxplain: explain the decisions of any ONNX model."""

from .errors import InputError, ModelError, OnnxplainError, OptionError, UnsupportedOperatorError
from .explainer import Explainer
from .methods import METHODS
from .api import heatmap, load_image, overlay, save

__version__ = "0.1.0"
__all__ = [
    "Explainer", "METHODS", "OnnxplainError", "ModelError", "InputError", "OptionError",
    "UnsupportedOperatorError", "load_image", "heatmap", "overlay", "save", "__version__",
]
