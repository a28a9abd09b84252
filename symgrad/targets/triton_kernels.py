"""Kernel emitters for the MAP and ROW_REDUCTION classes (the GEMM classes are in triton_gemm).

Each emitter turns one :class:`~symgrad.plan.Launch` into kernel source (through
a Jinja skeleton in ``templates/triton``) and the host lines that launch it. All decisions are
made here, in Python; the templates only place the pieces.

Row kernels. Indices of the row dim print as ``row`` (one program walks a range of rows), of the
column dim as ``cols`` (a block of columns, looped over when the row is longer than a block).
Every ``Sum``/``ReduceMax`` over the column dim becomes a row statistic, computed in a pass over
the row's column blocks; a statistic whose body reads another is computed in a later pass, except
``Sum(exp(f - M)*g)`` after ``M = max(f)``, which is computed in the same pass with an online
(rescaled) running max. Statistics that only row-level results need are accumulated in the final
pass, where the elementwise outputs are written. A ``Sum`` over the row dim (bias and weight
gradients, losses) is accumulated per program into a partial buffer and finished by a small
second kernel.

Every row kernel with a column dim has two paths, chosen on the host by the ``SINGLE_BLOCK``
constexpr (``n_cols <= BLOCK``), so only the taken one is compiled. Single block: each row operand
is loaded once into registers and every pass (statistics in dependency order, then outputs and
column partials) runs from them; one read of the row from memory. Several blocks: the passes
above, one loop over the row's column blocks each.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field, replace

import sympy as sp

from ..functions import Iverson, ReduceMax
from .triton_expr import TritonPrintError, print_expr
from ..plan import KernelPlan as Plan, Launch, LoweringError, Statement as Stmt, dim_of_extent, fresh_names, row_layout, substitute

_INIT = {"max": 'float("-inf")', "sum": "0.0"}
ROW = sp.Symbol("_row", integer=True)
COL = sp.Symbol("_col", integer=True)


@dataclass
class Context:
    """What every emitter needs to know about the op: names of dims, params, buffers."""

    plan: Plan
    env: object  # jinja environment

    @property
    def op(self):
        return self.plan.op

    @property
    def dims(self):
        return {ds.dim.name: ds.dim for ds in self.plan.dims}

    @property
    def params(self):
        return {p.name: p for p in self.plan.params}


class Sig:
    """A kernel's arguments: buffers (pointer + one stride per axis), dims, params, extras."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.bufs: dict[str, int] = {}
        self.idims: set[str] = set()
        self.fdims: set[str] = set()
        self.params: set[str] = set()
        self.extra: list[tuple[str, str]] = []  # (kernel arg, host expression)
        self.constexpr: list[tuple[str, str]] = []
        self.scalar_loads: dict[str, str] = {}

    def buf(self, name: str) -> str:
        if name not in self.ctx.plan.buffers:
            raise LoweringError(f"op {self.ctx.op.name}: kernel reads unknown buffer {name}")
        self.bufs[name] = len(self.ctx.plan.buffers[name])
        return f"{name}_ptr"

    def stride(self, name: str, axis: int) -> str:
        self.buf(name)
        return f"{name}_s{axis}"

    def idim(self, name: str) -> str:
        self.idims.add(name)
        return f"n_{name}"

    def kernel_args(self) -> list[str]:
        out = []
        for b in sorted(self.bufs):
            out.append(f"{b}_ptr")
            out += [f"{b}_s{a}" for a in range(self.bufs[b])]
        out += [f"n_{d}" for d in sorted(self.idims)]
        out += [f"f_{d}" for d in sorted(self.fdims)]
        out += [f"p_{p}" for p in sorted(self.params)]
        out += [a for a, _ in self.extra]
        out += [f"{a}: tl.constexpr" for a, _ in self.constexpr]
        return out

    def host_args(self) -> list[str]:
        out = []
        for b in sorted(self.bufs):
            out.append(f"t_{b}")
            out += [f"t_{b}.stride({a})" for a in range(self.bufs[b])]
        out += [f"n_{d}" for d in sorted(self.idims)]
        out += [f"_rt.fdim(n_{d})" for d in sorted(self.fdims)]
        out += [f"p_{p}" for p in sorted(self.params)]
        out += [h for _, h in self.extra]
        out += [f"{a}={h}" for a, h in self.constexpr]
        return out

    def acc_lines(self) -> list[str]:
        """The kernel's first lines. ``ACC``: the dtype its math and accumulations run in, float64
        when the op's tensors are float64, else float32 (fp32, fp16 and bf16 inputs alike), read at
        compile time from a float buffer the host allocates in the op's dtype or its accumulation
        dtype (never a label, never a cotangent, whose dtype is the caller's). Then the float
        params and float dims as ``ACC`` scalars: compiled they arrive as fp32 scalars (a no-op
        cast in an fp32 kernel, so fp32 and 16-bit kernels compile exactly as with a literal
        ``tl.float32``), interpreted as Python floats, which a ``tl.where`` of two scalars would
        otherwise round to fp32 in a float64 kernel."""
        plan = self.ctx.plan
        skip = set(plan.labels) | set(plan.cotangents)
        ptrs = [f"{b}_ptr" for b in sorted(self.bufs) if b not in skip] + [a for a, _ in self.extra if a.endswith("_ptr")]
        if not ptrs:
            raise LoweringError(f"op {self.ctx.op.name}: a kernel with no float buffer of the op's own dtype")
        return ([f"ACC: tl.constexpr = tl.float64 if {ptrs[0]}.dtype.element_ty == tl.float64 else tl.float32"]
                + [f"{v} = tl.full([], {v}, ACC)" for v in self.float_args()])

    def float_args(self) -> list[str]:
        """The kernel's float scalar arguments: float params and float dims."""
        params = self.ctx.params
        return [f"p_{p}" for p in sorted(self.params) if not params[p].integer] + [f"f_{d}" for d in sorted(self.fdims)]

    def launcher(self, kname: str) -> str:
        """What the host launches: the kernel, or where it takes float scalars the kernel the
        tensors' dtype needs (``_rt.float_params``: fp64 arguments for float64 tensors on a GPU)."""
        floats = tuple(self.float_args())
        return f"_rt.float_params({kname}, dtype, {floats!r})" if floats else kname

    def names_for(self, expr: sp.Expr, names: dict) -> dict:
        """Complete ``names`` with dims, params and scalar buffers that ``expr`` reads."""
        out = dict(names)
        dims, params, buffers = self.ctx.dims, self.ctx.params, self.ctx.plan.buffers
        labels = {a.base.label for a in expr.atoms(sp.Indexed)}
        for s in expr.free_symbols:
            if s in out or not isinstance(s, sp.Symbol) or s in labels:
                continue
            n = str(s)
            if n in params:
                self.params.add(n)
                out[s] = f"p_{n}"
            elif n in dims:
                self.fdims.add(n)
                out[s] = f"f_{n}"
            elif n in buffers and not buffers[n]:
                self.buf(n)
                self.scalar_loads[n] = f"v_{n} = tl.load({n}_ptr).to(ACC)"
                out[s] = f"v_{n}"
            else:
                raise LoweringError(f"op {self.ctx.op.name}: symbol {n} has no meaning in a kernel")
        return out


