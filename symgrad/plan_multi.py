"""The multi-tensor form of an op: one launch over MANY tensors of different sizes.

An update rule (:mod:`symgrad.ops.optim`) is only that: its plan's one launch is a ``multi`` map.
Any other op whose tensor inputs are per-tensor vectors (one dim ``D``, or a leading dim and ``D``:
each tensor is then one row of ``numel`` entries) plus scalars has one too, when its forward is

- a map over those dims (every output a map: ``clip_by_norm``'s ``g*min(1, max_norm/total)``, an
  activation): ``multi`` writes each output of each tensor, as many ``forward`` calls would, in
  one launch;
- or ONE reduction of its one tensor over ``D``, ``F(R_n h(g[n]))`` (``R`` a sum or a max), that is
  its own combiner: ``op(concat(x_1, ..., x_k)) == op([op(x_1), ..., op(x_k)])``, as a norm is
  the norm of its parts' norms. ``multi_reduce`` then writes the op's value over each block of
  every tensor (stage one, one launch), and the same op over those partial values gives the whole
  (stage two, one small launch). The plan proves the property before it promises it: the partial
  values are ``F(s)`` for a partial accumulator ``s``, so the op over them is ``F(R h(F(s_k)))``,
  equal to ``F(R s_k)`` exactly when ``h(F(s)) == s`` on the accumulator's range (``s >= 0`` when
  ``h`` is nonnegative): ``sqrt(s)**2 == s`` for the 2-norm, ``|s| == s`` for the max norm. A
  sum of squares (``h(F(s)) = s**2``) or a mean is refused: its value over values is another
  number, never a silently wrong one.

The multi statements are the forward's, re-indexed flat (``g[r, n]`` -> ``g[n]``, an output
``norm[r]`` -> ``norm``): targets print them over one index. An op over such vectors that cannot
take the form (a mean, softmax) is noted in the trace with the reason; its generated module, as
any other op's without the form, has no ``forward_multi``.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

from .functions import ReduceMax

#: The accumulator of a multi-tensor reduction in :attr:`Combine.finish`.
ACC = sp.Symbol("_acc", real=True)


@dataclass(frozen=True)
class Combine:
    """A multi-tensor reduction ``output = finish(reduce_n body[n])``: ``reduce`` is ``"sum"`` or
    ``"max"``; ``body`` reads the launch's flat index; ``finish`` reads :data:`ACC` (and scalars)."""

    reduce: str
    body: sp.Expr
    finish: sp.Expr
    target: str

    @property
    def identity(self) -> float:
        return 0.0 if self.reduce == "sum" else float("-inf")


def schedule_multi(s) -> None:
    """The plan's multi-tensor launch, if the op has one (see the module doc), noted in the trace."""
    from .plan import Launch  # noqa: PLC0415  (plan imports this module)

    if s.op.kind == "update":
        s.multi = s.launches["forward"][0]
        return
    found = _multi_form(s)
    if found is None:  # not over per-tensor vectors at all: nothing to say
        return
    if isinstance(found, str):
        s.note("schedule launches", "no_multi", f"no multi-tensor launch: {found}", [], [])
        return
    kind, statements, dim, combine, proof = found
    s.multi, s.combine = Launch(kind, statements, (dim,)), combine
    what = ("one multi-tensor map launch: each block of any of many tensors computes every output"
            if kind == "multi" else
            "one multi-tensor reduction launch writes the op's value F(s) over each span of many tensors (s: the "
            f"span's {combine.reduce}), and the op over those values is the whole: it is its own combiner, as {proof}")
    s.note("schedule launches", f"launch_{kind}", what, list(statements), [st.target for st in statements])


