"""The NumPy printer: one IR statement -> vectorized NumPy lines, evaluated in an axis space.

Every index of a statement (free or bound) is an axis (see :mod:`symgrad.targets.statements`). A
printed sub-expression is an array over exactly the axes of its free indices, in canonical order,
so lining two up is inserting ``None`` for the axes one lacks (``dout[:, None]``), never a copy.

How each node lowers:

* tensor entry at plain indices covering the tensor -> the array itself, transposed if the indices
  come in another order; anything else (strided, shifted, label-addressed reads) -> a masked gather
  ``_m.gather(T, i0, i1, ...)`` whose index arrays are printed from the index expressions; reads
  outside the extent give 0;
* ``Sum`` over a product of arrays -> ``np.einsum`` (contractions and stencils: no product of all
  axes is ever formed); with a gathered operand, ``_m.contract``, where a term that reads outside
  a tensor contributes nothing (``0*inf`` would be NaN: a conv's padding against an infinite
  filter entry); over anything else -> ``np.sum(..., axis=...)``; ``ReduceMax`` -> ``np.max``;
* an index used as a value -> an ``np.arange`` over its range (one-hots ``KroneckerDelta(i, y[b])``
  become ``_i[None, :] == y[:, None]``);
* Iverson brackets, one-hots and weights (factors that read only params and brackets, such as a
  label-smoothing target) are strong zeros: ``[c]*v`` prints as ``np.where(c, v, 0)``, so a masked
  infinity never becomes NaN;
* functions and powers use their spellings in :data:`symgrad.primitives.TABLE`: ``numpy`` (arrays)
  or ``numpy_scalar`` (params only, ``math``: NumPy scalars would promote float32 arrays to float64).

A statement with one-hot terms, or with a mask among the factors over fewer axes than the statement
(a row mask ``w[b]``), is lowered by :func:`lower_row_form_lines` instead, in place: the row scale
is formed once per row, one-hots are written as one entry per row (``_m.add_onehot``), masked rows
are zeroed by index afterwards (``_m.zero_unless``), and a temporary the kernel no longer reads
becomes the result's buffer. softmax + cross-entropy's ``dx`` then costs three passes over B x C,
not nine.

The printer is strict: a node without a rule raises :class:`LoweringError` naming it.
"""
from __future__ import annotations

import itertools
import re

import sympy as sp
from sympy.printing.printer import Printer

from .. import primitives
from ..primitives import Iverson, ReduceMax
from .statements import LoweringError, Prepared, RowForm, common_subexpressions

DTYPE = "_dt"  # the local holding the float dtype the kernel computes in

READS = "_m.reads"  # a gathered einsum operand that keeps where it read inside its tensor


def _reads(operands) -> bool:
    return any(code.startswith(READS + "(") for code, _ in operands)


_RELATIONS = {sp.StrictGreaterThan: ">", sp.GreaterThan: ">=", sp.StrictLessThan: "<", sp.LessThan: "<=", sp.Eq: "==", sp.Ne: "!="}
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Env:
    """What the printer knows about an op's names: tensors (name -> ``Dim``s), which are labels,
    scalar buffers, params and dims. ``where`` names the op in errors."""

    def __init__(self, tensors: dict, labels: set, params: set, dims: set, sizes: dict, where: str, masks: set = frozenset(),
                 maxes: dict | None = None):
        self.tensors = tensors
        self.maxes = dict(maxes or {})  # buffers holding a row max (the plan's shared statistics) -> the entry
        self.masks = set(masks)  # buffers that hold a weight (w[b] = [y[b] != ignore]): strong zeros too
        self.sizes = sizes  # size expression -> dim name, to print extents as the dim's local
        self.labels = labels
        self.scalars = {n for n, d in tensors.items() if not d}
        self.params = params
        self.dims = dims
        self.where = where


class _Temp:
    def __init__(self, axes, values: bool, weight: bool, data: bool):
        self.axes, self.values, self.weight, self.data = axes, values, weight, data


def top_level_ops(code: str) -> set[str]:
    """Operator characters outside brackets and string literals (decides where parentheses go)."""
    ops, depth, quote = set(), 0, None
    for i, ch in enumerate(code):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0:
            if ch in "+-*/%<>=&|~!@":
                ops.add("**" if code[i : i + 2] == "**" or code[i - 1 : i + 1] == "**" else ch)
            elif ch == " " and code[i : i + 4] in (" if ", " and", " or "):
                ops.add("if")
    return ops


def wrap(code: str, allowed: set[str] = frozenset()) -> str:
    """``code`` in parentheses unless its top-level operators are all in ``allowed``."""
    return code if top_level_ops(code) <= set(allowed) else f"({code})"


