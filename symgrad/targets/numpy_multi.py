"""The NumPy target's multi-tensor launches: a plan's ``multi`` map -> in-place ufunc calls over chunks.

A multi-tensor map (an update rule: an optimizer step that reads a parameter, its gradient and
state and writes new values over them; an op's ``forward_multi``: clipping's scale) runs over many
tensors. Printed as one NumPy expression per statement it would allocate a full-size temporary for
every operation (AdamW: about a dozen arrays the size of the model) and pass over memory once per
operation. Instead the generated module walks each tensor in chunks that fit in cache and
evaluates every statement of the chunk as a sequence of ufunc calls with ``out=``: each operation
writes a chunk-sized scratch row (a few rows allocated once per call), the last one writes the
result's chunk (over the updated tensor, or into the output), so each tensor entry is read from
and written to memory once.

What is computed once per call, not per entry: every subexpression that reads no tensor (the
bias corrections ``1 - beta1**t``, ``lr*weight_decay``, clipping's ``min(1, max_norm/total)``) is
hoisted into a Python float, computed in float64 as torch computes its host-side scalars.

Iverson brackets whose condition reads a tensor (``min``, ``max``, a clamp, ``sign``) have no
in-place ufunc form: such a subexpression is printed by the op printer (:mod:`.numpy_printer`)
over the chunk's views, as every non-multi statement is: strong zeros, NaN where the comparison
is unordered, its temporaries chunk-sized. A multi-tensor reduction (``multi_reduce``) is the op's
statement printed the same way, as a function of one flat vector that both stages call.

Strict like every printer: a node it has no spelling for raises :class:`LoweringError`.
"""
from __future__ import annotations

import re

import sympy as sp
from sympy.printing.pycode import PythonCodePrinter

from .. import primitives
from ..plan import KernelPlan, LoweringError
from .numpy_printer import Env, NumPyPrinter, lower_statement_lines
from .statements import common_subexpressions, prepare

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
        false = primitives.bracket_false(expr)  # NaN where the comparison is unordered, as every target
        if false is None:
            return f"(1.0 if {self._print(expr.args[0])} else 0.0)"
        return f"(1.0 if {self._print(expr.args[0])} else 0.0 if {self._print(false)} else math.nan)"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Integer(self, expr):
        return f"{int(expr)}.0"

    def _print_Rational(self, expr):
        return f"({expr.p}.0/{expr.q}.0)"


class _Emitter:
    """Ufunc calls for one chunk: each tensor-valued node into a scratch row, or into ``out``."""

    def __init__(self, op: str, views: dict, consts: dict, scalar_names: dict, dim, general: list,
                 scalar_inputs: set, params: set):
        self.op = op
        self.scalar_inputs, self.params = scalar_inputs, params
        self.views = views  # tensor entry (x[i], or an earlier result's entry) -> the chunk's view name
        self.consts = consts  # hoisted scalar expression -> its local name (filled as met)
        self.scalar_names = scalar_names
        self.scalar = _ScalarPrinter(scalar_names)
        self.dim = dim
        self.general = general  # names of the op printer's results so far (one counter per chunk body)
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
            if any(self._bracketed(a) for a in expr.args):  # one op-printer block: its CSE sees every term
                return self._general(expr, out)
            return self._chain("add", "subtract", expr.args, out)
        if isinstance(expr, sp.Mul):
            return self._mul(expr, out)
        if isinstance(expr, sp.Pow):
            return self._pow(expr, out)
        if isinstance(expr, (primitives.Iverson, sp.KroneckerDelta)):
            return self._general(expr, out)
        p = primitives.of(expr)
        if p is not None and isinstance(p.numpy, str) and p.numpy != primitives.STRUCTURAL and len(expr.args) == 1:
            ufunc = p.numpy.split("(")[0]
            if ufunc.startswith("np.") and ufunc.count(".") == 1 and p.numpy == ufunc + "({0})":  # a unary ufunc
                return self.call(ufunc[3:], [self.emit(expr.args[0])], out)
        return self._general(expr, out)  # no in-place ufunc spelling: the op printer's (strict)

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

    def _general(self, expr, out):
        """``expr`` printed by the op printer over the chunk's views (brackets: strong zeros, NaN
        where unordered), into a fresh chunk-sized array."""
        (i,) = {ix for e in expr.atoms(sp.Indexed) for ix in e.indices}
        views = {e: sp.IndexedBase(v, real=True)[i] for e, v in self.views.items()}
        tensors = {v: (self.dim,) for v in self.views.values()}
        tensors.update({n: () for n in self.scalar_inputs})
        env = Env(tensors, set(), set(self.params), {self.dim.name}, {self.dim.size: self.dim.name}, f"op {self.op}")
        where = f"op {self.op}, {expr}"
        prepared = prepare(expr.xreplace(views), (i,), (self.dim,), set(tensors) | set(self.params), tensors, where)
        printer = NumPyPrinter(env, prepared, where)
        reps, reduced = common_subexpressions(prepared.expr)
        name = f"_g{len(self.general)}"
        self.general.append(name)
        lines = lower_statement_lines(printer, reps, reduced, name, prepared.indices, f"({self.dim.name},)")
        if any(re.search(rf"\b{self.dim.name}\b", line) for line in lines):  # an extent: the chunk's
            lines.insert(0, f"{self.dim.name} = _n")
        self.lines += lines
        result = ("array", name, None)
        return result if out is None else self._copy(result, out)

    def _bracketed(self, expr) -> bool:
        """A bracket over tensor data, or a product with one: no in-place ufunc form."""
        brackets = (primitives.Iverson, sp.KroneckerDelta)
        factors = expr.args if isinstance(expr, sp.Mul) else (expr,)
        return any(isinstance(f, brackets) and self.tensor(f) for f in factors)

    def _mul(self, expr, out):
        if self._bracketed(expr):
            return self._general(expr, out)
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
        return self._general(expr, out)  # no in-place ufunc spelling: the op printer's (strict)


