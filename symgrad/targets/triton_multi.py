"""The Triton target's multi-tensor kernels: a plan's multi-tensor launch -> one kernel over many tensors.

One launch covers every tensor of a list, whatever their sizes: the host builds a table of each
tensor's base address (int64, one row per tensor the kernel reads or writes), the entry counts,
and a program -> (tensor, first entry) map (:mod:`symgrad.runtime.multi_tensor`); each program
loads its tensor's addresses, bitcasts them to pointers of the row's dtype, reads its entries of
every input once, computes in fp32 registers and stores. Scalar inputs (an optimizer's ``lr`` and
step count ``t``, clipping's total norm) are loaded from device tensors (one value, or one per
tensor), so a value that changes from call to call neither recompiles the kernel nor waits for
the device. Three kernels, one printer:

- ``_update`` (an update rule's module): stores each result over the input it updates; with fp32
  master weights (``master=``, the rule's first tensor bf16/fp16) that input is read from and
  written to the master, and its rounding is also stored into the low-precision tensor;
- ``_multi_map`` (an op's ``forward_multi``, ``KernelPlan.multi`` a map): stores each output into
  its own list (which may be an input's: in place);
- ``_multi_reduce`` (``multi_reduce``): each program reduces its span of one tensor to the op's
  value over that span and stores it at its slot of a partial-value vector; the same kernel over
  that vector, one program, is stage two (:class:`symgrad.plan_multi.Combine`).
"""
from __future__ import annotations

import sympy as sp

from ..plan import KernelPlan, LoweringError
from ..plan_multi import ACC
from . import declaration_file
from .triton_expr import HELPERS, TritonPrintError, print_expr


def render(plan: KernelPlan, command: str, env) -> str:
    """An update rule's whole module (``templates/triton/update.j2``)."""
    op = plan.op
    tensors = [t.name for t in op.inputs if t.dims]
    updated = {t: o for o, t in plan.updates.items()}
    # the first tensor may have fp32 master weights when the rule updates it (an optimizer's p)
    master = tensors[0] if tensors[0] in updated else None
    rows = {n: n for n in tensors}
    kernel = _kernel_context(plan, "update", rows, {o: t for t, o in updated.items()}, master)
    return env.get_template("update.j2").render(
        op=op, declared=declaration_file(op), command=command, repr=repr, float=float, helpers=sorted(HELPERS),
        inputs=list(plan.inputs), tensors=tensors, updated=updated, **kernel,
        kernel_source=_kernel(env, kernel),
    )


def section(plan: KernelPlan, env) -> str:
    """The multi-tensor part of an op's module (``forward_multi`` and its kernel), or ''."""
    if plan.multi is None:
        return ""
    op = plan.op
    tensors = [t.name for t in op.inputs if t.dims]
    if plan.multi.kind == "multi":
        outputs = [st.target for st in plan.multi.statements]
        kernel = _kernel_context(plan, "map", {n: n for n in tensors + outputs}, {o: o for o in outputs}, None)
    else:
        kernel = _reduce_context(plan)
    least = max((d.min_size for t in op.inputs for d in t.dims[-1:]), default=0)
    return env.get_template("multi_host.j2").render(
        op=op, repr=repr, tensors=tensors, least=least,
        outputs=list(plan.outputs), kernel_source=_kernel(env, kernel), **kernel,
    )


def _kernel(env, context: dict) -> str:
    return env.get_template("multi.j2").render(**context, repr=repr).strip("\n") + "\n"


def _names(plan: KernelPlan, i) -> dict:
    op = plan.op
    names = {sp.IndexedBase(t.name, real=True)[i]: t.name for t in op.inputs if t.dims}
    names.update({sp.Symbol(t.name, real=True): t.name for t in op.inputs if not t.dims})
    names.update({p.symbol: p.name for p in op.params})
    return names


def _print(op, what, expr, names) -> str:
    try:
        return print_expr(expr, names)
    except TritonPrintError as e:
        raise LoweringError(f"op {op.name}: {what}: {e}") from None


