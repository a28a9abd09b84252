"""Runtime for the generated NumPy modules: special functions, masked gathers, argument checks.

Generated NumPy modules depend on NumPy and this module only (no SciPy, no PyTorch). Everything is
vectorized; nothing loops over elements in Python.
"""
from __future__ import annotations

import operator

import numpy as np

from .leading import fold, fold_like, unfold  # noqa: F401  (leading axes, shared with the Triton modules)
from .domains import check_params, check_sizes, label_error  # noqa: F401  (param domains and least sizes, shared with the Triton modules)
from .gather import ALL, Reads, contract, gather, reads  # noqa: F401  (reads outside a tensor)

__all__ = [
    "ALL", "erf", "sigmoid", "gather", "reads", "contract", "add_onehot", "zero_unless",
    "bind_params", "positional_params", "sum_rows", "bind_dims", "derived_dim", "check_shape", "float_dtype", "float_array", "label_array", "check_labels",
]


# ------------------------------------------------------------------------------------------------
# special functions

# W. J. Cody, "Rational Chebyshev approximations for the error function", Math. Comp. 23 (1969),
# coefficients as in netlib specfun CALERF: max relative error below 1e-16 on each interval.
_A = (3.1611237438705656, 113.864154151050156, 377.485237685302021, 3209.37758913846947, 0.185777706184603153)
_B = (23.6012909523441209, 244.024637934444173, 1282.61652607737228, 2844.23683343917062)
_C = (0.564188496988670089, 8.88314979438837594, 66.1191906371416295, 298.635138197400131,
      881.95222124176909, 1712.04761263407058, 2051.07837782607147, 1230.33935479799725, 2.15311535474403846e-8)
_D = (15.7449261107098347, 117.693950891312499, 537.181101862009858, 1621.38957456669019,
      3290.79923573345963, 4362.61909014324716, 3439.36767414372164, 1230.33935480374942)
_P = (0.305326634961232344, 0.360344899949804439, 0.125781726111229246, 0.0160837851487422766,
      6.58749161529837803e-4, 0.0163153871373020978)
_Q = (2.56852019228982242, 1.87295284992346047, 0.527905102951428412, 0.0605183413124413191, 0.00233520497626869185)
_SQRPI = 0.56418958354775628695  # 1/sqrt(pi)
_THRESH = 0.46875
_XBIG = 26.543  # erfc underflows beyond this


def _erfc_scaled_tail(y: np.ndarray) -> np.ndarray:
    """erfc(y) for y > THRESH (Cody's second and third intervals), without cancellation."""
    mid = y <= 4.0
    out = np.empty_like(y)
    ym = y[mid]
    num, den = _C[8] * ym, ym.copy()
    for c, d in zip(_C[:7], _D[:7]):
        num, den = (num + c) * ym, (den + d) * ym
    out[mid] = (num + _C[7]) / (den + _D[7])
    yt = y[~mid]
    z = 1.0 / (yt * yt)
    num, den = _P[5] * z, z.copy()
    for p, q in zip(_P[:4], _Q[:4]):
        num, den = (num + p) * z, (den + q) * z
    out[~mid] = (_SQRPI - z * (num + _P[4]) / (den + _Q[4])) / yt
    # exp(-y*y) split as exp(-ysq*ysq)*exp(-del): y*y would lose the low bits that matter here.
    ysq = np.trunc(y * 16.0) / 16.0
    delta = (y - ysq) * (y + ysq)
    out *= np.exp(-ysq * ysq) * np.exp(-delta)
    return np.where(y >= _XBIG, 0.0, out)


def erf(x):
    """The error function, elementwise, accurate to about 1 ulp in float64 (Cody's algorithm).

    Computed in float64 and returned in the input's float dtype (float32 stays float32)."""
    x = np.asarray(x)
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    x64 = x.astype(np.float64, copy=False)
    y = np.abs(x64)
    out = np.empty_like(x64)
    small = y <= _THRESH
    ys = y[small]
    z = ys * ys
    num, den = _A[4] * z, z.copy()
    for a, b in zip(_A[:3], _B[:3]):
        num, den = (num + a) * z, (den + b) * z
    out[small] = x64[small] * (num + _A[3]) / (den + _B[3])
    big = ~small & ~np.isnan(y)
    yb = np.minimum(y[big], 2 * _XBIG)  # keeps inf finite inside the rational function
    out[big] = np.copysign((0.5 - _erfc_scaled_tail(yb)) + 0.5, x64[big])
    out[np.isnan(y)] = np.nan
    return out.astype(dtype, copy=False)