class NumPyPrinter(Printer):
    """Prints one prepared statement's nodes as NumPy array expressions over its axes."""

    printmethod = "_numpycode"

    def __init__(self, env: Env, prepared: Prepared, where: str):
        super().__init__()
        self.env = env
        self.where = where
        self.axis_order = prepared.axes
        self.ranges = prepared.ranges
        self.index_set = set(prepared.axes)
        self.temps: dict[sp.Symbol, _Temp] = {}
        self.maxes: dict = dict(env.maxes)  # a temp or buffer holding a row max -> the entry it is the max of
        self.lines: list[str] = []
        self._aranges: dict[sp.Symbol, str] = {}
        self._hoisted = 0
        self._axes_cache: dict = {}
        # params known to be nonzero here: the code is inside ``if <param> != 0:`` already
        self.nonzero: set = set()
        self.letters = self._letters()

    # --- axes and classification ---------------------------------------------------------------

    def axes(self, e: sp.Basic) -> tuple:
        """The axes ``e`` varies along: its free indices, and those of the temporaries it reads."""
        hit = self._axes_cache.get(e)
        if hit is None:
            found = self._axis_set(e)
            hit = self._axes_cache[e] = tuple(a for a in self.axis_order if a in found)
        return hit

    def _axis_set(self, e) -> set:
        if isinstance(e, sp.Symbol):
            if e in self.index_set:
                return {e}
            return set(self.temps[e].axes) if e in self.temps else set()
        if isinstance(e, sp.Sum):
            inner = set(self.axes(e.function))
            for v, lo, hi in e.limits:
                inner = (inner - {v}) | set(self.axes(lo)) | set(self.axes(hi))
            return inner
        if isinstance(e, ReduceMax):
            body, v, lo, hi = e.args
            return (set(self.axes(body)) - {v}) | set(self.axes(lo)) | set(self.axes(hi))
        if isinstance(e, sp.Indexed):
            return set().union(*(self.axes(ix) for ix in e.indices))
        return set().union(*(self.axes(a) for a in e.args)) if e.args else set()

    def has_data(self, e: sp.Basic) -> bool:
        """Does ``e`` read anything that is an array at run time (tensors, scalar buffers, indices)?"""
        if isinstance(e, sp.Indexed):
            return True
        if isinstance(e, sp.Symbol):
            if e in self.temps:
                return self.temps[e].data
            return e in self.index_set or str(e) in self.env.scalars
        return any(self.has_data(a) for a in e.args)

    def reads_values(self, e: sp.Basic) -> bool:
        """Does ``e`` read float data other than through a bracket's condition?"""
        if isinstance(e, (Iverson, sp.KroneckerDelta)):
            return False
        if isinstance(e, sp.Indexed):
            return str(e.base) not in self.env.labels and str(e.base) not in self.env.masks
        if isinstance(e, sp.Symbol):
            if e in self.temps:
                return self.temps[e].values
            return str(e) in self.env.scalars and str(e) not in self.env.masks
        return any(self.reads_values(a) for a in e.args)

    @staticmethod
    def is_bracket(e) -> bool:
        return isinstance(e, (Iverson, sp.KroneckerDelta))

    def is_weight(self, e) -> bool:
        """A factor that may be 0 at run time but reads no float data: params, brackets."""
        if self.is_bracket(e) or self.reads_values(e):
            return False
        if isinstance(e, sp.Symbol) and e in self.temps:
            return self.temps[e].weight
        if e.has(Iverson, sp.KroneckerDelta) or any(str(a.base) in self.env.masks for a in e.atoms(sp.Indexed)):
            return True
        return any(str(s) in self.env.params or str(s) in self.env.masks for s in e.free_symbols)

    # --- helpers ------------------------------------------------------------------------------

    def _letters(self) -> dict:
        names = [str(a) for a in self.axis_order]
        out, used = {}, set()
        for a, n in zip(self.axis_order, names):
            if len(n) == 1 and n in _LETTERS and n not in used:
                out[a] = n
                used.add(n)
        for a in self.axis_order:
            if a not in out:
                out[a] = next(ch for ch in _LETTERS if ch not in used)
                used.add(out[a])
        return out

    def align(self, code: str, have: tuple, want: tuple) -> str:
        """An array over axes ``have`` viewed over ``want`` (a superset, same canonical order)."""
        if not have or have == want:
            return code
        return f"{wrap(code)}[{', '.join(':' if a in have else 'None' for a in want)}]"

    def aligned(self, e: sp.Basic, want: tuple) -> str:
        return self.align(self._print(e), self.axes(e), want)

    def switches(self, factors) -> list:
        """The factors that are params only and may be 0 at run time (label smoothing's ``eps``):
        a product with one is skipped by a Python ``if`` rather than masked elementwise."""
        return [f for f in factors if self.is_weight(f) and not self.axes(f) and not self.has_data(f) and f not in self.nonzero]

    def fresh_name(self, base: str) -> str:
        """A local name no temporary or index array of this statement uses."""
        taken = {str(t) for t in self.temps} | {f"_{a}" for a in self.axis_order} | set(self._aranges.values())
        for n in itertools.chain([""], itertools.count(2)):
            if f"{base}{n}" not in taken:
                return f"{base}{n}"
        raise AssertionError

    def hoist(self, e: sp.Expr) -> sp.Expr:
        """``e`` computed once into a named temporary (it is used twice); returns its symbol."""
        if e.is_Symbol or e.is_Number or isinstance(e, sp.Indexed):
            return e
        sym = sp.Symbol(f"_w{self._hoisted}", real=True)
        self._hoisted += 1
        self.define_temp(sym, e)
        return sym

    def arange(self, ix: sp.Symbol) -> str:
        name = self._aranges.get(ix)
        if name is None:
            base = str(ix)
            name = f"_ix_{base}" if re.fullmatch(r"[tw]\d+", base) else f"_{base}"
            lo, hi = self.ranges[ix]
            stop = self.size_code(sp.expand(hi + 1))
            self.lines.append(f"{name} = np.arange({stop})" if lo == 0 else f"{name} = np.arange({self._print(lo)}, {stop})")
            self._aranges[ix] = name
        return name

    def extent(self, ix: sp.Symbol) -> sp.Expr:
        lo, hi = self.ranges[ix]
        return sp.expand(hi - lo + 1)

    def size_code(self, size: sp.Expr) -> str:
        """A size, as the local of the dim it is (``Ho``) when it is one."""
        name = self.env.sizes.get(sp.expand(size))
        return name if name is not None else self._print(size)

    def define_temp(self, sym: sp.Symbol, e: sp.Basic) -> None:
        """A common subexpression, computed once over its own axes."""
        code = self._print(e)
        self.temps[sym] = _Temp(self.axes(e), self.reads_values(e), self.is_weight(e), self.has_data(e))
        if isinstance(e, ReduceMax):
            self.maxes[sym] = e.args[0]
        self.lines.append(f"{sym} = {code}")

    def emptyPrinter(self, expr):
        raise LoweringError(f"{self.where}: the NumPy target has no rule for {type(expr).__name__} (in {expr})")

    # --- atoms -------------------------------------------------------------------------------

    def _print_Symbol(self, e):
        if e in self.index_set:
            return self.arange(e)
        name = str(e)
        if e in self.temps or name in self.env.params or name in self.env.dims or name in self.env.scalars:
            return name
        raise LoweringError(f"{self.where}: unknown symbol {name} (not a param, dim, buffer or index)")

    def _print_Integer(self, e):
        return str(int(e))

    def _print_Rational(self, e):
        return f"{e.p}/{e.q}"

    def _print_Float(self, e):
        return repr(float(e))

    def _print_NumberSymbol(self, e):
        if e == sp.pi:
            return "math.pi"
        if e == sp.E:
            return "math.e"
        return repr(float(e))

    def _print_Infinity(self, e):
        return "math.inf"

    def _print_NegativeInfinity(self, e):
        return "-math.inf"

    def _print_BooleanTrue(self, e):
        return "True"

    def _print_BooleanFalse(self, e):
        return "False"

    # --- tensor entries ----------------------------------------------------------------------

    def _print_Indexed(self, e):
        code, have = self.entry(e)
        want = tuple(a for a in self.axis_order if a in have)
        if have == want:
            return code
        perm = tuple(have.index(a) for a in want)
        return f"{wrap(code)}.T" if len(perm) == 2 else f"{wrap(code)}.transpose{perm}"

    def entry(self, e: sp.Indexed, guards=(), fn: str = "_m.gather") -> tuple[str, tuple]:
        """A tensor entry as ``(code, axes)``, the axes in the order the code lays them out: the
        tensor itself for plain indices; else a gather whose plain positions stay whole axes
        (``_m.ALL``) and whose other positions are index arrays printed from their expressions.

        ``guards`` are brackets over the gather's index axes (a stride's divisibility): they go
        into the index as -1, always out of range, so the gather reads 0 there; no full-size mask.
        ``fn`` is ``_m.gather``, or ``_m.reads`` for an operand of ``_m.contract``."""
        name = str(e.base)
        if name not in self.env.tensors:
            raise LoweringError(f"{self.where}: reads unknown tensor {name}")
        dims = self.env.tensors[name]
        if len(e.indices) != len(dims):
            raise LoweringError(f"{self.where}: {e} has {len(e.indices)} indices but {name} has {len(dims)} dims")
        if self._plain(e):
            return name, tuple(e.indices)
        whole = [self._whole(e, p) for p in range(len(dims))]
        arrays = [p for p in range(len(dims)) if not whole[p]]
        block = tuple(a for a in self.axis_order if any(a in self.axes(e.indices[p]) for p in arrays))
        index = [("_m.ALL" if whole[p] else self.aligned(ix, block)) for p, ix in enumerate(e.indices)]
        if guards:
            cond = " & ".join(self.cond(g, block) for g in guards)
            index[arrays[0]] = f"np.where({cond}, {index[arrays[0]]}, -1)"
        kept = [e.indices[p] for p in range(len(dims)) if whole[p]]
        if arrays == list(range(arrays[0], arrays[-1] + 1)):  # NumPy puts an adjacent block in place
            before = [e.indices[p] for p in range(arrays[0]) if whole[p]]
            have = tuple(before) + block + tuple(kept[len(before):])
        else:
            have = block + tuple(kept)
        return f"{fn}({name}, {', '.join(index)})", have

    def gather_block(self, e: sp.Indexed) -> tuple | None:
        """The axes of a gathered entry's index arrays (None when ``e`` is read plainly)."""
        if str(e.base) not in self.env.tensors or self._plain(e):
            return None
        arrays = [p for p in range(len(e.indices)) if not self._whole(e, p)]
        return tuple(a for a in self.axis_order if any(a in self.axes(e.indices[p]) for p in arrays))

    def _whole(self, e: sp.Indexed, p: int) -> bool:
        """Can position ``p`` of ``e`` be read whole: a plain index over the full extent, used
        by no other position?"""
        ix = e.indices[p]
        if ix not in self.index_set:
            return False
        lo, hi = self.ranges[ix]
        if lo != 0 or sp.expand(hi + 1 - self.env.tensors[str(e.base)][p].size) != 0:
            return False
        return not any(ix in other.free_symbols for q, other in enumerate(e.indices) if q != p)

    def _plain(self, e: sp.Indexed) -> bool:
        """Is ``e`` read at distinct plain indices whose ranges are exactly the tensor's extents?"""
        dims = self.env.tensors[str(e.base)]
        if len(set(e.indices)) != len(e.indices) or len(dims) != len(e.indices):
            return False
        for ix, d in zip(e.indices, dims):
            if ix not in self.index_set or self.ranges[ix][0] != 0 or sp.expand(self.ranges[ix][1] + 1 - d.size) != 0:
                return False
        return True

    # --- arithmetic --------------------------------------------------------------------------

    def _print_Add(self, e):
        ax = self.axes(e)
        pair, terms = primitives.shift_first(e.as_ordered_terms(), self.maxes)
        if pair and not terms:
            pair, terms = [], pair
        small = [t for t in terms if self.axes(t) != ax]
        if len(small) >= 2 and len(small) < len(terms):
            # add the terms with fewer axes on their small arrays first: one full-size pass for them
            group = sp.Add(*small)
            terms = [t for t in terms if t not in small] + [group]
        if pair:  # x - max first, exact near the max (primitives.shift_first)
            terms = [sp.Add(*pair)] + terms
        out = []
        for t in terms:
            if t.could_extract_minus_sign() and not t.is_Add:
                code = wrap(self.aligned(-t, ax), {"*", "/", "**"})
                out.append(f"- {code}" if out else f"-{code}")
                continue
            code = self.aligned(t, ax)
            if out and code.startswith("-") and top_level_ops(code[1:]) <= {"*", "/", "**"}:
                out.append(f"- {code[1:]}")  # a sum of a negated body prints with its sign
            else:
                code = wrap(code, {"*", "/", "**", "+", "-"})
                out.append(f"+ {code}" if out else code)
        return " ".join(out)

    def _print_Mul(self, e):
        ax = self.axes(e)
        factors = list(e.args)
        brackets = [f for f in factors if self.is_bracket(f)]
        weights = [f for f in factors if self.is_weight(f)]
        if not any(self.reads_values(f) for f in factors) or not (brackets or weights):
            return self.product(factors, ax)
        # Strong zeros: where a bracket or a weight is 0 the product is 0, even against inf.
        # A weight of params only (label smoothing's eps) is a Python test: the term is skipped.
        switches = self.switches(weights)
        masks = [w for w in weights if w not in switches and w not in self.nonzero]
        rest = [f for f in factors if f not in brackets and f not in masks]
        conds = [self.cond(b, ax) for b in brackets]
        falses = [self.false_cond(b, ax) for b in brackets]
        if masks:
            w = self.hoist(sp.Mul(*masks))
            conds.append(f"({self.aligned(w, ax)} != 0)")
            rest.append(w)
        code = self.product(rest, ax)
        if conds:
            zero = "0"
            if any(falses):  # a bracket that compares a NaN is NaN, not 0 (primitives.bracket_false)
                zero = f"np.where({' | '.join(f for f in falses if f)}, {DTYPE}.type(0), {DTYPE}.type(np.nan))"
            code = f"np.where({' & '.join(conds)}, {code}, {zero})"
        if switches:
            code = f"({code} if {wrap(self._print(sp.Mul(*switches)), {'+', '-', '*', '/', '**'})} != 0 else {self.zeros(ax)})"
        return code

    def zeros(self, ax) -> str:
        if not ax:
            return f"{DTYPE}.type(0)"
        return f"np.zeros(({', '.join(self.size_code(self.extent(a)) for a in ax)},), dtype={DTYPE})"

    def product(self, factors, ax) -> str:
        """``a*b/(c*d)``; factors with fewer axes are multiplied together first (on the small
        arrays), so each full-size factor costs one pass; negative powers go below the line."""
        factors = list(factors)
        small = [f for f in factors if self.axes(f) != ax]
        big = [f for f in factors if self.axes(f) == ax]
        if small and big and any(not f.is_Number for f in small) and len(factors) > 2:
            gax = tuple(a for a in ax if any(a in self.axes(f) for f in small))
            lead = self._fraction(small, gax)
            sign = ""
            if lead.startswith("-"):
                sign, lead = "-", lead[1:]
            lead = self.align(wrap(lead, {"*", "/", "**"}), gax, ax)
            rest = self._fraction(big, ax)
            if rest.startswith("1/"):
                return f"{sign}{wrap(lead, {'*', '/', '**'})}{rest[1:]}"
            return f"{sign}{wrap(lead, {'*', '/', '**'})}*{wrap(rest, {'*', '/', '**'})}"
        return self._fraction(factors, ax)

    def _fraction(self, factors, ax) -> str:
        coeff = sp.Integer(1)
        num, den = [], []
        for f in factors:
            if f.is_Number:
                coeff *= f
            elif f.is_Pow and f.exp.is_Number and f.exp.is_negative:
                den.append(sp.Pow(f.base, -f.exp))
            else:
                num.append(f)
        sign = ""
        if coeff.is_negative:
            sign, coeff = "-", -coeff
        top = []
        if coeff.is_Rational:
            if coeff.p != 1 or not num:
                top.append(str(coeff.p))
            if coeff.q != 1:
                den.insert(0, sp.Integer(coeff.q))
        elif coeff != 1:
            top.append(self._print(coeff))
        top += [wrap(self.aligned(f, ax), {"*", "**"}) for f in primitives.saturating_first(num)]
        code = "*".join(top)
        if den:
            bottom = [wrap(self.aligned(f, ax), {"*", "**"}) for f in den]
            below = bottom[0] if len(bottom) == 1 and top_level_ops(bottom[0]) <= {"**"} else f"({'*'.join(bottom)})"
            if not any(self.has_data(f) for f in den) and any(str(s) in self.env.dims for f in den for s in f.free_symbols):
                below = f"_m.divisor({'*'.join(bottom)})"  # a dim may be 0 (an empty batch): x/0 as IEEE
            code = f"{code}/{wrap(below, {'**'})}"
        return f"{sign}{code}" if sign else code

    def _print_Pow(self, e):
        return self._print_Function(e)

    def _print_Mod(self, e):
        ax = self.axes(e)
        a, b = e.args
        return f"{wrap(self.aligned(a, ax), {'*', '**'})} % {wrap(self.aligned(b, ax))}"

    def _print_floor(self, e):
        return self._rounding(e, "//", "np.floor", "math.floor")

    def _print_ceiling(self, e):
        return self._rounding(e, None, "np.ceil", "math.ceil")

    def _rounding(self, e, intdiv, array_fn, scalar_fn):
        ax = self.axes(e)
        num, den = sp.fraction(sp.together(e.args[0]))
        if intdiv and den != 1 and num.is_integer and den.is_integer:
            # floor(n/d) of integers: floor division, exact at any size.
            return f"{wrap(self.aligned(num, ax), {'*', '**'})}//{wrap(self.aligned(den, ax))}"
        fn = scalar_fn if not self.has_data(e) else array_fn
        return f"{fn}({self.aligned(e.args[0], ax)})"

    # --- functions ---------------------------------------------------------------------------

    def _print_Function(self, e):
        """A primitive in its table spelling: ``numpy`` over arrays, ``numpy_scalar`` over params."""
        p = primitives.of(e)
        spelling = p.numpy if p is not None else None
        if spelling is None or spelling == primitives.STRUCTURAL:
            raise LoweringError(f"{self.where}: the NumPy target has no spelling for function {type(e).__name__} (in {e})")
        if callable(spelling):
            return spelling(self, e)
        if p.numpy_scalar is not None and not self.has_data(e):
            spelling = p.numpy_scalar
        return spelling.format(*(self._print(a) for a in e.args))

    def _print_Iverson(self, e):
        cond = self.cond(e, self.axes(e))
        false = self.false_cond(e, self.axes(e))
        if not self.has_data(e):
            return f"float({cond})" if false is None else f"(1.0 if {cond} else 0.0 if {false} else math.nan)"
        if false is not None:  # NaN where the comparison is unordered (primitives.bracket_false)
            return f"np.where({cond}, {DTYPE}.type(1), np.where({false}, {DTYPE}.type(0), {DTYPE}.type(np.nan)))"
        return f"np.asarray({cond}, dtype={DTYPE})"

    def _print_KroneckerDelta(self, e):
        return self._print_Iverson(e)

    def cond(self, bracket, ax) -> str:
        """The boolean array of a bracket, lined up with ``ax``."""
        if isinstance(bracket, sp.KroneckerDelta):
            rel = sp.Eq(*bracket.args, evaluate=False)
        else:
            rel = bracket.args[0]
        return self.align(f"({self._print(rel)})", self.axes(rel), ax)

    def false_cond(self, bracket, ax):
        """Where a bracket is surely 0 (None: wherever its condition fails), lined up with ``ax``."""
        false = primitives.bracket_false(bracket)
        if false is None:
            return None
        return self.align(f"({self._print(false)})", self.axes(false), ax)

    def _print_Relational(self, e):
        op = _RELATIONS.get(type(e))
        if op is None:
            raise LoweringError(f"{self.where}: the NumPy target has no rule for relation {type(e).__name__}")
        ax = self.axes(e)
        lhs, rhs = (wrap(self.aligned(a, ax), {"+", "-", "*", "/", "**", "%"}) for a in e.args)
        return f"{lhs} {op} {rhs}"

    def _print_And(self, e):
        return self._logic(e, "&")

    def _print_Or(self, e):
        return self._logic(e, "|")

    def _logic(self, e, op):
        ax = self.axes(e)
        return f" {op} ".join(f"({self.aligned(a, ax)})" for a in sorted(e.args, key=sp.default_sort_key))

    def _print_Not(self, e):
        return f"~({self._print(e.args[0])})"

    # --- reductions --------------------------------------------------------------------------

    def _print_ReduceMax(self, e):
        body, v = e.args[0], e.args[1]
        have = self.axes(body)
        if v not in have:
            return self._print(body)
        # initial=-inf: a max over an empty row (an empty batch's softmax) is -inf, not an error
        return f"np.max({self._print(body)}, axis={have.index(v)}, initial=-math.inf)"

    def _print_Sum(self, e):
        body = e.function
        bound = [v for v, _, _ in e.limits]
        have = self.axes(body)
        counts = [self.extent(v) for v in bound if v not in have]  # the body is constant along v
        reduce = [v for v in bound if v in have]
        if not reduce:
            code = self._print(body)
        else:
            operands, outside = self._operands(body)
            across = self._across_rows(reduce, self.axes(e), operands)
            if across:
                code = across
            elif len(operands) >= 2:
                code = self._einsum(operands, self.axes(e))
            elif isinstance(body, sp.Indexed) and self._plain(body):
                # a plain tensor: sum its own axes, no transposed view needed
                keep = [ix for ix in body.indices if ix not in reduce]
                if keep == [a for a in self.axis_order if a in keep]:
                    axis = tuple(body.indices.index(v) for v in reduce)
                    code = f"np.sum({body.base}, axis={axis[0] if len(axis) == 1 else axis})"
                else:
                    code = self._reduce_sum(operands[0], reduce)
            else:
                code = self._reduce_sum(operands[0], reduce)
            if outside:
                c = sp.Mul(*outside)
                code = f"-{code}" if c == -1 else f"{wrap(self._print(c), {'*', '/', '**'})}*{code}"
        if counts:
            code = "*".join([wrap(self.size_code(c), {"*", "**"}) for c in counts] + [wrap(code, {"*", "**"})])
        return code

    def _across_rows(self, reduce, out_axes, operands) -> str | None:
        """A sum over the rows that keeps other axes (layer_norm's dw and dbias): NumPy adds such
        an axis one row at a time, an error growing with the batch; ``_m.sum_rows`` adds blocks of
        rows, then the blocks' sums in float64, so the error stays within torch's at any batch.
        A matrix product (BLAS blocks its sums already) is left as it is."""
        if len(reduce) != 1 or not out_axes or self._matmul(operands, out_axes) or _reads(operands):
            return None
        (v,) = reduce
        n = self.extent(v)
        if not any(len(d) >= 2 and sp.expand(d[0].size - n) == 0 for d in self.env.tensors.values()):
            return None
        if len(operands) >= 2:
            subs = ",".join("".join(self.letters[a] for a in ax) for _, ax in operands)
            out = "".join(self.letters[a] for a in (v, *out_axes))  # rows first: blocks of rows are contiguous
            code, ax = f'np.einsum("{subs}->{out}", {", ".join(c for c, _ in operands)})', (v, *out_axes)
        else:
            code, ax = operands[0]
        return f"_m.sum_rows({code}, {ax.index(v)})"

    @staticmethod
    def _reduce_sum(operand, reduce) -> str:
        code, ax = operand
        axis = tuple(ax.index(v) for v in reduce)
        return f"np.sum({code}, axis={axis[0] if len(axis) == 1 else axis})"

    def _operands(self, body):
        """A summed product as einsum operands ``[(code, axes)]`` plus scalar factors to multiply
        the result by. Brackets and weights fold (as strong zeros) into the smallest value factor
        whose axes cover theirs; if one covers none, the whole body is one operand."""
        factors = list(sp.Mul.make_args(body))
        scalars = [f for f in factors if not self.axes(f) and not self.is_weight(f)]
        arrays = [f for f in factors if f not in scalars]
        values = [f for f in arrays if self.reads_values(f) and self.axes(f)]
        guards = [f for f in arrays if self.is_bracket(f) or self.is_weight(f)]
        loose = [f for f in arrays if f not in values and f not in guards]

        def cover(g):
            fits = [v for v in values if set(self.axes(g)) <= set(self.axes(v))]
            return min(fits, key=lambda v: len(self.axes(v))) if fits else None

        if len(values) + len(loose) < 2 or any(cover(g) is None for g in guards):
            return [(self._print(body), self.axes(body))], []
        masks: dict = {v: [] for v in values}
        for g in guards:
            masks[cover(g)].append(g)
        ops = []
        for v in values:
            block = self.gather_block(v) if isinstance(v, sp.Indexed) else None
            inside = [g for g in masks[v] if block is not None and self.is_bracket(g) and set(self.axes(g)) <= set(block)]
            if inside and len(inside) == len(masks[v]):
                ops.append(self.entry(v, inside, READS))
            elif masks[v]:
                expr = sp.Mul(v, *masks[v])
                ops.append((self._print(expr), self.axes(expr)))
            elif isinstance(v, sp.Indexed):
                # as laid out: no transposed copy for einsum; a gather keeps where it read inside
                ops.append(self.entry(v, (), READS) if block is not None else self.entry(v))
            else:
                ops.append((self._print(v), self.axes(v)))
        ops += [(self._print(f), self.axes(f)) for f in loose]
        return ops, scalars

    def _einsum(self, operands, out_axes) -> str:
        matmul = None if _reads(operands) else self._matmul(operands, out_axes)
        if matmul:
            return matmul
        subs = ",".join("".join(self.letters[a] for a in ax) for _, ax in operands)
        out = "".join(self.letters[a] for a in out_axes)
        args = ", ".join(code for code, _ in operands)
        # optimize=True turns a pair into a BLAS product, unless an axis is kept by both operands
        # (a batch axis, as in sum over rows of dy*xhat): then its path is ~100x slower than the
        # plain loop. More than two operands always want the path search.
        batch = len(operands) == 2 and set(operands[0][1]) & set(operands[1][1]) & set(out_axes)
        if _reads(operands):  # a term that reads outside a tensor (a conv's padding) contributes nothing
            return f'_m.contract("{subs}->{out}", {args}{", optimize=False" if batch else ""})'
        return f'np.einsum("{subs}->{out}", {args})' if batch else f'np.einsum("{subs}->{out}", {args}, optimize=True)'

    @staticmethod
    def _matmul(operands, out_axes) -> str | None:
        """``A @ B`` (with ``.T`` where needed) for a product of two matrices over one shared axis."""
        if len(operands) != 2 or len(out_axes) != 2 or any(len(ax) != 2 for _, ax in operands):
            return None
        (a, ax_a), (b, ax_b) = operands
        shared = set(ax_a) & set(ax_b)
        if len(shared) != 1 or shared & set(out_axes):
            return None
        (c,) = shared
        p, q = out_axes
        if p in ax_b:
            (a, ax_a), (b, ax_b) = (b, ax_b), (a, ax_a)
        if p not in ax_a or q not in ax_b:
            return None
        left = wrap(a) if ax_a == (p, c) else f"{wrap(a)}.T"
        right = wrap(b) if ax_b == (c, q) else f"{wrap(b)}.T"
        return f"{left} @ {right}"


