"""Host glue of the generated NumPy multi-tensor functions: an update rule's ``update()``, an op's
``forward_multi()`` (:mod:`symgrad.targets.numpy_multi`).

Each takes, for each tensor input, a list of arrays: the i-th array of every list belongs to the
i-th position (a parameter: its gradient, its state) and has that position's number of entries
(any shape: a multi-tensor map or reduction sees each array flat). An update writes the tensors
it updates in place, so they must be writable, C-contiguous arrays of one float dtype (float32 or
float64); the tensors it only reads (the gradient) may have any layout and float dtype, and are
cast chunk by chunk. A map or a reduction computes each position in float64 if any of its arrays
is float64, else in float32, as ``forward`` does; a map writes new arrays (or the caller's
``out``, which may be an input list itself: in place).
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


def _float(op: str, name: str, k: int, a) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{op}: {name}[{k}] must be a NumPy array, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{op}: {name}[{k}] has dtype {a.dtype}; multi-tensor functions take float arrays")
    return a


def _lists(op: str, names: tuple, lists: tuple) -> list:
    seqs = []
    for name, seq in zip(names, lists):
        if isinstance(seq, np.ndarray) or not hasattr(seq, "__len__"):
            raise TypeError(f"{op}: {name} must be a list of arrays (one per position), got {type(seq).__name__}")
        seqs.append(list(seq))
    if len({len(s) for s in seqs}) > 1:
        raise ValueError(f"{op}: the lists differ in length: " + ", ".join(f"{n}: {len(s)}" for n, s in zip(names, seqs)))
    for name, seq in zip(names, seqs):
        for k, a in enumerate(seq):
            _float(op, name, k, a)
            if a.size != seqs[0][k].size:
                raise ValueError(f"{op}: {name}[{k}] has {a.size} entries but {names[0]}[{k}] has {seqs[0][k].size}")
    return seqs


def map_tensors(op: str, names: tuple, lists: tuple, out_names: tuple, out) -> tuple[list, list]:
    """``(groups, outs)``: per position, ``(flat input views, flat output views, compute dtype)``;
    ``outs`` the output lists (new arrays shaped as the first input's, or the caller's ``out``:
    writable arrays with the position's entries; an input list itself computes in place)."""
    seqs = _lists(op, names, lists)
    count = len(seqs[0]) if seqs else 0
    dtypes = [np.dtype(np.float64) if any(s[k].dtype == np.float64 for s in seqs) else np.dtype(np.float32)
              for k in range(count)]
    if out is None:
        outs = [[np.empty(seqs[0][k].shape, dtypes[k]) for k in range(count)] for _ in out_names]
    else:
        outs = [out] if len(out_names) == 1 else list(out)
        if len(outs) != len(out_names):
            raise ValueError(f"{op}: out must hold {len(out_names)} lists (one per output: {', '.join(out_names)})")
        outs = _lists(op, tuple(out_names), tuple(outs))
        if outs and (len(outs[0]) != count or any(a.size != seqs[0][k].size for k, a in enumerate(outs[0]))):
            raise ValueError(f"{op}: out must hold one array per position, with that position's entries")
    groups = []
    for k in range(count):
        views = tuple(np.ravel(s[k]) for s in seqs)
        targets = []
        for name, seq in zip(out_names, outs):
            a = seq[k]
            if not a.flags.writeable:
                raise ValueError(f"{op}: {name}[{k}] is read-only: forward_multi writes its outputs there")
            targets.append((a, a.reshape(-1) if a.flags.c_contiguous else None))
        groups.append((views, targets, dtypes[k]))
    return groups, outs


def map_chunks(groups: list, size: int, rows: int):
    """``(*input views, *output views, n, dtype, scratch)`` for every chunk of every position: views
    of at most ``size`` entries in the position's dtype (inputs cast a chunk at a time), and
    ``rows`` scratch rows of that dtype; an output of another dtype or not C-contiguous gets a
    chunk-sized array, written into it (in C order) once the chunk is done."""
    scratch: dict = {}
    for views, targets, dt in groups:
        if dt not in scratch:
            scratch[dt] = np.empty((max(rows, 1), size), dt)
        direct = [flat is not None and flat.dtype == dt for _, flat in targets]
        total = views[0].size
        for lo in range(0, total, size):
            hi = min(lo + size, total)
            ins = tuple(v[lo:hi] if v.dtype == dt else v[lo:hi].astype(dt) for v in views)
            outs = tuple(flat[lo:hi] if ok else np.empty(hi - lo, dt) for (_, flat), ok in zip(targets, direct))
            yield (*ins, *outs, hi - lo, dt, scratch[dt])
            for (a, _), ok, chunk in zip(targets, direct, outs):
                if not ok:
                    a.flat[lo:hi] = chunk


def reduce_tensors(op: str, name: str, seq, least: int) -> tuple[list, np.dtype]:
    """The flat arrays of ``seq`` in their compute dtypes, and the value's dtype (float64 if any
    array is, else float32). ``least``: the fewest entries the op takes per array."""
    (seq,) = _lists(op, (name,), (seq,))
    if not seq:
        raise ValueError(f"{op}: no arrays: the value of an empty list is undefined here (the caller decides it)")
    flat = []
    for k, a in enumerate(seq):
        if a.size < least:
            raise ValueError(f"{op}: {name}[{k}] has {a.size} entries; each array needs at least {least}")
        dt = np.float64 if a.dtype == np.float64 else np.float32
        flat.append(np.ravel(a).astype(dt, copy=False))
    dtype = np.dtype(np.float64) if any(a.dtype == np.float64 for a in flat) else np.dtype(np.float32)
    return flat, dtype


def spans(flat: list, size: int):
    """Each array's consecutive pieces of at most ``size`` entries (an empty array has none)."""
    for a in flat:
        for lo in range(0, a.size, size):
            yield a[lo:lo + size]
