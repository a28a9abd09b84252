"""From the target-neutral IR to a launch plan: which statements run in which Triton kernel.

Steps, all decided from the IR (never from op names):

1. Inline temporaries. A forward value that is neither an output nor saved, and a value backward
   recomputes, is substituted into the statements that read it, unless it reduces across rows
   (``n_valid = Sum(w[b], b)``): such a value is materialized, since every row needs all of it.
2. Fuse losses. When every output is a scalar and each gradient is ``cotangent * G`` with ``G`` a
   map (no reduction) of forward values and inputs, forward also writes ``G`` (named
   ``<grad>_fused``) in the pass that computes the loss, and backward only scales it.
3. Level the statements. A statement reads values of its own launch by substitution; it must wait
   for a later launch only when it reads a cross-row reduction or a contraction result. Levels are
   assigned as late as possible, so row statistics are computed in the launch that consumes them
   (the softmax statistics of a loss in the same pass as the loss and its gradient).
4. Group a level's statements into launches: each contraction or stencil alone (an implicit-GEMM
   kernel); reductions and maps sharing a row space in one row kernel; pure maps of one shape in a
   flat map kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy as sp

from ..declare import Dim, Role
from ..functions import ReduceMax
from ..ir import KernelClass, Program, classify


class LoweringError(NotImplementedError):
    """The Triton target cannot lower a statement; the message names the op, statement and class."""


@dataclass(frozen=True)
class Stmt:
    target: str
    indices: tuple
    dims: tuple
    expr: sp.Expr
    kind: KernelClass
    fused: bool = False  # a fused-loss gradient that forward writes (only when asked to)

    @property
    def formula(self) -> str:
        lhs = f"{self.target}[{', '.join(map(str, self.indices))}]" if self.indices else self.target
        return f"{lhs} = {sp.sstr(self.expr)}"

    def reads(self) -> set[str]:
        return {str(a.base) for a in self.expr.atoms(sp.Indexed)} | {str(s) for s in self.expr.free_symbols}


@dataclass
class Launch:
    kind: str  # "map" | "rows" | "gemm"
    stmts: list  # Stmt
    space: tuple = ()  # rows: (rowdim, coldim or None); map: target dims


@dataclass
class Plan:
    program: Program
    forward: list  # Launch
    backward: list  # Launch
    saved_inputs: tuple
    saved_values: tuple  # computed in forward, kept for backward
    fused: dict  # gradient name -> fused buffer name
    buffers: dict  # name -> dims
    labels: frozenset  # integer label buffers
    cotangents: tuple
    fused_cotangent: dict = field(default_factory=dict)  # gradient -> cotangent it scales by


_fresh_counter = [0]


def freshen(expr: sp.Expr) -> sp.Expr:
    """Rename every bound summation index, so substituting into ``expr`` never captures."""

    def go(node):
        if isinstance(node, sp.Sum):
            body = go(node.function)
            ren, lims = {}, []
            for k, lo, hi in node.limits:
                _fresh_counter[0] += 1
                ren[k] = sp.Symbol(f"{k}_f{_fresh_counter[0]}", integer=True)
                lims.append((ren[k], go(lo), go(hi)))
            return sp.Sum(body.xreplace(ren), *lims)
        if isinstance(node, ReduceMax):
            body, k, lo, hi = node.args
            _fresh_counter[0] += 1
            nk = sp.Symbol(f"{k}_f{_fresh_counter[0]}", integer=True)
            return ReduceMax(go(body).xreplace({k: nk}), nk, lo, hi)
        if not node.args:
            return node
        new = [go(a) for a in node.args]
        return node.func(*new) if any(a is not b for a, b in zip(new, node.args)) else node

    return go(expr)


def substitute(expr: sp.Expr, st: Stmt) -> sp.Expr:
    """Replace reads of ``st.target`` in ``expr`` by its definition."""
    if not st.indices:
        sym = [s for s in expr.free_symbols if str(s) == st.target]
        return expr.xreplace({s: freshen(st.expr) for s in sym}) if sym else expr

    def rep(node):
        return freshen(st.expr).xreplace(dict(zip(st.indices, node.indices)))

    return expr.replace(lambda n: isinstance(n, sp.Indexed) and str(n.base) == st.target, rep)


def sum_dims(expr: sp.Expr, dims: tuple) -> list:
    """The dims summed over anywhere in ``expr`` (by matching each limit's extent)."""
    out = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.Sum):
            lims = node.limits
        elif isinstance(node, ReduceMax):
            lims = [node.limits]
        else:
            continue
        for _, lo, hi in lims:
            out.append(dim_of_extent(hi - lo + 1, dims))
    return out