def mask_buffers(statements, env: Env) -> set[str]:
    """Forward values that are weights (they read params, labels and brackets only, like
    ``w[b] = [y[b] != ignore_index]``): products with them are strong zeros, as with the bracket."""
    masks: set[str] = set()

    def values(e) -> bool:
        if isinstance(e, (Iverson, sp.KroneckerDelta)):
            return False
        if isinstance(e, sp.Indexed):
            return str(e.base) not in env.labels and str(e.base) not in masks
        if isinstance(e, sp.Symbol):
            return str(e) in env.scalars and str(e) not in masks
        return any(values(a) for a in e.args)

    for st in statements:
        if st.expr.has(Iverson, sp.KroneckerDelta) and not values(st.expr):
            masks.add(st.target)
    return masks


def lower_statement_lines(printer: NumPyPrinter, reps, reduced, target: str, indices: tuple, shape: str) -> list[str]:
    """The statement's lines: temporaries, then ``target = ...`` with exactly the target's shape, in
    the kernel dtype, never an alias of another buffer (the caller may write to what it gets)."""
    for sym, e in reps:
        printer.define_temp(sym, e)
    line = assign_line(printer, reduced, target, indices, shape)
    return printer.lines + [line]


def assign_line(printer: NumPyPrinter, expr, target: str, indices: tuple, shape: str) -> str:
    """``target = <expr>`` as a fresh array of exactly the target's shape, in the kernel dtype."""
    code = printer._print(expr)
    have = printer.axes(expr)
    bare = isinstance(expr, (sp.Indexed, sp.Symbol)) and expr not in printer.index_set
    if not indices:
        return f"{target} = np.array({code}, dtype={DTYPE})"
    if have == indices and bare:  # a copy: the result never aliases an argument
        return f"{target} = np.array({code}, dtype={DTYPE})"
    if have == indices and not printer.reads_values(expr) and not expr.has(Iverson, sp.KroneckerDelta):
        # label or index arithmetic only: the values may be integers
        return f"{target} = np.asarray({code}, dtype={DTYPE})"
    if have == indices:
        return f"{target} = {code}"
    return f"{target} = np.broadcast_to({printer.align(code, have, indices)}, {shape}).astype({DTYPE})"


