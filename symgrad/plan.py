"""The kernel plan: an op's derivation, lowered ONCE into launches that every target prints.

    derivation -> [lowering stages] -> KernelPlan -> NumPy printer | Triton emitters

The plan is the single place where statements are classified, temporaries inlined, losses fused,
stencils re-indexed, what backward saves and what it recomputes decided, and statements grouped
into launches. Targets only print it: none re-plans, re-classifies, re-indexes or decides what to
save. Its data types are small:

``Statement``  ``target[indices] = expr`` over named buffers, with its kernel class;
``Launch``     one kernel launch: a kind (``map``, ``rows``, ``gemm``, ``multi``, ``scale``), its
               statements (in order) and its iteration space;
``Kernel``     the launches of forward or of backward, and the names that kernel returns;
``KernelPlan`` both kernels, the saved set, the buffers (name -> dims) and the lowering trace.

Kernel classes (by index structure):

- MAP: every index free (activations, hadamard products, bias add, optimizer updates);
- ROW_REDUCTION: a ``Sum`` or ``ReduceMax`` over an index, broadcast back (softmax, norms, losses,
  bias gradients);
- CONTRACTION: a sum over a product of two tensors that each keep an index the other lacks
  (matmul, linear, batched matmul: a shared batch index is allowed) -> ``einsum``/``tl.dot``;
- STENCIL: a contraction whose indices are affine expressions (conv) -> implicit GEMM.

Launch kinds and their spaces:

- ``map``: statements without reductions over one target shape; ``space`` is that shape's dims;
- ``rows``: row kernels; ``space = (row dims, column dim or None)``: one program per row (a
  coordinate of every row dim), reductions over the column dim are row statistics, sums over all
  row dims are cross-row partials finished by a second kernel;
- ``gemm``: one contraction or stencil statement, with its epilogue; ``space = ()``;
- ``multi``: a multi-tensor map, the one launch of an update rule (``Op.kind == "update"``): its
  statements are maps over the one flat dim of ``space``, run for MANY tensors (the parameters of
  an optimizer's group, each of its own size) in one launch; each statement's result is written
  over the input it updates (``KernelPlan.updates``), in place, in statement order. Any other op
  over per-tensor vectors may have one too, as ``KernelPlan.multi`` beside its forward (a map, or
  a self-combining reduction ``multi_reduce``: :mod:`symgrad.plan_multi`);
- ``scale``: a fused loss's gradient ``d = cotangent*d_fused`` (backward): the buffer forward wrote
  is the op's own and dead after backward, so backward scales it in place and hands it out as the
  gradient (no second buffer; nothing to move when the cotangent is 1); ``space`` is its dims.

Adding a kernel class: classify it in :func:`classify`, give it a launch kind in
:func:`schedule_launches`, and an emitter per target.

The lowering stages run in order, and each records what it decided in the plan's trace (shown by
``symgrad derive OP --steps``): :data:`LOWERING_STAGES`.

Not here, on purpose: how an array target evaluates one statement (the NumPy printer's axis space,
its row-scale and one-hot forms and its common subexpressions, in ``targets/statements.py``). They
decide no launch, no saved value and no index change another target must share: Triton computes a
one-hot as a masked store and leaves common subexpressions to its compiler, and the NumPy axis
space renames bound indices in a way a row kernel must not see.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field, replace

import sympy as sp

from .declare import Dim, Op, Param, Role
from .derive import Derivation
from .functions import Iverson, ReduceMax
from .rewrite import Rule, Stage, Step, Trace, run_stage


class LoweringError(ValueError):
    """The plan cannot lower a statement; names the op, the statement and what is unsupported."""


class KernelClass(enum.Enum):
    MAP = "map"
    ROW_REDUCTION = "row_reduction"
    CONTRACTION = "contraction"
    STENCIL = "stencil"


@dataclass(frozen=True)
class Statement:
    target: str
    indices: tuple[sp.Symbol, ...]
    dims: tuple[Dim, ...]
    expr: sp.Expr
    kind: KernelClass
    fused: bool = False  # a fused-loss gradient that forward writes only when backward will run

    @property
    def formula(self) -> str:
        lhs = f"{self.target}[{', '.join(map(str, self.indices))}]" if self.indices else self.target
        return f"{lhs} = {sp.sstr(self.expr)}"

    @property
    def equation(self) -> sp.Eq:
        lhs = sp.IndexedBase(self.target)[self.indices] if self.indices else sp.Symbol(self.target)
        return sp.Eq(lhs, self.expr, evaluate=False)

    def reads(self) -> set[str]:
        names = {str(a.base) for a in self.expr.atoms(sp.Indexed)}
        return names | {str(s) for s in self.expr.free_symbols if isinstance(s, sp.Symbol)}


@dataclass(frozen=True)
class DimSource:
    """Where generated code reads a dim's size: ``buffer.shape[axis]``, or a formula of others."""

    dim: Dim
    buffer: str | None
    axis: int | None
    formula: sp.Expr | None = None


@dataclass(frozen=True)
class Launch:
    kind: str  # "map" | "rows" | "gemm" | "scale"
    statements: tuple[Statement, ...]
    space: tuple = ()  # map: target dims; rows: (row dims, column dim or None); gemm: ()

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(s.target for s in self.statements)


@dataclass(frozen=True)
class Kernel:
    name: str  # "forward" or "backward"
    launches: tuple[Launch, ...]
    returns: tuple[str, ...]

    @property
    def statements(self) -> tuple[Statement, ...]:
        return tuple(s for launch in self.launches for s in launch.statements)


