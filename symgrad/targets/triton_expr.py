"""The Triton expression printer: a strict SymPy printer; functions are spelled as the primitives
table says (``triton`` in :data:`symgrad.primitives.TABLE`).

Every node the generated kernels may compute has a spelling here; anything else raises
:class:`TritonPrintError` naming the node, so a new construct fails at generation time rather
than producing a kernel that computes something else.

Names (symbols, tensor entries, reductions) are not printed by the printer itself: the kernel
builder hands it a ``names`` table (SymPy node -> code) for the context being printed (a column
block, a row, a tile), and a node missing from that table is an error too.

Two modes:
- value mode (default): math in the kernel's ``ACC`` dtype (fp32; fp64 for float64 tensors).
  Numbers print as float literals, comparisons as Triton booleans, Iverson brackets and Kronecker
  deltas through ``tl.where``.
- index mode: integer index arithmetic (stencil offsets). Only integers, names, ``+``, ``*``
  and ``floor(a/b)`` (as ``//``) are allowed.
"""
from __future__ import annotations

from typing import Mapping

import sympy as sp
from sympy.printing.printer import Printer

from .. import primitives
from ..primitives import ReduceMax


class TritonPrintError(NotImplementedError):
    """A node has no Triton spelling (or no name in the current kernel context)."""


#: The ``sg_*`` helpers (``@triton.jit`` functions of ``symgrad.runtime.triton_support``) that the
#: spellings in :data:`symgrad.primitives.TABLE` call: what a generated module imports.
HELPERS = primitives.triton_helpers()

_RELATIONS = {
    sp.StrictGreaterThan: ">",
    sp.GreaterThan: ">=",
    sp.StrictLessThan: "<",
    sp.LessThan: "<=",
    sp.Equality: "==",
    sp.Unequality: "!=",
}


def _float(v) -> str:
    f = float(v)
    if f != f or f in (float("inf"), float("-inf")):
        return {True: 'float("inf")', False: 'float("-inf")'}[f > 0] if f == f else 'float("nan")'
    return repr(f)


def _axes(factor) -> frozenset:
    """The index symbols a factor varies along (a row statistic or a param: none)."""
    return frozenset().union(*(ix.free_symbols for e in factor.atoms(sp.Indexed) for ix in e.indices))


