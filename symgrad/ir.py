"""The target-neutral kernel IR: what every code generator (NumPy, Triton) lowers from.

A ``Program`` holds an op's forward and backward as ordered ``Statement``s, each
``target[indices] = expr`` over named buffers, classified by index structure:

- MAP: every index free (activations, hadamard products, bias add, optimizer updates);
- ROW_REDUCTION: a ``Sum`` or ``ReduceMax`` over an index, broadcast back (softmax, norms, losses,
  bias gradients);
- CONTRACTION: a sum over a product of two tensors that each keep an index the other lacks
  (matmul, linear) -> ``@``/``einsum``/``tl.dot``;
- STENCIL: a contraction whose indices are affine expressions (conv) -> implicit GEMM.

Backward reads forward values through ``saved``: a forward value the gradients read is saved
when it needs a reduction to compute, and recomputed in backward when it is a map of saved
values (softmax_cross_entropy saves the row's log-sum-exp, not the B x C softmax). An output is
recomputed only when it is plain arithmetic of other values; one that costs a transcendental
call (sigmoid's) is saved.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import sympy as sp

from .declare import Dim, Op, Output, Param, Role
from .derive import Derivation
from .functions import ReduceMax


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

    @property
    def formula(self) -> str:
        lhs = f"{self.target}[{', '.join(map(str, self.indices))}]" if self.indices else self.target
        return f"{lhs} = {sp.sstr(self.expr)}"

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
class Kernel:
    name: str  # "forward" or "backward"
    statements: tuple[Statement, ...]
    returns: tuple[str, ...]


@dataclass(frozen=True)
class Program:
    op: Op
    params: tuple[Param, ...]
    inputs: tuple[str, ...]  # declaration order
    differentiable: tuple[str, ...]
    outputs: tuple[str, ...]
    cotangents: tuple[str, ...]  # one per output, in output order
    dims: tuple[DimSource, ...]
    forward: Kernel  # reads inputs and params; returns outputs
    backward: Kernel  # reads saved and cotangents; returns one gradient per differentiable input
    saved: tuple[str, ...]  # inputs and forward values that backward reads (params are always kept)
    buffers: dict  # name -> dims, for every input, forward value, cotangent and gradient


def classify(expr: sp.Expr) -> KernelClass:
    entries = list(expr.atoms(sp.Indexed))
    if any(not (ix.is_Symbol or ix.is_Integer) for e in entries for ix in e.indices if not _is_label_index(ix)):
        return KernelClass.STENCIL
    sums = list(expr.atoms(sp.Sum))
    if not sums and not expr.has(ReduceMax):
        return KernelClass.MAP
    for s in sums:
        bound = {lim[0] for lim in s.limits}
        tensors = [f for f in sp.Mul.make_args(s.function) if isinstance(f, sp.Indexed)]
        if len(tensors) >= 2:
            own = [set(t.indices) - bound for t in tensors]
            if all(own) and all(own[a] - own[b] for a in range(len(own)) for b in range(len(own)) if a != b):
                return KernelClass.CONTRACTION
    return KernelClass.ROW_REDUCTION


def _is_arithmetic(expr: sp.Expr) -> bool:
    """Only + and * of values (rms_norm's y = xhat*w): recomputing is cheaper than saving a tensor.
    Outputs that cost a transcendental call (sigmoid's out) are saved instead."""
    return not expr.atoms(sp.Function) and all(p.exp.is_Integer for p in expr.atoms(sp.Pow))


def _is_label_index(ix) -> bool:
    return isinstance(ix, sp.Indexed)


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
            raise ValueError(f"op {op.name}: dim {d.name} is read from no input")
    return tuple(out)


def lower(derivation: Derivation) -> Program:
    op = derivation.op
    fwd: dict[str, Output] = derivation.forward
    statements = {name: Statement(name, q.indices, q.dims, q.expr, classify(q.expr)) for name, q in fwd.items()}
    outputs = tuple(o.name for o in op.outputs)
    inputs = tuple(t.name for t in op.inputs)

    # What backward reads; maps of other values are recomputed rather than saved.
    grads = [
        Statement(f"d{g.input}", g.indices, op.tensor(g.input).dims, g.expr, classify(g.expr))
        for g in derivation.gradients.values()
    ]
    need = set().union(*(s.reads() for s in grads)) if grads else set()
    recompute: list[str] = []
    saved: set[str] = set()
    pending = sorted(need & set(fwd))
    while pending:
        name = pending.pop()
        st = statements[name]
        if st.kind is KernelClass.MAP and (name not in outputs or _is_arithmetic(st.expr)):
            if name not in recompute:
                recompute.append(name)
                pending.extend(sorted((st.reads() & set(fwd)) - saved - set(recompute)))
                need |= st.reads()
        else:
            saved.add(name)
    saved_inputs = [t for t in inputs if t in need]
    order = list(fwd)
    recompute.sort(key=order.index)

    # Forward computes what outputs and saved values need, in declaration order.
    want = set(outputs) | saved
    for name in reversed(order):
        if name in want:
            want |= statements[name].reads() & set(fwd)
    forward = Kernel("forward", tuple(statements[n] for n in order if n in want), outputs)
    backward = Kernel("backward", tuple(statements[n] for n in recompute) + tuple(grads), tuple(s.target for s in grads))

    buffers = {t.name: t.dims for t in op.inputs}
    buffers.update({name: q.dims for name, q in fwd.items()})
    buffers.update({derivation.cotangents[o.name]: o.dims for o in op.outputs})
    buffers.update({s.target: s.dims for s in grads})
    return Program(
        op=op,
        params=op.params,
        inputs=inputs,
        differentiable=tuple(t.name for t in op.inputs if t.role is Role.DIFF),
        outputs=outputs,
        cotangents=tuple(derivation.cotangents[o] for o in outputs),
        dims=_dim_sources(op),
        forward=forward,
        backward=backward,
        saved=tuple(saved_inputs) + tuple(n for n in order if n in saved),
        buffers=buffers,
    )