@dataclass(frozen=True)
class KernelPlan:
    op: Op
    params: tuple[Param, ...]
    inputs: tuple[str, ...]  # declaration order
    differentiable: tuple[str, ...]
    outputs: tuple[str, ...]
    cotangents: tuple[str, ...]  # one per output, in output order
    dims: tuple[DimSource, ...]
    forward: Kernel  # reads inputs and params; returns outputs (and computes what is saved)
    backward: Kernel  # reads saved values and cotangents; one gradient per differentiable input
    saved: tuple[str, ...]  # inputs, then forward values, that backward reads (params always kept)
    recomputed: tuple[str, ...]  # forward values backward computes again instead of saving
    fused: dict  # gradient -> the buffer forward writes it into per unit cotangent (fused losses)
    overwritable: dict  # fused gradient -> the input whose buffer forward may write it into (opt-in)
    buffers: dict  # name -> dims, for every input, forward value, cotangent, gradient, temporary
    labels: frozenset  # integer label inputs
    updates: dict = field(default_factory=dict)  # update rules: output -> the input it is written over
    # the multi-tensor launch (symgrad.plan_multi): an update rule's one launch, an op's flat
    # map ("multi") or self-combining reduction ("multi_reduce", with its Combine); None if none
    multi: Launch | None = None
    combine: object = None
    trace: Trace = field(default_factory=Trace, compare=False)

    @property
    def saved_inputs(self) -> tuple[str, ...]:
        return tuple(n for n in self.saved if n in self.inputs)

    @property
    def saved_values(self) -> tuple[str, ...]:
        return tuple(n for n in self.saved if n not in self.inputs)

    @property
    def leading_inputs(self) -> tuple[str, ...]:
        """Inputs whose first dim takes any number of leading axes (torch's ``[*, D]``)."""
        return tuple(t.name for t in self.op.inputs if t.dims and t.dims[0].leading)

    @property
    def leading_outputs(self) -> tuple[str, ...]:
        """Outputs that start with that dim: the generated modules unfold its axes on them."""
        if not self.leading_inputs:
            return ()
        return tuple(o for o in self.outputs if self.buffers[o] and self.buffers[o][0].leading)

    @property
    def fused_cotangent(self) -> dict:
        return {g: self.cotangents[0] for g in self.fused}


# ------------------------------------------------------------------------------------------------
# classification


def classify(expr: sp.Expr, non_indices=frozenset()) -> KernelClass:
    """The kernel class of ``expr``; ``non_indices`` are the integer symbols that are not indices
    (dims, integer params)."""
    entries = list(expr.atoms(sp.Indexed))
    if any(not (ix.is_Symbol or ix.is_Integer) for e in entries for ix in e.indices if not isinstance(ix, sp.Indexed)):
        return KernelClass.STENCIL
    sums = list(expr.atoms(sp.Sum))
    if not sums and not expr.has(ReduceMax):
        return KernelClass.MAP
    for s in sums:
        if is_contraction(s, non_indices):
            return KernelClass.CONTRACTION
    return KernelClass.ROW_REDUCTION


def operand_groups(s: sp.Sum, non_indices=frozenset()) -> tuple[list, list]:
    """``(groups, coefficient factors)`` of a sum's summand: factors joined by the free indices
    they own (indices that are neither summed nor shared by every tensor entry, as batch
    indices are); a factor that owns none is a coefficient."""
    bound = {lim[0] for lim in s.limits}
    factors = sp.Mul.make_args(s.function)

    def indices(f):
        return {x for x in f.free_symbols if isinstance(x, sp.Symbol) and x.is_integer} - bound - set(non_indices)

    reading = [indices(f) for f in factors if f.atoms(sp.Indexed)]
    common = set.intersection(*reading) if reading else set()

    def own(f):
        return indices(f) - common

    groups: list[list] = []
    coeff = []
    for f in factors:
        mine = own(f)
        if not mine:
            coeff.append(f)
            continue
        hit = [g for g in groups if any(own(h) & mine for h in g)]
        groups = [g for g in groups if g not in hit] + [[f] + [h for g in hit for h in g]]
    return groups, coeff


def is_contraction(s: sp.Sum, non_indices=frozenset()) -> bool:
    """A sum over a product of operands that each own an index the others lack (shared batch
    indices allowed): ``Sum(X[b, k]*W[k, j], k)``, ``Sum(Q[h, t, e]*K[h, s, e], e)``."""
    groups, _ = operand_groups(s, non_indices)
    return len(groups) >= 2 and all(any(isinstance(f, sp.Indexed) or f.atoms(sp.Indexed) for f in g) for g in groups)


def _is_arithmetic(expr: sp.Expr) -> bool:
    """Only + and * of values (rms_norm's y = xhat*w): recomputing is cheaper than saving a tensor.
    Outputs that cost a transcendental call (sigmoid's out) are saved instead."""
    return not expr.atoms(sp.Function) and all(p.exp.is_Integer for p in expr.atoms(sp.Pow))


def _dim_sources(op: Op) -> tuple[DimSource, ...]:
    out = []
    for d in op.dims:
        if d.extent is not None:
            out.append(DimSource(d, None, None, d.extent))
            continue
        for t in op.inputs:
            if d in t.dims:
                out.append(DimSource(d, t.name, t.dims.index(d)))
                break
        else:
            raise LoweringError(f"op {op.name}: dim {d.name} is read from no input")
    return tuple(out)


def dim_of_extent(extent: sp.Expr, dims) -> Dim | None:
    for d in dims:
        if d.size == extent or sp.expand(d.size - extent) == 0:
            return d
    return None


def binders(node: sp.Basic):
    """``(symbol, lo, hi)`` for each index that ``node`` binds (a Sum's limits, a ReduceMax)."""
    if isinstance(node, sp.Sum):
        return [tuple(lim) for lim in node.limits]
    if isinstance(node, ReduceMax):
        return [node.limits]
    return []


# ------------------------------------------------------------------------------------------------
# substitution without capture


