"""Reverse-mode derivation by contraction: the gradient of input x at a fresh index ``a`` is
``d/dx[a] Sum(dout * out)`` over every output, then simplified by the named stages.

Intermediates are inlined before differentiating (the chain rule then needs no bookkeeping) and
found again afterwards by the reuse stage, which is what decides what backward saves.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import sympy as sp

from .declare import Op, Output, Role
from .rewrite import RewriteError, Trace, run_stages
from .rules import updates
from .rules.canonical import canonicalize
from .rules.context import Context, Pattern
from .stages import FORWARD_STAGES, GRADIENT_STAGES


class DerivationError(RuntimeError):
    """The engine met something it cannot differentiate soundly; names the op and the term."""


@dataclass
class Gradient:
    input: str
    indices: tuple[sp.Symbol, ...]
    raw: sp.Expr
    expr: sp.Expr
    trace: Trace

    @property
    def target(self) -> sp.Expr:
        return sp.IndexedBase(f"d{self.input}")[self.indices] if self.indices else sp.Symbol(f"d{self.input}")


@dataclass
class Derivation:
    op: Op
    contraction: sp.Expr  # Sum(dout * out): what each gradient differentiates
    cotangents: dict[str, str]  # output name -> cotangent tensor name
    forward: dict[str, Output]  # intermediates and outputs in evaluation order, stabilized
    gradients: dict[str, Gradient]
    reads: tuple[str, ...]  # forward values (outputs, intermediates) the gradients read; the IR decides what is saved
    seconds: float = 0.0
    forward_trace: Trace = field(default_factory=Trace)


def cotangent_name(output: str) -> str:
    return f"d{output}"


class _Fresh:
    """Deterministic fresh index names, so derivations print identically on every run."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def __call__(self) -> sp.Symbol:
        return sp.Symbol(f"k_{next(self._n)}", integer=True)

    def freshen(self, expr: sp.Basic) -> sp.Basic:
        """Give every summation index in ``expr`` a name used nowhere else."""
        from .rewrite import apply_bottom_up

        def go(node):
            if isinstance(node, sp.Sum):
                ren = {k: self() for k, _, _ in node.limits}
                return sp.Sum(node.function.xreplace(ren), *[(ren[k], lo, hi) for k, lo, hi in node.limits])
            return None

        return apply_bottom_up(expr, go)


def _inliner(op: Op, fresh: _Fresh):
    defs: dict[str, tuple[tuple, sp.Expr]] = {}

    def inline(expr: sp.Basic) -> sp.Basic:
        def expand(n):
            name = str(n.base) if isinstance(n, sp.Indexed) else str(n)
            indices, body = defs[name]
            sub = dict(zip(indices, n.indices)) if isinstance(n, sp.Indexed) else {}
            return fresh.freshen(body.xreplace(sub))

        return expr.replace(
            lambda n: (isinstance(n, sp.Indexed) and str(n.base) in defs) or (isinstance(n, sp.Symbol) and str(n) in defs and not defs[str(n)][0]),
            expand,
        )

    for q in (*op.intermediates, *op.outputs):
        defs[q.name] = (q.indices, fresh.freshen(inline(q.expr)))
    return inline, defs


def context_for(op: Op) -> Context:
    ctx = Context(op=op.name)
    for t in op.inputs:
        ctx.extents[t.name] = tuple(d.size for d in t.dims)
        ctx.extents[f"d{t.name}"] = ctx.extents[t.name]
    for q in (*op.intermediates, *op.outputs):
        ctx.extents[q.name] = tuple(d.size for d in q.dims)
        ctx.extents[cotangent_name(q.name)] = ctx.extents[q.name]
    for fact in op.facts:
        ctx.label_ranges[fact.label] = fact.dim.size
    ctx.reserved = set(ctx.extents) | {d.name for d in op.dims} | {p.name for p in op.params}
    for d in op.dims:
        ctx.letters.setdefault(d.size, d.index)
    # Free index names are never reused for dummies: a shadowed index breaks substitution.
    ctx.reserved |= {str(ix) for t in op.inputs for ix in gradient_indices(t)}
    ctx.reserved |= {str(ix) for q in (*op.intermediates, *op.outputs) for ix in q.indices}
    for t in op.inputs:
        for d, ix in zip(t.dims, gradient_indices(t)):
            ctx.ranges[ix] = (sp.Integer(0), d.size - 1)
    return ctx