# ------------------------------------------------------------------------------------------------
# statements as row scale * (dense + one-hots), evaluated in place


def row_form_applies(printer: NumPyPrinter, form: RowForm, indices: tuple) -> bool:
    """Is :func:`lower_row_form_lines` worth it for a map statement: a one-hot to write as one entry
    per row, or a mask among the row scale that the plain product would turn into a full-size
    ``np.where``? (Statements with reductions keep the plain form.)"""
    if not indices or set(printer.axis_order) != set(indices) or not (form.dense or form.onehots):
        return False
    if form.onehots:
        return True
    masks = [f for f in form.scale if (printer.is_bracket(f) or printer.is_weight(f)) and printer.has_data(f)]
    return bool(masks) and any(printer.reads_values(t) for t in form.dense)


def lower_row_form_lines(printer: NumPyPrinter, form: RowForm, target: str, indices: tuple, shape: str,
                         owned=frozenset()) -> list[str]:
    """The statement ``scale * (dense + one-hots)`` (:func:`~.statements.row_form`), in place:

    1. the row scale once, over its own few axes (its masks are strong zeros there already);
    2. the dense terms into ``target``: a temporary of the kernel that nothing reads afterwards
       (``owned``) becomes ``target`` itself when it is a term, so no B x C array is allocated;
       a term whose coefficient is a param that is 0 at run time (``eps``) is skipped by an ``if``;
       then one in-place multiply by the row scale;
    3. each one-hot as one entry per row (``_m.add_onehot``), never a dense one-hot array;
    4. entries a mask of the scale zeroes set to exactly 0 (``_m.zero_unless``, by row index): step
       2 gave ``0*inf = nan`` there where the dense part was not finite (a row of +inf logits that
       an ignored label masks). Masks are strong zeros; nothing else ever is.

    Every step is exact: the terms and the scale are the statement's own, only grouped per row.
    """
    ax = tuple(indices)
    lines: list[str] = []

    def emit(line: str, guard: str | None = None) -> None:
        lines.extend(printer.lines)  # index arrays and hoisted temporaries the line reads
        printer.lines.clear()
        lines.extend([f"if {guard} != 0:", f"    {line}"] if guard else [line])

    def guard_of(factors) -> tuple[str | None, list]:
        sw = printer.switches(factors)
        return (wrap(printer._print(sp.Mul(*sw)), {"+", "-", "*", "/", "**"}) if sw else None), sw

    def guarded(sw, fn):
        printer.nonzero |= set(sw)  # inside ``if sw != 0:`` the product needs no second test
        try:
            return fn()
        finally:
            printer.nonzero -= set(sw)

    # One reading of each tensor in the whole statement: a consumed buffer is read nowhere else.
    reads: dict = {}
    for piece in (*form.scale, *form.dense, *(o.coeff for o in form.onehots), *(o.label for o in form.onehots)):
        for node in sp.preorder_traversal(piece):
            if isinstance(node, sp.Indexed):
                reads[str(node.base)] = reads.get(str(node.base), 0) + 1

    n = len(form.dense)
    reps, reduced = common_subexpressions(sp.Tuple(sp.Mul(*form.scale), *form.dense, *(o.coeff for o in form.onehots)))
    for sym, e in reps:
        printer.define_temp(sym, e)
    scale, dense, coeffs = reduced[0], list(reduced[1:1 + n]), list(reduced[1 + n:])

    # 1. the row scale; a weight that is an expression is computed once (the scale and step 4 read it)
    factors = [printer.hoist(f) if printer.is_weight(f) and printer.has_data(f) else f for f in sp.Mul.make_args(scale)]
    keep = [printer.cond(f, ax) if printer.is_bracket(f) else f"({printer.aligned(f, ax)} != 0)"
            for f in factors if printer.is_bracket(f) or printer.is_weight(f)]
    scale = sp.Mul(*factors)
    if scale != 1 and printer.has_data(scale) and not isinstance(scale, (sp.Indexed, sp.Symbol)):
        sym = sp.Symbol(printer.fresh_name("_scale"), real=True)
        code = printer._print(scale)
        # a plain value from here on: its zeros are restored by step 4, never by a full-size np.where
        printer.temps[sym] = _Temp(printer.axes(scale), values=True, weight=False, data=True)
        emit(f"{sym} = {code}")
        scale = sym
    scale_code = printer.aligned(scale, ax) if scale != 1 else None

    # 2. the dense part
    plain = [t for t in dense if not printer.switches(sp.Mul.make_args(t))]
    switched = [t for t in dense if t not in plain]

    def owned_read(t) -> bool:
        return (isinstance(t, sp.Indexed) and str(t.base) in owned and tuple(t.indices) == ax
                and printer._plain(t) and reads.get(str(t.base)) == 1)

    def add(t, sw=()) -> None:
        if t.could_extract_minus_sign():
            code = guarded(sw, lambda: printer.aligned(-t, ax))
            line = f"{target} -= {code}"
        else:
            line = f"{target} += {guarded(sw, lambda: printer.aligned(t, ax))}"
        emit(line, guard_of(sp.Mul.make_args(t))[0] if sw else None)

    base = next((t for t in plain if owned_read(t)), None)
    scaled = False
    if base is not None:
        emit(f"{target} = {base.base}  # {base.base} is read nowhere else: {target} takes over its buffer")
        for t in plain:
            if t is not base:
                add(t)
    elif plain:
        body = sp.Add(*plain)
        if scale_code is not None and not switched and printer.axes(body) == ax:
            # fold the scale into the one pass that builds the array; a plain product: the scale's
            # masks are step 4's business, not a full-size np.where's
            emit(f"{target} = {printer.product([scale, body], ax)}")
            scaled = True
        else:
            emit(assign_line(printer, body, target, ax, shape))
    else:
        # no dense part: zeros, never scaled (a one-hot is a strong zero: 0*inf stays 0 off the label)
        emit(f"{target} = {printer.zeros(ax)}")
        scaled = not switched
    for t in switched:
        add(t, printer.switches(sp.Mul.make_args(t)))
    if scale_code is not None and not scaled:
        emit(f"np.multiply({target}, {scale_code}, out={target})")

    # 3. one entry per position of the other axes; labels outside the axis's range add nothing
    for o, c in zip(form.onehots, coeffs):
        other = tuple(a for a in ax if a != o.axis)
        value = c if scale == 1 else sp.Mul(scale, c)
        guard, sw = guard_of(sp.Mul.make_args(value))
        code = guarded(sw, lambda: printer.align(printer._print(value), printer.axes(value), other))
        lo = printer.ranges[o.axis][0]
        label = o.label - lo if lo != 0 else o.label
        label_code = printer.align(printer._print(label), printer.axes(label), other)
        emit(f"_m.add_onehot({target}, {ax.index(o.axis)}, {label_code}, {code})", guard)

    # 4. strong zeros of the scale's masks
    if keep:
        emit(f"_m.zero_unless({target}, {' & '.join(keep)})")
    return lines