class _Freshener:
    """Renames bound indices with a per-op counter, so substituting never captures and
    regenerating one op alone is byte-identical."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def __call__(self, expr: sp.Expr) -> sp.Expr:
        def go(node):
            if isinstance(node, sp.Sum):
                body = go(node.function)
                ren, lims = {}, []
                for k, lo, hi in node.limits:
                    ren[k] = sp.Symbol(f"{k}_f{next(self._n)}", integer=True)
                    lims.append((ren[k], go(lo), go(hi)))
                return sp.Sum(body.xreplace(ren), *lims)
            if isinstance(node, ReduceMax):
                body, k, lo, hi = node.args
                nk = sp.Symbol(f"{k}_f{next(self._n)}", integer=True)
                return ReduceMax(go(body).xreplace({k: nk}), nk, lo, hi)
            if not node.args:
                return node
            new = [go(a) for a in node.args]
            return node.func(*new) if any(a is not b for a, b in zip(new, node.args)) else node

        return go(expr)


def fresh_names() -> _Freshener:
    """A new renamer of bound indices (``k`` -> ``k_f1``, ``k_f2``, ...)."""
    return _Freshener()


def substitute(expr: sp.Expr, st: Statement, fresh: _Freshener) -> sp.Expr:
    """Replace reads of ``st.target`` in ``expr`` by its definition."""
    if not st.indices:
        sym = [s for s in expr.free_symbols if str(s) == st.target]
        return expr.xreplace({s: fresh(st.expr) for s in sym}) if sym else expr

    def rep(node):
        return fresh(st.expr).xreplace(dict(zip(st.indices, node.indices)))

    return expr.replace(lambda n: isinstance(n, sp.Indexed) and str(n.base) == st.target, rep)


# ------------------------------------------------------------------------------------------------
# the lowering state and its stages


@dataclass
class _State:
    op: Op
    derivation: Derivation
    forward: list  # Statement
    backward: list  # Statement
    saved: set  # forward values backward reads from memory
    recomputed: list
    buffers: dict
    outputs: tuple
    returns: tuple
    fused: dict = field(default_factory=dict)
    overwritable: dict = field(default_factory=dict)
    launches: dict = field(default_factory=dict)  # "forward"/"backward" -> [Launch]
    declared: list = field(default_factory=list)  # the forward values as derived, before any stage
    multi: object = None  # Launch | None (plan_multi)
    combine: object = None
    trace: Trace = field(default_factory=Trace)
    fresh: _Freshener = field(default_factory=_Freshener)

    @property
    def dims(self) -> tuple:
        return self.op.dims

    def note(self, stage: str, rule: str, doc: str, before, after) -> None:
        self.trace.steps.append(Step(stage, rule, doc, _show(before), _show(after)))

    def crosses(self, st: Statement) -> bool:
        """Does ``st`` need every row of something (a contraction, a sum over rows)? Such a value
        is materialized: no single row's program can compute it."""
        if st.kind in (KernelClass.CONTRACTION, KernelClass.STENCIL):
            return True
        if not _reductions(st.expr):
            return False
        big, col = row_layout(self, st)
        return any(pos != col for pos in _bound_positions(st.expr, len(big)))


def _show(value) -> sp.Basic:
    if isinstance(value, sp.Basic):
        return value
    if isinstance(value, Statement):
        return value.equation
    return sp.Tuple(*[v.equation if isinstance(v, Statement) else sp.Symbol(str(v)) for v in value])


def choose_saved(s: _State) -> None:
    """A forward value the gradients read is saved when computing it needs a reduction, and
    recomputed in backward when it is a map of saved values (cross-entropy saves the row
    log-sum-exp, not the B x C softmax); an output is recomputed only when it is plain arithmetic,
    or when every tensor it reads is one backward reads anyway (silu's out from x: recomputing the
    sigmoid moves no byte, reading a saved out moves a tensor)."""
    fwd = {st.target: st for st in s.forward}
    need = set().union(*(st.reads() for st in s.backward)) if s.backward else set()
    read_anyway = need & set(s.buffers)
    recompute: list[str] = []
    pending = sorted(need & set(fwd))
    while pending:
        name = pending.pop()
        st = fwd[name]
        free = (st.reads() & set(s.buffers)) <= read_anyway - {name}
        if st.kind is KernelClass.MAP and (name not in s.outputs or _is_arithmetic(st.expr) or free):
            if name not in recompute:
                recompute.append(name)
                pending.extend(sorted((st.reads() & set(fwd)) - s.saved - set(recompute)))
                need |= st.reads()
        else:
            s.saved.add(name)
    order = list(fwd)
    recompute.sort(key=order.index)
    s.recomputed = recompute
    s.backward = [fwd[n] for n in recompute] + s.backward
    # Forward computes only what outputs and saved values need.
    want = set(s.outputs) | s.saved
    for name in reversed(order):
        if name in want:
            want |= fwd[name].reads() & set(fwd)
    s.forward = [fwd[n] for n in order if n in want]
    if s.saved:
        s.note("choose saved", "save", "saved: computing it needs a reduction (or it is an output worth a transcendental call)",
               sorted(need & set(fwd)), [n for n in order if n in s.saved])
    if recompute:
        s.note("choose saved", "recompute", "recomputed in backward: a map of saved values, cheaper than a tensor in memory",
               sorted(need & set(fwd)), recompute)


def inline_temporaries(s: _State) -> None:
    """A value that is neither handed out nor saved is substituted into the statements that read
    it (computed in registers where it is used), unless it needs every row (a contraction, a sum
    over rows): such a value is materialized."""
    s.forward = _inline(s, s.forward, set(s.outputs) | s.saved)
    s.backward = _inline(s, s.backward, set(s.returns))
    # Recomputation may have re-materialized a forward value that is saved: read the saved copy.
    s.backward = [st for st in s.backward if st.target in s.returns or st.target not in s.saved]


def _inline(s: _State, stmts: list, keep: set) -> list:
    out: list = []
    for st in stmts:
        expr = st.expr
        # A contraction reads its operands as tiles from memory: a temporary it reads stays one.
        holds_contraction = any(is_contraction(x, _non_indices(s)) for x in st.expr.atoms(sp.Sum))
        for prev in out:
            if prev.target in st.reads() and prev.target not in keep and not s.crosses(prev) and not holds_contraction:
                expr = substitute(expr, prev, s.fresh)
        new = replace(st, expr=expr, kind=classify(expr, _non_indices(s)))
        if expr != st.expr:
            s.note("inline temporaries", "inline", "a temporary read by one launch is computed where it is used", st, new)
        out.append(new)
    # Drop what is no longer read (a temporary inlined everywhere), until nothing changes.
    while True:
        needed = set(keep).union(*(st.reads() for st in out))
        kept = [st for st in out if st.target in needed]
        if len(kept) == len(out):
            return out
        out = kept


