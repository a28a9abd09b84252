"""Formatting derivations for people and programs: plain text, LaTeX and JSON.

Everything here is presentation. The derivation itself (``symgrad.derive``) is never changed; a
renderer only reads a :class:`~symgrad.derive.Derivation` (or the small :class:`ExprDerivation`
that ``symgrad derive "EXPR"`` builds for an ad-hoc scalar expression) and lays it out.

Expression strings in text and JSON output are ``sympy.sstr`` strings in index notation
(``Sum(dy[b, k]*w[k], (k, 0, D - 1))``). They read back to the very same SymPy expression with
``sympy.sympify(s, locals=sympy_locals(...))``: :func:`sympy_locals` gives every symbol, tensor and
symgrad function its SymPy object, with the assumptions the derivation used (indices are integers,
tensor entries real), without which SymPy would build a different (unequal) expression.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import sympy as sp
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.str import StrPrinter

from . import primitives, project
from .declare import Op, Role
from .rewrite import Step

__all__ = [
    "ExprDerivation",
    "sympy_locals",
    "to_str",
    "to_latex",
    "entry",
    "op_summary",
    "op_list_text",
    "derivation_dict",
    "derivation_text",
    "derivation_latex",
    "expr_dict",
    "expr_text",
    "expr_latex",
]

CHAIN_RULE = "chain rule"
FORWARD = "forward"


# ----------------------------------------------------------------------------------------------
# Expressions as strings


def function_classes() -> dict[str, type]:
    """The primitives' SymPy classes that ``sympify`` does not know by itself (``sigmoid``,
    ``Iverson``, ``ReduceMax``...), by name."""
    return {name: cls for name, cls in primitives.classes().items() if getattr(sp, name, None) is not cls}


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONSTANTS = frozenset({"pi", "E", "I", "oo", "zoo", "nan", "True", "False"})


def sympy_locals(*exprs: sp.Basic, op: Op | None = None, text: str | None = None) -> dict[str, object]:
    """The ``locals`` that make ``sympy.sympify(to_str(e), locals=...)`` give back ``e``.

    Names come from, in increasing precedence:

    - ``text`` (an expression string): every identifier not called as a function and not known
      otherwise is an index, an integer ``Symbol`` (so the string alone, with the op, suffices:
      summation dummies need no declaration);
    - ``op``: its dims (positive integers), params, tensors (real ``IndexedBase``, integer for
      labels), forward values and cotangents (``dx``, ``dout``), and declared indices;
    - ``exprs``: every ``Symbol`` (bound summation indices included) and ``IndexedBase`` in them,
      with their assumptions.

    symgrad's function classes (``sigmoid``, ``Iverson``, ``ReduceMax``...) are always there.
    Entries shadow SymPy's own names where they collide (a dim called ``S`` or ``N``).
    """
    ns: dict[str, object] = {}
    if text is not None:
        for m in _IDENT.finditer(text):
            name = m.group()
            called = text[m.end():m.end() + 1] == "("
            if not called and name not in _CONSTANTS and not text[max(m.start() - 1, 0):m.start()].isdigit():
                ns.setdefault(name, sp.Symbol(name, integer=True))
    if op is not None:
        for t in op.inputs:
            for ix in t.dims:
                ns[ix.index] = sp.Symbol(ix.index, integer=True)
        for q in (*op.intermediates, *op.outputs):
            for ix in q.indices:
                ns[str(ix)] = ix
        for d in op.dims:
            ns[d.name] = d.symbol
        for p in op.params:
            ns[p.name] = p.symbol
        for t in op.inputs:
            ns[t.name] = t.base if t.dims else sp.Symbol(t.name, real=True)
            ns[f"d{t.name}"] = sp.IndexedBase(f"d{t.name}") if t.dims else sp.Symbol(f"d{t.name}")
        for q in (*op.intermediates, *op.outputs):
            for name in (q.name, f"d{q.name}"):
                ns[name] = sp.IndexedBase(name, real=True) if q.indices else sp.Symbol(name, real=True)
    for e in exprs:
        if isinstance(e, sp.Basic):
            for s in e.atoms(sp.Symbol):
                ns[s.name] = s
    # IndexedBase labels are Symbols too: the base must win over its own label.
    for e in exprs:
        if isinstance(e, sp.Basic):
            for base in e.atoms(sp.IndexedBase):
                ns[str(base.label)] = base
    ns.update(function_classes())
    return ns


class _ReadBackPrinter(StrPrinter):
    """``sympy.sstr``, except where its string would parse to a different expression.

    A product of a number, a sum and more factors (``Mul(2, X - Y, dloss)``, as the derivation
    builds it) prints as ``2*(X - Y)*dloss``, which a parser reads left to right: ``2*(X - Y)``
    first, which SymPy distributes (``2*X - 2*Y``), so the string reads back as another (equal
    in value, unequal as an expression) product. Grouping the factors after the number
    (``2*((X - Y)*dloss)``, ``-((1 - eps)*w[i])``) multiplies the number into a product, which
    SymPy never distributes: the very same expression comes back."""

    def _print_Mul(self, expr):
        c, rest = expr.as_coeff_Mul()
        # sstr prints the number's numerator (or a bare minus), then the factors, a sum first when
        # SymPy orders one first; a number 1/q prints after them, where it meets a product
        if rest.is_Mul and not (c.is_Rational and c.p == 1) and _sum_first(rest):
            body = super()._print_Mul(rest)
            return f"-({body})" if c == -1 else f"{self.parenthesize(c, PRECEDENCE['Mul'])}*({body})"
        return super()._print_Mul(expr)


def _sum_first(product: sp.Mul) -> bool:
    """Whether sstr prints a sum as the first factor of ``product``'s numerator."""
    for f in product.as_ordered_factors():
        if f.is_Pow and f.exp.is_Rational and f.exp.is_negative:
            continue  # printed in the denominator
        return f.is_Add
    return False


