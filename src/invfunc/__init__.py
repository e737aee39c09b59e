"""invfunc: invertible functions for PyTorch that train in activation memory flat in depth.

Pair a pure function with its inverse (:func:`invertible`), compose with
:func:`chain` and :func:`couple`, and run memory-efficiently with
:func:`invertible_call`.
"""

from ._at import at
from ._call import invertible_call
from ._chain import chain
from ._check import BlockCheck, CheckReport, check
from ._core import Invertible, inverse, invertible
from ._coupling import couple
from ._errors import FreedTensorError, InvertibilityWarning, InvfuncError
from ._explain import explain
from ._modes import MODES, current_mode, mode
from ._module import InvertibleModule, as_module
from ._plan import Plan, plan
from ._verify import verify

__all__ = [
    "MODES",
    "BlockCheck",
    "CheckReport",
    "FreedTensorError",
    "InvertibilityWarning",
    "Invertible",
    "InvertibleModule",
    "InvfuncError",
    "Plan",
    "as_module",
    "at",
    "chain",
    "check",
    "couple",
    "current_mode",
    "explain",
    "inverse",
    "invertible",
    "invertible_call",
    "mode",
    "plan",
    "verify",
]

__version__ = "0.1.0"