def fuse_losses(s: _State) -> None:
    """When the op's one output is a scalar loss and each gradient is ``dloss * G`` with ``G`` a
    map of forward values, forward writes ``G`` in the pass that computes the loss (Liger-style)
    and backward only scales it: the logits are read once for loss and gradient. A per-row loss
    (``loss[b]``, reduction='none') fuses the same way, backward scaling row b by ``dloss[b]``."""
    if len(s.outputs) != 1:
        return
    cot = s.derivation.cotangents[s.outputs[0]]
    row_scaled = bool(s.buffers[s.outputs[0]])  # a per-row loss (reduction='none'): dx[b, i] = dloss[b]*G[b, i]
    units, scales = {}, {}
    for st in s.backward:
        if st.kind is not KernelClass.MAP or st.expr.has(sp.Sum, ReduceMax):
            return
        if row_scaled:
            entries = {a for a in st.expr.atoms(sp.Indexed) if str(a.base) == cot}
            # only a cotangent over fewer axes than the gradient: an elementwise op's own
            # cotangent (relu's dout[b, i]) gains nothing from a buffer written in forward
            if len(entries) != 1 or not set(next(iter(entries)).indices) < set(st.indices):
                return
            csym = next(iter(entries))
        else:
            csym = sp.Symbol(cot, real=True)
        g = sp.diff(st.expr, csym)
        if g.has(csym) or st.expr.subs(csym, 0) != 0 or sp.expand(st.expr - csym * g) != 0:
            return
        if row_scaled and not g.atoms(sp.Indexed):
            return  # a gradient that reads no tensor (a row mean's 1/C) is cheaper than a buffer of it
        units[st.target], scales[st.target] = g, csym
    if not units:
        return
    new_fwd = list(s.forward)
    new_bwd = []
    for st in s.backward:
        name = f"{st.target}_fused"
        s.fused[st.target] = name
        new_fwd.append(Statement(name, st.indices, st.dims, units[st.target], KernelClass.MAP, fused=True))
        s.buffers[name] = st.dims
        unit = sp.IndexedBase(name, real=True)[st.indices] if st.indices else sp.Symbol(name, real=True)
        new_bwd.append(Statement(st.target, st.indices, st.dims, scales[st.target] * unit, KernelClass.MAP))
        s.note("fuse losses", "fuse_loss", "forward writes the gradient per unit cotangent; backward scales it", st, new_bwd[-1])
    # The fused gradients replace what backward read: forward recomputes its temporaries.
    fwd_defs = {st.target: st for st in s.declared}
    keep = set(s.outputs) | set(s.fused.values())
    s.forward = [replace(st, fused=st.target in s.fused.values()) for st in _inline(s, _forward_closure(new_fwd, fwd_defs), keep)]
    s.backward = new_bwd
    s.saved = set(s.fused.values())
    s.recomputed = []


def _forward_closure(stmts: list, defs: dict) -> list:
    """``stmts`` preceded by every forward value they read (in declaration order)."""
    names = {st.target for st in stmts}
    want = set().union(*(st.reads() for st in stmts)) & set(defs)
    changed = True
    while changed:
        changed = False
        for n in list(want):
            extra = (defs[n].reads() & set(defs)) - want
            if extra:
                want |= extra
                changed = True
    return [defs[n] for n in defs if n in want and n not in names] + stmts


def share_row_statistics(s: _State) -> None:
    """A row statistic (a max or sum over a row) that several statements of one kernel compute is
    computed once, as a value of its own, and read by each: the fused cross-entropy's loss and
    gradient share the row max and the row sum of exp(x - max), so x - max stays exact and the
    row is exponentiated once."""
    for side in ("forward", "backward"):
        for _ in range(8):  # innermost statistics first; those that read them on the next round
            stmts = getattr(s, side)
            seen: dict = {}  # canonical form -> [(statement index, node, ranges)]
            for n, st in enumerate(stmts):
                for node, ranges in _row_statistics(s, st):
                    seen.setdefault(_canonical(node, st), []).append((n, node, ranges))
            shared = [hits for hits in seen.values() if len({n for n, _, _ in hits}) > 1]
            if not shared:
                break
            setattr(s, side, _share(s, stmts, shared))


def _share(s: _State, stmts: list, shared: list) -> list:
    out: list = []
    made: dict = {}  # id of the hits list -> the statistic's statement
    for n, st in enumerate(stmts):
        expr = st.expr
        for k, hits in enumerate(shared):
            for m, node, ranges in hits:
                if m != n or not expr.has(node):
                    continue
                idx = tuple(sorted(node.free_symbols & _index_symbols(st), key=lambda x: _order(st, x)))
                if k not in made:
                    kind = "max" if isinstance(node, ReduceMax) else "sum"
                    name = next(f"row_{kind}{j}" for j in itertools.count() if f"row_{kind}{j}" not in s.buffers)
                    dims = tuple(_index_dim(s, st, x, ranges) for x in idx)
                    made[k] = Statement(name, idx, dims, node, classify(node, _non_indices(s)))
                    s.buffers[name] = dims
                    out.append(made[k])
                    s.note("share row statistics", "share_statistic", "a row statistic several statements compute is computed once", made[k], name)
                read = sp.IndexedBase(made[k].target, real=True)[idx] if idx else sp.Symbol(made[k].target, real=True)
                expr = expr.xreplace({node: read})
        out.append(replace(st, expr=expr, kind=classify(expr, _non_indices(s))) if expr != st.expr else st)
    return out


def _index_symbols(st: Statement) -> set:
    return set(st.indices) | {v for n in _reductions(st.expr) for v, _, _ in binders(n)}


def _row_statistics(s: _State, st: Statement):
    """``(node, ranges)`` for each innermost max or sum of ``st`` that runs along a row (not across
    rows, not a contraction), with the ranges of the indices bound around it."""
    out = []

    def visit(node, ranges):
        if not isinstance(node, sp.Basic) or node.is_Atom or isinstance(node, sp.Indexed):
            return
        inner = {**ranges, **{v: (lo, hi) for v, lo, hi in binders(node)}}
        for a in node.args:
            visit(a, inner)
        if binders(node) and not any(_reductions(a) for a in node.args[:1]) and not (isinstance(node, sp.Sum) and is_contraction(node, _non_indices(s))):
            out.append((node, ranges))

    visit(st.expr, {})
    return out


