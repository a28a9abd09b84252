"""The value of an ad-hoc expression and its partials at ``--at``: numeric, at fixed precision, budgeted.

``symgrad derive "EXPR" --wrt x --at x=9`` used to substitute the point into the SymPy expression
and ``evalf`` it.  Substitution makes SymPy compute exactly (``2**(10**12)`` with ``--at y=1e12``,
``9**9**9`` for ``x**x**x``), and ``evalf`` walks the expression as a tree, so a derivative whose
written-out size doubles with each nested sigmoid took time that doubled too.  Here the expression
is never substituted into: each distinct node is evaluated once (shared subtrees once) in mpmath at
:data:`DIGITS` significant digits, under a time limit (:data:`TIME_LIMIT_S`) and a size limit on
every intermediate value (:data:`MAX_BITS`: a magnitude beyond ``2**MAX_BITS`` counts as an
overflow, ``inf``).  An overflow that leaves the result infinite is stated as ``inf``; one that
leaves it undefined (``inf - inf``) is an :class:`EvaluationError` naming the node that overflowed,
never a number that looks right.

A value is a float (rounded to nearest), or a string where it is not a finite real: ``inf``,
``-inf``, ``nan``, ``zoo`` (a division by zero), or a complex number (``3.14159...*I``).
"""
from __future__ import annotations

import time
from typing import Mapping

import mpmath
import sympy as sp
from mpmath.libmp import to_float

from . import parse, primitives

DIGITS = 30  # working precision: a float64 result is correctly rounded but for extreme cancellation
TIME_LIMIT_S = 2.0  # for all the values of one command
MAX_BITS = 4096  # |value| >= 2**MAX_BITS (about 1e1233) is an overflow: inf

_MP = mpmath.MPContext()
_MP.dps = DIGITS
_TABLE = parse.mirror_table(_MP)
_CONSTANTS = {sp.pi: +_MP.pi, sp.E: +_MP.e, sp.I: _MP.mpc(0, 1)}
_NUMBERS = (_MP.mpf, _MP.mpc)
_HUGE = _MP.mpf(2) ** MAX_BITS


class EvaluationError(ValueError):
    """The value at the point cannot be given within the budget; the message is one line."""


_ZOO = _MP.mpc(_MP.inf, _MP.inf)  # SymPy's zoo (1/0): infinite, of no direction