def dim_of_extent(extent: sp.Expr, dims: tuple) -> Dim | None:
    for d in dims:
        if d.size == extent or sp.expand(d.size - extent) == 0:
            return d
    return None


def _is_gemm(st: Stmt) -> bool:
    return st.kind in (KernelClass.CONTRACTION, KernelClass.STENCIL)


def build_plan(program: Program) -> Plan:
    _fresh_counter[0] = 0  # fresh names depend only on this op: regenerating one op is byte-identical
    op = program.op
    dims = tuple(ds.dim for ds in program.dims)
    buffers = dict(program.buffers)
    labels = frozenset(t.name for t in op.inputs if t.role is Role.LABEL)
    # Row dims: the leading dim of every tensor of rank >= 2 (batch rows, contraction rows).
    row_dims = {ds[0] for ds in buffers.values() if len(ds) >= 2}

    def crosses(st: Stmt) -> bool:
        return _is_gemm(st) or any(d in row_dims for d in sum_dims(st.expr, dims))

    def to_stmts(statements) -> list:
        return [Stmt(s.target, s.indices, s.dims, s.expr, s.kind) for s in statements]

    def inline(stmts: list, keep: set) -> list:
        out: list = []
        for st in stmts:
            expr = st.expr
            for prev in out:
                if prev.target in st.reads() and prev.target not in keep and not crosses(prev):
                    expr = substitute(expr, prev)
            out.append(replace(st, expr=expr, kind=classify(expr)))
        # Drop temporaries that were inlined everywhere.
        needed = set(keep)
        for st in out:
            needed |= st.reads()
        return [s for s in out if s.target in keep or (crosses(s) and s.target in needed)]

    saved_names = set(program.saved)
    outputs = set(program.outputs)
    fwd = inline(to_stmts(program.forward.statements), outputs | saved_names)
    bwd = inline(to_stmts(program.backward.statements), set(program.backward.returns))
    # Backward recomputation may have re-materialized forward values (a cross-row temp): read
    # the saved copy instead when there is one.
    bwd = [s for s in bwd if s.target in program.backward.returns or s.target not in saved_names]

    fused, fused_cot = {}, {}
    cot_dims = {c: buffers[c] for c in program.cotangents}
    if program.cotangents and all(not d for d in cot_dims.values()) and len(program.cotangents) == 1:
        cot = program.cotangents[0]
        csym = sp.Symbol(cot, real=True)
        units = {}
        for st in bwd:
            if st.kind is not KernelClass.MAP or st.expr.has(sp.Sum, ReduceMax):
                break
            g = sp.diff(st.expr, csym)
            if g.has(csym) or st.expr.subs(csym, 0) != 0 or sp.expand(st.expr - csym * g) != 0:
                break
            units[st.target] = g
        else:
            if units:
                new_fwd = to_stmts(program.forward.statements)
                new_bwd = []
                for st in bwd:
                    name = f"{st.target}_fused"
                    fused[st.target] = name
                    fused_cot[st.target] = cot
                    new_fwd.append(Stmt(name, st.indices, st.dims, units[st.target], KernelClass.MAP, fused=True))
                    buffers[name] = st.dims
                    e = csym * sp.IndexedBase(name, real=True)[st.indices] if st.indices else csym * sp.Symbol(name, real=True)
                    new_bwd.append(Stmt(st.target, st.indices, st.dims, e, KernelClass.MAP))
                keep = outputs | set(fused.values())
                fwd = [replace(s, fused=s.target in fused.values()) for s in inline(new_fwd, keep)]
                bwd = new_bwd
                saved_names = set(fused.values())

    saved_inputs = tuple(t for t in program.inputs if any(t in s.reads() for s in bwd))
    order = [s.target for s in fwd]
    saved_values = tuple(n for n in order if n in saved_names)
    return Plan(
        program=program,
        forward=_launches(op.name, fwd, dims, buffers, crosses),
        backward=_launches(op.name, bwd, dims, buffers, crosses),
        saved_inputs=saved_inputs,
        saved_values=saved_values,
        fused=fused,
        buffers=buffers,
        labels=labels,
        cotangents=program.cotangents,
        fused_cotangent=fused_cot,
    )