def _canonical(node: sp.Basic, st: Statement) -> sp.Basic:
    """``node`` with its bound and free indices renamed in order of appearance: two statements'
    copies of one statistic compare equal."""
    names = {}
    symbols = _index_symbols(st) | {v for v, _, _ in binders(node)}
    for x in sp.preorder_traversal(node):
        if isinstance(x, sp.Symbol) and x in symbols and x not in names:
            names[x] = sp.Symbol(f"_c{len(names)}", integer=True)
    return node.xreplace(names)


def split_reductions(s: _State) -> None:
    """A statement that holds a contraction or a sum over rows beside other work is split: the
    inner value becomes a temporary of its own launch (attention's ``dQ = Sum_s dS*K`` reads
    ``dS``, itself a row reduction of ``Sum_e dO*V``), so each launch is one kernel class."""
    for side in ("forward", "backward"):
        out: list = []
        for st in getattr(s, side):
            out += _split(s, st)
        setattr(s, side, out)


def _split(s: _State, st: Statement) -> list:
    """``st`` preceded by the temporaries hoisted out of it (see :func:`split_reductions`)."""
    hoisted: list = []
    counter = itertools.count()
    index_syms = set(st.indices) | {v for n in _reductions(st.expr) for v, _, _ in binders(n)}

    def materialize(node, ranges: dict) -> sp.Expr:
        idx = tuple(sorted(node.free_symbols & index_syms, key=lambda x: _order(st, x)))
        dims = tuple(_index_dim(s, st, x, ranges) for x in idx)
        name = f"{st.target}_t{next(counter)}"
        inner = Statement(name, idx, dims, node, classify(node, _non_indices(s)))
        s.buffers[name] = dims
        hoisted.extend(_split(s, inner))
        s.note("split reductions", "hoist", "a contraction (or a contraction's operand) becomes a value of its own launch", inner, name)
        return sp.IndexedBase(name, real=True)[idx] if idx else sp.Symbol(name, real=True)

    only_one = len(_reductions(st.expr)) == 1

    def visit(node, ranges: dict):
        if not isinstance(node, sp.Basic) or node.is_Atom or isinstance(node, sp.Indexed):
            return node
        inner_ranges = {**ranges, **{v: (lo, hi) for v, lo, hi in binders(node)}}
        args = [visit(a, inner_ranges) for a in node.args]
        if any(a is not b for a, b in zip(args, node.args)):
            node = node.func(*args)
        if isinstance(node, sp.Sum):
            split = _split_terms(node, _non_indices(s))
            if split is not node:
                return visit(split, ranges)
        if isinstance(node, sp.Sum) and len(node.limits) > 1:
            factored = _factor_sum(node)
            if factored is not node:
                return visit(factored, ranges)
        if isinstance(node, sp.Sum) and is_contraction(node, _non_indices(s)):
            node = _tensor_operands(s, st, node, lambda e: materialize(e, inner_ranges))
            if not only_one:
                return materialize(node, ranges)
        return node

    expr = visit(st.expr, {})
    if not hoisted:
        return [st]
    return hoisted + [replace(st, expr=expr, kind=classify(expr, _non_indices(s)))]


def _split_terms(node: sp.Sum, non_indices) -> sp.Expr:
    """``Sum(a*(f + g), k)`` as ``Sum(a*f, k) + Sum(a*g, k)`` when a term is a contraction
    (``Sum((V[t, j] - O[k, j])*dO[k, j], j)``: a GEMM and a row statistic, not one odd sum)."""
    body = sp.expand(node.function, deep=False, mul=True, multinomial=False, power_exp=False, power_base=False, log=False)
    if not body.is_Add:
        return node
    terms = [sp.Sum(t, *node.limits) for t in body.args]
    if not any(is_contraction(t, non_indices) for t in terms):
        return node
    return sp.Add(*terms)


def _factor_sum(node: sp.Sum) -> sp.Sum:
    """``Sum(f(k)*g(k, j)*h(j), k, j)`` as ``Sum(f(k)*Sum(g(k, j)*h(j), j), k)``: a summed index
    that only some factors read is summed over those factors first (the einsum order a person
    picks), so each sum is a contraction of two operands."""
    factors = sp.Mul.make_args(node.function)
    options = []
    for n, (j, lo, hi) in enumerate(node.limits):
        readers = [f for f in factors if j in f.free_symbols]
        if len(readers) < len(factors):
            options.append((len(readers), n, readers))
    if not options:
        return node
    _, n, readers = min(options, key=lambda o: (o[0], o[1]))  # the index fewest factors read
    j, lo, hi = node.limits[n]
    rest = [f for f in factors if f not in readers]
    inner = sp.Sum(sp.Mul(*readers), (j, lo, hi))
    others = [lim for m, lim in enumerate(node.limits) if m != n]
    return sp.Sum(sp.Mul(*rest) * inner, *others)


def _order(st: Statement, x) -> tuple:
    """Temporaries list their indices in the statement's order, then bound indices by name."""
    return (0, st.indices.index(x), "") if x in st.indices else (1, 0, str(x))