def sigmoid(x):
    """1/(1 + exp(-x)) without overflow: exp only ever sees -|x|."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


# ------------------------------------------------------------------------------------------------
# indexing


def add_onehot(out: np.ndarray, axis: int, labels, values) -> np.ndarray:
    """``out += values * onehot(labels)`` along ``axis``, in place, touching one entry per position
    of the other axes: the one its label picks. A dense one-hot would be a full pass (and a full
    array) for what is one entry per row.

    ``labels`` (integers) and ``values`` broadcast to the shape of ``out`` without ``axis``. A label
    outside ``[0, out.shape[axis])`` adds nothing: the one-hot of a label that names no entry is 0
    (the zero-extension convention; an ignored row's label of -100). Every position of the other
    axes updates a different entry, so a fancy-indexed ``+=`` is exact (no ``np.add.at``)."""
    other = out.shape[:axis] + out.shape[axis + 1:]
    labels = np.broadcast_to(np.asarray(labels), other)
    values = np.broadcast_to(np.asarray(values), other)
    if not other:  # a vector: at most one entry
        if 0 <= labels < out.shape[axis]:
            out[int(labels)] += values
        return out
    at = np.nonzero((labels >= 0) & (labels < out.shape[axis]))
    out[at[:axis] + (labels[at],) + at[axis:]] += values[at]
    return out


def zero_unless(out: np.ndarray, keep) -> np.ndarray:
    """``out`` set to exactly 0 wherever ``keep`` is false, in place: the strong zeros of a mask
    that multiplied ``out`` (``0*inf`` gave NaN there; a masked entry must be 0).

    ``keep`` broadcasts to ``out`` (``(B, 1)`` for a row mask). When it holds everywhere (the usual
    case) this only looks at ``keep``; a mask over leading axes zeroes the masked rows by index;
    any other pattern takes one masked pass."""
    keep = np.asarray(keep, dtype=bool)
    if keep.all():
        return out
    if keep.ndim == 0:
        out[...] = 0
        return out
    keep = keep.reshape((1,) * (out.ndim - keep.ndim) + keep.shape)
    lead = max(k + 1 for k, n in enumerate(keep.shape) if n != 1) if keep.size > 1 else 1
    if keep.shape[:lead] == out.shape[:lead]:
        out[~keep.reshape(keep.shape[:lead])] = 0
    else:
        np.copyto(out, 0, where=~keep)
    return out


# ------------------------------------------------------------------------------------------------
# argument checks shared by every generated module


_ROW_BLOCK = 64


def sum_rows(a: np.ndarray, axis: int) -> np.ndarray:
    """``a.sum(axis)`` for an axis NumPy would add one row at a time (not the last, contiguous
    one, which it sums pairwise): sums of blocks of 64 rows, then the blocks' sums added in
    float64. The error no longer grows with the number of rows (layer_norm's dw over 4231 rows)."""
    a = np.asarray(a)
    n = a.shape[axis]
    if n <= _ROW_BLOCK:
        return np.sum(a, axis=axis)
    parts = np.add.reduceat(a, np.arange(0, n, _ROW_BLOCK), axis=axis)
    return np.sum(parts, axis=axis, dtype=np.float64).astype(a.dtype, copy=False)


def positional_params(op: str, defaults: dict, args: tuple, given: dict) -> dict:
    """Params passed positionally after the inputs (in ``PARAMS`` order, as torch's functional
    ops take them) merged with those passed by name."""
    if len(args) > len(defaults):
        raise TypeError(f"{op}: {len(args)} positional param(s) given, but it has {len(defaults)}: {', '.join(defaults) or 'none'}")
    named = dict(zip(defaults, args))
    twice = sorted(set(named) & set(given))
    if twice:
        raise TypeError(f"{op}: param {twice[0]!r} given positionally and by name")
    return {**named, **given}


def bind_params(op: str, defaults: dict, integer: tuple, given: dict) -> dict:
    """The op's params: defaults overridden by ``given``; an unknown name is a TypeError."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        known = ", ".join(defaults) or "none"
        raise TypeError(f"{op}: unknown param(s) {', '.join(map(repr, unknown))}; its params are: {known}")
    out = dict(defaults)
    for name, value in given.items():
        if name in integer:
            try:
                out[name] = operator.index(value)
            except TypeError:
                raise TypeError(f"{op}: param {name!r} must be an integer, got {value!r}") from None
        else:
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"{op}: param {name!r} must be a number, got {value!r}") from None
    return out


_ZERO = np.float32(0.0)


def divisor(n):
    """A divisor that holds dims (``x/(B*C)``): ``n`` itself, or a float32 zero when an empty batch
    makes it 0, so the quotient is IEEE's inf or NaN (torch's mean over nothing is NaN) instead of
    Python's ZeroDivisionError. A float32 scalar widens no array: float32 math stays float32."""
    return n if n else _ZERO


def float_dtype(*values) -> np.dtype:
    """The dtype the math runs in: float64 if any float input is float64, else float32.

    Python scalars count as weak (NEP 50): ``dloss=1.0`` keeps a float32 backward in float32."""
    args = [v if isinstance(v, (int, float, np.ndarray, np.generic)) else np.asarray(v) for v in values]
    return np.result_type(*args, np.float32)


def float_array(op: str, name: str, value, weak: bool = False) -> np.ndarray:
    """A float input (or cotangent) as an array: its dtype must be a real float (float16, float32,
    float64), as the Triton modules and torch's float ops require. Complex, boolean, integer,
    object and string arrays are refused here, before any computing: the math would be silently
    wrong for them (complex) or they are a mistake to cast (labels passed as floats' input). A
    Python ``int`` or ``float`` scalar (``dloss=1``) counts as a float; with ``weak`` it stays a
    Python float, so it does not widen the math's dtype (NEP 50, see :func:`float_dtype`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if weak else np.asarray(float(value))
    try:
        a = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{op}: {name} must be a real float array, got {type(value).__name__} ({e})") from None
    if a.dtype.kind != "f":
        raise ValueError(f"{op}: {name} must be a real float array (float16, float32 or float64), got dtype {a.dtype}; "
                        "cast it (complex, boolean, integer and object arrays are not accepted)")
    return a


def check_labels(op: str, name: str, labels: np.ndarray, n: int, ignore=None) -> None:
    """A ValueError naming the first label outside ``[0, n)`` that is not ``ignore``, and its row."""
    bad = (labels < 0) | (labels >= n)
    if ignore is not None:
        bad &= labels != ignore
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), labels.shape)
        raise label_error(op, name, ", ".join(map(str, at)), int(labels[at]), n, ignore)


def label_array(op: str, name: str, value) -> np.ndarray:
    """An integer label tensor; a float array here is a mistake, not something to round."""
    a = np.asarray(value)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{op}: input {name} holds integer labels, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def bind_dims(op: str, arrays: dict, spec: dict) -> dict:
    """Each dim's size, read from the first input that has it; checks every input's rank and that
    inputs sharing a dim agree. ``spec`` maps input name -> its dim names, in declaration order."""
    dims: dict[str, int] = {}
    source: dict[str, str] = {}
    for name, names in spec.items():
        shape = np.shape(arrays[name])
        if len(shape) != len(names):
            want = f"({', '.join(names)})" if names else "() (a scalar)"
            raise ValueError(f"{op}: input {name} must have {len(names)} dims {want}, got shape {tuple(shape)}")
        for axis, (d, n) in enumerate(zip(names, shape)):
            if d not in dims:  # 0 is a size (an empty batch); least sizes are checked by check_sizes
                dims[d], source[d] = int(n), f"input {name} (axis {axis})"
            elif dims[d] != n:
                raise ValueError(f"{op}: input {name} has {d} = {n} (axis {axis}) but {source[d]} gives {d} = {dims[d]}")
    return dims


def derived_dim(op: str, name: str, formula: str, compute) -> int:
    """A derived dim (a convolution's output size): must come out a positive integer."""
    try:
        value = compute()
    except ZeroDivisionError:
        raise ValueError(f"{op}: dim {name} = {formula} divides by zero at these params") from None
    if value < 1:
        raise ValueError(f"{op}: dim {name} = {formula} is {value} for these inputs and params; it must be at least 1")
    return int(value)


def check_shape(op: str, name: str, value, dims: tuple, shape: tuple, dtype) -> np.ndarray:
    """A cotangent must have exactly its output's shape; returned as an array of ``dtype``."""
    a = float_array(op, f"cotangent {name}", value).astype(dtype, copy=False)
    if a.shape != tuple(shape):
        pretty = ", ".join(f"{d}={n}" for d, n in zip(dims, shape)) or "a scalar"
        raise ValueError(f"{op}: cotangent {name} must have shape {tuple(shape)} ({pretty}), got {a.shape}")
    return a


# ------------------------------------------------------------------------------------------------
# the saved dict handed out by forward_with_saved


def own_saved(saved: dict, given, outputs) -> dict:
    """``saved`` made independent of everything the caller holds, and read-only.

    A saved array that may share memory with an input the caller passed (``given``) or an output
    handed back (``outputs``, an array or a tuple of them) is copied, so an in-place change of the
    caller's array between ``forward_with_saved`` and ``backward`` (``x += 1``) cannot change the
    gradient: backward differentiates at the values forward saw, as torch's saved tensors do (torch
    raises instead; NumPy arrays have no version counter to compare). Every saved array is then
    marked read-only, so writing into ``saved`` itself raises. ``np.may_share_memory`` compares
    bounds only: the check costs nothing, the copies cost one pass over the aliased arrays. ``vjp``
    skips this: it owns its saved dict, nobody can change it between its forward and backward.
    """
    caller = [a for a in (*given, *(outputs if isinstance(outputs, tuple) else (outputs,)))
              if isinstance(a, np.ndarray)]
    owned = {}
    for name, value in saved.items():
        if isinstance(value, np.ndarray):
            if any(np.may_share_memory(value, a) for a in caller):
                value = value.copy()
            else:
                value = value.view()  # a view: read-only without touching the array forward made
            value.flags.writeable = False
        owned[name] = value
    return owned
