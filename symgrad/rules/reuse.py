"""Rewrite a gradient in terms of forward quantities (outputs and declared intermediates).

A forward quantity ``p[b, i] = exp(x[b, i]) / Sum(exp(x[b, k]), k)`` is found inside a gradient
at any index substitution (``p[b, j]``), whole, as a factor of a product (``exp(x[b, j])/S**2``
holds ``p[b, j]`` once, leaving ``1/S``), as a power (``V**(-3/2)`` is ``rstd**3`` when
``rstd = V**(-1/2)``) or as a part of a sum of terms. Products of exps count by their exponents:
``exp(s[t, j])*exp(s[t, l])*exp(-2*lse[t])`` holds ``p[t, j] = exp(s[t, j] - lse[t])`` and
``p[t, l]``. A factor outside a sum that completes a forward value inside it moves in
(``exp(-lse[t])*Sum(exp(s[t, j])*K[j, e], j)`` is ``Sum(p[t, j]*K[j, e], j)``). Which forward values
the gradient reads is then what backward saves.
"""
from __future__ import annotations

import sympy as sp

from ..rewrite import rule
from .canonical import canonicalize


def factors(expr) -> dict:
    """Multiplicative factors with exponents, keeping exp(...) whole (SymPy would merge them)."""
    out: dict = {}
    for f in sp.Mul.make_args(expr):
        base, e = (f.base, f.exp) if isinstance(f, sp.Pow) else (f, sp.Integer(1))
        out[base] = out.get(base, 0) + e
    return out


def substitutions(pattern, node):
    """Index substitutions that line the pattern's Indexed entries up with the node's: those one
    entry fixes alone, then those that several entries fix together (``score[t, s]`` is
    ``Sum(Q[t, e]*K[s, e], e)``: ``Q`` fixes ``t``, ``K`` fixes ``s``)."""
    by_base: dict = {}
    for entry in node.atoms(sp.Indexed):
        by_base.setdefault(str(entry.base), []).append(entry)
    found, partials = [], []
    want = set(pattern.indices)
    for pe in sorted(pattern.expr.atoms(sp.Indexed), key=sp.default_sort_key):
        slots = [(p, ix) for p, ix in enumerate(pe.indices) if ix in want]
        if not slots:
            continue
        options = []
        for entry in sorted(by_base.get(str(pe.base), []), key=sp.default_sort_key):
            sigma = {}
            for p, ix in slots:
                if sigma.setdefault(ix, entry.indices[p]) != entry.indices[p]:
                    break
            else:
                if set(sigma) == want and sigma not in found:
                    found.append(sigma)
                if sigma not in options:
                    options.append(sigma)
        partials.append(options)
    if len(partials) > 1 and not any(want <= set(o) for opts in partials for o in opts):
        joined = [{}]
        for options in partials:
            joined = [{**a, **b} for a in joined for b in options if all(a.get(k, v) == v for k, v in b.items())][:_MAX_JOINS]
        found += [sigma for sigma in joined if set(sigma) == want and sigma not in found]
    if not pattern.indices:
        found.append({})
    return found


_MAX_JOINS = 64


def monomial(expr) -> tuple[dict, dict]:
    """A product as (base -> exponent for factors other than exp, term -> coefficient of the
    exponent its exps add up to): ``exp(a)*exp(-2*b)*x**2`` is ``({x: 2}, {a: 1, b: -2})``."""
    bases: dict = {}
    logs: dict = {}
    for f in sp.Mul.make_args(expr):
        base, e = (f.base, f.exp) if isinstance(f, sp.Pow) else (f, sp.Integer(1))
        if isinstance(base, sp.exp):
            for t in sp.Add.make_args(base.args[0]):
                c, t = t.as_coeff_Mul()
                logs[t] = logs.get(t, 0) + c * e
        else:
            bases[base] = bases.get(base, 0) + e
    return bases, {t: c for t, c in logs.items() if c != 0}


def _times(have: dict, want: dict):
    """How many whole times ``want``'s exponents fit in ``have``'s (None: not once)."""
    n = None
    for base, e in want.items():
        ratio = have.get(base, 0) / e
        if not (ratio.is_number and ratio >= 1):
            return None
        whole = sp.floor(ratio)
        n = whole if n is None else min(n, whole)
    return n


def _replace_factor(node, inst, repl):
    have, want = factors(node), factors(inst)
    if not any(isinstance(b, sp.exp) for b in want):
        n = _times(have, want)
        if not n:
            return None
        rest = {b: e - (n * want[b] if b in want else 0) for b, e in have.items()}
        return repl**n * sp.Mul(*(b**e for b, e in rest.items()))
    # the pattern holds an exp: count exps by their exponents, however they are grouped
    (have_b, have_l), (want_b, want_l) = monomial(node), monomial(inst)
    nb, nl = _times(have_b, want_b), _times(have_l, want_l)
    n = nl if not want_b else (None if nb is None or nl is None else min(nb, nl))
    if not n:
        return None
    rest_b = {b: e - n * want_b.get(b, 0) for b, e in have_b.items()}
    rest_l = sp.Add(*(t * (c - n * want_l.get(t, 0)) for t, c in have_l.items()))
    return repl**n * sp.Mul(*(b**e for b, e in rest_b.items())) * sp.exp(rest_l)


def _replace_terms(node, inst, repl):
    have = dict(t.as_coeff_Mul()[::-1] for t in sp.Add.make_args(node))
    want = dict(t.as_coeff_Mul()[::-1] for t in sp.Add.make_args(inst))
    if len(want) < 2 or not all(t in have for t in want):
        return None
    ratios = {have[t] / c for t, c in want.items()}
    if len(ratios) != 1:
        return None
    (r,) = ratios
    return node - r * inst + r * repl


