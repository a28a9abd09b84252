"""Canonical forms for sums: split, factor out, count constants, name dummies canonically.

Canonical dummy names make alpha-equivalent sums structurally equal, so ``Sum(x[b,k], k)`` and
``Sum(x[b,j], j)`` cancel and forward patterns can be found inside gradients.
"""
from __future__ import annotations

import sympy as sp

from ..rewrite import rule

DUMMY_NAMES = ("k", "j", "l", "m", "n", "q", "r", "s", "t", "u", "v")


def all_names(expr: sp.Basic) -> set[str]:
    return {str(s) for s in expr.atoms(sp.Symbol)} | {str(s) for s in expr.atoms(sp.IndexedBase)}


def canonical_sum(node: sp.Sum, reserved: set[str], letters: dict | None = None) -> sp.Sum:
    """Rename the sum's dummies to the first free name, preferring the letter of the dim summed over."""
    taken = all_names(node.function) | {str(s) for s in node.free_symbols} | reserved
    taken -= {str(lim[0]) for lim in node.limits}
    renames, limits = {}, []
    for k, lo, hi in node.limits:
        # A name the body uses for something else (a nested sum's dummy) is never taken.
        preferred = (letters or {}).get(hi - lo + 1)
        candidates = ((preferred,) if preferred else ()) + DUMMY_NAMES
        name = next((n for n in candidates if n not in taken), None)
        i = 1
        while name is None:
            if f"k{i}" not in taken:
                name = f"k{i}"
            i += 1
        taken.add(name)
        new = sp.Symbol(name, integer=True)
        renames[k] = new
        limits.append((new, lo.xreplace(renames), hi.xreplace(renames)))
    return sp.Sum(node.function.xreplace(renames), *limits)


@rule("rename_dummies", "name summation indices canonically", quiet=True)
def rename_dummies(node, ctx):
    if isinstance(node, sp.Sum):
        new = canonical_sum(node, ctx.reserved, ctx.letters)
        return new if new != node else None


def canonicalize(expr: sp.Basic, reserved: set[str], letters: dict | None = None) -> sp.Basic:
    from ..rewrite import apply_bottom_up

    return apply_bottom_up(expr, lambda n: canonical_sum(n, reserved, letters) if isinstance(n, sp.Sum) else None)


def bound(node: sp.Sum) -> set[sp.Symbol]:
    return {lim[0] for lim in node.limits}


@rule("sum_split", "the sum of a sum of terms is the sum of the terms' sums")
def sum_split(node, ctx):
    if isinstance(node, sp.Sum) and isinstance(node.function, sp.Add):
        return sp.Add(*(sp.Sum(t, *node.limits) for t in node.function.args))


@rule("sum_factor_out", "factors that do not depend on a summation index move out of the sum")
def sum_factor_out(node, ctx):
    if not isinstance(node, sp.Sum):
        return None
    inner = bound(node)
    factors = sp.Mul.make_args(node.function)
    outside = [f for f in factors if not (f.free_symbols & inner)]
    if not outside or (len(outside) == 1 and outside[0] == 1):
        return None
    inside = [f for f in factors if f.free_symbols & inner]
    return sp.Mul(*outside) * sp.Sum(sp.Mul(*inside), *node.limits)


@rule("sum_of_constant", "a sum of a term free of its index is the term times the count")
def sum_of_constant(node, ctx):
    if not isinstance(node, sp.Sum):
        return None
    body, limits = node.function, list(node.limits)
    keep = []
    count = sp.Integer(1)
    for k, lo, hi in limits:
        if k in body.free_symbols or any(k in (l2.free_symbols | h2.free_symbols) for _, l2, h2 in limits):
            keep.append((k, lo, hi))
        else:
            count *= hi - lo + 1
    if count == 1 and len(keep) == len(limits):
        return None
    return count * (sp.Sum(body, *keep) if keep else body)


@rule("sum_push_in", "move factors into the one sum of a product, so forward patterns can be seen whole")
def sum_push_in(node, ctx):
    if not isinstance(node, sp.Mul):
        return None
    sums = [f for f in node.args if isinstance(f, sp.Sum)]
    if len(sums) != 1:
        return None
    (s,) = sums
    # Only tensor-valued factors move in; constants like -1/D stay out, where a mean is seen.
    move = [f for f in node.args if f is not s and f.has(sp.Indexed)]
    stay = [f for f in node.args if f is not s and not f.has(sp.Indexed)]
    if not move or set().union(*(f.free_symbols for f in move)) & bound(s):
        return None
    return sp.Mul(*stay) * sp.Sum(sp.Mul(*move) * s.function, *s.limits)


@rule("collect_common", "pull factors common to every term out of a sum of terms")
def collect_common(node, ctx):
    if isinstance(node, sp.Add):
        new = sp.factor_terms(node, sign=False, fraction=False)
        return new if new != node else None