def _rowmax(v: str) -> str:
    """A row's max that is NaN when any entry is (as torch's and NumPy's max are): ``tl.max``
    skips NaNs, so a NaN entry is added back as a sum that is 0 when there is none."""
    return f"(tl.max(tl.where(cmask, {v}, float('-inf')), 0) + tl.sum(tl.where(cmask & ({v} != {v}), {v}, 0.0), 0))"


def _maximum(a: str, b: str) -> str:
    """The running max of a multi-block row, NaN once any block's is."""
    return f"tl.maximum({a}, {b}, propagate_nan=tl.PropagateNan.ALL)"


def pr(ctx: Context, expr, names, what: str, maxes=None, rows: bool = False) -> str:
    try:
        return print_expr(expr, names, maxes=maxes, rows=rows)
    except TritonPrintError as e:
        raise LoweringError(f"op {ctx.op.name}: cannot print {what}: {e}") from None


def pr_rows(ctx: Context, expr, names, what: str, maxes=None) -> str:
    """:func:`pr` in a row kernel: a product's row statistics and per-column vectors multiply
    before its full tiles (``TritonPrinter.rows``)."""
    return pr(ctx, expr, names, what, maxes, rows=True)


def _skip_when_param_zero(ctx: Context, e):
    """A term of a finished total scaled by a bare param (label smoothing's ``eps*tot``) is a strong
    zero where the param is 0: torch skips that term (``label_smoothing=0`` with a -inf logit gives
    a finite loss, not ``0*inf``), as the NumPy target's Python ``if`` does."""
    params = {sp.Symbol(p.name) for p in ctx.op.params} | {sp.Symbol(p.name, real=True) for p in ctx.op.params}
    out = []
    for t in sp.Add.make_args(e):
        zero = [f for f in sp.Mul.make_args(t) if f in params]
        out.append(sp.Mul(*(Iverson(sp.Ne(f, 0)) for f in zero)) * t if zero and t.has(sp.Symbol) and t != zero[0] else t)
    return sp.Add(*out)


def _formula_lines(stmts) -> list[str]:
    out = []
    for s in stmts:
        out += textwrap.wrap(s.formula, 108, subsequent_indent="    ", break_long_words=True, break_on_hyphens=False)
    return out


def store_value(ptr: str, value: str) -> str:
    try:  # a number (a gradient that is identically 0 reads nothing): a Python float has no .to
        float(value)
        value = f"tl.full([], {value}, ACC)"
    except ValueError:
        pass
    return f"({value}).to({ptr}.dtype.element_ty)"


# ---------------------------------------------------------------------------------------------
# MAP: flatten the target's indices, BLOCK elements per program.


def emit_map(ctx: Context, launch: Launch, kname: str):
    sig = Sig(ctx)
    target_dims = launch.space
    stmts = launch.statements
    decompose = []
    # All statements of a map launch share their target dims; name their indices by position.
    pos_names = [f"i{a}" for a in range(len(target_dims))]
    if target_dims:
        rem = "offs"
        for a in range(len(target_dims) - 1, 0, -1):
            n = sig.idim(target_dims[a].name)
            decompose.append(f"{pos_names[a]} = {rem} % {n}")
            decompose.append(f"rem{a} = {rem} // {n}")
            rem = f"rem{a}"
        decompose.append(f"{pos_names[0]} = {rem}")
        decompose += [f"{n} = {n}.to(tl.int64)" for n in pos_names]
    total = " * ".join(f"n_{d.name}" for d in target_dims) or "1"
    for d in target_dims:
        sig.idim(d.name)
    loads: dict = {}
    load_lines: list[str] = []
    body: list[str] = []
    fresh = fresh_names()
    resolved: list[Stmt] = []
    flat: set = set()  # buffers over the launch's whole shape: one flat offset when all are contiguous
    for st in stmts:
        # A value written by this launch is computed again where a later statement reads it
        # (another program may own that element: attention's p[b, h, k, t] beside p[b, h, t, k]).
        for prev in resolved:
            if prev.target in st.reads():
                st = replace(st, expr=substitute(st.expr, prev, fresh))
        resolved.append(st)
        imap = {ix: pos_names[a] for a, ix in enumerate(st.indices)}
        names = dict(imap)
        for node in sorted(st.expr.atoms(sp.Indexed), key=sp.default_sort_key):
            key = node.xreplace({ix: sp.Symbol(imap[ix]) for ix in imap})
            if key not in loads:
                var = f"ld{len(loads)}"
                loads[key] = var
                whole = _whole(ctx, node, st.indices, target_dims)
                if whole:
                    flat.add(str(node.base))
                load_lines.append(_load(ctx, sig, node, imap, var, "mask", flat=whole))
            names[node] = loads[key]
        names = sig.names_for(st.expr, names)
        value = pr(ctx, st.expr, names, st.formula)
        ptr = sig.buf(st.target)
        off = " + ".join(f"{imap[ix]} * {sig.stride(st.target, a)}" for a, ix in enumerate(st.indices)) or "0"
        if target_dims:
            flat.add(st.target)
            off = _flat_or(off)
        line = f"tl.store({ptr} + {off}, {store_value(ptr, value)}, mask=mask)"
        if st.fused:
            body += ["if WRITE_GRAD:", "    " + line]
        else:
            body.append(line)
    sig.extra.append(("n_total", "n_total"))
    sig.constexpr.append(("BLOCK", "blk"))
    sig.constexpr.append(("IDX64", "n_total + blk >= 2**31"))
    sig.constexpr.append(("FLAT", f"_rt.contiguous({', '.join(f't_{b}' for b in sorted(flat))})" if flat else "False"))
    if any(s.fused for s in stmts):
        sig.constexpr.append(("WRITE_GRAD", "write_grad"))
    src = ctx.env.get_template("map.j2").render(
        name=kname, args=sig.kernel_args(), acc=sig.acc_lines(), formulas=_formula_lines(stmts),
        decompose=decompose, scalar_loads=sorted(sig.scalar_loads.values()), loads=load_lines, body=body,
    )
    host = [
        f"n_total = {total}",
        "blk = _rt.map_block(n_total)",
        f"{sig.launcher(kname)}[(triton.cdiv(n_total, blk),)]({', '.join(sig.host_args())})",
    ]
    return [src], host, [s.target for s in stmts]