def _multi_form(s):
    """``(kind, flat statements, dim, Combine or None)``, or why an op over per-tensor vectors has no
    multi form, or None for an op whose inputs are not such vectors."""
    from .plan import KernelClass, Statement  # noqa: PLC0415

    op = s.op
    tensors = [t for t in op.inputs if t.dims]
    shapes = {t.dims for t in tensors}
    if len(shapes) != 1:
        return None  # no tensor input, or tensors of different dims
    dims = next(iter(shapes))
    if len(dims) > 2 or (len(dims) == 2 and not dims[0].leading) or any(t.role.value == "label" for t in tensors):
        return None
    dim = dims[-1]
    stmts = [st for st in s.forward if not st.fused]
    if {st.target for st in stmts} != set(s.outputs):
        return "its forward computes values other than its outputs"
    flat = _flattener({t.name for t in tensors} | set(s.outputs), dims)
    if all(st.kind is KernelClass.MAP and tuple(st.dims) == tuple(dims) for st in stmts):
        index = sp.Symbol(dim.index, integer=True)
        out = []
        for st in stmts:
            e = flat(st.expr).xreplace({st.indices[-1]: index})
            if any(tuple(a.indices) != (index,) for a in e.atoms(sp.Indexed)) or set(st.indices[:-1]) & e.free_symbols:
                return f"{st.target} reads a tensor other than at its own entry"
            out.append(Statement(st.target, (index,), (dim,), e, KernelClass.MAP))
        return "multi", tuple(out), dim, None, ""
    if len(stmts) != 1 or len(tensors) != 1 or tuple(stmts[0].dims) != tuple(dims[:-1]):
        return "its forward is neither a map over its inputs' dims nor one reduction of its one tensor"
    st = stmts[0]
    expr = flat(st.expr)
    reductions = [n for n in sp.preorder_traversal(expr) if isinstance(n, (sp.Sum, ReduceMax))]
    if len(reductions) != 1:
        return "its output is not one reduction"
    red = reductions[0]
    if isinstance(red, sp.Sum):
        if len(red.limits) != 1:
            return "its reduction binds several indices"
        (k, lo, hi), body, kind = red.limits[0], red.function, "sum"
    else:
        body, k, lo, hi = red.args
        kind = "max"
    if lo != 0 or sp.expand(hi - (dim.size - 1)) != 0:
        return f"its reduction does not cover all of {dim.name}"
    finish = expr.xreplace({red: ACC})
    if finish.atoms(sp.Indexed):
        return "its value reads a tensor outside the reduction"
    entries = body.atoms(sp.Indexed)
    if len(entries) != 1 or tuple(next(iter(entries)).indices) != (k,):
        return "its reduction reads its tensor other than once at the reduced index"
    entry = next(iter(entries))
    part = sp.Symbol("s", nonnegative=True) if body.is_nonnegative else sp.Symbol("s", real=True)
    again = body.xreplace({entry: finish.xreplace({ACC: part})})
    if sp.simplify(again - part) != 0:
        return (f"it is not its own combiner: {sp.sstr(body)} at {sp.sstr(entry)} = {sp.sstr(finish.xreplace({ACC: part}))} "
                f"is {sp.sstr(again)}, not {part}: the op over its values per part is another number")
    index = sp.Symbol(dim.index, integer=True)
    flat_body = body.xreplace({k: index})
    statement = Statement(st.target, (), (), expr, st.kind)
    proof = (f"{sp.sstr(body)} at {sp.sstr(entry)} = {sp.sstr(finish.xreplace({ACC: part}))} is {part}"
             + (f" for {part} >= 0 ({sp.sstr(body)} >= 0)" if part.is_nonnegative else ""))
    return "multi_reduce", (statement,), dim, Combine(kind, flat_body, finish, st.target), proof


def _flattener(names: set, dims):
    """Re-index reads ``x[r, n]`` -> ``x[n]`` (each tensor one row): the leading index goes."""
    if len(dims) == 1:
        return lambda e: e

    def flat(e):
        return e.replace(lambda n: isinstance(n, sp.Indexed) and str(n.base) in names and len(n.indices) == 2,
                         lambda n: n.base[n.indices[1]])

    return flat
