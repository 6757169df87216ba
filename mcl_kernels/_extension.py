"""Loads the compiled extension `mcl_kernels._C`, or says once why it is missing.

The package must import and run without it (on the reference backend), so a failed import is a
warning, not an error; the reason is kept for the error a user gets when asking for a compiled
backend explicitly.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType
from typing import Optional

import torch  # noqa: F401  (loads libc10/libtorch, which mcl_kernels._C links against, before _C)

BUILD_HINT = ("build it from the source tree with `pip install --no-build-isolation -e .` "
              "(CUDA part: set CUDA_HOME and MCL_KERNELS_BUILD_CUDA=1)")

_C: Optional[ModuleType]
IMPORT_ERROR: Optional[str]
try:
    _C = importlib.import_module(f"{__package__}._C")
    IMPORT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(f"mcl_kernels: the compiled extension mcl_kernels._C could not be loaded ({IMPORT_ERROR}); "
                  f"the 'cpu' and 'cuda' backends are unavailable and 'auto' runs the reference. To fix: "
                  f"{BUILD_HINT}.", RuntimeWarning, stacklevel=2)


def built_with_cuda() -> bool:
    return _C is not None and bool(getattr(_C, "built_with_cuda", False))