def _short(expr: sp.Basic, limit: int = 60) -> str:
    text = sp.sstr(expr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Evaluator:
    """Values at one point, sharing a deadline (and a cache) between the expression and its partials."""

    def __init__(self, point: Mapping[sp.Symbol, sp.Expr], time_limit: float | None = None):
        self.point = {s: self._number(v) for s, v in point.items()}
        self.time_limit = TIME_LIMIT_S if time_limit is None else time_limit
        self.deadline = time.monotonic() + self.time_limit
        self.cache: dict[sp.Basic, object] = {}
        self.overflow: dict[sp.Basic, None] = {}  # nodes whose value passed 2**MAX_BITS, in order

    # -- public

    def value(self, expr: sp.Expr, what: str):
        """``expr``'s value (a float or a string, see the module doc); ``what`` names it in errors
        (``"evaluating d/dx at x=9"``)."""
        self.overflow = {}
        try:
            v = self._eval(expr)
        except RecursionError:
            raise EvaluationError(f"{what}: the expression nests too deeply to evaluate") from None
        except TimeoutError:
            raise EvaluationError(f"{what}: took longer than {self.time_limit:g} s (at fixed precision, {DIGITS} digits)") from None
        if isinstance(v, sp.Basic):  # a boolean or something SymPy left unevaluated
            raise EvaluationError(f"{what}: {_short(v)} has no numeric value")
        if isinstance(v, _MP.mpc):
            if v.imag == 0 or (_MP.isfinite(v) and abs(v.imag) <= abs(v.real) * _MP.mpf(2) ** -90):
                v = v.real
            elif _MP.isnan(v.real) or _MP.isnan(v.imag):
                v = _MP.nan
            elif _MP.isinf(v):
                return "zoo"
            else:
                if abs(v.real) <= abs(v.imag) * _MP.mpf(2) ** -90:
                    v = _MP.mpc(0, v.imag)
                return _complex_text(v)
        if _MP.isnan(v):
            if self.overflow:
                node = next(iter(self.overflow))
                raise EvaluationError(
                    f"{what}: the value is undefined because {_short(node)} exceeds 2**{MAX_BITS} "
                    f"(about 1e{int(MAX_BITS * 0.30103)}) there; no fixed-precision value can be given"
                )
            return "nan"
        if _MP.isinf(v):
            return "inf" if v > 0 else "-inf"
        return to_float(v._mpf_, rnd="n")  # beyond float64's range: inf, as float64 would say

    # -- evaluation

    def _number(self, v):
        if isinstance(v, sp.Rational):
            return _MP.mpf(v.p) / v.q
        if isinstance(v, sp.Float):
            return _MP.mpf(v)
        return _MP.mpmathify(v)

    def _eval(self, node: sp.Basic):
        cached = self.cache.get(node)
        if cached is not None:
            return cached
        if time.monotonic() > self.deadline:
            raise TimeoutError
        v = self._compute(node)
        if isinstance(v, _NUMBERS) and _MP.isfinite(v) and v != 0:
            mag = _MP.mag(v)
            if mag > MAX_BITS:
                self.overflow[node] = None
                v = _MP.inf * _MP.sign(v) if isinstance(v, _MP.mpf) else _MP.mpc(_MP.inf, 0)
            elif mag < -MAX_BITS:
                v = _MP.zero
        self.cache[node] = v
        return v

    def _compute(self, node: sp.Basic):
        if node.is_Symbol:
            if node not in self.point:
                raise EvaluationError(f"no value for {node.name!r}")
            return self.point[node]
        if node.is_Rational:
            if node.q == 1 and abs(node.p).bit_length() > MAX_BITS:
                return _MP.inf * (1 if node.p > 0 else -1)
            return _MP.mpf(node.p) / node.q
        if node.is_Float:
            return _MP.mpf(node)
        if node in _CONSTANTS:
            return _CONSTANTS[node]
        if node is sp.zoo:
            return _ZOO
        if node is sp.nan:
            return _MP.nan
        if node in (sp.oo, sp.S.NegativeInfinity):
            return _MP.inf if node is sp.oo else -_MP.inf
        if node is sp.true or node is sp.false:
            return bool(node)
        if isinstance(node, sp.Piecewise):
            for expr, cond in node.args:
                if self._truth(cond):
                    return self._eval(expr)
            return _MP.nan
        if isinstance(node, sp.Rel):
            a, b = self._eval(node.lhs), self._eval(node.rhs)
            return bool(_RELATIONS[type(node)](a, b)) if not (_MP.isnan(a) or _MP.isnan(b)) else False
        if isinstance(node, sp.And):
            return all(self._truth(a) for a in node.args)
        if isinstance(node, sp.Or):
            return any(self._truth(a) for a in node.args)
        if isinstance(node, sp.Not):
            return not self._truth(node.args[0])
        if isinstance(node, primitives.Iverson):
            return _MP.one if self._truth(node.args[0]) else _MP.zero
        if isinstance(node, sp.Heaviside):
            z = self._eval(node.args[0])
            if z == 0:
                return self._eval(node.args[1]) if len(node.args) > 1 else _MP.mpf(0.5)
            return _MP.one if z > 0 else (_MP.zero if z < 0 else _MP.nan)
        if isinstance(node, (sp.Max, sp.Min)):
            values = [self._eval(a) for a in node.args]
            if any(_MP.isnan(v) for v in values):
                return _MP.nan
            return max(values) if isinstance(node, sp.Max) else min(values)
        if isinstance(node, sp.Mul):
            values = [self._eval(a) for a in node.args]
            # an Iverson bracket that is 0 is a strong zero ([c]*inf is 0 where c is false)
            if any(isinstance(a, primitives.Iverson) and v == 0 for a, v in zip(node.args, values)):
                return _MP.zero
            return _MP.fprod(values)
        if isinstance(node, sp.Pow):
            return self._power(self._eval(node.base), node.exp)
        values = [self._eval(a) for a in node.args]
        f = _TABLE.get(type(node))
        try:
            if f is not None:
                return f(*values)
            # anything else SymPy produced: rebuild it on Floats, one node, at this precision
            result = node.func(*(v if isinstance(v, sp.Basic) else _to_sympy(v) for v in values))
            result = result.evalf(DIGITS)
            if result is sp.zoo:
                return _ZOO
            if not result.is_number:
                return result
            return _MP.mpmathify(complex(result)) if not result.is_real else _MP.mpf(result)
        except ZeroDivisionError:
            return _ZOO
        except (ArithmeticError, ValueError, TypeError):
            return _MP.nan

    def _truth(self, cond: sp.Basic) -> bool:
        v = self._eval(cond)
        if isinstance(v, bool):
            return v
        raise EvaluationError(f"cannot decide {_short(cond)} numerically")

    def _power(self, base, exponent: sp.Expr):
        """``base**exponent``; a large exponent goes through exp(e*log|b|), never exact powering."""
        if exponent.is_Integer and abs(exponent.p) <= 64:
            e = int(exponent.p)
            if base == 0 and e < 0:
                return _ZOO
            return _MP.power(base, e)
        e = self._eval(exponent)
        if e == 0:
            return _MP.one
        if base == 0:
            if isinstance(e, _MP.mpf) and e > 0:
                return _MP.zero
            return _ZOO
        if _MP.isnan(base) or _MP.isnan(e):
            return _MP.nan
        if isinstance(base, _MP.mpf) and isinstance(e, _MP.mpf) and _MP.isfinite(e) and e == _MP.floor(e):
            sign = -1 if base < 0 and int(e) % 2 else 1
            return sign * _MP.exp(e * _MP.log(abs(base)))
        return _MP.exp(e * _MP.log(base))  # complex for a negative base and a fractional exponent


_RELATIONS = {
    sp.StrictGreaterThan: lambda a, b: a > b,
    sp.GreaterThan: lambda a, b: a >= b,
    sp.StrictLessThan: lambda a, b: a < b,
    sp.LessThan: lambda a, b: a <= b,
    sp.Equality: lambda a, b: a == b,
    sp.Unequality: lambda a, b: a != b,
}


def _to_sympy(v) -> sp.Expr:
    if isinstance(v, _MP.mpc):
        return sp.Float(v.real, DIGITS) + sp.I * sp.Float(v.imag, DIGITS)
    if _MP.isinf(v):
        return sp.oo if v > 0 else -sp.oo
    if _MP.isnan(v):
        return sp.nan
    return sp.Float(v, DIGITS)


def _complex_text(v) -> str:
    return sp.sstr(sp.N(_to_sympy(v), 17))