def to_str(expr: sp.Basic) -> str:
    """One-line SymPy string in index notation (``sympy.sstr``), read back by ``sympify`` (with
    :func:`sympy_locals`) as the very same expression."""
    return _ReadBackPrinter().doprint(expr)


def entry(name: str, indices: Iterable) -> str:
    """``name[i, j]`` (or just ``name`` for a scalar)."""
    indices = tuple(indices)
    return f"{name}[{', '.join(map(str, indices))}]" if indices else name


class SymgradLatexPrinter(LatexPrinter):
    """SymPy's LaTeX printer, with the notation a person writes for symgrad's functions (the
    ``latex`` of their entries in :data:`symgrad.primitives.TABLE`)."""


def _latex_method(latex):
    def method(self, expr, exp=None):
        return latex(self, expr, exp)

    return method


for _p in primitives.TABLE:
    if _p.latex is not None and _p.cls is not None:
        setattr(SymgradLatexPrinter, f"_print_{_p.cls.__name__}", _latex_method(_p.latex))


def to_latex(expr: sp.Basic) -> str:
    return SymgradLatexPrinter().doprint(expr)


def _latex_entry(name: str, indices: Iterable) -> str:
    indices = tuple(indices)
    base = to_latex(sp.Symbol(name))
    if not indices:
        return base
    return f"{{{base}}}_{{{','.join(to_latex(i) for i in indices)}}}"


def _latex_text(s: str) -> str:
    """Escape plain text for ``\\text{...}``."""
    table = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "$": r"\$", "{": r"\{", "}": r"\}",
             "^": r"\^{}", "~": r"\~{}"}
    return "".join(table.get(c, c) for c in s)


# ----------------------------------------------------------------------------------------------
# Op declarations


def _number(v):
    """A param default as a JSON number: an int for integers, else a float."""
    if isinstance(v, (int, sp.Integer)) and not isinstance(v, bool):
        return int(v)
    return float(v)


def input_dict(t) -> dict:
    return {"name": t.name, "dims": [d.name for d in t.dims], "role": t.role.value}


def param_dict(p) -> dict:
    return {"name": p.name, "default": _number(p.default), "integer": p.integer, "domain": p.domain.text(p.integer), "doc": p.doc}


