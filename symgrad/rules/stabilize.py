"""Rewrites that keep float arithmetic finite where the math is finite.

They apply to forward and gradient alike: max-shifted log-sum-exp and softmax (exp never sees a
positive argument), any other exp under a sum shifted by its max over the sum, products of exps
merged into one exp (so ``exp(m)*exp(-lse)`` is ``exp(m - lse)``, which cannot overflow), softplus
for log(1 + exp(z)), log-sigmoid through softplus, log1p and expm1.

Gradients first reuse the forward values (:mod:`symgrad.rules.reuse`): a declared ``p = exp(s - lse)``
takes the place of ``exp(s)*exp(-lse)``, and what is left of an exp under a sum is shifted here.
"""
from __future__ import annotations

import sympy as sp

from ..functions import Iverson, ReduceMax, expm1, log1p, sigmoid, softplus, sq
from ..rewrite import rule


MASKED = sp.Float(1e30)  # how far below the others a masked entry sits in a row's max: a finite -inf


def _masks(factors, bound) -> list:
    """The brackets among ``factors`` that select entries of the sum (a causal mask ``[k <= t]``)."""
    return [a for a in factors if isinstance(a, (Iverson, sp.KroneckerDelta)) and a.free_symbols & bound]


def _exp_sum(node):
    """``Sum(masks*exp(f), (k, lo, hi))`` with f not yet shifted -> (f, k, lo, hi, masks)."""
    if isinstance(node, sp.Sum) and len(node.limits) == 1:
        k, lo, hi = node.limits[0]
        factors = sp.Mul.make_args(node.function)
        exps = [a for a in factors if isinstance(a, sp.exp)]
        masks = _masks(factors, {k})
        if len(exps) == 1 and len(exps) + len(masks) == len(factors) and not exps[0].has(ReduceMax):
            return exps[0].args[0], k, lo, hi, masks
    return None


def _complement(bracket):
    if isinstance(bracket, sp.KroneckerDelta):
        return Iverson(sp.Ne(*bracket.args))
    return Iverson(sp.Not(bracket.args[0]))


def _row_max(f, limits, masks):
    """max of ``f`` over ``limits`` (outermost first), over the entries the masks keep."""
    # f - MASKED*[not kept]: exactly f where kept (no 1e30 added and taken away again)
    body = f - MASKED * sp.Add(*(_complement(a) for a in masks))
    for k, lo, hi in reversed(limits):
        if k in body.free_symbols:
            body = ReduceMax(body, k, lo, hi)
    return body


def _shifted(f, k, lo, hi, masks=()):
    m = _row_max(f, [(k, lo, hi)], masks)
    return m, sp.Sum(sp.Mul(*masks) * sp.exp(f - m), (k, lo, hi))


@rule("logsumexp_shift", "log(sum(exp(f))) = m + log(sum(exp(f - m))) with m = max(f) (over the entries a mask keeps): exp never overflows")
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
            f, k, lo, hi, masks = _exp_sum(s.base)
            for e in args:
                if isinstance(e, sp.exp) and not e.args[0].has(ReduceMax):
                    inner = e.args[0]
                    # the numerator must be the summand at some index, i.e. f with k replaced
                    cands = {ix for ent in inner.atoms(sp.Indexed) for ix in ent.indices}
                    if any(f.xreplace({k: c}) == inner for c in cands):
                        m, shifted = _shifted(f, k, lo, hi, masks)
                        rest = [a for a in args if a is not s and a is not e]
                        return sp.Mul(*rest) * sp.exp(inner - m) / shifted
    return None


@rule("exp_sum_shift", "sum(exp(f)*g) = exp(m)*sum(exp(f - m)*g) with m = max(f) over the sum (and its mask): exp under a reduction never overflows")
def exp_sum_shift(node, ctx):
    if not isinstance(node, sp.Sum):
        return None
    bound = {lim[0] for lim in node.limits}
    factors = sp.Mul.make_args(node.function)
    exps = [a for a in factors if isinstance(a, sp.exp) and a.args[0].free_symbols & bound]
    if not exps or any(e.has(ReduceMax) for e in exps):
        return None
    f = sp.Add(*(e.args[0] for e in exps))
    used = [lim for lim in node.limits if lim[0] in f.free_symbols]
    if any((lo.free_symbols | hi.free_symbols) & bound for _, lo, hi in used):
        return None  # a triangular range: the max would depend on another summed index
    masks = [a for a in _masks(factors, bound) if a.free_symbols & bound <= {k for k, _, _ in used}]
    m = _row_max(f, used, masks)
    rest = [a for a in factors if a not in exps]
    return sp.exp(m) * sp.Sum(sp.Mul(*rest) * sp.exp(f - m), *node.limits)


