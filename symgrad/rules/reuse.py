"""Rewrite a gradient in terms of forward quantities (outputs and declared intermediates).

A forward quantity ``p[b, i] = exp(x[b, i]) / Sum(exp(x[b, k]), k)`` is found inside a gradient
at any index substitution (``p[b, j]``), whole, as a factor of a product (``exp(x[b, j])/S**2``
holds ``p[b, j]`` once, leaving ``1/S``), as a power (``V**(-3/2)`` is ``rstd**3`` when
``rstd = V**(-1/2)``) or as a part of a sum of terms. Which forward values the gradient reads is
then what backward saves.
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
    """Index substitutions that line the pattern's Indexed entries up with the node's."""
    by_base: dict = {}
    for entry in node.atoms(sp.Indexed):
        by_base.setdefault(str(entry.base), []).append(entry)
    found = []
    for pe in sorted(pattern.expr.atoms(sp.Indexed), key=sp.default_sort_key):
        slots = [(p, ix) for p, ix in enumerate(pe.indices) if ix in pattern.indices]
        if not slots:
            continue
        for entry in sorted(by_base.get(str(pe.base), []), key=sp.default_sort_key):
            sigma = {}
            for p, ix in slots:
                if sigma.setdefault(ix, entry.indices[p]) != entry.indices[p]:
                    break
            else:
                if set(sigma) == set(pattern.indices) and sigma not in found:
                    found.append(sigma)
    if not pattern.indices:
        found.append({})
    return found


def _replace_factor(node, inst, repl):
    have, want = factors(node), factors(inst)
    n = None
    for base, e in want.items():
        if base not in have:
            return None
        ratio = have[base] / e
        if not (ratio.is_number and ratio >= 1):
            return None
        whole = sp.floor(ratio)
        n = whole if n is None else min(n, whole)
    if not n:
        return None
    rest = {b: e - (n * want[b] if b in want else 0) for b, e in have.items()}
    return repl**n * sp.Mul(*(b**e for b, e in rest.items()))


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


def match(node, pattern, ctx):
    for sigma in substitutions(pattern, node):
        inst = canonicalize(_unbind(pattern.expr).xreplace(sigma), ctx.reserved, ctx.letters)
        repl = pattern.at([sigma[i] for i in pattern.indices])
        if node == inst:
            return repl
        if isinstance(node, (sp.Mul, sp.Pow)) or (isinstance(inst, (sp.Mul, sp.Pow)) and not isinstance(node, sp.Add)):
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
        if new is not None:
            return new
    return None