def _unbind(expr):
    """Rename summation dummies apart, so substituting free indices cannot capture them."""
    from ..rewrite import apply_bottom_up

    def go(node):
        if isinstance(node, sp.Sum):
            ren = {k: sp.Symbol(f"{k}_bound", integer=True) for k, _, _ in node.limits}
            return sp.Sum(node.function.xreplace(ren), *[(ren[k], lo, hi) for k, lo, hi in node.limits])
        return None

    return apply_bottom_up(expr, go)


def _instance(pattern, sigma, ctx):
    """The pattern at ``sigma``, canonicalized, memoized per derivation (``ctx.instances``)."""
    key = (pattern, tuple(sorted(sigma.items(), key=sp.default_sort_key)))
    inst = ctx.instances.get(key)
    if inst is None:
        unbound = ctx.instances.get(pattern)
        if unbound is None:
            unbound = ctx.instances[pattern] = _unbind(pattern.expr)
        inst = ctx.instances[key] = canonicalize(unbound.xreplace(sigma), ctx.reserved, ctx.letters)
    return inst


def match(node, pattern, ctx):
    for sigma in substitutions(pattern, node):
        inst = _instance(pattern, sigma, ctx)
        repl = pattern.at([sigma[i] for i in pattern.indices])
        if node == inst:
            return repl
        if isinstance(node, (sp.Mul, sp.Pow)) or (isinstance(inst, (sp.Mul, sp.Pow, sp.exp)) and not isinstance(node, sp.Add)):
            new = _replace_factor(node, inst, repl)
        elif isinstance(node, sp.Add) and isinstance(inst, sp.Add):
            new = _replace_terms(node, inst, repl)
        else:
            new = None
        if new is not None and new != node:
            return new
    return None


@rule("reuse_forward", "rewrite in terms of a value the forward pass already computed", top_down=True)
def reuse_forward(node, ctx):
    if isinstance(node, (sp.Indexed, sp.Symbol)) or not node.free_symbols:
        return None
    for pattern in ctx.patterns:
        new = match(node, pattern, ctx)
        if new is None and isinstance(node, sp.Sum) and len(node.limits) > 1 and isinstance(pattern.expr, sp.Sum):
            new = _match_inner_sum(node, pattern, ctx)
        if new is not None:
            return new
    return None


def _match_inner_sum(node, pattern, ctx):
    """A sum over several indices holds a forward value that sums over one of them:
    ``Sum(V[k, j]*dO[t, j]*p[t, k], k, j)`` is ``Sum(dO[t, j]*O[t, j], j)`` when
    ``O[t, e] = Sum(V[k, e]*p[t, k], k)``."""
    bound = {lim[0] for lim in node.limits}
    for pos, (v, lo, hi) in enumerate(node.limits):
        if (lo.free_symbols | hi.free_symbols) & bound:
            continue
        inner = [f for f in sp.Mul.make_args(node.function) if v in f.free_symbols]
        outer = [f for f in sp.Mul.make_args(node.function) if v not in f.free_symbols]
        if not outer:
            continue
        found = match(canonicalize(sp.Sum(sp.Mul(*inner), (v, lo, hi)), ctx.reserved, ctx.letters), pattern, ctx)
        if found is None or found.has(sp.Sum):
            continue
        rest = node.limits[:pos] + node.limits[pos + 1 :]
        return sp.Sum(sp.Mul(*outer) * found, *rest)
    return None


def _missing(body, inst, bound):
    """The factors ``inst`` needs beyond what ``body`` holds, as (bases, exponent terms), if ``body``
    holds some of it and the rest is free of the sum's indices; else None."""
    (have_b, have_l), (want_b, want_l) = monomial(body), monomial(inst)
    def short(have, want):
        out = {}
        for x, e in want.items():
            ratio = have.get(x, 0) / e
            if not (ratio.is_number and ratio >= 1):
                out[x] = e - have.get(x, 0)
        return out

    miss_b, miss_l = short(have_b, want_b), short(have_l, want_l)
    if not (miss_b or miss_l) or (len(miss_b) == len(want_b) and len(miss_l) == len(want_l)):
        return None
    if any(x.free_symbols & bound for x in (*miss_b, *miss_l)):
        return None
    return miss_b, miss_l


@rule("factor_into_sum", "a factor outside a sum moves in where it completes a forward value: exp(-lse)*sum(exp(s)*g) = sum(p*g)")
def factor_into_sum(node, ctx):
    if not isinstance(node, sp.Mul):
        return None
    args = list(node.args)
    for pos, s in enumerate(args):
        if not isinstance(s, sp.Sum):
            continue
        outside = sp.Mul(*args[:pos], *args[pos + 1 :])
        out_b, out_l = monomial(outside)
        bound = {lim[0] for lim in s.limits}
        for pattern in ctx.patterns:
            for sigma in substitutions(pattern, s.function):
                inst = _instance(pattern, sigma, ctx)
                miss = _missing(s.function, inst, bound)
                if miss is None:
                    continue
                miss_b, miss_l = miss
                if (miss_b and not _times(out_b, miss_b)) or (miss_l and not _times(out_l, miss_l)):
                    continue
                moved = sp.Mul(*(b**e for b, e in miss_b.items())) * sp.exp(sp.Add(*(t * c for t, c in miss_l.items())))
                body = s.function * moved
                if match(body, pattern, ctx) is None:
                    continue
                return (outside / moved) * sp.Sum(body, *s.limits)
    return None
