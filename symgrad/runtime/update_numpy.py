"""Host glue of the generated NumPy update rules (``generated/numpy/<rule>.py``, ``update()``).

An update takes, for each tensor input of the rule, a list of arrays: the i-th array of every list
belongs to the i-th parameter (its gradient, its state) and has that parameter's number of
entries. The tensors the rule updates are written in place, so they must be writable, C-contiguous
arrays of one float dtype (float32 or float64); the tensors it only reads (the gradient) may have
any layout and float dtype, and are cast chunk by chunk.
"""
from __future__ import annotations

import numpy as np

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def flat_tensors(op: str, names: tuple, updated: tuple, lists: tuple) -> tuple[list, np.dtype]:
    """One tuple per parameter, of the flat views of its tensors in ``names`` order, and the dtype
    the update computes in (that of the updated tensors). Errors name the tensor and the position."""
    seqs = []
    for name, seq in zip(names, lists):
        if isinstance(seq, np.ndarray) or not hasattr(seq, "__len__"):
            raise TypeError(f"{op}: {name} must be a list of arrays (one per parameter), got {type(seq).__name__}")
        seqs.append(list(seq))
    count = {len(s) for s in seqs}
    if len(count) > 1:
        raise ValueError(f"{op}: the tensor lists differ in length: " + ", ".join(f"{n}: {len(s)}" for n, s in zip(names, seqs)))
    dtype = None
    groups = []
    for k in range(count.pop() if count else 0):
        views, size = [], None
        for name, seq in zip(names, seqs):
            a = seq[k]
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{op}: {name}[{k}] must be a NumPy array, got {type(a).__name__}")
            if a.dtype not in _FLOATS and not (name not in updated and a.dtype.kind == "f"):
                raise TypeError(f"{op}: {name}[{k}] has dtype {a.dtype}; updates compute in float32 or float64")
            if size is None:
                size = a.size
            elif a.size != size:
                raise ValueError(f"{op}: {name}[{k}] has {a.size} entries but {names[0]}[{k}] has {size}")
            if name in updated:
                if not a.flags.c_contiguous or not a.flags.writeable:
                    raise ValueError(f"{op}: {name}[{k}] is updated in place, so it must be a writable C-contiguous array")
                if dtype is None:
                    dtype = a.dtype
                elif a.dtype != dtype:
                    raise TypeError(f"{op}: {name}[{k}] is {a.dtype} but the other updated tensors are {dtype}; "
                                    "keep parameters and state in one dtype (fp32 master weights for low precision)")
                views.append(a.reshape(-1))
            else:
                views.append(np.ravel(a))
        groups.append(tuple(views))
    return groups, dtype if dtype is not None else np.dtype(np.float32)


def chunks(groups: list, dtype: np.dtype, size: int):
    """``(*views, n)`` for every chunk of every parameter: views of at most ``size`` entries each;
    a read-only tensor of another dtype comes cast to ``dtype`` (one chunk at a time)."""
    for views in groups:
        total = views[0].size
        for lo in range(0, total, size):
            hi = min(lo + size, total)
            yield (*(v[lo:hi] if v.dtype == dtype else v[lo:hi].astype(dtype) for v in views), hi - lo)


def scalar(op: str, name: str, value) -> float:
    """``lr`` or ``t``: a Python number, or a one-entry array or tensor (a schedule's value)."""
    try:
        v = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a real number or a one-entry array, got {value!r}") from None
    return v