def _whole(ctx: Context, node: sp.Indexed, indices, target_dims) -> bool:
    """Whether a map statement reads ``node`` over the launch's whole shape, index for index (not
    broadcast, transposed or gathered): then a contiguous buffer is addressed by the flat offset."""
    dims = ctx.plan.buffers[str(node.base)]
    return bool(target_dims) and tuple(node.indices) == tuple(indices) and tuple(dims) == tuple(target_dims)


def _flat_or(offset: str) -> str:
    # FLAT (every whole-shape buffer contiguous): the flat offset itself, contiguous across rows,
    # so loads and stores stay 128-bit wide whatever the last dim's size; strided ones use strides.
    return f"(offs if FLAT else {offset})"


def _load(ctx: Context, sig: Sig, node: sp.Indexed, imap: dict, var: str, mask: str | None, flat: bool = False) -> str:
    name = str(node.base)
    parts = []
    masks = [mask] if mask else []
    for a, ix in enumerate(node.indices):
        label_here = isinstance(ix, sp.Indexed) and all(j in imap for j in ix.indices)
        if ix in imap or label_here:
            if ix in imap:
                code = imap[ix]
            else:  # a gather at a label this kernel has not loaded (a class weight per row, weight[y[b]])
                lname = str(ix.base)
                loff = " + ".join(f"{imap[j]} * {sig.stride(lname, q)}" for q, j in enumerate(ix.indices))
                code = f"tl.load({sig.buf(lname)} + {loff}" + (f", mask={mask}, other=0)" if mask else ")")
            if isinstance(ix, sp.Indexed):  # a gather at a label: mask labels outside the axis
                n = sig.idim(ctx.plan.buffers[name][a].name)
                code = f"{code}.to(tl.int64)"
                masks.append(f"({code} >= 0) & ({code} < {n})")
        elif ix.is_Integer:
            code = str(int(ix))
        else:
            raise LoweringError(f"op {ctx.op.name}: cannot address {node}: index {ix} is not a loop index")
        parts.append(f"{code} * {sig.stride(name, a)}")
    ptr = sig.buf(name)
    off = " + ".join(parts) or "0"
    if flat:
        off = _flat_or(off)
    label = name in ctx.plan.labels
    m = f", mask={' & '.join(masks)}, other=0" if masks else ""
    conv = "" if label else ".to(ACC)"
    return f"{var} = tl.load({ptr} + {off}{m}){conv}"


# ---------------------------------------------------------------------------------------------
# ROW_REDUCTION


@dataclass(eq=False)
class Stat:
    sym: sp.Symbol
    kind: str  # "sum" | "max"
    body: sp.Expr  # over ROW, COL and other stats
    deps: set = field(default_factory=set)
    pass_no: int = 0
    online: "Stat | None" = None
    late: bool = False

    @property
    def var(self) -> str:
        return str(self.sym)


