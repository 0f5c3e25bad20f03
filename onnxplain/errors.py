"""Typed errors. Every failure onnxplain reports to a user is one of these.

Each message names the cause and what to do; the CLI prints it on one line and
exits with code 2.
"""


class OnnxplainError(Exception):
    """Base class: something onnxplain cannot do with what it was given."""


class ModelError(OnnxplainError):
    """The model file is missing, malformed, hostile, or not a valid ONNX graph."""


class UnsupportedOperatorError(ModelError):
    """The model uses operators for which the requested method has no rule."""

    def __init__(self, operators, method=None):
        self.operators = sorted(set(operators))
        what = f"method '{method}'" if method else "this method"
        super().__init__(
            f"{what} has no rule for operator(s): {', '.join(self.operators)}; "
            "use a black-box method (occlusion, rise, kernel_shap, lime) for this model, "
            "or explain an intermediate tensor before these operators with --layer"
        )


class InputError(OnnxplainError):
    """An input array, image or file does not fit the model (shape, dtype, NaN, ...)."""


class OptionError(OnnxplainError):
    """An unknown method, an unknown option, or an impossible option value."""
