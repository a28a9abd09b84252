"""The NumPy target's update rules: a plan's ``multi`` launch -> in-place ufunc calls over chunks.

An update rule (an optimizer step) is a map that reads a parameter, its gradient and state and
writes new values over them. Printed as one NumPy expression per statement it would allocate a
full-size temporary for every operation (AdamW: about a dozen arrays the size of the model) and
pass over memory once per operation. Instead the generated module walks each tensor in chunks
that fit in cache and evaluates every statement of the chunk as a sequence of ufunc calls with
``out=``: each operation writes a chunk-sized scratch row (a few rows allocated once per call),
the last one writes the updated tensor's chunk in place, so each tensor entry is read from and
written to memory once.

What is computed once per call, not per entry: every subexpression that reads no tensor (the
bias corrections ``1 - beta1**t``, ``lr*weight_decay``) is hoisted into a Python float, computed
in float64 as torch computes its host-side scalars.

Strict like every printer: a node it has no spelling for raises :class:`LoweringError`.
"""
from __future__ import annotations

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from .. import primitives
from ..plan import KernelPlan, LoweringError

#: Entries per chunk: a chunk of each tensor and the scratch rows stay in a core's L2 cache.
CHUNK = 1 << 14


class _ScalarPrinter(PythonCodePrinter):
    """Host-side scalars (params, ``lr``, ``t``) in float64 Python arithmetic."""

    def __init__(self, names):
        super().__init__({"fully_qualified_modules": True, "strict": True})
        self.names = names

    def _print_Symbol(self, expr):
        try:
            return self.names[expr]
        except KeyError:
            raise LoweringError(f"update rule: symbol {expr} has no value on the host") from None

    def _print_Iverson(self, expr):
        return f"(1.0 if {self._print(expr.args[0])} else 0.0)"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        return f"{int(expr)}.0"

    def _print_Rational(self, expr):
        return f"({expr.p}.0/{expr.q}.0)"


