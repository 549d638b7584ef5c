"""wisca: bit-exact, verified WISCA weight-scaling transitions of LLM checkpoints."""

__version__ = "0.1.0"

from .api import TransformOptions, inspect, transform, undo, verify  # noqa: E402
from .errors import VerificationFailed, WiscaError  # noqa: E402
from .verify import Tolerance  # noqa: E402

__all__ = ["transform", "verify", "inspect", "undo", "TransformOptions", "Tolerance",
           "WiscaError", "VerificationFailed", "__version__"]