class RowBuilder:
    def __init__(self, ctx: Context, launch: Launch, kname: str):
        self.ctx, self.launch, self.kname = ctx, launch, kname
        rows, self.coldim = launch.space
        if not rows:
            raise LoweringError(f"op {ctx.op.name}: row kernel {kname} has no row dim")
        self.rowdims = tuple(rows)
        # One symbol per row dim; the program's flat row id ``row`` is decomposed into them (one
        # row dim: the row id itself, so rank-2 kernels print as before).
        if len(rows) == 1:
            self.rowsyms, self.rownames = (ROW,), ("row",)
        else:
            self.rowsyms = tuple(sp.Symbol(f"_row{j}", integer=True) for j in range(len(rows)))
            self.rownames = tuple(f"row_{j}" for j in range(len(rows)))
        self.dims = tuple(ctx.dims.values())
        self.stats: list[Stat] = []
        self.crosses: list[tuple[sp.Symbol, sp.Expr, bool]] = []  # (T symbol, body, col-dependent)
        self.sig = Sig(ctx)
        self.fresh = fresh_names()
        self.axes: dict = {}  # target -> one ROW/COL symbol per axis

    def fail(self, st: Stmt, why: str):
        raise LoweringError(f"op {self.ctx.op.name}: ROW_REDUCTION statement {st.formula}: {why}")

    def dim(self, lo, hi):
        return dim_of_extent(hi - lo + 1, self.dims)

    def maxes(self) -> dict:
        """Each row max's symbol -> the entry it is the max of (primitives.shift_first)."""
        return {s.sym: s.body for s in self.stats if s.kind == "max"}

    def stat(self, kind: str, body: sp.Expr) -> sp.Symbol:
        for s in self.stats:
            if s.kind == kind and s.body == body:
                return s.sym
        sym = sp.Symbol(f"st{len(self.stats)}", real=True)
        deps = {s for s in self.stats if body.has(s.sym)}
        self.stats.append(Stat(sym, kind, body, deps))
        return sym

    def abstract_stats(self, st: Stmt, expr: sp.Expr, reduce_over=None) -> sp.Expr:
        """Replace column reductions by statistics; with ``reduce_over=(k, lo, hi)``, also reduce
        ``expr`` itself over that column limit (a limit split off a multi-index sum)."""
        def go(node):
            if isinstance(node, sp.Sum):
                if len(node.limits) != 1:
                    self.fail(st, "a multi-index sum inside a row")
                k, lo, hi = node.limits[0]
                body = node.function
                kind = "sum"
            elif isinstance(node, ReduceMax):
                body, k, lo, hi = node.args
                kind = "max"
            else:
                if not node.args or isinstance(node, sp.Indexed):
                    return node
                new = [go(a) for a in node.args]
                return node.func(*new) if any(a is not b for a, b in zip(new, node.args)) else node
            if self.coldim is None or self.dim(lo, hi) != self.coldim or lo != 0:
                self.fail(st, f"reduction {node} is not over the whole column dim")
            inner = go(body)  # inner reductions first: they may reuse this dummy's name
            if inner.has(COL):
                self.fail(st, f"reduction {node} reads the output's own column")
            return self.stat(kind, inner.xreplace({k: COL}))

        if reduce_over is not None:
            return go(sp.Sum(expr, reduce_over))
        return go(expr)

    def row_axis(self, st: Stmt, node: sp.Sum, lim) -> int | None:
        """The row axis a sum's limit runs over, or None for the column (or no row dim). Matched by
        dim; a dim that is several axes (attention's [T, T]) by where the summand reads the index
        in a tensor of the row space's rank, whose other axes are the column or the row axes."""
        k, lo, hi = lim
        d = self.dim(lo, hi)
        if d not in self.rowdims:
            return None
        if d != self.coldim and self.rowdims.count(d) == 1:
            return self.rowdims.index(d)
        full = len(self.rowdims) + (self.coldim is not None)
        for a in sorted(node.function.atoms(sp.Indexed), key=sp.default_sort_key):
            if k not in a.indices or len(a.indices) != full:
                continue
            p = a.indices.index(k)
            others = a.indices[:p] + a.indices[p + 1:]
            if COL in others:
                c = a.indices.index(COL)
                return p if p < c else p - 1
            if set(self.rowsyms) <= set(others):
                return None
        self.fail(st, f"cannot tell which axis the sum {node} runs over")

    def abstract_cross(self, st: Stmt, expr: sp.Expr) -> sp.Expr:
        def go(node):
            axes = {lim: self.row_axis(st, node, lim) for lim in node.limits} if isinstance(node, sp.Sum) else {}
            rows = [lim for lim in node.limits if axes[lim] is not None] if axes else []
            if rows:
                cols = [lim for lim in node.limits if lim not in rows]
                if len(cols) > 1:
                    self.fail(st, f"sum {node} has more than one column limit")
                if sorted(axes[lim] for lim in rows) != list(range(len(self.rowdims))):
                    self.fail(st, f"sum {node} is over some row dims, not all of ({', '.join(d.name for d in self.rowdims)})")
                if any(lo != 0 for _, lo, _ in rows):
                    self.fail(st, "a partial sum over rows")
                body = node.function
                if body.has(*self.rowsyms):
                    self.fail(st, "a sum over rows inside a row")
                to_row = {lim[0]: self.rowsyms[axes[lim]] for lim in rows}
                body = self.abstract_stats(st, body.xreplace(to_row), cols[0] if cols else None)
                coldep = body.has(COL)
                for sym, b, c in self.crosses:
                    if b == body:
                        return sym
                sym = sp.Symbol(f"T{len(self.crosses)}", real=True)
                self.crosses.append((sym, body, coldep))
                return sym
            if not node.args or isinstance(node, (sp.Indexed, ReduceMax)):
                return node
            new = [go(a) for a in node.args]
            return node.func(*new) if any(a is not b for a, b in zip(new, node.args)) else node

        return go(expr)

    def target_axes(self, st: Stmt) -> tuple:
        """``(role, one ROW/COL symbol per target axis)``: the target spans every row dim and the
        column (``rowcol``, the column at any position), the row dims (``row``), the column only
        (``col``, a cross-row sum) or nothing (``scalar``). Axes are matched by position, so a
        dim that is several axes ([T, T]) is told apart by where the reductions read."""
        dims, rows, col = tuple(st.dims), self.rowdims, self.coldim
        if not dims:
            return "scalar", ()
        if dims == rows:
            return "row", self.rowsyms
        if col is not None and dims == (col,):
            return "col", (COL,)
        if col is not None and len(dims) == len(rows) + 1:
            cands = [p for p in range(len(dims)) if dims[p] == col and dims[:p] + dims[p + 1:] == rows]
            if cands:
                p = cands[-1]
                if len(cands) > 1:
                    p0 = row_layout(self.ctx.plan, st)[1]
                    p = p0 if p0 in cands else p
                syms = list(self.rowsyms)
                syms.insert(p, COL)
                return "rowcol", tuple(syms)
        names = ", ".join(d.name for d in rows) + (f"; column {col.name}" if col is not None else "")
        self.fail(st, f"target dims ({', '.join(d.name for d in dims)}) are not the row space ({names})")

    def build(self):
        stmts = self.launch.statements
        entries = []  # (stmt, role, expr)
        resolved: list[Stmt] = []  # statements with same-launch reads substituted
        for n, st in enumerate(stmts):
            e = st.expr
            for prev in resolved:
                if prev.target in st.reads():
                    e = substitute(e, prev, self.fresh)
            resolved.append(replace(st, expr=e))
            role, axes = self.target_axes(st)
            self.axes[st.target] = axes
            e = e.xreplace(dict(zip(st.indices, axes)))
            e = self.abstract_cross(st, e)
            if role in ("col", "scalar"):
                if e.has(*self.rowsyms) or e.atoms(sp.Sum, ReduceMax):
                    self.fail(st, "a reduction across rows mixed with row-level terms")
            else:
                if any(c for c in self.crosses if e.has(c[0])):
                    self.fail(st, "reads a reduction across rows of the same launch")
                e = self.abstract_stats(st, e)
            entries.append((st, role, e))
        self.entries = entries
        self._schedule()
        return self._emit()

    def _schedule(self):
        final_exprs = [e for _, r, e in self.entries if r == "rowcol"] + [b for _, b, c in self.crosses if c]
        row_exprs = [e for _, r, e in self.entries if r == "row"] + [b for _, b, c in self.crosses if not c]
        early: set = set()

        def need(expr):
            for s in self.stats:
                if expr.has(s.sym) and s.sym not in early:
                    early.add(s.sym)
                    need(s.body)

        for e in final_exprs:
            need(e)
        for s in self.stats:
            if any(r.has(s.sym) for r in row_exprs) and s.sym not in early:
                s.late = True
                for d in s.deps:
                    if d.sym not in early:
                        early.add(d.sym)
                        need(d.body)
        for s in self.stats:
            if s.late and s.sym in early:
                s.late = False
        for s in self.stats:  # stats are created inner-first, so deps come earlier
            if s.late:
                continue
            base = max((d.pass_no for d in s.deps), default=0)
            s.pass_no = base + 1
            if s.kind == "sum":
                maxes = [d for d in s.deps if d.kind == "max" and d.pass_no == base and not d.late]
                others = [d for d in s.deps if d not in maxes]
                if len(maxes) == 1 and all(d.pass_no < base for d in others):
                    m = maxes[0]
                    t = sp.Symbol("_m_probe", real=True)
                    b = s.body.xreplace({m.sym: t})
                    if sp.expand(sp.diff(b, t) + b) == 0:
                        s.pass_no, s.online = base, m

    # -- emission ------------------------------------------------------------------------
    def _offset(self, target: str) -> str:
        """``target``'s element offset: each axis's coordinate (a row coordinate or ``cols``)
        times that axis's own stride."""
        names = {**dict(zip(self.rowsyms, self.rownames)), COL: "cols"}
        return " + ".join(f"{names[a]} * {self.sig.stride(target, n)}" for n, a in enumerate(self.axes[target]))

    def _rows(self) -> tuple:
        """``(kernel expression of the row count, its host expression, lines decomposing the flat
        row id into one coordinate per row dim, int64 under IDX64)``: the last row dim varies fastest."""
        sig = self.sig
        if len(self.rowdims) == 1:
            n = sig.idim(self.rowdims[0].name)
            return n, n, []
        lines, rem = [], "row"
        for j in range(len(self.rowdims) - 1, 0, -1):
            n = sig.idim(self.rowdims[j].name)
            lines.append(f"{self.rownames[j]} = {rem} % {n}")
            if j > 1:
                lines.append(f"rrem{j} = {rem} // {n}")
                rem = f"rrem{j}"
            else:
                lines.append(f"{self.rownames[0]} = {rem} // {n}")
        sig.extra.append(("n_rows", "n_rows"))
        return "n_rows", " * ".join(f"n_{d.name}" for d in self.rowdims), lines

    def _printer_names(self, expr, loads: dict, load_lines: list, row_loads: dict, row_lines: list, extra: dict, vector: bool):
        names = dict(extra)
        rmap = dict(zip(self.rowsyms, self.rownames))
        names.update(rmap)
        if vector:
            names[COL] = "cols"
        for s in self.stats:
            names.setdefault(s.sym, s.var)
        for sym, _, _ in self.crosses:
            names.setdefault(sym, f"tot{str(sym)[1:]}")
        def row_level(ix):
            return ix in rmap or ix.is_Integer or (isinstance(ix, sp.Indexed) and all(row_level(j) for j in ix.indices))

        nodes = sorted(expr.atoms(sp.Indexed), key=lambda n: (sum(isinstance(i, sp.Indexed) for i in n.indices), sp.default_sort_key(n)))
        for node in nodes:
            if all(row_level(ix) for ix in node.indices):
                if node not in row_loads:
                    var = f"rv{len(row_loads)}"
                    row_loads[node] = var
                    row_lines.append(_load(self.ctx, self.sig, node, {**rmap, **row_loads}, var, None))
                names[node] = row_loads[node]
            else:
                if not vector:
                    raise LoweringError(f"op {self.ctx.op.name}: {node} read at row level")
                if node not in loads:
                    var = f"cv{self._nload}"
                    self._nload += 1
                    loads[node] = var
                    load_lines.append(_load(self.ctx, self.sig, node, {**rmap, COL: "cols", **row_loads}, var, "cmask"))
                names[node] = loads[node]
        return self.sig.names_for(expr, names)

    def _emit(self):
        ctx, sig = self.ctx, self.sig
        self._nload = 0
        row_loads: dict = {}
        row_lines: list = []
        passes = []
        pass_reads = []  # per pass over the row's blocks: the row's own tensors it loads
        n_passes = max((s.pass_no for s in self.stats if not s.late), default=0)
        for p in range(1, n_passes + 1):
            init, loads, load_lines, body = [], {}, [], []
            members = [s for s in self.stats if not s.late and s.pass_no == p]
            for s in members:
                init.append(f"{s.var} = tl.full([], {_INIT[s.kind]}, ACC)")
            for s in members:
                if s.online is not None:
                    continue  # emitted with its max
                extra = {}
                onl = [o for o in members if o.online is s]
                names = self._printer_names(s.body, loads, load_lines, row_loads, row_lines, extra, True)
                v = pr_rows(ctx, s.body, names, f"row statistic {s.body}")
                if s.kind == "max":
                    if onl:
                        body.append(f"m_new = {_maximum(s.var, _rowmax(v))}")
                        for o in onl:
                            onames = self._printer_names(o.body, loads, load_lines, row_loads, row_lines, {s.sym: "m_new"}, True)
                            ov = pr_rows(ctx, o.body, onames, f"row statistic {o.body}")
                            body.append(f"{o.var} = {o.var} * tl.exp({s.var} - m_new) + tl.sum(tl.where(cmask, {ov}, 0.0), 0)")
                        body.append(f"{s.var} = m_new")
                    else:
                        body.append(f"{s.var} = {_maximum(s.var, _rowmax(v))}")
                else:
                    body.append(f"{s.var} += tl.sum(tl.where(cmask, {v}, 0.0), 0)")
            passes.append(dict(init=init, loads=load_lines, body=body))
            pass_reads.append({str(n.base) for n in loads if n.has(*self.rowsyms)})
        # Final pass: elementwise outputs, column partials, late statistics.
        final = None
        init, loads, load_lines, body = [], {}, [], []
        late = [s for s in self.stats if s.late]
        for s in late:
            init.append(f"{s.var} = tl.full([], {_INIT[s.kind]}, ACC)")
            names = self._printer_names(s.body, loads, load_lines, row_loads, row_lines, {}, True)
            v = pr_rows(ctx, s.body, names, f"row statistic {s.body}")
            if s.kind == "max":
                body.append(f"{s.var} = {_maximum(s.var, _rowmax(v))}")
            else:
                body.append(f"{s.var} += tl.sum(tl.where(cmask, {v}, 0.0), 0)")
        for st, role, e in self.entries:
            if role != "rowcol":
                continue
            names = self._printer_names(e, loads, load_lines, row_loads, row_lines, {}, True)
            v = pr_rows(ctx, e, names, st.formula, self.maxes())
            ptr = sig.buf(st.target)
            line = f"tl.store({ptr} + {self._offset(st.target)}, {store_value(ptr, v)}, mask=cmask)"
            body += ["if WRITE_GRAD:", "    " + line] if st.fused else [line]
        part_init, part_store, part_host = [], [], []
        for sym, b, coldep in self.crosses:
            j = str(sym)[1:]
            if coldep:
                names = self._printer_names(b, loads, load_lines, row_loads, row_lines, {}, True)
                v = pr_rows(ctx, b, names, f"partial sum {b}", self.maxes())
                ncol = sig.idim(self.coldim.name)
                # Several column blocks: read-modify-write this program's own partial row, whose
                # first row writes it (so the buffer needs no zeroing). (The single-block path
                # keeps the partial sums in registers across the program's rows.)
                body += [f"pp{j} = part{j}_ptr + pid_ix * {ncol} + cols",
                         f"tl.store(pp{j}, tl.load(pp{j}, mask=cmask & (t > 0), other=0.0) + tl.where(cmask, {v}, 0.0), mask=cmask)"]
                part_init.append(f"pacc{j} = tl.zeros([BLOCK], ACC)")
                part_store += ["if SINGLE_BLOCK:", f"    tl.store(part{j}_ptr + pid_ix * {ncol} + cols0, pacc{j}, mask=cols0 < {ncol})"]
                # every program writes its whole partial row unless it has no rows (an empty batch)
                part_host.append(f"part{j} = (torch.empty if {{nrows}} else torch.zeros)((n_prog, n_{self.coldim.name}), dtype=_rt.acc_dtype(dtype), device=device)")
            else:
                part_init.append(f"acc{j} = tl.full([], 0.0, ACC)")
                part_store.append(f"tl.store(part{j}_ptr + pid_ix, acc{j})")
                part_host.append(f"part{j} = torch.zeros((n_prog,), dtype=_rt.acc_dtype(dtype), device=device)")
            sig.extra.append((f"part{j}_ptr", f"part{j}"))
        if body or late:
            final = dict(init=init, loads=load_lines, body=body)
            pass_reads.append({str(n.base) for n in loads if n.has(*self.rowsyms)})
        # Tensors of the row that a multi-block row reads in more than one pass: the host keeps
        # the rows in flight few enough that the later passes find them in L2.
        reread = sorted(n for n in set().union(*pass_reads) if sum(n in r for r in pass_reads) > 1)
        single = self._single_block(row_loads, row_lines) if self.coldim is not None else None
        if single is not None and not (passes or final):
            raise LoweringError(f"op {ctx.op.name}: row kernel {self.kname} has a column dim but no column pass")
        # Row-level results after the passes.
        row_after = []
        for st, role, e in self.entries:
            if role != "row":
                continue
            e = _skip_when_param_zero(ctx, e)  # a per-row loss's eps*sum(...) with eps = 0, as the finished total
            names = self._printer_names(e, {}, [], row_loads, row_lines, {}, False)
            v = pr_rows(ctx, e, names, st.formula, self.maxes())
            ptr = sig.buf(st.target)
            row_after.append(f"tl.store({ptr} + {self._offset(st.target)}, {store_value(ptr, v)})")
        for sym, b, coldep in self.crosses:
            if not coldep:
                names = self._printer_names(b, {}, [], row_loads, row_lines, {}, False)
                row_after.append(f"acc{str(sym)[1:]} += {pr_rows(ctx, b, names, f'partial sum {b}', self.maxes())}")
        nrow, nrow_host, row_decomp = self._rows()
        ncol = sig.idim(self.coldim.name) if self.coldim is not None else None
        sig.extra.append(("RPP", "rpp"))
        sig.constexpr.append(("BLOCK", "blk"))
        # every tensor the kernel addresses (the partial rows included), and the step of a block
        # along each column axis: the last block's masked columns reach that far past a row's end
        wide = [f"t_{b}" for b in sorted(sig.bufs)] + [f"part{str(sym)[1:]}" for sym, _, _ in self.crosses]
        if self.coldim is not None:
            wide += [f"blk * t_{b}.stride({a})" for b in sorted(sig.bufs)
                     for a, d in enumerate(ctx.plan.buffers[b]) if d == self.coldim]
        sig.constexpr.append(("IDX64", f"_rt.wide_index({nrow_host}, {', '.join(wide)})"))
        fused = any(st.fused for st in self.launch.statements)
        if fused:
            sig.constexpr.append(("WRITE_GRAD", "write_grad"))
        if single is not None:
            sig.constexpr.append(("SINGLE_BLOCK", f"n_{self.coldim.name} <= blk"))
        main = ctx.env.get_template("rows.j2").render(
            name=self.kname, args=sig.kernel_args(), acc=sig.acc_lines(), formulas=_formula_lines(self.launch.statements),
            scalar_loads=sorted(sig.scalar_loads.values()), nrow=nrow, ncol=ncol,
            part_init=part_init, row_lines=row_lines, single=single, passes=passes, final=final,
            row_after=row_after, part_store=part_store, row_decomp=row_decomp,
        )
        srcs = [main]
        host = [f"n_rows = {nrow_host}"] if row_decomp else []
        itemsize = "dtype.itemsize"
        n_part = sum(1 for _, _, coldep in self.crosses if coldep) if ncol else 0
        if ncol:
            # fp32 values per column the single-block path keeps live: its column operands, each
            # column partial's accumulator (and its update), one for temporaries, and the costly
            # values several of its passes share
            live = len(single["hoist"]) + len(single["loads"]) + 2 * n_part + 1 + self._shared_values()
            host.append(f"blk = _rt.row_block(n_{self.coldim.name}, {itemsize}, {live})")
        else:
            host.append("blk = 16")
        nrows = nrow_host if not row_decomp else "n_rows"
        if (reread or n_part) and ncol:
            # what each program of a multi-block row keeps in L2: the row its later passes read
            # again, and its fp32 partial row of each column partial, added into once per row
            per_row = " + ".join([f"t_{n}.element_size()" for n in reread] + ([f"{4 * n_part}"] if n_part else []))
            host.append(f"hot = n_{self.coldim.name} * ({per_row}) if n_{self.coldim.name} > blk else 0")
            per_sm = ", per_sm=1, partial_rows=True" if n_part else ""  # see row_programs: each program leaves a partial row
            host.append(f"n_prog, rpp = _rt.row_programs({nrows}, device, {bool(self.crosses)}, hot{per_sm})")
        elif self.crosses:
            host.append(f"n_prog, rpp = _rt.row_programs({nrows}, device, True)")
        else:
            host.append(f"n_prog, rpp = {nrows}, 1")
        host += [line.replace("{nrows}", nrows) for line in part_host]
        host.append(f"{sig.launcher(self.kname)}[(n_prog,)]({', '.join(sig.host_args())}, num_warps=_rt.row_warps(blk), maxnreg=_rt.row_regs(blk))")
        if self.crosses:
            fsrc, fhost = self._finish()
            srcs.append(fsrc)
            host += fhost
        return srcs, host, [s.target for s in self.launch.statements]

    def _shared_values(self) -> int:
        """Column values the single-block path computes once and keeps live between passes:
        function applications (a tanh, an exp; not brackets, which are comparisons) over the
        column that two or more of its statistics, outputs and partials read. The compiler
        computes each once for all of them (softcapped cross-entropy's ``tanh(x/softcap)`` is read
        by its max, its sum, its sum of logits and its gradient), so each is one more register per
        column until its last reader."""
        exprs = [st.body for st in self.stats] + [e for _, role, e in self.entries if role == "rowcol"]
        exprs += [b for _, b, coldep in self.crosses if coldep]
        readers: dict = {}
        for i, e in enumerate(exprs):
            for node in sp.preorder_traversal(e):
                if isinstance(node, sp.Function) and not isinstance(node, (Iverson, sp.KroneckerDelta)) and node.has(COL):
                    readers.setdefault(node, set()).add(i)
        return sum(1 for r in readers.values() if len(r) > 1)

    def _single_block(self, row_loads: dict, row_lines: list) -> dict:
        """The ``SINGLE_BLOCK`` path: the whole row is one block, so every column operand is loaded
        once into registers and all passes run from them: statistics in dependency order (a max
        before the sums that read it, so no online rescaling), then late statistics, outputs and
        column partials (accumulated in registers across the program's rows). Operands that do not
        depend on the row (weights, biases) are loaded once per program, before the row loop.
        Masked-out lanes are excluded exactly as in the multi-block passes."""
        ctx = self.ctx
        loads: dict = {}
        load_lines: list = []
        body: list = []

        def names_of(expr):
            return self._printer_names(expr, loads, load_lines, row_loads, row_lines, {}, True)

        # Stats are created inner-first (deps before dependents); an online sum has its max's
        # pass number and comes after it, so (pass, creation) order is a dependency order.
        early = sorted((s for s in self.stats if not s.late), key=lambda s: s.pass_no)
        for s in early + [s for s in self.stats if s.late]:
            v = pr_rows(ctx, s.body, names_of(s.body), f"row statistic {s.body}")
            if s.kind == "max":
                body.append(f"{s.var} = {_rowmax(v)}")
            else:
                body.append(f"{s.var} = tl.sum(tl.where(cmask, {v}, 0.0), 0)")
        for st, role, e in self.entries:
            if role != "rowcol":
                continue
            v = pr_rows(ctx, e, names_of(e), st.formula, self.maxes())
            ptr = self.sig.buf(st.target)
            line = f"tl.store({ptr} + {self._offset(st.target)}, {store_value(ptr, v)}, mask=cmask)"
            body += ["if WRITE_GRAD:", "    " + line] if st.fused else [line]
        for sym, b, coldep in self.crosses:
            if coldep:
                v = pr_rows(ctx, b, names_of(b), f"partial sum {b}", self.maxes())
                body.append(f"pacc{str(sym)[1:]} += tl.where(cmask, {v}, 0.0)")
        hoist = [line for node, line in zip(loads, load_lines) if not node.has(*self.rowsyms)]
        per_row = [line for node, line in zip(loads, load_lines) if node.has(*self.rowsyms)]
        return dict(hoist=hoist, loads=per_row, body=body)

    def _finish(self):
        ctx = self.ctx
        sig = Sig(ctx)
        fname = self.kname + "_finish"
        lines, stores, scalar_stores = [], [], []
        col = self.coldim is not None and any(c for _, _, c in self.crosses)
        ncol = sig.idim(self.coldim.name) if col else None
        for sym, b, coldep in self.crosses:
            j = str(sym)[1:]
            sig.extra.append((f"part{j}_ptr", f"part{j}"))
            if coldep:
                lines += [f"tot{j} = tl.zeros([BLOCK], ACC)",
                          "for p in range(0, P):",
                          f"    tot{j} += tl.load(part{j}_ptr + p * {ncol} + cols, mask=cmask, other=0.0)"]
            else:
                lines += [f"acc{j} = tl.zeros([BLOCK], ACC)",
                          "for p0 in range(0, P, BLOCK):",
                          "    po = p0 + tl.arange(0, BLOCK)",
                          f"    acc{j} += tl.load(part{j}_ptr + po, mask=po < P, other=0.0)",
                          f"tot{j} = tl.sum(acc{j}, 0)"]
        loads: dict = {}
        load_lines: list = []
        for st, role, e in self.entries:
            if role not in ("col", "scalar"):
                continue
            names = {sym: f"tot{str(sym)[1:]}" for sym, _, _ in self.crosses}
            if role == "col":
                names[COL] = "cols"
            for node in sorted(e.atoms(sp.Indexed), key=sp.default_sort_key):
                if role != "col" or not all(ix == COL for ix in node.indices):
                    raise LoweringError(f"op {ctx.op.name}: {st.formula}: finishing reads {node}")
                if node not in loads:
                    loads[node] = f"c{len(loads)}"
                    load_lines.append(_load(ctx, sig, node, {COL: "cols"}, loads[node], "cmask"))
                names[node] = loads[node]
            e = _skip_when_param_zero(ctx, e)
            names = sig.names_for(e, names)
            v = pr_rows(ctx, e, names, st.formula, self.maxes())
            ptr = sig.buf(st.target)
            if role == "col":
                stores.append(f"tl.store({ptr} + cols * {sig.stride(st.target, 0)}, {store_value(ptr, v)}, mask=cmask)")
            else:
                scalar_stores.append(f"tl.store({ptr}, {store_value(ptr, v)})")
        sig.extra.append(("P", "n_prog"))
        sig.constexpr.append(("BLOCK", "fblk"))
        src = ctx.env.get_template("finish.j2").render(
            name=fname, args=sig.kernel_args(), acc=sig.acc_lines(), formulas=[f"finish: {s.formula}"[:110] for s, r, _ in self.entries if r in ("col", "scalar")],
            ncol=ncol, scalar_loads=sorted(sig.scalar_loads.values()), lines=lines, loads=load_lines,
            stores=stores, scalar_stores=scalar_stores,
        )
        if col:
            host = [f"fblk = _rt.map_block(n_{self.coldim.name})",
                    f"{sig.launcher(fname)}[(triton.cdiv(n_{self.coldim.name}, fblk),)]({', '.join(sig.host_args())})"]
        else:
            host = ["fblk = _rt.map_block(n_prog)", f"{sig.launcher(fname)}[(1,)]({', '.join(sig.host_args())})"]
        return src, host