class TritonPrinter(Printer):
    printmethod = "_tritoncode"

    def __init__(self, names: Mapping[sp.Basic, str], index_mode: bool = False, maxes=None, rows: bool = False):
        super().__init__()
        # In a row kernel, factors that vary along fewer axes (a row's statistics, then per-column
        # vectors) multiply, and divide, before the full tiles, as in the NumPy printer: a norm's
        # y = x*w*rstd with rstd = 1/(s*sqrt(...)) is (rstd*w)*x there, finite where x*w overflows.
        self.rows = rows
        self.names = dict(names)
        self.maxes = dict(maxes or {})  # row-max symbol -> the entry it is the max of
        self.index_mode = index_mode

    # Every node goes through the names table first; numbers fold to literals.
    def _print(self, expr, **kwargs):
        if expr in self.names:
            return self.names[expr]
        if isinstance(expr, sp.Basic) and expr.is_number and not expr.atoms(sp.Indexed, sp.Sum, ReduceMax):
            if self.index_mode:
                if not expr.is_Integer:
                    raise TritonPrintError(f"non-integer {expr} in index arithmetic")
                return str(int(expr))
            if expr.is_real is False or expr.has(sp.zoo, sp.nan):
                raise TritonPrintError(f"constant {expr} is not a finite real number")
            return _float(expr)
        return super()._print(expr, **kwargs)

    def emptyPrinter(self, expr):
        raise TritonPrintError(f"no Triton spelling for {type(expr).__name__}: {expr}")

    def doprint(self, expr):
        return self._print(sp.sympify(expr))

    # -- names -----------------------------------------------------------------------------
    def _print_Symbol(self, expr):
        raise TritonPrintError(f"symbol {expr} has no name in this kernel context")

    def _print_Indexed(self, expr):
        raise TritonPrintError(f"tensor entry {expr} is not loaded in this kernel context")

    def _print_Sum(self, expr):
        raise TritonPrintError(f"reduction {expr} is not lowered in this kernel context")

    def _print_ReduceMax(self, expr):
        raise TritonPrintError(f"reduction {expr} is not lowered in this kernel context")

    # -- arithmetic ------------------------------------------------------------------------
    def _print_Add(self, expr):
        pair, rest = primitives.shift_first(expr.args, self.maxes)
        rest, exact = primitives.exact_group(rest)
        if exact:  # the data-free terms (a smoothed target t) summed first: p - t (primitives.exact_group)
            rest = rest + [sp.Add(*exact, evaluate=False)]
        terms = pair + rest  # x - max first, exact near the max (primitives.shift_first)
        # Print positive terms first so the line reads naturally; order is deterministic
        # because SymPy's argument order is.
        out = self._print(terms[0])
        for t in terms[1:]:
            if t.could_extract_minus_sign():
                out += " - " + self._print(-t)
            else:
                out += " + " + self._print(t)
        return f"({out})"

    def _print_Mul(self, expr):
        if expr.could_extract_minus_sign():
            return f"(-{self._print(-expr)})"
        brackets = [f for f in expr.args if isinstance(f, (primitives.Iverson, sp.KroneckerDelta))]
        if brackets and not self.index_mode and len(brackets) < len(expr.args):
            # Strong zeros, as in every target: where a bracket is 0 the product is 0, even
            # against inf; NaN where a bracket compares a NaN (primitives.bracket_false).
            rest = self._print(sp.Mul(*[f for f in expr.args if f not in brackets]))
            conds = [self._cond(b) for b in brackets]
            falses = [primitives.bracket_false(b) for b in brackets]
            zero = "0.0"
            if any(f is not None for f in falses):
                fs = " | ".join(self._print(f) for f in falses if f is not None)
                zero = f"tl.where({fs}, 0.0, float('nan'))"
            return f"tl.where({' & '.join(conds)}, {rest}, {zero})"
        factors = primitives.saturating_first(expr.args)
        if self.rows and len(factors) > 2:
            axes = [_axes(f) for f in factors]
            most = max(len(a) for a in axes)
            small = [f for f, a in zip(factors, axes) if len(a) < most]
            big = [f for f, a in zip(factors, axes) if len(a) == most]
            below = [f for f in small if isinstance(f, sp.Pow) and f.exp.is_negative or f.is_Rational and not f.is_Integer]
            moved = below or factors[:len(small)] != small  # else the plain order is this order already
            if small and big and moved and any(not f.is_number for f in small):
                return f"({self._fraction(small)} * {self._fraction(big)[1:-1]})"
        return self._fraction(factors)

    def _fraction(self, factors) -> str:
        """``(a * b / (c * d))``: negative integer powers and rational coefficients below the line."""
        num, den = [], []
        for f in factors:
            if isinstance(f, sp.Pow) and f.exp.is_Integer and f.exp < 0 and not self.index_mode:
                den.append(f.base ** (-f.exp))
            elif f.is_Rational and not f.is_Integer and not self.index_mode:
                if f.p != 1:
                    num.append(sp.Integer(f.p))
                den.append(sp.Integer(f.q))
            else:
                num.append(f)
        top = " * ".join(self._print(f) for f in num) if num else ("1" if self.index_mode else "1.0")
        if not den:
            return f"({top})"
        bottom = " * ".join(self._print(f) for f in den)
        return f"({top} / ({bottom}))"

    def _print_Pow(self, expr):
        base, e = expr.base, expr.exp
        if self.index_mode:
            if e.is_Integer and 0 < e <= 4:
                return "(" + " * ".join([self._print(base)] * int(e)) + ")"
            raise TritonPrintError(f"power {expr} in index arithmetic")
        return self._print_Function(expr)

    def _print_floor(self, expr):
        if not self.index_mode:
            raise TritonPrintError(f"floor outside index arithmetic: {expr}")
        num, den = sp.fraction(expr.args[0])
        return f"(({self._print(num)}) // ({self._print(den)}))"

    def _print_ceiling(self, expr):
        if not self.index_mode:
            raise TritonPrintError(f"ceiling outside index arithmetic: {expr}")
        num, den = sp.fraction(expr.args[0])
        return f"(-((-({self._print(num)})) // ({self._print(den)})))"

    # -- functions ------------------------------------------------------------------------
    def _print_Function(self, expr):
        p = primitives.of(expr)
        spelling = p.triton if p is not None else None
        if spelling is None or spelling == primitives.STRUCTURAL:
            return self.emptyPrinter(expr)
        if self.index_mode:
            raise TritonPrintError(f"function {expr} in index arithmetic")
        if callable(spelling):
            return spelling(self, expr)
        return spelling.format(*(self._print(a) for a in expr.args))

    _print_exp = _print_Function

    def _cond(self, bracket) -> str:
        if isinstance(bracket, sp.KroneckerDelta):
            a, b = bracket.args
            return f"({self._print(a)} == {self._print(b)})"
        return self._print(bracket.args[0])

    def _print_Iverson(self, expr):
        false = primitives.bracket_false(expr)
        if false is not None:  # NaN where the comparison is unordered (primitives.bracket_false)
            return f"tl.where({self._print(expr.args[0])}, 1.0, tl.where({self._print(false)}, 0.0, float('nan')))"
        return f"tl.where({self._print(expr.args[0])}, 1.0, 0.0)"

    def _print_KroneckerDelta(self, expr):
        a, b = expr.args
        return f"tl.where({self._print(a)} == {self._print(b)}, 1.0, 0.0)"

    def _print_Relational(self, expr):
        op = _RELATIONS.get(type(expr))
        if op is None:
            return self.emptyPrinter(expr)
        return f"({self._side(expr.lhs, expr.rhs)} {op} {self._side(expr.rhs, expr.lhs)})"

    def _side(self, side, other) -> str:
        """An integer compared with an integer (a param, an index) prints as an integer: Triton's
        interpreter cannot combine an int-vs-float comparison of a scalar with a block mask."""
        if side.is_Integer and other.is_integer:
            return str(int(side))
        return self._print(side)

    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"({self._print(expr.args[0])} == 0)"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"


def print_expr(expr: sp.Basic, names: Mapping[sp.Basic, str], index_mode: bool = False, maxes=None, rows: bool = False) -> str:
    return TritonPrinter(names, index_mode, maxes, rows).doprint(expr)
