"""symgrad's own SymPy functions, re-exported from :mod:`symgrad.primitives`, where each is defined
once with its derivative, its spellings per target, its reference and its LaTeX."""
from __future__ import annotations

from .primitives import Ceiling, Floor, Iverson, ReduceMax, expm1, log1p, onehot, relu, sigmoid, softplus, sq

__all__ = ["Iverson", "sigmoid", "softplus", "ReduceMax", "log1p", "expm1", "relu", "onehot", "Floor", "Ceiling", "sq"]
