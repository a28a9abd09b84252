"""symgrad: derive, simplify and compile gradients of tensor ops declared in SymPy."""
from .declare import REGISTRY, Op, register
from .derive import Derivation, derive

__all__ = ["REGISTRY", "Op", "register", "Derivation", "derive"]