def forward_patterns(op: Op, defs, ctx: Context) -> list[Pattern]:
    """Each forward value, both as declared (over earlier values: found once those are) and
    inlined (found where the derivative never formed the earlier values), largest first."""
    found: list[Pattern] = []
    for q in (*op.intermediates, *op.outputs):
        forms = [q.expr, defs[q.name][1]]
        for form in forms:
            pat = Pattern(q.name, q.indices, canonicalize(form, ctx.reserved, ctx.letters))
            if pat not in found:
                found.append(pat)
            # exp of a log-form value (log_softmax's x - lse) is its softmax: reuse it as exp(out).
            e = sp.exp(form)
            if not e.has(sp.log) and not isinstance(e, sp.exp):
                found.append(Pattern(q.name, q.indices, canonicalize(e, ctx.reserved, ctx.letters), wrap="exp"))
    found.sort(key=lambda p: -sp.count_ops(p.expr))
    return found


def gradient_indices(t) -> tuple[sp.Symbol, ...]:
    names, out = set(), []
    for d in t.dims:
        name = d.index
        while name in names:
            name += "2"
        names.add(name)
        out.append(sp.Symbol(name, integer=True))
    return tuple(out)


def _check_supported(op: Op, expr: sp.Basic, where: str) -> None:
    bad = [a for a in sp.preorder_traversal(expr) if isinstance(a, (sp.Derivative, sp.Subs, sp.DiracDelta))]
    if bad:
        raise DerivationError(f"op {op.name}: cannot simplify {where}: unsupported term {bad[0]}")


def derive(op: Op, trace: bool = True) -> Derivation:
    start = time.perf_counter()
    fresh = _Fresh()
    inline, defs = _inliner(op, fresh)
    ctx = context_for(op)

    # The contraction with the upstream gradients, over fresh copies of the output indices.
    terms, cot = [], {}
    for out in op.outputs:
        cot[out.name] = cotangent_name(out.name)
        ren = {ix: fresh() for ix in out.indices}
        body = defs[out.name][1].xreplace(ren)
        if out.indices:
            dout = sp.IndexedBase(cot[out.name], real=True)[tuple(ren[ix] for ix in out.indices)]
            terms.append(sp.Sum(dout * body, *[(ren[ix], 0, d.size - 1) for ix, d in zip(out.indices, out.dims)]))
        else:
            terms.append(sp.Symbol(cot[out.name], real=True) * body)
    contraction = sp.Add(*terms)

    ctx.patterns = forward_patterns(op, defs, ctx)

    gradients = {}
    for t in op.inputs:
        if t.role is not Role.DIFF:
            continue
        ix = gradient_indices(t)
        entry = t[ix] if ix else sp.Symbol(t.name, real=True)
        raw = sp.diff(contraction, entry)
        tr = Trace()
        try:
            expr = run_stages(raw, GRADIENT_STAGES, ctx, tr if trace else None)
        except RewriteError as e:
            raise DerivationError(f"op {op.name}: gradient of {t.name}: {e}") from None
        _check_supported(op, expr, f"the gradient of {t.name}")
        leftover = [a for a in sp.preorder_traversal(expr) if isinstance(a, sp.KroneckerDelta) and not _is_onehot(a, op)]
        if leftover:
            raise DerivationError(f"op {op.name}: gradient of {t.name} keeps an unsolved index equation {leftover[0]}")
        gradients[t.name] = Gradient(t.name, ix, raw, expr, tr)

    forward, ftrace = {}, Trace()
    for q in (*op.intermediates, *op.outputs):
        stable = run_stages(q.expr, FORWARD_STAGES, ctx, ftrace)
        forward[q.name] = Output(q.name, q.indices, stable, q.dims)
        if op.kind == "update" and trace:  # an update is not differentiated: its steps say why its form is right
            ftrace.steps += updates.explain(op, stable)

    names = {q.name for q in (*op.intermediates, *op.outputs)}
    read = set()
    for g in gradients.values():
        read |= {str(a.base) for a in g.expr.atoms(sp.Indexed)} | {str(s) for s in g.expr.free_symbols}
    reads = tuple(q.name for q in (*op.intermediates, *op.outputs) if q.name in read & names)
    return Derivation(op, contraction, cot, forward, gradients, reads, time.perf_counter() - start, ftrace)


def _is_onehot(delta: sp.KroneckerDelta, op: Op) -> bool:
    labels = {t.name for t in op.inputs if t.role is Role.LABEL}
    return any(isinstance(a, sp.Indexed) and str(a.base) in labels for a in delta.args)