def _tensor_operands(s: _State, st: Statement, node: sp.Sum, materialize) -> sp.Sum:
    """``Sum(f*g*..., k)`` as a product of two tensor operands (a GEMM reads two tiles): factors
    are grouped by the free indices they share; a group that is not one tensor entry is
    materialized. Factors that read no free index stay as the summand's coefficient."""
    bound = {v for v, _, _ in node.limits}
    groups, coeff = operand_groups(node, _non_indices(s))
    if len(groups) != 2:
        raise LoweringError(f"op {s.op.name}: statement {st.formula}: the contraction {node} is not a product of two operands")
    if all(len(g) == 1 and isinstance(g[0], sp.Indexed) for g in groups) and not any(f.free_symbols & bound for f in coeff):
        return node
    # Coefficients that read a bound index go with the first operand.
    movable = [f for f in coeff if f.free_symbols & bound]
    coeff = [f for f in coeff if f not in movable]
    operands = []
    for n, g in enumerate(groups):
        g = g + (movable if n == 0 else [])
        # A reduction beside other factors is a value of its own (a row statistic), so the
        # operand is a map of it: attention's p[t, s]*Sum_e O[t, e]*dO[t, e].
        g = [materialize(f) if len(g) > 1 and _reductions(f) else f for f in g]
        operands.append(g[0] if len(g) == 1 and isinstance(g[0], sp.Indexed) else materialize(sp.Mul(*g)))
    return sp.Sum(sp.Mul(*coeff, *operands), *node.limits)


def _non_indices(s: _State) -> set:
    """Integer symbols that are not indices: dims and integer params."""
    return {d.symbol for d in s.op.dims} | {p.symbol for p in s.op.params}


def _index_dim(s: _State, st: Statement, ix, ranges: dict) -> Dim:
    """The dim an index ranges over: the statement's own, or the bound range it is summed over."""
    if ix in st.indices:
        return st.dims[st.indices.index(ix)]
    lo, hi = ranges.get(ix, (None, None))
    d = dim_of_extent(hi - lo + 1, s.dims) if lo is not None else None
    if d is None or lo != 0:
        raise LoweringError(f"op {s.op.name}: statement {st.formula}: index {ix} ranges over no dim")
    return d


def reindex_stencils(s: _State) -> None:
    """A bound index read at a strided position ``a*j + rest`` (``a`` a stride, not +-1: the
    gradient of a strided convolution) is replaced by the position itself, which runs over the read
    tensor's extent; the stride becomes a divisibility guard. One policy for every target."""
    for side in ("forward", "backward"):
        out = []
        for st in getattr(s, side):
            if st.kind is KernelClass.STENCIL:
                ctx = _StencilContext(s, st)
                expr = run_stage(st.expr, REINDEX, ctx, None)
                if expr != st.expr:
                    s.note("re-index stencils", "reindex_strided", reindex_stencils.__doc__.split(";")[0], st, sp.Eq(st.equation.lhs, expr, evaluate=False))
                    st = replace(st, expr=expr)
            out.append(st)
        setattr(s, side, out)


@dataclass
class _StencilContext:
    state: _State
    statement: Statement

    @property
    def tensors(self) -> dict:
        return self.state.buffers

    def fresh_index(self, dim: Dim) -> sp.Symbol:
        taken = {str(x) for x in self.statement.expr.free_symbols} | {str(v) for n in sp.preorder_traversal(self.statement.expr) for v, _, _ in binders(n)}
        taken |= {str(i) for i in self.statement.indices}
        for n in itertools.chain([""], itertools.count(2)):
            name = f"{dim.index}{n}_v"
            if name not in taken:
                return sp.Symbol(name, integer=True)
        raise AssertionError


def _reindex_rule(node, ctx: _StencilContext):
    if not isinstance(node, sp.Sum):
        return None
    factors = list(sp.Mul.make_args(node.function))
    limits = list(node.limits)
    ranges = {j: (lo, hi) for j, lo, hi in limits}
    for li, (j, lo, hi) in enumerate(limits):
        found = _strided_read(factors, j, ctx.tensors, ranges)
        if found is not None:
            break
    else:
        return None
    fi, pos, a = found
    entry = factors[fi]
    dim = ctx.tensors[str(entry.base)][pos]
    r = ctx.fresh_index(dim)
    rest = sp.expand(entry.indices[pos] - a * j)
    num, den = (rest - r, -a) if a.could_extract_minus_sign() else (r - rest, a)
    q = sp.floor(num / den)  # the old index, where the guard below holds
    guards = [Iverson(sp.Eq(sp.Mod(num, den), 0))]
    if not _covered(factors, fi, j, lo, hi, ctx.tensors):
        guards.append(Iverson(sp.And(sp.Le(lo, q), sp.Le(q, hi))))
    new_entry = entry.base[tuple(r if p == pos else ix for p, ix in enumerate(entry.indices))]
    others = [f.xreplace({j: q}) for k, f in enumerate(factors) if k != fi]
    limits[li] = (r, sp.Integer(0), dim.size - 1)
    return sp.Sum(sp.Mul(*guards, new_entry, *others), *limits)


def _strided_read(factors, j, tensors, ranges):
    """(factor index, position, coefficient) of a tensor factor read at ``a*j + rest`` with the
    coefficient ``a`` (a stride: numbers, params) not +-1 and negative (a transposed read: conv dX
    reads the filter at ``h + pad - stride*j``), and ``j`` in no other position."""
    for fi, f in enumerate(factors):
        if not isinstance(f, sp.Indexed) or str(f.base) not in tensors:
            continue
        hits = [p for p, ix in enumerate(f.indices) if j in ix.free_symbols]
        if len(hits) != 1:
            continue
        e = sp.expand(f.indices[hits[0]])
        a = sp.expand(sp.diff(e, j))
        if a.is_zero or a in (sp.Integer(1), sp.Integer(-1)) or a.free_symbols & (set(ranges) | {j}):
            continue
        if sp.expand(e - a * j).has(j):  # not linear in j
            continue
        if not a.could_extract_minus_sign():
            # +stride*j is the forward's own read (conv dW reads X there: a zero-padded gather);
            # re-indexed, the padding's zeros would meet every entry of X, inf and NaN included
            continue
        return fi, hits[0], a
    return None


def _covered(factors, skip, j, lo, hi, tensors) -> bool:
    """Does another factor read ``j`` plainly at a position whose extent is exactly [lo, hi]?"""
    if lo != 0:
        return False
    for k, f in enumerate(factors):
        if k == skip or not isinstance(f, sp.Indexed) or str(f.base) not in tensors:
            continue
        for p, ix in enumerate(f.indices):
            if ix == j and sp.expand(tensors[str(f.base)][p].size - (hi + 1)) == 0:
                return True
    return False


