"""Kronecker-delta elimination and the range guards it leaves behind.

``Sum(f(k) * KroneckerDelta(k + c, a), (k, lo, hi))`` becomes ``f(a - c)`` guarded by
``lo <= a - c <= hi``. Solving the index equation is what turns a convolution's gradient into a
correlation. A guard is then dropped only when it provably holds: by construction (a free index
over the same range), by zero extension (the solved index only addresses a tensor dimension of
exactly that extent, and reads outside a tensor are zero), or by a declared fact (labels lie in
``[0, C)``). A guard that cannot be dropped stays in the expression: never a silent wrong answer.
"""
from __future__ import annotations

import sympy as sp

from ..functions import Iverson
from ..rewrite import rule


def _has_delta(expr) -> bool:
    return expr.has(sp.KroneckerDelta)


@rule("distribute_deltas", "multiply out products whose sums hold a Kronecker delta")
def distribute_deltas(node, ctx):
    if not isinstance(node, sp.Mul):
        return None
    for f in node.args:
        # Only the sum that holds the delta is multiplied out: (x - mean) factors stay whole.
        if isinstance(f, sp.Add) and _has_delta(f):
            rest = sp.Mul(*(g for g in node.args if g is not f))
            return sp.Add(*(rest * t for t in f.args))
    return None


def solve_for(delta: sp.KroneckerDelta, k: sp.Symbol):
    """The value of ``k`` that makes the delta 1, when its equation is linear in k with unit slope."""
    diff = sp.expand(delta.args[0] - delta.args[1])
    if any(k in idx.free_symbols for idx in diff.atoms(sp.Indexed)):
        return None
    slope = diff.coeff(k)
    if slope not in (1, -1):
        return None
    rest = sp.expand(diff - slope * k)
    if k in rest.free_symbols:
        return None
    return -rest / slope


def guard(expr, value, lo, hi):
    return Iverson(sp.And(sp.Le(lo, value, evaluate=False), sp.Le(value, hi, evaluate=False))) * expr


def parse_guard(node):
    """``[lo <= v <= hi]`` -> (v, lo, hi), else None."""
    if not isinstance(node, Iverson):
        return None
    cond = node.args[0]
    if not isinstance(cond, sp.And) or len(cond.args) != 2:
        return None
    if not all(isinstance(r, (sp.LessThan, sp.GreaterThan)) for r in cond.args):
        return None
    (l1, g1), (l2, g2) = ((r.lts, r.gts) for r in cond.args)
    if g1 == l2:
        return g1, l1, g2
    if g2 == l1:
        return g2, l2, g1
    return None


def _delta_solutions(node):
    """Yield (position of k in the limits, k, lo, hi, delta, value) for each solvable delta."""
    for pos, (k, lo, hi) in enumerate(node.limits):
        for f in sp.Mul.make_args(node.function):
            if isinstance(f, sp.KroneckerDelta) and k in f.free_symbols:
                value = solve_for(f, k)
                if value is not None:
                    yield pos, k, lo, hi, f, value


def _substitute(node, pos, k, delta, value, guarded_by):
    body, limits = node.function, list(node.limits)
    rest = sp.Mul(*(g for g in sp.Mul.make_args(body) if g is not delta))
    new = rest.xreplace({k: value})
    if guarded_by is not None:
        new = guard(new, value, *guarded_by)
    others = [(k2, l2.xreplace({k: value}), h2.xreplace({k: value})) for k2, l2, h2 in limits[:pos] + limits[pos + 1:]]
    return sp.Sum(new, *others) if others else new


def only_addresses(expr, k, extent, extents) -> bool:
    """True when ``k`` occurs in ``expr`` only as a whole index into tensor dims of size ``extent``."""
    placeholder = sp.Symbol("addressed")

    def mask(n):
        sizes = extents.get(str(n.base))
        if sizes is None:
            return n
        new = tuple(placeholder if ix == k and sp.expand(sizes[p] - extent) == 0 else ix for p, ix in enumerate(n.indices))
        return sp.IndexedBase(str(n.base))[new]

    masked = expr.replace(lambda n: isinstance(n, sp.Indexed), mask)
    return k not in masked.free_symbols and masked != expr


@rule("eliminate_delta_addressed", "a sum over k of f(k)*delta(k, e) is f(e) with no guard: k only "
      "addresses a tensor dimension of k's extent, and reads outside a tensor are zero")
def eliminate_delta_addressed(node, ctx):
    if not isinstance(node, sp.Sum) or not _has_delta(node.function):
        return None
    for pos, k, lo, hi, delta, value in _delta_solutions(node):
        rest = sp.Mul(*(g for g in sp.Mul.make_args(node.function) if g is not delta))
        if lo == 0 and not value.is_Symbol and only_addresses(rest, k, hi + 1, ctx.extents):
            return _substitute(node, pos, k, delta, value, None)
    return None


@rule("eliminate_delta", "a sum over k of f(k)*delta(k, e) is f(e), guarded by: e lies in k's range")
def eliminate_delta(node, ctx):
    if not isinstance(node, sp.Sum) or not _has_delta(node.function):
        return None
    for pos, k, lo, hi, delta, value in _delta_solutions(node):
        return _substitute(node, pos, k, delta, value, (lo, hi))
    return None


@rule("guard_by_construction", "the index ranges over exactly the guarded interval, so the guard holds")
def guard_by_construction(node, ctx):
    g = parse_guard(node)
    if g is None:
        return None
    value, lo, hi = g
    if value in ctx.ranges and ctx.ranges[value] == (lo, hi):
        return sp.Integer(1)
    return None


@rule("guard_by_label_fact", "declared fact: labels lie in [0, C), so a one-hot row sums to 1")
def guard_by_label_fact(node, ctx):
    g = parse_guard(node)
    if g is None:
        return None
    value, lo, hi = g
    if isinstance(value, sp.Indexed) and str(value.base) in ctx.label_ranges:
        if lo == 0 and sp.expand(hi - (ctx.label_ranges[str(value.base)] - 1)) == 0:
            return sp.Integer(1)
    return None
