"""Param domains and least dim sizes: the checks every generated module runs before computing.

Each op declares its params' domains (``Param(..., domain="[0, 1]")``, :class:`symgrad.declare.Domain`);
a generated module carries them as a table ``{param: (low, high, low_closed, high_closed, text)}``
and calls :func:`check_params` with it, on both targets. NaN lies in no domain.
"""
from __future__ import annotations


def check_params(op: str, values: dict, domains: dict) -> None:
    """A ``ValueError`` naming the op, the param, its value and its domain for the first param
    outside its domain (``conv2d: param stride must be an integer >= 1, got 0``)."""
    for name, (low, high, low_closed, high_closed, text) in domains.items():
        v = values[name]
        inside = (low <= v if low_closed else low < v) and (v <= high if high_closed else v < high)
        if not inside:
            raise ValueError(f"{op}: param {name} must be {text}, got {v!r}")


def label_error(op: str, name: str, row, value, n: int, ignore) -> ValueError:
    """The error for the first label outside ``[0, n)`` that is not ``ignore`` (torch: ``Target 9 is
    out of bounds``), on both targets."""
    also = "" if ignore is None else f" or equal ignore_index ({ignore})"
    return ValueError(f"{op}: label {name}[{row}] = {value} is out of bounds: labels must lie in [0, {n}){also}")


def check_sizes(op: str, dims: dict, minimum: dict) -> None:
    """Dims may be empty (0) unless the op declares a least size (``Dim(min_size=1)``, e.g. a max
    over an empty row, which torch refuses too): a ``ValueError`` naming the dim and its size.

    A least size may come with dims that excuse it (``(1, ("N", "Cin"))``, ``Dim(empty_with=...)``):
    a conv2d input of height 0 is refused, as torch refuses it, unless its batch or channels are
    empty too."""
    for name, least in minimum.items():
        least, excused_by = least if isinstance(least, tuple) else (least, ())
        if name in dims and dims[name] < least and not any(dims.get(e) == 0 for e in excused_by):
            unless = f" unless {' or '.join(excused_by)} is 0" if excused_by else ""
            raise ValueError(f"{op}: dim {name} is {dims[name]}; it must be at least {least}{unless} (check the input shapes and params)")
