"""A reference interpreter: evaluate SymPy index expressions numerically, in float64.

This is what generated code is tested against, so it is deliberately simple and independent of any
code generator: a recursive evaluator with one small handler per SymPy node class.

Evaluation is vectorized over indices. Every free index and every summation variable gets its own
numpy axis; an index is bound to an ``arange`` shaped to broadcast along its axis, so a sub-expression
is an array that varies only along the indices it reads. A ``Sum`` binds its variable on a fresh axis,
evaluates the body once and sums that axis away (``keepdims``); ``ReduceMax`` does the same with max.
Conventions:

* reading a tensor outside its extent gives 0 (the zero padding of a convolution);
* ``Iverson`` brackets and ``KroneckerDelta``s are strong zeros: a factor they multiply is 0 where the
  bracket is 0, even if that factor is not finite there;
* labels are integers; a bound of a ``Sum`` may depend on outer indices (masked per entry).

Unknown nodes raise :class:`EvaluationError` naming the node: a missing handler is never a silent 0.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import sympy as sp

from . import primitives
from .declare import Op, Role
from .primitives import Iverson, ReduceMax


class EvaluationError(ValueError):
    """The interpreter cannot evaluate a node; the message names it."""


# --------------------------------------------------------------------------------------------------
# the evaluator


# functions: SymPy class -> float64 NumPy, from the primitives table (``reference``)
_FUNCTIONS = {p.cls: p.reference for p in primitives.TABLE if p.cls is not None and callable(p.reference)}

_RELATIONS = {
    sp.StrictGreaterThan: np.greater,
    sp.GreaterThan: np.greater_equal,
    sp.StrictLessThan: np.less,
    sp.LessThan: np.less_equal,
    sp.Eq: np.equal,
    sp.Ne: np.not_equal,
}


def _depth(expr: sp.Basic) -> int:
    """How many axes the bound variables (Sum limits, ReduceMax) nested in ``expr`` need."""
    if isinstance(expr, sp.Sum):
        inner = [_depth(expr.function)] + [_depth(e) for _, lo, hi in expr.limits for e in (lo, hi)]
        return len(expr.limits) + max(inner)
    if isinstance(expr, ReduceMax):
        return 1 + max(_depth(expr.body), _depth(expr.args[2]), _depth(expr.args[3]))
    return max((_depth(a) for a in expr.args), default=0)


class _Evaluator:
    """Evaluates one expression; ``rank`` is the number of axes every non-scalar value has."""

    def __init__(self, env: Mapping[str, object], rank: int):
        self.env = env
        self.rank = rank

    def axis_range(self, axis: int, lo: int, hi: int) -> np.ndarray:
        shape = [1] * self.rank
        shape[axis] = max(hi - lo + 1, 0)
        return np.arange(lo, hi + 1).reshape(shape)

    def __call__(self, node: sp.Basic, bound: dict, axis: int):
        """``bound``: index symbol -> value (int or int array); ``axis``: the next free axis."""
        for cls in type(node).__mro__:
            handler = _HANDLERS.get(cls)
            if handler is not None:
                return handler(self, node, bound, axis)
        raise EvaluationError(f"the reference interpreter cannot evaluate {type(node).__name__} node: {node}")

    # ---- leaves

    def symbol(self, node, bound, axis):
        if node in bound:
            return bound[node]
        name = str(node)
        if name in self.env:
            v = self.env[name]
            if np.ndim(v) != 0:
                raise EvaluationError(f"symbol {name} names a tensor of shape {np.shape(v)}; index it")
            return np.asarray(v)[()]
        raise EvaluationError(f"unknown symbol {name}: not a bound index and not in the environment")

    def indexed(self, node, bound, axis):
        name = str(node.base)
        if name not in self.env:
            raise EvaluationError(f"unknown tensor {name} in {node}")
        arr = np.asarray(self.env[name])
        if arr.ndim != len(node.indices):
            raise EvaluationError(f"{node}: tensor {name} has {arr.ndim} dims, indexed with {len(node.indices)}")
        ix = [self._as_index(self(e, bound, axis), node) for e in node.indices]
        inside = np.ones((), dtype=bool)
        clipped = []
        for i, n in zip(ix, arr.shape):
            inside = inside & (i >= 0) & (i < n)
            clipped.append(np.clip(i, 0, max(n - 1, 0)))
        if arr.size == 0:
            return np.zeros(np.broadcast_shapes(*(np.shape(i) for i in ix)), dtype=arr.dtype)
        return np.where(inside, arr[tuple(clipped)], np.zeros((), dtype=arr.dtype))

    @staticmethod
    def _as_index(value, node):
        v = np.asarray(value)
        if v.dtype.kind in "iub":
            return v.astype(np.int64)
        r = np.rint(v)
        if not np.all(np.abs(v - r) < 1e-9):
            raise EvaluationError(f"{node}: an index is not an integer ({v.ravel()[:4]} ...)")
        return r.astype(np.int64)

    # ---- arithmetic

    def add(self, node, bound, axis):
        vals = [self(a, bound, axis) for a in node.args]
        out = vals[0]
        for v in vals[1:]:
            out = out + v
        return out

    def mul(self, node, bound, axis):
        out, masks = 1, []
        for a in node.args:
            v = self(a, bound, axis)
            if isinstance(a, (Iverson, sp.KroneckerDelta)):
                masks.append(v != 0)
            out = out * v
        for m in masks:  # strong zero: [false]*anything = 0
            out = np.where(m, out, 0.0)
        return out

    def integer(self, node, bound, axis):
        return int(node)

    def number(self, node, bound, axis):
        if node.is_finite is False or node is sp.nan:
            raise EvaluationError(f"non-finite number {node}")
        return float(node)

    # ---- functions

    def function(self, node, bound, axis):
        args = [np.asarray(self(a, bound, axis), dtype=np.float64) for a in node.args]
        return _FUNCTIONS[type(node)](*args)

    def iverson(self, node, bound, axis):
        return np.asarray(self(node.args[0], bound, axis)).astype(np.float64)

    def delta(self, node, bound, axis):
        a, b = (self(x, bound, axis) for x in node.args)
        return np.equal(a, b).astype(np.float64)

    def relation(self, node, bound, axis):
        return _RELATIONS[type(node)](self(node.lhs, bound, axis), self(node.rhs, bound, axis))

    def logic(self, node, bound, axis):
        vals = [np.asarray(self(a, bound, axis), dtype=bool) for a in node.args]
        if isinstance(node, sp.Not):
            return ~vals[0]
        f = np.logical_and if isinstance(node, sp.And) else np.logical_or
        out = vals[0]
        for v in vals[1:]:
            out = f(out, v)
        return out

    def boolean(self, node, bound, axis):
        return np.asarray(bool(node))

    def piecewise(self, node, bound, axis):
        conds = [np.asarray(self(c, bound, axis), dtype=bool) for _, c in node.args]
        vals = [self(e, bound, axis) for e, _ in node.args]
        taken = np.zeros((), dtype=bool)
        out = np.full((), np.nan)  # no branch taken: undefined
        for v, c in zip(vals, conds):
            out = np.where(c & ~taken, v, out)
            taken = taken | c
        return out

    # ---- bound variables

    def _bind(self, limits, bound, axis):
        """Bind each (k, lo, hi) on its own axis, outermost first; returns bindings, the mask where a
        bound varies with outer indices, the axes used, and whether every range is empty."""
        bound = dict(bound)
        mask, axes = None, []
        for k, lo, hi in reversed(limits):
            lo_v, hi_v = self(lo, bound, axis), self(hi, bound, axis)
            lo_i = self._as_index(lo_v, lo)
            hi_i = self._as_index(hi_v, hi)
            first, last = int(np.min(lo_i)), int(np.max(hi_i))
            if last < first:
                return None, None, None
            r = self.axis_range(axis, first, last)
            bound[k] = r
            if np.ndim(lo_i) or np.ndim(hi_i):
                m = (r >= lo_i) & (r <= hi_i)
                mask = m if mask is None else mask & m
            axes.append(axis)
            axis += 1
        return bound, mask, axes

    def _reduce(self, node, body, limits, bound, axis, reduce, empty):
        inner, mask, axes = self._bind(limits, bound, axis)
        if inner is None:
            return empty
        v = np.asarray(self(body, inner, axis + len(limits)), dtype=np.float64)
        shape = np.broadcast_shapes(v.shape, *(inner[k].shape for k, _, _ in limits))
        v = np.broadcast_to(v.reshape((1,) * (len(shape) - v.ndim) + v.shape), shape)
        if mask is not None:
            v = np.where(mask, v, empty)
        return reduce(v, axis=tuple(axes), keepdims=True)

    def sum(self, node, bound, axis):
        return self._reduce(node, node.function, node.limits, bound, axis, np.sum, 0.0)

    def reduce_max(self, node, bound, axis):
        body, k, lo, hi = node.args
        return self._reduce(node, body, ((k, lo, hi),), bound, axis, np.max, -np.inf)


_HANDLERS = {
    sp.Symbol: _Evaluator.symbol,
    sp.Indexed: _Evaluator.indexed,
    sp.Add: _Evaluator.add,
    sp.Mul: _Evaluator.mul,
    sp.Integer: _Evaluator.integer,
    sp.Rational: _Evaluator.number,
    sp.Float: _Evaluator.number,
    sp.NumberSymbol: _Evaluator.number,  # pi, E, ...
    Iverson: _Evaluator.iverson,
    sp.KroneckerDelta: _Evaluator.delta,
    sp.And: _Evaluator.logic,
    sp.Or: _Evaluator.logic,
    sp.Not: _Evaluator.logic,
    sp.logic.boolalg.BooleanTrue: _Evaluator.boolean,
    sp.logic.boolalg.BooleanFalse: _Evaluator.boolean,
    sp.Piecewise: _Evaluator.piecewise,
    sp.Sum: _Evaluator.sum,
    ReduceMax: _Evaluator.reduce_max,
    **{cls: _Evaluator.relation for cls in _RELATIONS},
    **{cls: _Evaluator.function for cls in _FUNCTIONS},
}


def evaluate(expr: sp.Basic, env: Mapping[str, object], point: Mapping[sp.Symbol, int] | None = None) -> float:
    """The value of ``expr`` with its free indices at the integers in ``point``."""
    bound = {k: int(v) for k, v in (point or {}).items()}
    with np.errstate(all="ignore"):
        v = np.asarray(_Evaluator(env, _depth(expr))(sp.sympify(expr), bound, 0), dtype=np.float64)
    if v.size != 1:
        raise EvaluationError(f"{expr} has free indices that are not bound (value of shape {v.shape})")
    return float(v.reshape(-1)[0])


def evaluate_over(expr: sp.Basic, env: Mapping[str, object], indices, shape) -> np.ndarray:
    """``expr`` at every tuple of its free ``indices`` (index ``n`` running over ``range(shape[n])``)."""
    indices, shape = tuple(indices), tuple(int(s) for s in shape)
    if len(indices) != len(shape):
        raise EvaluationError(f"{len(indices)} indices but shape {shape}")
    ev = _Evaluator(env, len(indices) + _depth(expr))
    bound = {ix: ev.axis_range(a, 0, n - 1) for a, (ix, n) in enumerate(zip(indices, shape))}
    with np.errstate(all="ignore"):
        v = np.asarray(ev(sp.sympify(expr), bound, len(indices)), dtype=np.float64)
    if v.ndim:
        v = v.reshape(v.shape[: len(indices)])  # the summed axes are all 1 by now
    return np.array(np.broadcast_to(v, shape), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# ops: sizes, params, inputs, forward and gradients


def param_values(op: Op, sizes: Mapping[str, float] | None = None, params: Mapping[str, float] | None = None) -> dict:
    """Each param's value: its default, overridden by ``sizes`` (test sizes carry conv's stride and
    pad) and then by ``params``."""
    out = {}
    for p in op.params:
        v = p.default
        for src in (sizes or {}, params or {}):
            if p.name in src:
                v = src[p.name]
        out[p.name] = int(v) if p.integer else float(v)
    return out


def instantiate(op: Op, sizes: Mapping[str, float], params: Mapping[str, float] | None = None) -> dict[str, int]:
    """Concrete sizes of every dim of ``op``: given ones from ``sizes``, derived ones (a conv's output
    size) from their formula over the others and the params."""
    pv = param_values(op, sizes, params)
    dims: dict[str, int] = {}
    for d in op.dims:
        if d.extent is None:
            if d.name not in sizes:
                raise EvaluationError(f"op {op.name}: no size given for dim {d.name}")
            dims[d.name] = int(sizes[d.name])
    for d in op.dims:
        if d.extent is not None:
            v = evaluate(d.extent, {**pv, **dims})
            if v != int(v) or v < 0:
                raise EvaluationError(f"op {op.name}: dim {d.name} = {d.extent} is {v} at sizes {dict(sizes)}")
            if d.name in sizes and int(sizes[d.name]) != int(v):
                raise EvaluationError(f"op {op.name}: dim {d.name} given as {sizes[d.name]} but its formula gives {int(v)}")
            dims[d.name] = int(v)
    return dims


def shape_of(tensor, dims: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(dims[d.name] for d in tensor.dims)


def sample_inputs(op: Op, sizes, rng: np.random.Generator, params=None, ignore_fraction: float = 0.25) -> dict[str, np.ndarray]:
    """A random point of the op's domain: float inputs uniform on their ``domain``; labels integers in
    [0, C) (C from the op's LabelRange fact) with about ``ignore_fraction`` of the entries set to the
    ``ignore_index`` param when the op has one (never all of them)."""
    dims = instantiate(op, sizes, params)
    pv = param_values(op, sizes, params)
    ranges = {f.label: f.dim for f in op.facts}
    out = {}
    for t in op.inputs:
        shape = shape_of(t, dims)
        if t.role is Role.LABEL:
            if t.name not in ranges:
                raise EvaluationError(f"op {op.name}: label {t.name} has no LabelRange fact to sample it from")
            classes = dims[ranges[t.name].name]
            labels = rng.integers(0, classes, size=shape).astype(np.int64)
            if "ignore_index" in pv and labels.size > 1 and ignore_fraction > 0:
                n = min(max(1, int(round(ignore_fraction * labels.size))), labels.size - 1)
                flat = labels.reshape(-1)
                flat[rng.choice(labels.size, size=n, replace=False)] = pv["ignore_index"]
            out[t.name] = labels
        else:
            lo, hi = t.domain
            out[t.name] = rng.uniform(lo, hi, size=shape)
    return out


def _op_env(op: Op, sizes, params, extra) -> dict:
    dims = instantiate(op, sizes, params)
    return {**dims, **param_values(op, sizes, params), **extra}


def evaluate_forward(op, arrays: Mapping[str, np.ndarray], params=None, sizes=None) -> dict[str, np.ndarray]:
    """Every intermediate and output of ``op`` over all its index tuples, in evaluation order.

    ``op`` may also be a ``Derivation``: then its stabilized forward forms are evaluated.
    """
    forms = None
    if not isinstance(op, Op):  # a Derivation
        forms, op = list(op.forward.values()), op.op
    forms = forms or [*op.intermediates, *op.outputs]
    sizes = sizes or {}
    dims = instantiate(op, sizes, params)
    env = _op_env(op, sizes, params, arrays)
    result = {}
    for q in forms:
        v = evaluate_over(q.expr, env, q.indices, shape_of(q, dims))
        env[q.name] = result[q.name] = v
    return result


def evaluate_gradient(derivation, input_name: str, env: Mapping[str, object], sizes, which: str = "expr") -> np.ndarray:
    """The gradient of ``input_name`` (its simplified ``expr`` or its ``raw`` derivative) over the
    input's shape; ``env`` holds the inputs, params, forward values and the cotangents ``d<output>``."""
    if which not in ("expr", "raw"):
        raise ValueError(f"which must be 'expr' or 'raw', not {which!r}")
    op = derivation.op
    g = derivation.gradients[input_name]
    params = {p.name: env[p.name] for p in op.params if p.name in env}
    dims = instantiate(op, sizes, params)
    full = {**_op_env(op, sizes, params, {}), **env}
    return evaluate_over(getattr(g, which), full, g.indices, shape_of(op.tensor(input_name), dims))


def contraction_loss(op: Op, values: Mapping[str, np.ndarray], cotangents: Mapping[str, np.ndarray]) -> float:
    """Sum over outputs of sum(d<output> * output): the scalar whose gradient the VJP is."""
    return float(sum(np.sum(np.asarray(cotangents[f"d{o.name}"]) * values[o.name]) for o in op.outputs))


def finite_differences(op: Op, inputs: Mapping[str, np.ndarray], params, sizes, name: str, cotangents) -> np.ndarray:
    """Central differences of the contraction loss (the declared forward, in float64) with respect
    to each entry of input ``name``: the numeric gradient a derived one is checked against."""
    base = np.asarray(inputs[name], dtype=np.float64)
    grad = np.zeros_like(base)
    for ix in np.ndindex(base.shape):
        h = 1e-5 * max(1.0, abs(base[ix]))
        losses = []
        for sign in (1.0, -1.0):
            moved = base.copy()
            moved[ix] += sign * h
            losses.append(contraction_loss(op, evaluate_forward(op, {**inputs, name: moved}, params, sizes), cotangents))
        grad[ix] = (losses[0] - losses[1]) / (2 * h)
    return grad