def _launches(opname: str, stmts: list, dims: tuple, buffers: dict, crosses) -> list:
    if not stmts:
        return []
    names = [s.target for s in stmts]
    by = {s.target: s for s in stmts}

    def edges(q: Stmt):
        for p_name in names[: names.index(q.target)]:
            if p_name in q.reads():
                p = by[p_name]
                yield p, (crosses(p) or _is_gemm(q))

    asap: dict = {}
    for q in stmts:
        asap[q.target] = max([asap[p.target] + int(c) for p, c in edges(q)], default=0)
    top = max(asap.values())
    level = {n: top for n in names}
    for q in reversed(stmts):
        consumers = [(r, c) for r in stmts for p, c in edges(r) if p.target == q.target]
        if consumers:
            level[q.target] = min(level[r.target] - int(c) for r, c in consumers)
    launches: list = []
    for lv in range(top + 1):
        group = [s for s in stmts if level[s.target] == lv]
        rows: dict = {}
        maps: dict = {}
        def pure(s):
            return not s.expr.has(sp.Sum, ReduceMax)

        all_map = all(pure(s) for s in group if not _is_gemm(s))
        for s in group:
            if _is_gemm(s):
                launches.append(Launch("gemm", [s]))
                continue
            big = len(s.dims) > 2 or any(len(buffers.get(str(a.base), ())) > 2 for a in s.expr.atoms(sp.Indexed))
            if pure(s) and (all_map or big):
                maps.setdefault(s.dims, []).append(s)
                continue
            space = row_space(opname, s, buffers)
            for key in list(rows):
                merged = _merge(key, space)
                if merged is not None:
                    rows[merged] = rows.pop(key) + [s]
                    break
            else:
                rows[space] = [s]
        for d, ss in maps.items():
            launches.append(Launch("map", ss, d))
        for space, ss in rows.items():
            launches.append(Launch("rows", ss, space))
    # Keep statement order inside each launch and launches in dependency order.
    return launches


def _merge(a: tuple, b: tuple):
    if a[0] != b[0]:
        return None
    if a[1] is None or b[1] is None or a[1] == b[1]:
        return (a[0], a[1] or b[1])
    return None


def row_space(opname: str, st: Stmt, buffers: dict) -> tuple:
    """(row dim, column dim or None) of a row-reduction statement, from the tensors it touches."""
    ranks = [buffers[str(a.base)] for a in st.expr.atoms(sp.Indexed) if str(a.base) in buffers] + [st.dims]
    two = {tuple(d) for d in ranks if len(d) == 2}
    if any(len(d) > 2 for d in ranks):
        raise LoweringError(f"op {opname}: ROW_REDUCTION statement {st.formula} reads a tensor of rank > 2")
    if len(two) > 1:
        raise LoweringError(f"op {opname}: ROW_REDUCTION statement {st.formula} mixes row spaces {sorted(map(str, two))}")
    if two:
        r, c = next(iter(two))
        return (r, c)
    one = [d[0] for d in ranks if len(d) == 1]
    if not one:
        raise LoweringError(f"op {opname}: ROW_REDUCTION statement {st.formula} touches no tensor")
    return (one[0], None)