def chunk_body(plan: KernelPlan) -> tuple[list[str], list[tuple[str, str]], int, list[str]]:
    """``(lines, hoisted scalars, scratch rows, formulas)`` of the chunk loop of a multi-tensor map:
    an update rule's statements written over the inputs they update (view ``<input>_``), an op's
    into its outputs' chunks (view ``<output>_``)."""
    op = plan.op
    launch = plan.multi
    (i,) = {ix for st in launch.statements for ix in st.indices}
    tensors = [t for t in op.inputs if t.dims]
    views = {sp.IndexedBase(t.name, real=True)[i]: f"{t.name}_" for t in tensors}
    scalar_names = {sp.Symbol(t.name, real=True): t.name for t in op.inputs if not t.dims}
    scalar_names.update({p.symbol: p.name for p in op.params})
    consts: dict = {}
    general: list = []
    lines, rows, formulas = [], 0, []
    for st in launch.statements:
        target = plan.updates.get(st.target, st.target)
        em = _Emitter(op.name, views, consts, scalar_names, launch.space[0], general,
                      {t.name for t in op.inputs if not t.dims}, {p.name for p in op.params})
        em.rows, em.free = rows, list(range(rows))[::-1]  # every scratch row is free again
        em.emit(st.expr, out=f"{target}_")
        rows = max(rows, em.rows)
        formulas.append(st.formula)
        where = "written over" if st.target in plan.updates else "into"
        lines += [f"# {st.formula}   ({where} {target})", *em.lines]
        # later statements read the new value where this one wrote it
        views[sp.IndexedBase(st.target, real=True)[i]] = f"{target}_"
    hoisted = [(name, code) for name, code in consts.values()]
    return lines, hoisted, rows, formulas


def value_lines(plan: KernelPlan) -> list[str]:
    """The body of ``_value(<tensor>, <scalars>, <params>, _dt)``: the op's one statement
    (``multi_reduce``) over one flat vector, printed by the op printer; it returns the value."""
    op = plan.op
    st = plan.multi.statements[0]
    dim = plan.multi.space[0]
    tensor = next(t.name for t in op.inputs if t.dims)
    tensors = {tensor: (dim,), st.target: ()}
    tensors.update({t.name: () for t in op.inputs if not t.dims})
    params = {p.name for p in op.params}
    env = Env(tensors, set(), params, {dim.name}, {dim.size: dim.name}, f"op {op.name}")
    where = f"op {op.name}, multi-tensor {st.target}"
    prepared = prepare(st.expr, (), (), set(tensors) | params | {dim.name}, tensors, where)
    printer = NumPyPrinter(env, prepared, where)
    reps, reduced = common_subexpressions(prepared.expr)
    return [f"# {st.formula}", f"{dim.name} = {tensor}.shape[0]",
            *lower_statement_lines(printer, reps, reduced, st.target, (), "()"), f"return {st.target}"]