def _kernel_context(plan: KernelPlan, kind: str, rows: dict, stores: dict, master) -> dict:
    """What ``multi.j2`` prints for a map (``update`` or ``map``): ``rows`` the address rows
    (tensor -> its name), ``stores`` statement target -> the row it is stored into."""
    op = plan.op
    launch = plan.multi
    (i,) = {ix for st in launch.statements for ix in st.indices}
    names = _names(plan, i)
    body, hoisted = [], {}
    for st in launch.statements:
        expr = _hoist(st.expr, hoisted)
        for name in hoisted.values():
            names.setdefault(name, str(name))
        code = _print(op, st.target, expr, names)
        body.append((st.formula, st.target, code, stores[st.target]))
        names[sp.IndexedBase(st.target, real=True)[i]] = st.target
    return dict(
        kind=kind, kname="_update" if kind == "update" else "_multi_map", rows=list(rows), scalar_dtype=_scalar_dtype(kind),
        loads=[t.name for t in op.inputs if t.dims], scalars=[t.name for t in op.inputs if not t.dims],
        params=list(plan.params), body=body, master=master,
        master_value=next((target for target, row in stores.items() if row == master), None),
        scalar_lines=[(str(sym), _print(op, "a scalar", e, names)) for e, sym in hoisted.items()],
    )


def _reduce_context(plan: KernelPlan) -> dict:
    op = plan.op
    c = plan.combine
    (i,) = c.body.atoms(sp.Indexed).pop().indices
    names = _names(plan, i)
    hoisted: dict = {}
    body = _hoist(c.body, hoisted)
    finish = _hoist(c.finish.xreplace({ACC: sp.IndexedBase("_tot", real=True)[i]}), hoisted)
    for name in hoisted.values():
        names.setdefault(name, str(name))
    names[sp.IndexedBase("_tot", real=True)[i]] = "tot"
    tensor = next(t.name for t in op.inputs if t.dims)
    return dict(
        kind="reduce", kname="_multi_reduce", rows=[tensor], loads=[tensor], scalar_dtype=_scalar_dtype("reduce"),
        scalars=[t.name for t in op.inputs if not t.dims], params=list(plan.params), master=None,
        reduce=c.reduce, value=_print(op, "the reduced value", body, names), finish=_print(op, "the finish", finish, names),
        formula=plan.multi.statements[0].formula, target=c.target,
        scalar_lines=[(str(sym), _print(op, "a scalar", e, names)) for e, sym in hoisted.items()],
    )


def _scalar_dtype(kind: str) -> str:
    """An update rule's scalars in float64, as torch computes an optimizer's step sizes on the host
    (``1 - 0.999**t`` in fp32 is off by ~6e-5); an op's in fp32, as its ``forward`` (and torch's
    fp32 tensor math: clipping's ``max_norm/(total + 1e-6)``). float64 math there would also cost
    registers and a division subroutine, which keep a ``cos``'s range-reduction array in local
    memory."""
    return "tl.float64" if kind == "update" else "tl.float32"


def _tensor(e) -> bool:
    return bool(e.atoms(sp.Indexed))


def _hoist(expr, hoisted: dict):
    """``expr`` with every subexpression that reads no tensor replaced by a symbol ``_c<k>``
    (``hoisted``: subexpression -> symbol). The kernel computes those once per program in float64
    from the float64 params, as torch computes its step sizes on the host, and rounds each to fp32
    once: ``1 - 0.999**t`` in fp32 would carry ~6e-5 relative error into Adam's step. A product of
    a tensor term with scalar divisors only (``sqrt(v)/sqrt(1 - beta2**t)``) divides, as torch does."""

    def leaf(e):
        if e.is_Number:
            return e
        if not e.free_symbols:  # a constant (sqrt(2)): a literal, as a number is
            return e.evalf(17)
        if e not in hoisted:
            hoisted[e] = sp.Symbol(f"_c{len(hoisted)}", real=True)
        return hoisted[e]

    def go(e):
        if isinstance(e, sp.Indexed):
            return e
        if not _tensor(e):
            return leaf(e)
        if isinstance(e, sp.Mul):
            scalars = [a for a in e.args if not _tensor(a)]
            tensors = [go(a) for a in e.args if _tensor(a)]
            divisors = all(isinstance(a, sp.Pow) and a.exp.is_number and a.exp < 0 and not a.base.is_Number for a in scalars)
            if scalars and divisors and not any(isinstance(a, sp.Pow) and a.exp.is_number and a.exp < 0 for a in e.args if _tensor(a)):
                return sp.Mul(*tensors, *[sp.Pow(leaf(a.base ** -a.exp), -1) for a in scalars], evaluate=False)
            numbers = [a for a in scalars if a.is_Number]
            rest = [a for a in scalars if not a.is_Number]
            return sp.Mul(*numbers, *([leaf(sp.Mul(*rest))] if rest else []), *tensors, evaluate=False)
        if isinstance(e, sp.Add):
            scalars = [a for a in e.args if not _tensor(a)]
            tensors = [go(a) for a in e.args if _tensor(a)]
            return sp.Add(*tensors, *([leaf(sp.Add(*scalars))] if scalars else []), evaluate=False)
        if not e.args:
            return e
        return e.func(*[go(a) for a in e.args])

    return go(expr)