class _Emitter:
    """Ufunc calls for one chunk: each tensor-valued node into a scratch row, or into ``out``."""

    def __init__(self, op: str, views: dict, consts: dict, scalar_names: dict):
        self.op = op
        self.views = views  # tensor entry (x[i], or an updated output's entry) -> the chunk's view name
        self.consts = consts  # hoisted scalar expression -> its local name (filled as met)
        self.scalar = _ScalarPrinter(scalar_names)
        self.lines: list[str] = []
        self.free: list[int] = []
        self.rows = 0

    # -- operands: ("array", code, scratch row or None) or ("const", code) ---------------------
    def const(self, expr) -> str:
        if expr.is_Number:
            return repr(float(expr))
        if expr.is_Symbol:
            return self.scalar.doprint(expr)
        if expr not in self.consts:
            self.consts[expr] = (f"_c{len(self.consts)}", self.scalar.doprint(expr))
        return self.consts[expr][0]

    def take(self) -> int:
        if self.free:
            return self.free.pop()
        self.rows += 1
        return self.rows - 1

    def release(self, operand) -> None:
        if operand[0] == "array" and operand[2] is not None:
            self.free.append(operand[2])

    def call(self, ufunc: str, args: list, out: str | None):
        for a in args:
            self.release(a)
        row = None
        if out is None:
            row = self.take()
            out = f"_s[{row}, :_n]"
        code = ", ".join(a[1] for a in args)
        self.lines.append(f"np.{ufunc}({code}, out={out})")
        return ("array", out, row)

    def tensor(self, expr) -> bool:
        return bool(expr.atoms(sp.Indexed))

    def emit(self, expr, out: str | None = None):
        if not self.tensor(expr):
            return ("const", self.const(expr))
        if isinstance(expr, sp.Indexed):
            if expr not in self.views:
                raise LoweringError(f"op {self.op}: the update reads {expr}, which is no tensor of this chunk")
            view = ("array", self.views[expr], None)
            return view if out is None else self._copy(view, out)
        if isinstance(expr, sp.Add):
            return self._chain("add", "subtract", expr.args, out)
        if isinstance(expr, sp.Mul):
            return self._mul(expr, out)
        if isinstance(expr, sp.Pow):
            return self._pow(expr, out)
        if isinstance(expr, primitives.Iverson):
            return self._mul(sp.Mul(sp.S.One, expr, evaluate=False), out)
        p = primitives.of(expr)
        if p is not None and isinstance(p.numpy, str) and p.numpy != primitives.STRUCTURAL and len(expr.args) == 1:
            ufunc = p.numpy.split("(")[0]
            if ufunc.startswith("np.") and ufunc.count(".") == 1:
                return self.call(ufunc[3:], [self.emit(expr.args[0])], out)
        raise LoweringError(f"op {self.op}: the NumPy update printer has no in-place spelling for {expr}")

    def _copy(self, view, out):
        self.lines.append(f"np.copyto({out}, {view[1]})")
        return ("array", out, None)

    def _chain(self, plus: str, minus: str, args, out):
        consts = [a for a in args if not self.tensor(a)]
        arrays = sorted((a for a in args if self.tensor(a)), key=lambda a: a.could_extract_minus_sign())
        acc = self.emit(arrays[0])
        rest = arrays[1:]
        c = sp.Add(*consts)
        steps = [(minus if a.could_extract_minus_sign() else plus, -a if a.could_extract_minus_sign() else a) for a in rest]
        if c != 0:
            steps.append(("add", c))
        for n, (ufunc, a) in enumerate(steps):
            last = n == len(steps) - 1
            acc = self.call(ufunc, [acc, self.emit(a)], out if last else None)
        if not steps and out is not None:
            acc = self._copy(acc, out)
        return acc

    def _mul(self, expr, out):
        brackets = [f for f in expr.args if isinstance(f, primitives.Iverson) and self.tensor(f)]
        if brackets:
            rest = self.emit(sp.Mul(*[f for f in expr.args if f not in brackets]))
            cond = " & ".join(_NumPyCond(self.views).doprint(b.args[0]) for b in brackets)
            self.release(rest)
            row = self.take() if out is None else None
            target = out if out is not None else f"_s[{row}, :_n]"
            # a strong zero, as every target's brackets: the masked entries are 0 even against inf
            self.lines.append(f"np.copyto({target}, np.where({cond}, {rest[1]}, 0.0))")
            return ("array", target, row)
        num, den, consts = [], [], []
        def scalar_divisor(f):
            return not self.tensor(f) and isinstance(f, sp.Pow) and f.exp.is_number and f.exp < 0 and not f.base.is_Number

        # x/c for a scalar c divides (as torch's sqrt(v)/bias_correction2_sqrt), not times 1/c;
        # a product with other scalars (lr/(1 - beta1**t)) folds them into one hoisted scalar
        divide_by_scalar = all(scalar_divisor(f) for f in expr.args if not self.tensor(f)) and not any(
            isinstance(f, sp.Pow) and f.exp.is_number and f.exp < 0 for f in expr.args if self.tensor(f))
        for f in expr.args:
            if divide_by_scalar and scalar_divisor(f):
                den.append(f.base ** (-f.exp))
            elif not self.tensor(f):
                consts.append(f)
            elif isinstance(f, sp.Pow) and f.exp.is_number and f.exp < 0:
                den.append(f.base ** (-f.exp))
            else:
                num.append(f)
        c = sp.Mul(*consts)
        ops = [("multiply", f) for f in num[1:]] + [("divide", f) for f in den]
        if num:
            acc = self.emit(num[0])
        else:
            acc = ("const", self.const(c))
            c = sp.S.One
        if c != 1:
            ops.append(("multiply", c))
        if acc[0] == "const":  # c / den: the numerator is a number
            ufunc, f = ops.pop(0)
            acc = self.call(ufunc, [acc, self.emit(f)], out if not ops else None)
        for n, (ufunc, f) in enumerate(ops):
            acc = self.call(ufunc, [acc, self.emit(f)], out if n == len(ops) - 1 else None)
        if not ops and out is not None and acc[1] != out:
            acc = self._copy(acc, out)
        return acc

    def _pow(self, expr, out):
        base, e = expr.base, expr.exp
        if not self.tensor(e) and e.is_number:
            if e == 2:
                return self.call("square", [self.emit(base)], out)
            if e == sp.S.Half:
                return self.call("sqrt", [self.emit(base)], out)
            if e == -1:
                return self.call("reciprocal", [self.emit(base)], out)
            return self.call("power", [self.emit(base), ("const", self.const(e))], out)
        raise LoweringError(f"op {self.op}: the NumPy update printer has no in-place spelling for {expr}")


class _NumPyCond(PythonCodePrinter):
    """A bracket's comparison over chunk views (it allocates a boolean chunk: brackets are rare)."""

    def __init__(self, views):
        super().__init__({"strict": True})
        self.views = views

    def _print_Indexed(self, expr):
        return self.views[expr]


def chunk_body(plan: KernelPlan) -> tuple[list[str], list[tuple[str, str]], int, list[str]]:
    """``(lines, hoisted scalars, scratch rows, formulas)`` of the chunk function of an update rule."""
    op = plan.op
    (launch,) = plan.forward.launches
    (i,) = {ix for st in launch.statements for ix in st.indices}
    tensors = [t for t in op.inputs if t.dims]
    views = {sp.IndexedBase(t.name, real=True)[i]: f"{t.name}_" for t in tensors}
    scalar_names = {sp.Symbol(t.name, real=True): t.name for t in op.inputs if not t.dims}
    scalar_names.update({p.symbol: p.name for p in op.params})
    consts: dict = {}
    lines, rows, formulas = [], 0, []
    for st in launch.statements:
        target = plan.updates[st.target]
        em = _Emitter(op.name, views, consts, scalar_names)
        em.rows, em.free = rows, list(range(rows))[::-1]  # every scratch row is free again
        expr = st.expr.xreplace({ix: i for ix in st.indices})
        em.emit(expr, out=f"{target}_")
        rows = max(rows, em.rows)
        formulas.append(st.formula)
        lines += [f"# {st.formula}   (written over {target})", *em.lines]
        # later statements read the new value where this one wrote it
        views[sp.IndexedBase(st.target, real=True)[i]] = f"{target}_"
    hoisted = [(name, code) for name, code in consts.values()]
    return lines, hoisted, rows, formulas