REINDEX = Stage("re-index stencils", (Rule("reindex_strided", reindex_stencils.__doc__, _reindex_rule),), max_passes=8)


def schedule_launches(s: _State) -> None:
    """Statements are grouped into launches: each contraction or stencil alone (a GEMM with its
    epilogue); reductions and maps sharing a row space in one row kernel; pure maps of one shape
    in one flat map kernel. A statement waits for a later launch only when it reads a value that
    needs every row; levels are assigned as late as possible, so row statistics are computed in
    the launch that consumes them."""
    if s.op.kind == "update":
        _schedule_update(s)
        return
    for side in ("forward", "backward"):
        stmts = getattr(s, side)
        # in place over forward's buffer when the cotangent is one number; a per-row loss's
        # (reduction='none': dloss[b]*G[b, i]) runs as an ordinary map into a new buffer
        scaled = [st for st in stmts if side == "backward" and st.target in s.fused and len(st.expr.atoms(sp.Indexed)) == 1]
        launches = [Launch("scale", (st,), st.dims) for st in scaled] + _launches(s, [st for st in stmts if st not in scaled])
        s.launches[side] = launches
        for launch in launches:
            s.note("schedule launches", f"launch_{launch.kind}", f"one {launch.kind} launch over {_space_text(launch)}",
                   list(launch.statements), list(launch.targets))


def _schedule_update(s: _State) -> None:
    """An update rule is one multi-tensor map: every statement a map over the rule's one dim (any
    reduction would need a whole tensor, which a launch over many tensors' blocks does not see)."""
    dims = {st.dims for st in s.forward}
    bad = [st for st in s.forward if st.kind is not KernelClass.MAP]
    if bad or len(dims) != 1 or len(next(iter(dims))) != 1:
        what = f"{bad[0].target} is a {bad[0].kind.value}" if bad else "its outputs are not all over one dim"
        raise LoweringError(f"op {s.op.name}: an update rule lowers to one multi-tensor map over one flat dim; {what}")
    launch = Launch("multi", tuple(s.forward), next(iter(dims)))
    s.launches["forward"], s.launches["backward"] = [launch], []
    s.note("schedule launches", "launch_multi",
           "one multi-tensor map launch: each block reads p, g and the state of one of many tensors once and writes "
           "the results over them in place", list(launch.statements),
           [f"{st.target} -> {s.op.updates.get(st.target, st.target)}" for st in launch.statements])


def _space_text(launch: Launch) -> str:
    if launch.kind == "rows":
        rows, col = launch.space
        return f"rows ({', '.join(d.name for d in rows)})" + (f" x columns {col.name}" if col else "")
    if launch.kind in ("map", "multi"):
        return f"({', '.join(d.name for d in launch.space)})"
    return "a tiled product"


def _launches(s: _State, stmts: list) -> list:
    if not stmts:
        return []
    names = [st.target for st in stmts]
    by = {st.target: st for st in stmts}

    def gemm(st):
        return st.kind in (KernelClass.CONTRACTION, KernelClass.STENCIL)

    def edges(q: Statement):
        for p_name in names[: names.index(q.target)]:
            if p_name in q.reads():
                p = by[p_name]
                yield p, (s.crosses(p) or gemm(q))

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
        group = [st for st in stmts if level[st.target] == lv]
        rows: dict = {}
        maps: dict = {}

        def pure(st):
            return not st.expr.has(sp.Sum, ReduceMax)

        all_map = all(pure(st) for st in group if not gemm(st))
        for st in group:
            if gemm(st):
                launches.append(Launch("gemm", (st,)))
                continue
            if pure(st) and (all_map or len(st.dims) > 2 or _reads_rank(s, st) > 2):
                maps.setdefault(st.dims, []).append(st)
                continue
            space = row_space(s, st)
            for key in list(rows):
                merged = _merge(key, space)
                if merged is not None:
                    rows[merged] = rows.pop(key) + [st]
                    break
            else:
                rows[space] = [st]
        level_launches = [Launch("map", tuple(ss), d) for d, ss in maps.items()]
        level_launches += [Launch("rows", tuple(ss), space) for space, ss in rows.items()]
        launches += _dependency_order(level_launches)
    return launches


def _dependency_order(launches: list) -> list:
    """Launches of one level, each after the launches whose values it reads (stable otherwise)."""
    out: list = []
    pending = list(launches)
    while pending:
        made = {t for launch in pending for t in launch.targets}
        for launch in pending:
            reads = set().union(*(st.reads() for st in launch.statements))
            if not (reads & made) - set(launch.targets):
                out.append(launch)
                pending.remove(launch)
                break
        else:
            out += pending  # a cycle cannot arise from statements in order; keep them as they are
            break
    return out


def _reads_rank(s: _State, st: Statement) -> int:
    return max((len(s.buffers.get(str(a.base), ())) for a in st.expr.atoms(sp.Indexed)), default=0)


def _merge(a: tuple, b: tuple):
    if a[0] != b[0]:
        return None
    if a[1] is None or b[1] is None or a[1] == b[1]:
        return (a[0], a[1] or b[1])
    return None


def _reductions(expr) -> list:
    return [n for n in sp.preorder_traversal(expr) if binders(n)]


def _bound_positions(expr, rank: int) -> set:
    """Axes of the rank-``rank`` tensors at which ``expr``'s reductions read their bound index."""
    bound = {v for n in _reductions(expr) for v, _, _ in binders(n)}
    out = set()
    for e in expr.atoms(sp.Indexed):
        if len(e.indices) == rank:
            out |= {p for p, ix in enumerate(e.indices) if ix in bound}
    return out


def _read_space(s: _State, entry: sp.Indexed) -> tuple:
    """The dims a read ranges over: its tensor's, except for a gather by labels (``weight[y[b]]``,
    a class weight per row), which ranges over the labels' dims."""
    if entry.indices and all(isinstance(ix, sp.Indexed) and str(ix.base) in s.buffers for ix in entry.indices):
        return tuple(s.buffers[str(entry.indices[0].base)])
    return tuple(s.buffers[str(entry.base)])


