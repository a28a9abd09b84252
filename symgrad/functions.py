"""SymPy functions that symgrad needs beyond SymPy's own, each with its derivative beside it.

Each class is one primitive: its definition (``eval`` for exact values), its derivative
(``fdiff``) and, where it matters, a rewrite to plain SymPy for numeric checks.  Derivatives are
written in terms of the function itself where that is what a person writes by hand
(``sigmoid' = sigmoid*(1 - sigmoid)``), so the derivation can later reuse a saved forward output.
"""
from __future__ import annotations

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

__all__ = ["Iverson", "sigmoid", "softplus", "ReduceMax", "log1p", "expm1", "relu", "onehot"]


class Iverson(sp.Function):
    """The Iverson bracket ``[cond]``: 1 where the condition holds, else 0.

    Its derivative is 0 (almost everywhere), which is the convention for relu at 0. SymPy folds
    a ``Piecewise`` into any ``Sum`` around it; a bracket stays a plain factor, so index
    guards and masks survive the sum rewrites.
    """

    nargs = 1

    @classmethod
    def eval(cls, cond):
        if cond is sp.true:
            return sp.Integer(1)
        if cond is sp.false:
            return sp.Integer(0)

    def fdiff(self, argindex=1):
        return sp.Integer(0)

    def _eval_derivative(self, s):
        return sp.Integer(0)

    def _eval_is_real(self):
        return True

    def _eval_is_nonnegative(self):
        return True


class sigmoid(sp.Function):
    """The logistic function 1/(1 + exp(-z))."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        if z.is_zero:
            return sp.S.Half

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return 1 / (1 + sp.exp(-z))

    def _eval_is_real(self):
        return self.args[0].is_real


class softplus(sp.Function):
    """log(1 + exp(z)), which a kernel must compute without overflowing exp."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        if z.is_zero:
            return sp.log(2)

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return sp.log(1 + sp.exp(z))

    def _eval_is_real(self):
        return self.args[0].is_real


class ReduceMax(sp.Function):
    """``ReduceMax(body, k, lo, hi)``: the maximum of ``body`` over the integer ``k`` in [lo, hi].

    Tie rule: the derivative splits the upstream gradient evenly among the entries that attain
    the maximum (as ``torch.amax`` does), so it is a valid subgradient and is exact where the
    maximum is unique.
    """

    nargs = 4

    @property
    def body(self):
        return self.args[0]

    @property
    def variable(self):
        return self.args[1]

    @property
    def limits(self):
        return (self.args[1], self.args[2], self.args[3])

    @property
    def free_symbols(self):
        body, k, lo, hi = self.args
        return (body.free_symbols - {k}) | lo.free_symbols | hi.free_symbols

    @property
    def bound_symbols(self):
        return [self.args[1]]

    def _eval_derivative(self, s):
        body, k, lo, hi = self.args
        # A fresh dummy keeps the substitution k -> a (delta elimination) out of this max itself.
        j = sp.Symbol(f"{k}_tie", integer=True)
        at_max = Iverson(sp.Eq(body.xreplace({k: j}), self))
        return sp.Sum(at_max * sp.diff(body.xreplace({k: j}), s), (j, lo, hi)) / sp.Sum(at_max, (j, lo, hi))

    def _eval_is_real(self):
        return self.args[0].is_real


def relu(z):
    """max(z, 0) as z*[z > 0], so its derivative is [z > 0], with the value 0 at z = 0."""
    return z * Iverson(z > 0)


def onehot(label, index):
    """1 where ``index`` equals the integer ``label``, else 0: a Kronecker delta."""
    return sp.KroneckerDelta(label, index)