@rule("log_of_exp", "log(exp(a)*x) = a + log(x): the exp is never formed")
def log_of_exp(node, ctx):
    if isinstance(node, sp.log) and isinstance(node.args[0], sp.Mul):
        exps = [a for a in node.args[0].args if isinstance(a, sp.exp)]
        if exps:
            rest = sp.Mul(*(a for a in node.args[0].args if a not in exps))
            return sp.Add(*(e.args[0] for e in exps)) + sp.log(rest)
    return None


@rule("merge_exps", "exp(a)*exp(b) = exp(a + b): one exp of the (bounded) sum where each factor alone may overflow")
def merge_exps(node, ctx):
    if not isinstance(node, sp.Mul):
        return None
    exps = [a for a in node.args if isinstance(a, sp.exp) or (isinstance(a, sp.Pow) and isinstance(a.base, sp.exp))]
    if len(exps) < 2:
        return None
    arg = sp.Add(*(a.args[0] if isinstance(a, sp.exp) else a.exp * a.base.args[0] for a in exps))
    return sp.Mul(*(a for a in node.args if a not in exps)) * sp.exp(arg)


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


def _softplus_terms(node):
    """The terms of an Add as ``(limits, summand)``: a sum's constant factor moves into its summand."""
    out = []
    for t in sp.Add.make_args(node):
        coeff, rest = t.as_independent(sp.Sum, as_Add=False)
        if isinstance(rest, sp.Sum) and not (coeff.free_symbols & {lim[0] for lim in rest.limits}):
            out.append((rest.limits, coeff * rest.function))
        else:
            out.append((None, t))
    return out


def _softplus_factor(summand):
    """``summand = a*softplus(z)`` -> (a, z), or None."""
    sps = [f for f in sp.Mul.make_args(summand) if isinstance(f, softplus)]
    if len(sps) != 1:
        return None
    a = summand / sps[0]
    return (a, sps[0].args[0]) if not a.has(softplus) else None


@rule("one_softplus", "a*softplus(z) + b*softplus(-z) = a*z + (a + b)*softplus(-z) when a + b is simpler: one softplus, "
      "and the logit's infinities give torch's loss (an infinite target meets z, not inf - inf)")
def one_softplus(node, ctx):
    if not isinstance(node, sp.Add):
        return None
    terms = _softplus_terms(node)
    for i, (lim1, s1) in enumerate(terms):
        f1 = _softplus_factor(s1)
        if f1 is None or f1[1].could_extract_minus_sign():
            continue  # the term with softplus(+z), z written without a leading minus, is rewritten
        a, z = f1
        for j, (lim2, s2) in enumerate(terms):
            f2 = _softplus_factor(s2) if j != i and lim2 == lim1 else None
            if f2 is None or sp.expand(f2[1] + z) != 0:
                continue
            b = f2[0]
            total = sp.expand(a + b)
            if total.free_symbols & (a.free_symbols | b.free_symbols) - z.free_symbols:
                continue  # a + b still holds what a and b hold: no simpler
            joined = a * z + total * softplus(-z)
            if lim1 is not None:
                joined = sp.Sum(joined, *lim1)
            rest = [sp.Sum(s, *lim) if lim is not None else s for n, (lim, s) in enumerate(terms) if n not in (i, j)]
            return sp.Add(*rest, joined)
    return None


@rule("scaled_sum_of_squares", "(a + c*sum(f**2))**(+-1/2) = s**(+-1)*(a/s**2 + c*sum((f/s)**2))**(+-1/2) with "
      "s = 1 + max|f| (1 where that is inf): no square overflows (a norm of entries near 1e30 in float32)")
def scaled_sum_of_squares(node, ctx):
    if not (isinstance(node, sp.Pow) and node.exp in (sp.S.Half, -sp.S.Half) and isinstance(node.base, sp.Add)):
        return None
    sums = [t for t in node.base.args if t.has(sp.Sum)]
    if len(sums) != 1:
        return None
    c, total = sums[0].as_independent(sp.Sum, as_Add=False)
    if not isinstance(total, sp.Sum) or len(total.limits) != 1:
        return None
    k, lo, hi = total.limits[0]
    square = total.function
    if not (isinstance(square, sp.Pow) and square.exp == 2 and k in square.base.free_symbols):
        return None
    f, a = square.base, node.base - sums[0]
    # s = 1 + the row's largest |f|: s >= 1, so a/s**2 cannot overflow; every (f/s)**2 <= 1; and
    # where max|f| > 1 a term is >= 1/4, so the root is never of an underflowed 0. An infinite f
    # leaves s = 1 (a strong zero), so the sum is inf and a power -1/2 is 0, as unscaled (torch's
    # rms_norm of a row holding inf); a NaN makes s NaN.
    m = ReduceMax(sp.Abs(f), k, lo, hi)
    s = 1 + m * Iverson(sp.StrictGreaterThan(1 / m, 0))  # m < inf (which SymPy takes as true)
    return s ** (2 * node.exp) * (a / s**2 + c * sp.Sum(sq(f / s), (k, lo, hi))) ** node.exp
