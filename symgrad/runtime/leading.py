"""Leading axes: an op whose first dim is declared ``leading`` takes any number of axes there.

A generated module folds them into that one dim before computing (``x[2, 3, 5, D]`` runs as
``x[30, D]``; a 1-D ``x[D]`` as ``x[1, D]``) and unfolds outputs and gradients that start with it,
as torch's ``[*, D]`` ops do. Both targets share this code: NumPy arrays and torch tensors alike
have ``.shape`` and ``.reshape`` (a view where the layout allows one).
"""
from __future__ import annotations

import math


def fold(op: str, values: dict, ranks: dict) -> tuple[tuple | None, tuple]:
    """``(leading shape, folded values)`` of the inputs that start with the leading dim; ``ranks``
    gives each one's declared rank. Every input must carry the same leading axes."""
    lead, first, out = None, None, []
    for name, value in values.items():
        if not hasattr(value, "shape"):
            raise TypeError(f"{op}: input {name} must be an array or a tensor, got {type(value).__name__}")
        rank, shape = ranks[name], tuple(value.shape)
        if len(shape) < rank - 1:
            raise ValueError(f"{op}: input {name} must have at least {rank - 1} dims after its leading axes, got shape {shape}")
        here = shape[: len(shape) - (rank - 1)]
        if lead is None:
            lead, first = here, name
        elif here != lead:
            raise ValueError(f"{op}: input {name} has leading axes {here} but input {first} has {lead}")
        out.append(value.reshape((math.prod(here),) + shape[len(here):]))
    return lead, tuple(out)


def unfold(value, lead):
    """``value`` (leading dim first) with the leading axes restored; ``None`` leaves it as it is.

    A value whose shape is already the unfolded one (one leading axis) is returned itself, not a
    same-shape view: autograd then sees the op's real output, which may be changed in place as
    torch allows it (a view made inside a custom Function may not be), and torch's version check
    still raises where backward reads a saved output that changed."""
    if lead is None or value is None:
        return value
    shape = tuple(lead) + tuple(value.shape[1:])
    if tuple(value.shape) == shape:
        return value
    return value.reshape(shape)


def fold_like(op: str, name: str, value, lead, trailing: tuple):
    """A cotangent of an output that starts with the leading dim, folded as forward folded:
    it must have the output's shape, the leading axes then ``trailing``."""
    if lead is None:
        return value
    shape, want = tuple(value.shape), tuple(lead) + tuple(trailing)
    if shape != want:
        raise ValueError(f"{op}: cotangent {name} must have shape {want} (its output's), got {shape}")
    return value.reshape((math.prod(lead),) + tuple(trailing))
