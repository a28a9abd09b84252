"""Preparation of one plan statement for array code generation (the NumPy target).

An array target evaluates a statement ``target[indices] = expr`` in an *axis space*: every index of
the statement, free or bound by a ``Sum``/``ReduceMax``, names one axis whose coordinates run over
that index's range. A sub-expression is an array over exactly the axes of the indices it depends on
(its free index symbols), so broadcasting lines sub-expressions up and reductions remove axes.

For that to be sound each index symbol must have one range in the whole statement, and reads must
be cheap to form (stencils arrive re-indexed by the plan). :func:`prepare` therefore

1. renames an index whose name a buffer, param or dim also uses, and a bound index that is bound
   elsewhere with a different range (shadowing with the *same* range is harmless: the inner binder
   reduces its axis before the outer one sees it);
2. lists the axes in a canonical order: the statement's indices, then bound indices in order of first
   appearance.

:func:`common_subexpressions` runs ``sympy.cse`` with tensor entries, brackets and sum limits held
opaque, so extracted temporaries are plain array expressions over known axes.

:func:`row_form` splits a statement into a *row scale* (the factors over fewer axes than the
statement: ``dloss*w[b]/n_valid``), *dense* terms and *one-hot* terms ``c*KroneckerDelta(i, y[b])``,
so a target can scale each row once and write the one-hots as one entry per row instead of
forming a dense one-hot array.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy as sp

from ..functions import Iverson, ReduceMax
from ..plan import LoweringError, binders


@dataclass
class Prepared:
    expr: sp.Expr
    axes: tuple[sp.Symbol, ...]  # canonical order: statement indices first
    ranges: dict  # index symbol -> (lo, hi), inclusive, expressions over dims and params
    indices: tuple[sp.Symbol, ...]  # the statement's own indices, possibly renamed


def _rebind(node: sp.Basic, old: sp.Symbol, new: sp.Symbol) -> sp.Basic:
    """``node`` with its binder ``old`` renamed ``new`` (in its limits and its body)."""
    if isinstance(node, sp.Sum):
        limits = [(new if v == old else v, a, b) for v, a, b in node.limits]
        return sp.Sum(node.function.xreplace({old: new}), *limits)
    body, v, a, b = node.args
    return ReduceMax(body.xreplace({old: new}), new, a, b)


class _Names:
    """Fresh, deterministic names that clash with nothing in the statement."""

    def __init__(self, taken):
        self.taken = set(taken)

    def __call__(self, base: str) -> sp.Symbol:
        for n in itertools.chain([""], itertools.count(2)):
            name = f"{base}{n}"
            if name not in self.taken:
                self.taken.add(name)
                return sp.Symbol(name, integer=True)
        raise AssertionError


def prepare(expr: sp.Expr, indices, dims, reserved, tensors, where: str) -> Prepared:
    """``expr`` ready for axis-space evaluation. ``dims`` are the statement's dims (``Dim``s),
    ``reserved`` every name the generated code uses for something else, ``tensors`` maps a tensor
    name to its ``Dim``s; ``where`` names the op and statement in errors."""
    names = _Names(set(reserved) | {str(s) for s in expr.free_symbols} | _bound_names(expr))
    ranges: dict = {}
    indices = tuple(indices)
    ren = {}
    for ix, d in zip(indices, dims):
        if str(ix) in reserved:
            ren[ix] = names(f"{ix}_")
    expr = expr.xreplace(ren)
    indices = tuple(ren.get(ix, ix) for ix in indices)
    for ix, d in zip(indices, dims):
        ranges[ix] = (sp.Integer(0), d.size - 1)

    def unique(node, scope):
        if not isinstance(node, sp.Basic) or node.is_Atom:
            return node
        for v, lo, hi in binders(node):
            for s in (lo, hi):
                hit = sorted(str(a) for a in s.free_symbols if a in ranges or a in scope)
                if hit:
                    raise LoweringError(f"{where}: the bound of {v} depends on index {hit[0]} (a triangular sum); not supported")
            if str(v) in reserved or (v in ranges and ranges[v] != (lo, hi)):
                new = names(f"{v}_")
                node = _rebind(node, v, new)
                v = new
            ranges.setdefault(v, (lo, hi))
        inner = scope | {v for v, _, _ in binders(node)}
        args = [unique(a, inner) for a in node.args]
        return node.func(*args) if any(a is not b for a, b in zip(args, node.args)) else node

    expr = unique(expr, frozenset())
    expr = unify_binders(expr, indices, ranges)
    expr = collect_brackets(expr)
    order = list(indices)
    for node in sp.preorder_traversal(expr):
        for v, _, _ in binders(node):
            if v not in order:
                order.append(v)
    _check_index_positions(expr, ranges, where)
    return Prepared(expr, tuple(order), ranges, indices)


def unify_binders(expr: sp.Expr, indices, ranges) -> sp.Expr:
    """Rename a bound index to a free index of the same range that its sum does not read.

    In the axis space the renamed sum is the same computation (its body reduces the shared axis
    before anything else sees it), and it lets CSE see that ``exp(x[b, i] - m[b])`` and the summed
    ``exp(x[b, k] - m[b])`` are one array: softmax then exponentiates once, as a person would."""

    def visit(node):
        if not isinstance(node, sp.Basic) or node.is_Atom:
            return node
        for v, lo, hi in binders(node):
            taken = node.free_symbols | {w for inner in sp.preorder_traversal(node) for w, _, _ in binders(inner)}
            for u in indices:
                if ranges[u] == (lo, hi) and u not in taken:  # u is neither read nor bound inside
                    node = _rebind(node, v, u)
                    break
        args = [visit(a) for a in node.args]
        return node.func(*args) if any(a is not b for a, b in zip(args, node.args)) else node

    return visit(expr)


def collect_brackets(expr: sp.Expr) -> sp.Expr:
    """``eps*[c] - [c] + p`` -> ``(eps - 1)*[c] + p``: one bracket array instead of two."""
    def go(node):
        if not isinstance(node, sp.Basic) or node.is_Atom:
            return node
        args = [go(a) for a in node.args]
        if any(a is not b for a, b in zip(args, node.args)):
            node = node.func(*args)
        if node.is_Add:
            brackets = sorted({f for t in node.args for f in sp.Mul.make_args(t) if isinstance(f, (Iverson, sp.KroneckerDelta))}, key=sp.default_sort_key)
            if brackets:
                node = sp.collect(node, brackets)
        return node

    return go(expr)


def _bound_names(expr) -> set[str]:
    return {str(v) for node in sp.preorder_traversal(expr) for v, _, _ in binders(node)}


def _check_index_positions(expr, ranges, where) -> None:
    for e in sorted(expr.atoms(sp.Indexed), key=sp.default_sort_key):
        for pos in e.indices:
            if not _integer_valued(pos):
                raise LoweringError(f"{where}: tensor entry {e} is read at {pos}, which is not an integer expression")


def _integer_valued(e) -> bool:
    """Integer arithmetic over integer symbols: +, *, non-negative powers, floor/ceiling, Mod."""
    if e.is_integer:
        return True
    if isinstance(e, (sp.floor, sp.ceiling)):
        return all(s.is_integer for s in e.args[0].free_symbols)
    if isinstance(e, sp.Mod) or e.is_Add or e.is_Mul:
        return all(_integer_valued(a) for a in e.args)
    if e.is_Pow:
        return _integer_valued(e.base) and e.exp.is_Integer and e.exp >= 0
    return False


# ------------------------------------------------------------------------------------------------
# common subexpressions


def common_subexpressions(expr: sp.Expr, prefix: str = "_t", row_maxes=frozenset()):
    """``sympy.cse`` of ``expr`` with tensor entries, Iverson brackets, one-hots and sum limits held
    opaque: a temporary is then an array expression over the statement's axes, never a piece of an
    index or a bound. Returns ``(replacements, reduced)``; deterministic (placeholders are named in
    traversal order, never ``Dummy``s, whose numbering depends on what ran before). A sum holding a
    row max (a ``ReduceMax``, or a read of a buffer named in ``row_maxes``) is not made a temporary:
    where it is used, the printer adds ``x - max`` first (``max + log(s) - x`` would round at
    ``ulp(max)``)."""
    opaque: dict = {}
    counter = itertools.count()

    def hide(node):
        if isinstance(node, (sp.Indexed, Iverson, sp.KroneckerDelta)):
            if node not in opaque:
                opaque[node] = sp.Symbol(f"_o{next(counter)}", real=True)
            return opaque[node]
        if not isinstance(node, sp.Basic) or node.is_Atom:
            return node
        if isinstance(node, sp.Sum):
            limits = [(v, hide_bound(a), hide_bound(b)) for v, a, b in node.limits]
            return sp.Sum(hide(node.function), *limits)
        if isinstance(node, ReduceMax):
            body, v, a, b = node.args
            return ReduceMax(hide(body), v, hide_bound(a), hide_bound(b))
        args = [hide(a) for a in node.args]
        return node.func(*args) if any(a is not b for a, b in zip(args, node.args)) else node

    def hide_bound(b):
        if b.is_Atom:
            return b
        if b not in opaque:
            opaque[b] = sp.Symbol(f"_o{next(counter)}", integer=True)
        return opaque[b]

    # a row max a bracket compares (``[m < inf]``) is hoisted first: the bracket is opaque to cse,
    # and the max would otherwise be computed again inside it
    hoisted = []
    in_brackets = set().union(*(b.atoms(ReduceMax) for b in expr.atoms(Iverson))) if expr.has(Iverson) else set()
    for n, m in enumerate(sorted(in_brackets & _outside_brackets(expr), key=sp.default_sort_key)):
        sym = sp.Symbol(f"{prefix}m{n}", real=True)
        hoisted.append((sym, m))
        expr = expr.xreplace({m: sym})
    hidden = hide(expr)
    if not opaque and hidden == expr and not expr.args and not hoisted:
        return hoisted, expr
    back = {v: k for k, v in opaque.items()}
    reps, reduced = sp.cse(hidden, symbols=sp.numbered_symbols(prefix, real=True), optimizations=None, order="canonical")
    reduced = reduced[0]
    # sympy.cse can leave an occurrence of an extracted subexpression in place (a product that is
    # a term of an Add); replace what is left, so the temporary really is computed once.
    for k, (sym, e) in enumerate(reps):
        reduced = reduced.xreplace({e: sym})
        reps[k + 1:] = [(s2, e2.xreplace({e: sym})) for s2, e2 in reps[k + 1:]]
    reps = hoisted + [(s, e.xreplace(back)) for s, e in reps]
    reduced = reduced.xreplace(back)
    maxes = {sym for sym, e in reps if isinstance(e, ReduceMax)}

    def holds_max(e) -> bool:
        def is_max(t):
            m = t.as_coeff_Mul()[1]
            return isinstance(m, ReduceMax) or m in maxes or (isinstance(m, sp.Indexed) and str(m.base) in row_maxes)
        return e.is_Add and any(is_max(t) for t in e.args)

    # a row max such a sum holds stays one temporary of its own: only the sum is put back
    for n, (sym, e) in enumerate(list(reps)):
        for t in e.args if holds_max(e) else ():
            m = t.as_coeff_Mul()[1]
            if isinstance(m, ReduceMax):
                msym = sp.Symbol(f"{prefix}m{len(maxes) + len(hoisted)}", real=True)
                maxes.add(msym)
                at = next(i for i, r in enumerate(reps) if r[0] == sym)
                reps = reps[:at] + [(msym, m)] + [(s2, e2.xreplace({m: msym})) for s2, e2 in reps[at:]]
                reduced = reduced.xreplace({m: msym})
    for sym, e in [r for r in reps if holds_max(r[1])]:  # put such sums back where they are used
        reps = [(s2, e2.xreplace({sym: e})) for s2, e2 in reps if s2 != sym]
        reduced = reduced.xreplace({sym: e})
    return reps, reduced


def _outside_brackets(expr) -> set:
    """The row maxes ``expr`` uses outside any Iverson bracket."""
    if isinstance(expr, Iverson):
        return set()
    if isinstance(expr, ReduceMax):
        return {expr}
    return set().union(*(_outside_brackets(a) for a in expr.args)) if expr.args else set()


# ------------------------------------------------------------------------------------------------
# row scale, dense part and one-hots


@dataclass(frozen=True)
class OneHot:
    """The term ``coeff*KroneckerDelta(axis, label)``: nonzero only where ``axis == label``, so it is
    one entry per position of the other axes. ``coeff`` is free of ``axis`` (it is read at the
    label: ``p[b, i]*delta(i, y[b])`` has ``coeff = p[b, y[b]]``)."""

    axis: sp.Symbol
    label: sp.Expr
    coeff: sp.Expr


@dataclass(frozen=True)
class RowForm:
    """``expr == Mul(*scale) * (Add(*dense) + sum(c*KroneckerDelta(axis, label)))``."""

    scale: tuple[sp.Expr, ...]  # factors over a strict subset of the axes, none a one-hot's axis
    dense: tuple[sp.Expr, ...]  # terms without a one-hot factor
    onehots: tuple[OneHot, ...]


def row_form(expr: sp.Expr, indices) -> RowForm:
    """``expr`` (a prepared statement over ``indices``) as a row scale times dense plus one-hot terms.

    A factor of the whole statement that lacks one of its axes is a *scale*: it multiplies every
    term, so it can be applied once per row (a ``(B, 1)`` array) rather than inside a full-size
    expression; masks among them (``w[b]``, brackets) stay factors of the whole statement. The rest
    is expanded over one sum, if one carries the one-hots; a term with a factor
    ``KroneckerDelta(i, L)`` (``i`` a statement axis, ``L`` an integer expression free of ``i``,
    such as a label ``y[b]``) is a one-hot: only the entries ``i == L`` are nonzero. Deltas
    elsewhere (nested in a function, in two sums) stay dense terms: always correct, only slower."""
    axes = set(indices)
    bound = _bound_symbols(expr)

    def onehot(d) -> tuple | None:
        """``(axis, label)`` of a delta that picks one entry along a statement axis."""
        if not isinstance(d, sp.KroneckerDelta):
            return None
        for a, label in (d.args, d.args[::-1]):
            if a in axes and label.is_integer and not label.free_symbols & (bound | {a}):
                return a, label
        return None

    onehot_axes = {hit[0] for d in expr.atoms(sp.KroneckerDelta) if (hit := onehot(d))}
    factors = sp.Mul.make_args(expr)
    scale, body = [], []
    for f in factors:
        own = f.free_symbols & axes
        if own != axes and not own & onehot_axes and not any(onehot(d) for d in f.atoms(sp.KroneckerDelta)):
            scale.append(f)
        else:
            body.append(f)

    def carries(f) -> bool:
        return f.is_Add and any(onehot(g) for t in f.args for g in sp.Mul.make_args(t))

    carriers = [f for f in body if carries(f)]
    if len(carriers) > 1:  # one-hots in two sums multiply (a product of deltas): keep it dense
        return RowForm(tuple(scale), (sp.Mul(*body),), ())
    if carriers:  # distribute the other factors over the sum that carries the one-hots
        others = [f for f in body if f is not carriers[0]]
        terms = [sp.Mul(*others, t) for t in carriers[0].args]
    else:
        terms = [sp.Mul(*body)]
    dense, onehots = [], []
    for t in terms:
        hit = _onehot_term(t, onehot)
        if hit is None:
            dense.append(t)
        else:
            onehots.append(hit)
    return RowForm(tuple(scale), tuple(d for d in dense if d != 0), tuple(onehots))


def _onehot_term(term, onehot) -> OneHot | None:
    factors = list(sp.Mul.make_args(term))
    for k, f in enumerate(factors):
        hit = onehot(f)
        if hit is None:
            continue
        axis, label = hit
        rest = sp.Mul(*factors[:k], *factors[k + 1:])
        if axis in _bound_symbols(rest):
            continue  # a sum over the same name inside: substituting would capture it
        if axis in rest.free_symbols:  # delta(i, L)*f(i) == delta(i, L)*f(L)
            rest = rest.xreplace({axis: label})
        return OneHot(axis, label, rest)
    return None


def _bound_symbols(expr) -> set:
    return {v for node in sp.preorder_traversal(expr) for v, _, _ in binders(node)}