@rule("merge_powers", "powers of one base multiply by adding exponents: k*x**k/x is k*x**(k - 1)")
def merge_powers(node, ctx):
    if not isinstance(node, sp.Mul):
        return None
    exps: dict = {}
    for f in node.args:
        base, e = (f.base, f.exp) if isinstance(f, sp.Pow) else (f, sp.Integer(1))
        if not isinstance(base, sp.exp) and not base.is_number:
            exps.setdefault(base, []).append(e)
    merged = {b: es for b, es in exps.items() if len(es) > 1}
    if not merged:
        return None
    keep = [f for f in node.args if (f.base if isinstance(f, sp.Pow) else f) not in merged]
    return sp.Mul(*keep, *(b ** sp.Add(*es) for b, es in merged.items()))


@rule("expand_when_smaller", "multiply out a sum of products when that makes it smaller (terms cancel)")
def expand_when_smaller(node, ctx):
    if isinstance(node, sp.Add):
        new = sp.expand_mul(node)
        if sp.count_ops(new) < sp.count_ops(node):
            return new
    return None


@rule("sum_nest", "a sum over several indices sums each one over only the factors that use it: sum_kj a[k]*b[k, j] = sum_k a[k]*sum_j b[k, j]")
def sum_nest(node, ctx):
    if not isinstance(node, sp.Sum) or len(node.limits) < 2:
        return None
    inner = bound(node)
    factors = sp.Mul.make_args(node.function)
    for pos in reversed(range(len(node.limits))):
        k, lo, hi = node.limits[pos]
        others = node.limits[:pos] + node.limits[pos + 1 :]
        if (lo.free_symbols | hi.free_symbols) & inner or any(k in (l2.free_symbols | h2.free_symbols) for _, l2, h2 in others):
            continue
        uses = [f for f in factors if k in f.free_symbols]
        if not uses or len(uses) == len(factors):
            continue
        rest = [f for f in factors if k not in f.free_symbols]
        return sp.Sum(sp.Mul(*rest) * sp.Sum(sp.Mul(*uses), (k, lo, hi)), *others)
    return None


def _indices(expr) -> set:
    """The indices (integer symbols other than dims, which are positive) ``expr`` depends on."""
    return {x for x in expr.free_symbols if isinstance(x, sp.Symbol) and x.is_integer and not x.is_positive}


def _apart(expr, names):
    """Rename the dummies of sums inside ``expr`` that are called like ``names``, so that ``expr``
    can move under a sum binding them."""
    from ..rewrite import apply_bottom_up

    def go(node):
        if isinstance(node, sp.Sum) and bound(node) & names:
            ren = {k: sp.Symbol(f"{k}_in", integer=True) for k in bound(node) & names}
            return sp.Sum(node.function.xreplace(ren), *[(ren.get(k, k), lo, hi) for k, lo, hi in node.limits])
        return None

    return apply_bottom_up(expr, go)


def _split_sum_term(term):
    """``c*Sum(body, limits)`` -> [(c, sum)] for each Sum factor of a product."""
    out = []
    args = sp.Mul.make_args(term)
    for pos, f in enumerate(args):
        if isinstance(f, sp.Sum):
            out.append((sp.Mul(*args[:pos], *args[pos + 1 :]), f))
    return out


@rule("sum_join", "two sums over one range with a common factor join into one pass: sum_k a*b*c1 + sum_k a*d*c2 = sum_k a*(b*c1 + d*c2)")
def sum_join(node, ctx):
    if not isinstance(node, sp.Add):
        return None
    terms = list(node.args)
    for i, t1 in enumerate(terms):
        for c1, s1 in _split_sum_term(t1):
            for j in range(i + 1, len(terms)):
                for c2, s2 in _split_sum_term(terms[j]):
                    if s1.limits != s2.limits or (_indices(c1) | _indices(c2)) & bound(s1):
                        continue
                    f1, f2 = sp.Mul.make_args(s1.function), sp.Mul.make_args(s2.function)
                    common = [f for f in f1 if f in f2 and f.free_symbols & bound(s1)]
                    if not common:
                        continue
                    b1 = sp.Mul(*(f for f in f1 if f not in common))
                    b2 = sp.Mul(*(f for f in f2 if f not in common))
                    # only when the joined pass runs over the entries each of the two ran over
                    if _indices(s1) != _indices(s2) or not _indices(c1) | _indices(c2) <= _indices(s1):
                        continue
                    c1, c2 = _apart(c1, bound(s1)), _apart(c2, bound(s1))
                    joined = sp.Sum(sp.Mul(*common) * (c1 * b1 + c2 * b2), *s1.limits)
                    rest = [t for n, t in enumerate(terms) if n not in (i, j)]
                    return sp.Add(*rest, joined)
    return None
