"""The Triton target's update rules: a plan's ``multi`` launch -> one multi-tensor kernel.

One launch updates every tensor of an optimizer's group, whatever their sizes: the host builds a
table of each tensor's base address (int64, one row per tensor input of the rule), the entry
counts, and a block -> (tensor, first entry) map (:mod:`symgrad.runtime.multi_tensor`); each
program loads its tensor's addresses, bitcasts them to pointers of the input's dtype, reads the
parameter, gradient and state of its block once, computes every statement in fp32 registers and
stores the new values over the inputs they update. Nothing else is written. ``lr`` and the step
count ``t`` are loaded from device tensors (one ``t`` per tensor, or one for all), so a schedule
that changes them neither recompiles the kernel nor waits for the device.

With fp32 master weights (``master=`` a list of fp32 tensors, the parameters bf16/fp16) the rule's
parameter ``p`` is read from and written to the master, and its rounding is also stored into the
low-precision parameter, in the same pass.
"""
from __future__ import annotations

import sympy as sp

from ..plan import KernelPlan, LoweringError
from . import declaration_file
from .triton_expr import HELPERS, TritonPrintError, print_expr


def render(plan: KernelPlan, command: str, env) -> str:
    op = plan.op
    (launch,) = plan.forward.launches
    (i,) = {ix for st in launch.statements for ix in st.indices}
    tensors = [t.name for t in op.inputs if t.dims]
    scalars = [t.name for t in op.inputs if not t.dims]
    if tensors[:1] != ["p"] or "p" not in plan.updates.values():
        raise LoweringError(f"op {op.name}: an update rule's first input is the parameter p, which it updates")
    names = {sp.IndexedBase(n, real=True)[i]: n for n in tensors}
    names.update({sp.Symbol(n, real=True): n for n in scalars})
    names.update({p.symbol: p.name for p in op.params})
    body, hoisted = [], {}
    for st in launch.statements:
        expr = _hoist(st.expr.xreplace({ix: i for ix in st.indices}), hoisted)
        for name in hoisted.values():
            names.setdefault(name, str(name))
        try:
            code = print_expr(expr, names)
        except TritonPrintError as e:
            raise LoweringError(f"op {op.name}: {st.target}: {e}") from None
        target = plan.updates[st.target]
        body.append((st.formula, st.target, code, target))
        names[sp.IndexedBase(st.target, real=True)[i]] = st.target
    return env.get_template("update.j2").render(
        op=op, declared=declaration_file(op), command=command, repr=repr, float=float, helpers=sorted(HELPERS),
        inputs=list(plan.inputs), tensors=tensors, scalars=scalars, params=list(plan.params),
        updated={t: o for o, t in plan.updates.items()}, body=body,
        scalar_lines=[(str(sym), print_expr(e, names)) for e, sym in hoisted.items()],
    )


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
