"""Operation declarations in index notation, and the registry that lists them.

A declaration is one block: inputs with named dimensions and roles, scalar params, intermediates
and outputs as SymPy expressions over ``Indexed`` entries and ``Sum``s with symbolic bounds, the
facts the math may use, the domain to sample test points from and the tolerances per dtype.
Tensors are never expanded into scalars: a dimension is a symbol, so derivation cost does not
depend on sizes.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Mapping

import sympy as sp

from . import primitives


class DeclarationError(ValueError):
    """A declaration is malformed; the message names the op and the problem."""


class DuplicateOpError(DeclarationError):
    """Two declarations of one op name; ``first`` and ``second`` are their modules."""

    def __init__(self, name: str, first: str, second: str):
        super().__init__(f"op {name!r} is declared twice: in {first or '?'} and in {second or '?'}")
        self.name, self.first, self.second = name, first, second


class Role(enum.Enum):
    DIFF = "differentiable"  # a float tensor that gets a gradient
    LABEL = "label"  # integer class labels: no gradient
    CONST = "constant"  # a float tensor held fixed (targets): no gradient


@dataclass(frozen=True)
class Dim:
    """A named, symbolic tensor dimension; ``index`` is the letter used for it in gradients.

    A ``leading`` dim stands for any number of leading axes, as torch's ``[*, D]``: it must be the
    first dim of every tensor that has it, and the generated modules fold those axes into it
    (``x[2, 3, 5, D]`` runs as ``x[30, D]``) and unfold outputs and gradients again."""

    name: str
    index: str
    extent: sp.Expr | None = None  # derived dims (conv output size) give their formula
    leading: bool = False
    # The least size the generated modules accept. 0 by default: empty batches, rows and features
    # give empty (or empty-sum) results as torch does. 1 where torch refuses an empty dim (a max
    # over an empty row, a convolution's kernel or output channels); a derived dim is always >= 1.
    min_size: int | None = field(default=None, compare=False)  # a check on sizes, not part of the dim's identity
    # Dims whose emptiness excuses min_size (torch takes a conv2d input of height 0 only when its
    # batch or channels are empty): ``Dim("H", "h", min_size=1, empty_with=("N", "Cin"))``.
    empty_with: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        if self.min_size is None:
            object.__setattr__(self, "min_size", 1 if self.extent is not None else 0)

    @property
    def symbol(self) -> sp.Symbol:
        return sp.Symbol(self.name, integer=True, positive=True)

    @property
    def least(self):
        """The least size as the generated size checks take it: ``min_size``, or ``(min_size,
        empty_with)`` (``symgrad.runtime.domains.check_sizes``)."""
        return (self.min_size, tuple(self.empty_with)) if self.empty_with else self.min_size

    @property
    def size(self) -> sp.Expr:
        return self.extent if self.extent is not None else self.symbol


def idx(names: str) -> tuple[sp.Symbol, ...]:
    """Index symbols, e.g. ``b, i, k = idx("b i k")``."""
    return tuple(sp.Symbol(n, integer=True) for n in names.split())


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[Dim, ...]
    role: Role = Role.DIFF
    domain: tuple[float, float] = (-2.0, 2.0)  # sampling interval for test points (DIFF/CONST)

    @property
    def base(self) -> sp.IndexedBase:
        if self.role is Role.LABEL:
            return sp.IndexedBase(self.name, integer=True)
        return sp.IndexedBase(self.name, real=True)

    def __getitem__(self, indices) -> sp.Expr:
        if not isinstance(indices, tuple):
            indices = (indices,)
        if len(indices) != len(self.dims):
            raise DeclarationError(f"tensor {self.name} has {len(self.dims)} dims, indexed with {len(indices)}")
        if not indices:
            return sp.Symbol(self.name, real=True)
        return self.base[indices]


@dataclass(frozen=True)
class Domain:
    """The values a param may take: an interval of the reals (of the integers for an integer param),
    each end open or closed. Spell it as text in a declaration: ``"finite"`` (the default: any
    number but NaN and +-inf), ``"[0, 1]"``, ``"(0, inf)"``, ``"[1, inf)"``, ``"{0, 1}"`` (integers
    only, same as ``"[0, 1]"``). The generated modules of every target check each param against its
    domain before computing anything (:func:`symgrad.runtime.domains.check_params`)."""

    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False

    @staticmethod
    def parse(spec: "Domain | str") -> "Domain":
        if isinstance(spec, Domain):
            return spec
        text = str(spec).strip()
        if text == "finite":
            return Domain()
        m = re.fullmatch(r"\{\s*(-?\d+)\s*,\s*(-?\d+)\s*\}", text)
        if m:
            return Domain(float(m[1]), float(m[2]), True, True)
        m = re.fullmatch(r"([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])", text)
        if not m:
            raise DeclarationError(f"domain {text!r}: write 'finite', an interval such as '[0, 1]' or '(0, inf)', or '{{0, 1}}'")
        try:
            low, high = float(m[2]), float(m[3])
        except ValueError:
            raise DeclarationError(f"domain {text!r}: its ends must be numbers or +-inf") from None
        if math.isnan(low) or math.isnan(high) or low > high:
            raise DeclarationError(f"domain {text!r} is empty")
        return Domain(low, high, m[1] == "[" and math.isfinite(low), m[4] == "]" and math.isfinite(high))

    def contains(self, value) -> bool:
        v = float(value)
        return (self.low <= v if self.low_closed else self.low < v) and (v <= self.high if self.high_closed else v < self.high)

    def text(self, integer: bool = False) -> str:
        """How messages and ``symgrad list`` name it: ``finite``, ``in [0, 1]``, ``an integer >= 1``."""

        def num(v):
            return str(int(v)) if float(v).is_integer() else repr(float(v))

        if integer:
            lo = None if math.isinf(self.low) else math.floor(self.low) + (0 if self.low_closed and self.low.is_integer() else 1)
            hi = None if math.isinf(self.high) else math.ceil(self.high) - (0 if self.high_closed and self.high.is_integer() else 1)
            if lo is None and hi is None:
                return "an integer"
            if hi is None:
                return f"an integer >= {lo}"
            if lo is None:
                return f"an integer <= {hi}"
            if hi - lo <= 3:
                return "in {" + ", ".join(str(v) for v in range(lo, hi + 1)) + "}"
            return f"an integer in [{lo}, {hi}]"
        if math.isinf(self.low) and math.isinf(self.high):
            return "finite"
        lo = "-inf" if math.isinf(self.low) else num(self.low)
        hi = "inf" if math.isinf(self.high) else num(self.high)
        return f"in {'[' if self.low_closed else '('}{lo}, {hi}{']' if self.high_closed else ')'}"

    def literal(self, integer: bool = False) -> str:
        """Python source of the entry the generated modules pass to the runtime check:
        ``(low, high, low_closed, high_closed, text)``."""

        def end(v):
            return repr(float(v)) if math.isfinite(v) else ("float('inf')" if v > 0 else "-float('inf')")

        return f"({end(self.low)}, {end(self.high)}, {self.low_closed}, {self.high_closed}, {self.text(integer)!r})"


@dataclass(frozen=True)
class Param:
    """A scalar param (eps, lr, alpha...): a name with a default and a :class:`Domain`
    (``domain="[0, 1]"``; a float param's default domain is ``"finite"``, an integer's any integer).

    A param is its own symbol: use it in formulas directly (``x[b, i] + eps``, ``Param`` turns
    into :attr:`symbol` under SymPy arithmetic), or through ``.symbol``. Either way the formula
    and the declaration hold one object, so a typo'd name cannot silently become a new symbol:
    a formula whose free symbol is no param, dim, input or index is refused at registration.
    """

    name: str
    default: float
    integer: bool = False
    doc: str = ""
    domain: Domain | str = "finite"

    def __post_init__(self):
        domain = Domain.parse(self.domain)
        object.__setattr__(self, "domain", domain)
        if not domain.contains(self.default):
            raise DeclarationError(f"param {self.name}: its default {self.default!r} is outside its domain {domain.text(self.integer)}")

    @property
    def symbol(self) -> sp.Symbol:
        if self.integer:
            return sp.Symbol(self.name, integer=True)
        return sp.Symbol(self.name, real=True)

    def _sympy_(self) -> sp.Symbol:
        return self.symbol

    def __str__(self) -> str:
        return self.name


def _symbolic(name):
    def method(self, *other):
        return getattr(self.symbol, name)(*other)

    method.__name__ = name
    return method


for _name in ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
              "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__lt__", "__le__", "__gt__", "__ge__"):
    setattr(Param, _name, _symbolic(_name))


@dataclass(frozen=True)
class Output:
    """``name[indices] = expr``; intermediates are outputs the user does not see."""

    name: str
    indices: tuple[sp.Symbol, ...]
    expr: sp.Expr
    dims: tuple[Dim, ...]
    # An update rule's output is the new value of one of its inputs (``p_new`` of ``p``): the
    # generated update writes it over that input, in place (see :func:`update`).
    updates: str | None = field(default=None, compare=False)

    def at(self, indices) -> sp.Expr:
        if not indices:
            return sp.Symbol(self.name, real=True)
        return sp.IndexedBase(self.name, real=True)[tuple(indices)]


@dataclass(frozen=True)
class LabelRange:
    """Fact: ``label`` entries lie in [0, dim), so ``Sum(onehot(label, i), i) == 1``.

    Rows whose label is ``ignore`` are allowed outside the range: the op must weight them by 0.
    ``ignore`` names that param (``"ignore_index"``). The generated modules check the fact on their
    inputs, as torch does (``Target 9 is out of bounds``): a label outside ``[0, dim)`` that is not
    the ignored one is an error, never a loss (:func:`symgrad.runtime.domains.label_error`).
    """

    label: str
    dim: Dim
    ignore: str | None = None


@dataclass(frozen=True)
class Op:
    name: str
    doc: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Output, ...]
    intermediates: tuple[Output, ...] = ()
    params: tuple[Param, ...] = ()
    facts: tuple[LabelRange, ...] = ()
    # Sizes to instantiate in tests: each a dict dim name -> int.
    test_sizes: tuple[Mapping[str, int], ...] = ()
    tolerances: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # dtype -> (rtol, atol)
    module: str = ""  # the module that registered it (set by ``register``), named in generated banners

    def __post_init__(self):
        # Formulas hold only primitives every target lowers: Max, Min, sign, Heaviside and
        # Piecewise become Iverson brackets here (symgrad.primitives, ``canonical``), once.
        tensors = {t.name for t in self.inputs} | {q.name for q in (*self.intermediates, *self.outputs)}

        def constant(e) -> bool:
            return not e.atoms(sp.Indexed) and not any(str(s) in tensors for s in e.free_symbols)

        for kind in ("intermediates", "outputs"):
            forms = getattr(self, kind)
            new = tuple(dataclasses.replace(q, expr=primitives.canonicalize(q.expr, constant)) for q in forms)
            if any(a.expr is not b.expr for a, b in zip(new, forms)):
                object.__setattr__(self, kind, new)

    @property
    def dims(self) -> tuple[Dim, ...]:
        seen: dict[str, Dim] = {}
        for t in (*self.inputs, *self.outputs, *self.intermediates):
            for d in t.dims:
                seen.setdefault(d.name, d)
        return tuple(seen.values())

    def tensor(self, name: str) -> Tensor:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def differentiable(self) -> tuple[Tensor, ...]:
        return tuple(t for t in self.inputs if t.role is Role.DIFF)

    @property
    def updates(self) -> dict[str, str]:
        """Output name -> the input it is the new value of; empty for an ordinary op."""
        return {q.name: q.updates for q in self.outputs if q.updates is not None}

    @property
    def kind(self) -> str:
        """``"op"``: a differentiable tensor op (forward, backward, vjp); ``"update"``: an update
        rule (an optimizer step): every output is the new value of an input, written over it in
        place by one multi-tensor launch, and nothing is differentiated."""
        return "update" if self.updates else "op"


def update(tensor: Tensor, indices, expr) -> Output:
    """The output ``<tensor>_new[indices] = expr`` of an update rule: the new value of the input
    ``tensor`` (a parameter or an optimizer state), which the generated update writes over it."""
    if not isinstance(indices, tuple):
        indices = (indices,)
    return Output(f"{tensor.name}_new", tuple(indices), sp.sympify(expr), tensor.dims, updates=tensor.name)


def output(name: str, indices, expr, dims) -> Output:
    if not isinstance(indices, tuple):
        indices = (indices,)
    if not isinstance(dims, tuple):
        dims = (dims,)
    return Output(name, tuple(indices), sp.sympify(expr), tuple(dims))


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")


class Registry:
    """Ops by name, in registration order (which is also the order tests and generation use)."""

    def __init__(self) -> None:
        self._ops: dict[str, Op] = {}

    def add(self, op: Op) -> Op:
        if not _NAME.match(op.name):
            raise DeclarationError(f"op name {op.name!r} is not an identifier")
        if op.name in self._ops:
            raise DuplicateOpError(op.name, self._ops[op.name].module, op.module)
        _check(op)
        self._ops[op.name] = op
        return op

    def get(self, name: str) -> Op:
        try:
            return self._ops[name]
        except KeyError:
            raise KeyError(f"unknown op {name!r}; `symgrad list` shows the registered ops") from None

    def __iter__(self):
        return iter(self._ops.values())

    def __contains__(self, name: str) -> bool:
        return name in self._ops

    def names(self) -> list[str]:
        return list(self._ops)

    def of_kind(self, kind: str) -> list[Op]:
        """The ops of one kind (:attr:`Op.kind`): ``"op"``, differentiable ops whose modules have
        forward, backward and vjp; ``"update"``, update rules whose modules have ``update``. A test
        of one module contract iterates the kind it applies to."""
        if kind not in ("op", "update"):
            raise ValueError(f"kind must be 'op' or 'update', got {kind!r}")
        return [op for op in self._ops.values() if op.kind == kind]


def _check(op: Op) -> None:
    """Reject declarations whose outputs read undeclared tensors or symbols, leave indices unbound,
    or use a function some target cannot lower (symgrad.primitives)."""
    known = {t.name for t in op.inputs} | {o.name for o in op.intermediates}
    # the symbols a formula may use besides its indices: params, dims, scalar inputs and values
    allowed = {p.symbol for p in op.params} | {d.symbol for d in op.dims}
    allowed |= {s for d in op.dims if d.extent is not None for s in d.extent.free_symbols}
    allowed |= {sp.Symbol(t.name, real=True) for t in op.inputs if not t.dims}
    for t in (*op.inputs, *op.intermediates, *op.outputs):
        late = [d.name for d in t.dims[1:] if d.leading]
        if late:
            raise DeclarationError(f"op {op.name}: {t.name} has the leading dim {late[0]} after its first axis; a leading dim comes first")
    for out in (*op.intermediates, *op.outputs):
        if len(out.indices) != len(out.dims):
            raise DeclarationError(f"op {op.name}: output {out.name} has {len(out.dims)} dims but {len(out.indices)} indices")
        for base in out.expr.atoms(sp.IndexedBase):
            if str(base) not in known:
                raise DeclarationError(f"op {op.name}: output {out.name} reads undeclared tensor {base}")
        loose = {s for s in out.expr.free_symbols if type(s) is sp.Symbol and s.is_integer and not s.is_positive} - set(out.indices)
        loose = {s for s in loose if str(s) not in known} - {p.symbol for p in op.params}
        if loose:
            raise DeclarationError(f"op {op.name}: output {out.name} has unbound indices {sorted(map(str, loose))}")
        labels = {base.label for base in out.expr.atoms(sp.IndexedBase)}
        for s in sorted(out.expr.free_symbols - set(out.indices) - allowed - labels, key=str):
            if not isinstance(s, sp.Symbol) or (s.is_integer and not s.is_positive):
                continue  # an entry (x[b, i]) or an index (checked above)
            same = [x for x in allowed if str(x) == str(s)]
            hint = (f"; it has other assumptions than the declared {s} ({same[0].assumptions0}): use the declaration "
                    "itself in the formula (a Param is its symbol) or its .symbol" if same
                    else "; declare it as a Param, a Dim or an input, or fix its spelling")
            raise DeclarationError(f"op {op.name}: output {out.name} uses undeclared symbol {s}{hint}")
        for node, why in primitives.unsupported(out.expr):
            raise DeclarationError(f"op {op.name}: output {out.name} uses {node}, which symgrad cannot lower: {why}")
        known.add(out.name)
        if not out.indices:
            allowed.add(sp.Symbol(out.name, real=True))
    if op.updates:
        _check_update(op)


def _check_update(op: Op) -> None:
    """An update rule: every output replaces an input of its own dims, no input is differentiated,
    and no statement reads an input's old value after an earlier output has overwritten it (the
    update runs in place, in declaration order)."""
    inputs = {t.name: t for t in op.inputs}
    for t in op.inputs:
        if t.role is Role.DIFF:
            raise DeclarationError(f"op {op.name}: update rules are not differentiated; declare input {t.name} "
                                   "with Role.CONST (a value the update reads) instead of Role.DIFF")
    written: dict[str, str] = {}
    for out in op.outputs:
        if out.updates is None:
            raise DeclarationError(f"op {op.name}: output {out.name} is not the new value of an input; every output of "
                                   "an update rule is one (declare it with symgrad.declare.update)")
        t = inputs.get(out.updates)
        if t is None or not t.dims:
            raise DeclarationError(f"op {op.name}: output {out.name} updates {out.updates!r}, which is not a tensor input")
        if t.dims != out.dims:
            raise DeclarationError(f"op {op.name}: output {out.name} has dims {[d.name for d in out.dims]} but updates "
                                   f"{t.name}[{', '.join(d.name for d in t.dims)}]")
        if out.updates in written.values():
            raise DeclarationError(f"op {op.name}: input {out.updates} is updated twice")
        written[out.name] = out.updates
    defs = {q.name: q.expr for q in op.intermediates}
    overwritten: set[str] = set()
    for out in op.outputs:
        stale = sorted(_reads(out.expr, defs) & overwritten)
        if stale:
            raise DeclarationError(f"op {op.name}: output {out.name} reads the old value of {stale[0]}, which an earlier "
                                   f"output has already overwritten in place; read {stale[0]}_new or reorder the outputs")
        overwritten.add(out.updates)


def _reads(expr: sp.Expr, defs: dict) -> set[str]:
    """The tensors ``expr`` reads, through intermediates."""
    names = {str(a.base) for a in expr.atoms(sp.Indexed)} | {str(s) for s in expr.free_symbols}
    for n in list(names):
        if n in defs:
            names |= _reads(defs[n], defs)
    return names


REGISTRY = Registry()


def register(op: Op) -> Op:
    """Add ``op`` to the registry, recording the module that declares it."""
    if not op.module:
        op = dataclasses.replace(op, module=sys._getframe(1).f_globals.get("__name__", ""))
    return REGISTRY.add(op)