def emit_rows(ctx: Context, launch: Launch, kname: str):
    return RowBuilder(ctx, launch, kname).build()


# ---------------------------------------------------------------------------------------------
# SCALE: a fused loss's gradient, its forward buffer scaled in place by the scalar cotangent.


def emit_scale(ctx: Context, launch: Launch, kname: str):
    """``d = cot*d_fused`` over ``d_fused``'s own buffer (see the plan's ``scale`` launches): a
    few programs per SM walk contiguous chunks; the gradient handed out is that buffer."""
    (st,) = launch.statements
    sig = Sig(ctx)
    unit = [a for a in st.expr.atoms(sp.Indexed)]
    if len(unit) != 1 or tuple(unit[0].indices) != tuple(st.indices) or str(unit[0].base) not in ctx.plan.fused.values():
        raise LoweringError(f"op {ctx.op.name}: scale launch {st.formula}: not a fused gradient times its cotangent")
    buf = str(unit[0].base)
    names = sig.names_for(st.expr, {unit[0]: "v", **{ix: "offs" for ix in st.indices}})
    (cot,) = list(sig.scalar_loads)
    value = pr(ctx, st.expr, names, st.formula)
    ptr = sig.buf(buf)
    sig.bufs[buf] = 0  # flat over the contiguous buffer: no strides
    sig.extra += [("n_total", "n_total"), ("CHUNK", "chunk")]
    sig.constexpr += [("BLOCK", "blk"), ("IDX64", "n_total + chunk >= 2**31")]
    src = ctx.env.get_template("scale.j2").render(
        name=kname, args=sig.kernel_args(), acc=sig.acc_lines(), formulas=_formula_lines([st]), target=st.target,
        scalar_loads=sorted(sig.scalar_loads.values()), cot=f"v_{cot}",
        load=f"v = tl.load({ptr} + offs, mask=mask, other=0).to(ACC)",
        store=f"tl.store({ptr} + offs, {store_value(ptr, value)}, mask=mask)",
    )
    host = [
        f"t_{st.target} = _rt.take_fused(OP, saved, {buf!r})",
        f"n_total = t_{st.target}.numel()",
        "blk, n_prog, chunk = _rt.scale_geometry(n_total, device)",
        f"{sig.launcher(kname)}[(n_prog,)]({', '.join(sig.host_args())})",
    ]
    return [src], host, [st.target]