def op_summary(op: Op) -> dict:
    """What ``symgrad list --format json`` says about one op."""
    return {
        "name": op.name,
        "doc": op.doc,
        "inputs": [input_dict(t) for t in op.inputs],
        "params": [param_dict(p) for p in op.params],
        "outputs": [{"name": q.name, "dims": [d.name for d in q.dims]} for q in op.outputs],
        "kind": op.kind,
        "updates": {t: o for o, t in op.updates.items()},  # update rules: input -> its new value
        "modules": project.modules_for(op.name),
    }


def _shape(name: str, dims) -> str:
    return f"{name}[{', '.join(d.name for d in dims)}]" if dims else name


def op_list_text(ops: Iterable[Op]) -> str:
    ops = list(ops)
    width = max((len(op.name) for op in ops), default=0)
    lines = []
    for op in ops:
        lines.append(f"{op.name.ljust(width)}  {op.doc}")
        pad = " " * (width + 2)
        if op.kind == "update":  # an update rule: what it reads and what it writes over in place
            updated = set(op.updates.values())
            ins = ", ".join(_shape(t.name, t.dims) + (" (updated)" if t.name in updated else "") for t in op.inputs)
            lines.append(f"{pad}update rule, in place: {ins}")
        else:
            ins = ", ".join(f"{_shape(t.name, t.dims)}" + ("" if t.role is Role.DIFF else f" ({t.role.value})") for t in op.inputs)
            outs = ", ".join(_shape(q.name, q.dims) for q in op.outputs)
            lines.append(f"{pad}in: {ins}  ->  out: {outs}")
        if op.params:
            lines.append(f"{pad}params: " + ", ".join(f"{p.name}={_number(p.default)} ({p.domain.text(p.integer)})" for p in op.params))
    lines.append("")
    lines.append(f"{len(ops)} ops. `symgrad derive OP --steps` shows how an op's gradient is derived.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Steps: the chain rule, then every rewrite that fired (quiet ones skipped)


@dataclass
class StepView:
    """One line of a derivation: which gradient (or forward value), which stage and rule, the result."""

    target: str  # "dx[b, i]", or the forward value "lse[b]"
    input: str | None  # the input differentiated, None for forward rewrites
    stage: str
    rule: str
    doc: str
    expr: sp.Basic


def _trace_views(steps: Iterable[Step], target: str, input: str | None) -> list[StepView]:
    """The steps to show: quiet bookkeeping (renaming dummies) is folded into the step before it,
    so each shown expression is exactly what the next rule saw, and the last is the result."""
    views: list[StepView] = []
    for s in steps:
        if not s.quiet:
            views.append(StepView(target, input, s.stage, s.rule, s.doc, s.after))
        elif views:
            views[-1].expr = s.after
    return views


def gradient_steps(d) -> list[StepView]:
    """Per gradient: the contraction, its derivative by SymPy (the chain rule), then the rewrites."""
    views = []
    for name, g in d.gradients.items():
        target = to_str(g.target)
        wrt = entry(name, g.indices)
        views.append(StepView(target, name, CHAIN_RULE, "contraction",
                              "L = the sum over every output of cotangent * output; each gradient is dL/d(entry)", d.contraction))
        views.append(StepView(target, name, CHAIN_RULE, "differentiate",
                              f"{target} = dL/d{wrt}: SymPy's diff, each entry it meets a Kronecker delta", g.raw))
        views += _trace_views(g.trace.steps, target, name)
    return views


def forward_steps(d) -> list[StepView]:
    """Stability rewrites of the forward values, attributed to the value they rewrote."""
    steps = [s for s in d.forward_trace.steps]
    views, pos = [], 0
    declared = {q.name: q for q in (*d.op.intermediates, *d.op.outputs)}
    for name, q in declared.items():
        cur = q.expr
        while pos < len(steps) and steps[pos].before == cur:
            s = steps[pos]
            if not s.quiet:
                views.append(StepView(entry(name, q.indices), None, s.stage, s.rule, s.doc, s.after))
            cur = s.after
            pos += 1
    for s in steps[pos:]:  # not attributable: still shown
        if not s.quiet:
            views.append(StepView(FORWARD, None, s.stage, s.rule, s.doc, s.after))
    return views


def _step_json(v: StepView) -> dict:
    return {"target": v.target, "input": v.input, "stage": v.stage, "rule": v.rule, "doc": v.doc, "expr": to_str(v.expr)}


# ----------------------------------------------------------------------------------------------
# Op derivations


def plan_of(d):
    """The kernel plan of derivation ``d`` (lowered once per rendering, shared by its parts)."""
    from .plan import lower

    return lower(d)


def saved_line(plan) -> str:
    """What backward saves, as the one kernel plan decides it for every target."""
    line = "saved for backward (every target): " + (", ".join(plan.saved) if plan.saved else "nothing (backward reads only cotangents)")
    if plan.recomputed:
        line += f"; recomputed in backward: {', '.join(plan.recomputed)}"
    if plan.fused:
        line += "; fused loss: forward writes " + ", ".join(f"{f} (= {g} per unit {plan.cotangents[0]})" for g, f in plan.fused.items())
    return line + "\n" + targets_line(plan)


def _targets_dict(plan) -> dict:
    from .targets import lowering_report

    return {t: {"lowers": why is None, "why": why} for t, why in lowering_report(plan).items()}


def targets_line(plan) -> str:
    """Which targets print the plan, and why any cannot."""
    from .targets import lowering_report

    report = lowering_report(plan)
    ok = [t for t, why in report.items() if why is None]
    lines = ["lowers for: " + (", ".join(ok) if ok else "no target")]
    lines += [f"cannot lower for {t}: {why}" for t, why in report.items() if why is not None]
    return "\n".join(lines)


def lowering_steps(plan) -> list[StepView]:
    """The lowering stages' decisions (inline, fuse, split, re-index, schedule), one view each."""
    return [StepView("lowering", None, s.stage, s.rule, s.doc, s.after) for s in plan.trace.steps]


def derivation_dict(d, steps: bool = False) -> dict:
    """``symgrad derive OP --format json``: one object."""
    op = d.op
    outputs = {q.name for q in op.outputs}
    plan = plan_of(d)
    return {
        "op": op.name,
        "doc": op.doc,
        "inputs": [input_dict(t) for t in op.inputs],
        "params": [param_dict(p) for p in op.params],
        "outputs": {name: to_str(q.expr) for name, q in d.forward.items() if name in outputs},
        "intermediates": {name: to_str(q.expr) for name, q in d.forward.items() if name not in outputs},
        "indices": {name: [str(i) for i in q.indices] for name, q in d.forward.items()},
        "cotangents": dict(d.cotangents),
        "reads": list(d.reads),
        "saved": list(plan.saved),
        "recomputed": list(plan.recomputed),
        "lowers_for": _targets_dict(plan),
        "gradients": {name: to_str(g.expr) for name, g in d.gradients.items()},
        "targets": {name: to_str(g.target) for name, g in d.gradients.items()},
        "steps": [_step_json(v) for v in (forward_steps(d) + gradient_steps(d))] if steps else [],
    }


def _aligned(rows: list[tuple[str, str]], indent: str = "  ", sep: str = " = ") -> list[str]:
    width = max((len(a) for a, _ in rows), default=0)
    return [f"{indent}{a.ljust(width)}{sep}{b}" for a, b in rows]


def _steps_text(views: list[StepView], lead: str) -> list[str]:
    """A derivation by hand: stage headings, then per step the rule and why, and the result."""
    lines: list[str] = []
    stage = None
    rule_w = max((len(v.rule) for v in views), default=0)
    for v in views:
        if v.stage != stage:
            stage = v.stage
            lines.append(f"  [{stage}]")
        lines.append(f"    {v.rule.ljust(rule_w)}  {v.doc}")
        shown = f"{to_str(v.expr.lhs)} = {to_str(v.expr.rhs)}" if isinstance(v.expr, sp.Eq) else to_str(v.expr)
        lines.append(f"    {' ' * rule_w}  {lead} {shown}")
    return lines


def derivation_text(d, steps: bool = False) -> str:
    op = d.op
    outputs = {q.name for q in op.outputs}
    plan = plan_of(d)
    cot = ", ".join(f"{c} is the upstream gradient of {o}" for o, c in d.cotangents.items())
    lines = [f"{op.name}: {op.doc}", "", "inputs"]
    updated = set(op.updates.values())
    lines += _aligned([(_shape(t.name, t.dims), "updated in place" if t.name in updated else
                        ("read" if op.kind == "update" else t.role.value)) for t in op.inputs], sep="  ")
    if op.params:
        lines.append("params")
        lines += _aligned([(f"{p.name} = {_number(p.default)}", p.doc) for p in op.params], sep="  ")
    lines += ["", "forward"]
    lines += _aligned([(entry(name, q.indices), to_str(q.expr) + ("" if name in outputs else "    (intermediate)"))
                       for name, q in d.forward.items()])
    if steps:
        fsteps = forward_steps(d)
        if fsteps:
            lines += ["", "forward rewrites"]
            for target, views in _group(fsteps).items():
                lines.append(f"  {target}")
                lines += ["  " + ln for ln in _steps_text(views, "=")]
        for target, views in _group(gradient_steps(d)).items():
            lines += ["", f"derivation of {target}  ({cot})"]
            lines += _steps_text(views, "=")
    if op.kind == "update":  # not differentiated: what it writes instead
        lines += ["", "update (in place, one multi-tensor launch; not differentiated)"]
        lines += _aligned([(t, o) for o, t in op.updates.items()], sep=" <- ")
    else:
        lines += ["", f"gradients ({cot})" if d.gradients else "gradients: none (no differentiable inputs)"]
        lines += _aligned([(to_str(g.target), to_str(g.expr)) for g in d.gradients.values()])
    if steps:
        lines += ["", "lowering (one kernel plan, printed by every target)"]
        lines += _steps_text(lowering_steps(plan), "->")
    lines += ["", targets_line(plan) if op.kind == "update" else saved_line(plan)]
    return "\n".join(ln.rstrip() for ln in lines) + "\n"


def _group(views: list[StepView]) -> dict[str, list[StepView]]:
    out: dict[str, list[StepView]] = {}
    for v in views:
        out.setdefault(v.target, []).append(v)
    return out


def _latex_block(rows: list[str]) -> list[str]:
    """An align* environment; rows starting with % are LaTeX comments and end no line."""
    return [r"\begin{align*}", *[r if r.startswith("%") else r + r" \\" for r in rows], r"\end{align*}"]


def derivation_latex(d, steps: bool = False) -> str:
    op = d.op
    lines = [f"% symgrad derive {op.name}: {op.doc}", "% forward"]
    rows = [rf"{_latex_entry(name, q.indices)} &= {to_latex(q.expr)}" for name, q in d.forward.items()]
    lines += _latex_block(rows)
    if steps:
        for name, g in d.gradients.items():
            lines.append(f"% derivation of {to_str(g.target)}")
            rows = [rf"{_latex_entry('d' + name, g.indices)} &= \frac{{\partial}}{{\partial {_latex_entry(name, g.indices)}}} "
                    rf"\left({to_latex(d.contraction)}\right)",
                    rf"&= {to_latex(g.raw)} && \text{{{_latex_text(CHAIN_RULE)}}}"]
            views = _trace_views(g.trace.steps, to_str(g.target), name)
            for v in views:
                lines_doc = f"%   {v.stage}: {v.rule}: {v.doc}"
                rows.append(lines_doc)
                rows.append(rf"&= {to_latex(v.expr)} && \text{{{_latex_text(v.rule)}}}")
            lines += _latex_block(rows)
    lines.append("% gradients")
    lines += _latex_block([rf"{_latex_entry('d' + name, g.indices)} &= {to_latex(g.expr)}" for name, g in d.gradients.items()])
    lines += ["% " + ln for ln in saved_line(plan_of(d)).splitlines()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Ad-hoc scalar expressions


@dataclass
class ExprDerivation:
    """``symgrad derive "EXPR" --wrt x``: the expression, its partials, and values at a point."""

    text: str  # as the user typed it
    expr: sp.Expr
    wrt: tuple[sp.Symbol, ...]
    raw: dict[str, sp.Expr]  # variable -> sympy.diff
    gradients: dict[str, sp.Expr]  # variable -> simplified
    steps: dict[str, list[Step]] = field(default_factory=dict)
    at: dict[str, sp.Expr] | None = None
    values: dict | None = None  # {"expr": v, "gradients": {x: v}}; v float, or a string when not a finite real
    seconds: float = 0.0

    @property
    def variables(self) -> list[sp.Symbol]:
        return sorted(self.expr.free_symbols, key=lambda s: s.name)


def _expr_steps(e: ExprDerivation) -> list[StepView]:
    views = []
    for name, raw in e.raw.items():
        target = f"d/d{name}"
        views.append(StepView(target, name, CHAIN_RULE, "differentiate", f"SymPy's diff with respect to {name}", raw))
        views += _trace_views(e.steps.get(name, ()), target, name)
    return views


def expr_dict(e: ExprDerivation, steps: bool = False) -> dict:
    wrt = {s.name for s in e.wrt}
    out = {
        "expr": to_str(e.expr),
        "inputs": [{"name": s.name, "dims": [], "role": (Role.DIFF if s.name in wrt else Role.CONST).value} for s in e.variables],
        "params": [],
        "outputs": {"f": to_str(e.expr)},
        "saved": [],
        "gradients": {name: to_str(g) for name, g in e.gradients.items()},
        "steps": [_step_json(v) for v in _expr_steps(e)] if steps else [],
    }
    if e.at is not None:
        out["at"] = {k: float(v) for k, v in e.at.items()}
        out["values"] = e.values
    return out


def _fmt_value(v) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def expr_text(e: ExprDerivation, steps: bool = False) -> str:
    lines = [f"f = {to_str(e.expr)}"]
    if steps:
        for name, raw in e.raw.items():
            lines += ["", f"derivation of df/d{name}"]
            lines.append(f"  [{CHAIN_RULE}]")
            lines.append(f"    df/d{name} = {to_str(raw)}")
            lines += _steps_text(_trace_views(e.steps.get(name, ()), f"d/d{name}", name), "=")
    lines += ["", "gradients"]
    lines += _aligned([(f"df/d{name}", to_str(g)) for name, g in e.gradients.items()])
    if e.at is not None and e.values is not None:
        point = ", ".join(f"{k} = {to_str(v)}" for k, v in e.at.items())
        lines += ["", f"at {point}"]
        rows = [("f", _fmt_value(e.values["expr"]))]
        rows += [(f"df/d{name}", _fmt_value(v)) for name, v in e.values["gradients"].items()]
        lines += _aligned(rows)
    return "\n".join(lines) + "\n"


def expr_latex(e: ExprDerivation, steps: bool = False) -> str:
    lines = [f"% symgrad derive {to_str(e.expr)}"]
    rows = [rf"f &= {to_latex(e.expr)}"]
    for name, g in e.gradients.items():
        sym = to_latex(sp.Symbol(name))
        rows.append(rf"\frac{{\partial f}}{{\partial {sym}}} &= {to_latex(g)}")
    lines += _latex_block(rows)
    if steps:
        for name, raw in e.raw.items():
            sym = to_latex(sp.Symbol(name))
            lines.append(f"% derivation of df/d{name}")
            rows = [rf"\frac{{\partial f}}{{\partial {sym}}} &= {to_latex(raw)} && \text{{{_latex_text(CHAIN_RULE)}}}"]
            for v in _trace_views(e.steps.get(name, ()), f"d/d{name}", name):
                rows.append(rf"&= {to_latex(v.expr)} && \text{{{_latex_text(v.rule)}}}")
            lines += _latex_block(rows)
    if e.at is not None and e.values is not None:
        point = ", ".join(f"{k} = {to_str(v)}" for k, v in e.at.items())
        lines.append(f"% at {point}: f = {_fmt_value(e.values['expr'])}; "
                     + "; ".join(f"df/d{n} = {_fmt_value(v)}" for n, v in e.values["gradients"].items()))
    return "\n".join(lines) + "\n"
