"""Backward rules, one module per family; importing this package registers them all."""

from . import base  # noqa: F401
from . import gradient_elementwise, gradient_linear, gradient_pool, gradient_shape  # noqa: F401
from . import gradient_signal  # noqa: F401
from . import gradient_attention, gradient_roi  # noqa: F401
from . import gradient_sample  # noqa: F401
from . import gradient_loss  # noqa: F401
from . import gradient_scatter  # noqa: F401
from . import gradient_reduce  # noqa: F401
from . import gradient_math  # noqa: F401
from . import deeplift, excitation, lrp, modified  # noqa: F401
from . import recurrent, recurrent_lrp  # noqa: F401
from . import control  # noqa: F401
from . import attnlrp  # noqa: F401
from . import ml, quantized  # noqa: F401
from .base import RULES, Builder, lookup, register  # noqa: F401