def row_layout(s: _State, st: Statement) -> tuple:
    """``(dims of the largest tensor st touches, position of its column or None)``: the column is
    the axis reduced inside a row: the last axis, or the one other axis that the reductions read
    their bound index at while the statement keeps every other axis (softmax over a middle dim)."""
    shapes = [_read_space(s, a) for a in st.expr.atoms(sp.Indexed) if str(a.base) in s.buffers] + [tuple(st.dims)]
    shapes = [d for d in shapes if d]
    if not shapes:
        return ((), None)
    big = max(shapes, key=len)
    for shape in shapes:
        if any(d not in big for d in shape):
            raise LoweringError(f"op {s.op.name}: ROW_REDUCTION statement {st.formula}: mixes the spaces ({', '.join(d.name for d in big)}) and ({', '.join(d.name for d in shape)})")
    if len(big) == 1:
        return (big, None)
    reduced = _bound_positions(st.expr, len(big))
    inner = sorted(p for p in reduced if p != len(big) - 1)
    # A sum over every leading axis (a bias gradient) is a cross-row partial along the last axis;
    # one over a single axis among several leading ones, the rest kept, is that axis's row reduction.
    if len(inner) == 1 and len(reduced) == 1 and len(big) > 2 and len(st.dims) >= len(big) - 1:
        return (big, inner[0])
    return (big, len(big) - 1)


def row_space(s: _State, st: Statement) -> tuple:
    """``(row dims, column dim or None)`` of a row statement (see :func:`row_layout`)."""
    big, col = row_layout(s, st)
    if not big:
        raise LoweringError(f"op {s.op.name}: ROW_REDUCTION statement {st.formula}: touches no tensor")
    if col is None:
        return (big, None)
    return (big[:col] + big[col + 1:], big[col])


def overwritable_inputs(s: _State) -> None:
    """A fused gradient may be written into its input's own buffer (an opt-in for callers whose
    input is a dead intermediate, such as logits) when no program can read an entry of the input
    after another (or itself) has overwritten it: the launch writing the gradient is the last to
    read the input, and each of its reads is at the program's own row (a row kernel: loaded before
    the row's gradient block is stored) or, in a map, at the element it writes."""
    launches = s.launches.get("forward", [])
    for grad, name in s.fused.items():
        inp = grad[1:]
        at = [n for n, launch in enumerate(launches) if name in launch.targets]
        if not at or s.buffers.get(inp) != s.buffers[name]:
            continue
        launch = launches[at[0]]
        if any(inp in st.reads() for later in launches[at[0] + 1:] for st in later.statements):
            continue
        if all(_own_reads(s, launch, st, inp) for st in launch.statements):
            s.overwritable[grad] = inp
            s.note("overwritable inputs", "overwrite_input", overwritable_inputs.__doc__.split(":")[0], [name], [inp])


def _own_reads(s: _State, launch: Launch, st: Statement, inp: str) -> bool:
    reads = [a for a in st.expr.atoms(sp.Indexed) if str(a.base) == inp]
    if launch.kind == "map":
        return all(tuple(a.indices) == tuple(st.indices) for a in reads)
    if launch.kind != "rows" or launch.space[1] is None:
        return not reads
    rows, col = launch.space
    dims = s.buffers[inp]
    for a in reads:
        for d, ix in zip(dims, a.indices):
            plain = isinstance(ix, sp.Symbol)
            # a row-level gather (x[b, y[b]]) is loaded at the top of the row, before any store
            gather = d == col and isinstance(ix, sp.Indexed) and all(isinstance(j, sp.Symbol) for j in ix.indices)
            if not (plain or gather):
                return False
    return True


from .plan_multi import schedule_multi  # noqa: E402  (it builds this module's Launch and Statement)

LOWERING_STAGES = (choose_saved, inline_temporaries, fuse_losses, share_row_statistics, split_reductions, reindex_stencils,
                   schedule_launches, schedule_multi, overwritable_inputs)


def lower(derivation: Derivation) -> KernelPlan:
    """Run the lowering stages on ``derivation``; raises :class:`LoweringError` naming the op and
    statement when something cannot be planned."""
    op = derivation.op
    fwd = derivation.forward
    non_idx = {d.symbol for d in op.dims} | {p.symbol for p in op.params}
    forward = [Statement(name, q.indices, q.dims, q.expr, classify(q.expr, non_idx)) for name, q in fwd.items()]
    grads = [
        Statement(f"d{g.input}", g.indices, op.tensor(g.input).dims, g.expr, classify(g.expr, non_idx))
        for g in derivation.gradients.values()
    ]
    buffers = {t.name: t.dims for t in op.inputs}
    buffers.update({name: q.dims for name, q in fwd.items()})
    buffers.update({derivation.cotangents[o.name]: o.dims for o in op.outputs})
    buffers.update({st.target: st.dims for st in grads})
    outputs = tuple(o.name for o in op.outputs)
    state = _State(op, derivation, forward, grads, set(), [], buffers, outputs, tuple(st.target for st in grads))
    state.declared = list(forward)
    for stage in LOWERING_STAGES:
        stage(state)
    inputs = tuple(t.name for t in op.inputs)
    backward_reads = set().union(*(st.reads() for st in state.backward)) if state.backward else set()
    order = [st.target for st in state.forward]
    saved = tuple(t for t in inputs if t in backward_reads) + tuple(n for n in order if n in state.saved)
    return KernelPlan(
        op=op,
        params=op.params,
        inputs=inputs,
        differentiable=tuple(t.name for t in op.inputs if t.role is Role.DIFF),
        outputs=outputs,
        cotangents=tuple(derivation.cotangents[o] for o in outputs),
        dims=_dim_sources(op),
        forward=Kernel("forward", tuple(state.launches["forward"]), outputs),
        backward=Kernel("backward", tuple(state.launches["backward"]), state.returns),
        saved=saved,
        recomputed=tuple(state.recomputed),
        fused=dict(state.fused),
        overwritable=dict(state.overwritable),
        buffers=dict(state.buffers),
        labels=frozenset(t.name for t in op.inputs if t.role is Role.LABEL),
        updates=op.updates,
        multi=state.multi,
        combine=state.combine,
        trace=state.trace,
    )
