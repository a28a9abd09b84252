"""Rewrites that keep float arithmetic finite where the math is finite.

They apply to forward and gradient alike: max-shifted log-sum-exp and softmax (exp never sees a
positive argument), softplus for log(1 + exp(z)), log-sigmoid through softplus, log1p and expm1.
"""
from __future__ import annotations

import sympy as sp

from ..functions import ReduceMax, expm1, log1p, sigmoid, softplus
from ..rewrite import rule


def _exp_sum(node):
    """``Sum(exp(f), (k, lo, hi))`` with f not yet shifted -> (f, k, lo, hi)."""
    if isinstance(node, sp.Sum) and len(node.limits) == 1 and isinstance(node.function, sp.exp):
        f = node.function.args[0]
        if not f.has(ReduceMax):
            k, lo, hi = node.limits[0]
            return f, k, lo, hi
    return None


def _shifted(f, k, lo, hi):
    m = ReduceMax(f, k, lo, hi)
    return m, sp.Sum(sp.exp(f - m), (k, lo, hi))


@rule("logsumexp_shift", "log(sum(exp(f))) = m + log(sum(exp(f - m))) with m = max(f): exp never overflows")
def logsumexp_shift(node, ctx):
    if isinstance(node, sp.log):
        parts = _exp_sum(node.args[0])
        if parts:
            m, s = _shifted(*parts)
            return m + sp.log(s)


@rule("softmax_shift", "exp(f_i)/sum(exp(f)) = exp(f_i - m)/sum(exp(f - m)) with m = max(f)")
def softmax_shift(node, ctx):
    if not isinstance(node, sp.Mul):
        return None
    args = list(node.args)
    for s in args:
        if isinstance(s, sp.Pow) and s.exp == -1 and _exp_sum(s.base):
            f, k, lo, hi = _exp_sum(s.base)
            for e in args:
                if isinstance(e, sp.exp) and not e.args[0].has(ReduceMax):
                    inner = e.args[0]
                    # the numerator must be the summand at some index, i.e. f with k replaced
                    cands = {ix for ent in inner.atoms(sp.Indexed) for ix in ent.indices}
                    if any(f.xreplace({k: c}) == inner for c in cands):
                        m, shifted = _shifted(f, k, lo, hi)
                        rest = [a for a in args if a is not s and a is not e]
                        return sp.Mul(*rest) * sp.exp(inner - m) / shifted
    return None


@rule("softplus", "log(1 + exp(z)) = softplus(z), which never overflows")
def softplus_rule(node, ctx):
    if isinstance(node, sp.log) and isinstance(node.args[0], sp.Add):
        terms = node.args[0].args
        if len(terms) == 2 and 1 in terms:
            z = terms[0] if terms[1] == 1 else terms[1]
            if isinstance(z, sp.exp):
                return softplus(z.args[0])


@rule("log_sigmoid", "log(sigmoid(z)) = -softplus(-z) and log(1 - sigmoid(z)) = -softplus(z)")
def log_sigmoid(node, ctx):
    if not isinstance(node, sp.log):
        return None
    a = node.args[0]
    if isinstance(a, sigmoid):
        return -softplus(-a.args[0])
    if isinstance(a, sp.Add) and len(a.args) == 2 and 1 in a.args:
        other = a.args[0] if a.args[1] == 1 else a.args[1]
        if isinstance(other, sp.Mul) and other.args[0] == -1 and isinstance(other.args[1], sigmoid) and len(other.args) == 2:
            return -softplus(other.args[1].args[0])
    return None


@rule("log1p", "log(1 + z) = log1p(z), exact for small z")
def log1p_rule(node, ctx):
    if isinstance(node, sp.log) and isinstance(node.args[0], sp.Add) and 1 in node.args[0].args:
        # runs after softplus and log_sigmoid, which take the log(1 + exp) and log(1 - sigmoid) cases
        return log1p(node.args[0] - 1)


@rule("expm1", "exp(z) - 1 = expm1(z), exact for small z")
def expm1_rule(node, ctx):
    if isinstance(node, sp.Add) and -1 in node.args:
        for t in node.args:
            if isinstance(t, sp.exp):
                return node - t + 1 + expm1(t.args[0])
    return None
