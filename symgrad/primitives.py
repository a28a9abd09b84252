"""Every function symgrad knows, defined once: one block per primitive (in the style of JAX's lax.py).

A block holds everything about one function: its SymPy class (symgrad's own classes are defined in
the block; SymPy's are named), its derivative rule, its NumPy spelling (arrays, and ``math`` for
params-only arguments), its Triton spelling (and the ``sg_*`` helpers of
:mod:`symgrad.runtime.triton_support` it calls), its float64 reference (what
:mod:`symgrad.evaluate` computes), its mpmath value (what :mod:`symgrad.parse` checks user text
with), its LaTeX where SymPy's is not what a person writes, and its name in the grammar of
user-typed expressions. Every other module reads :data:`TABLE`:

========================================  ====================================================
reader                                    what it takes
========================================  ====================================================
``symgrad.targets.numpy_printer``         ``numpy`` / ``numpy_scalar``
``symgrad.targets.triton_expr``           ``triton``, ``helpers`` (the module's imports)
``symgrad.evaluate``                      ``reference``
``symgrad.parse``                         ``grammar``, ``mpmath``
``symgrad.render``                        ``latex``, the classes for ``sympy_locals``
``symgrad.declare``                       ``canonical`` (at ``Op`` construction) and
                                          :func:`unsupported` (at registration)
========================================  ====================================================

A function is one of:

* spelled: it has a NumPy and a Triton spelling (a format string over the printed arguments, or a
  function ``(printer, expr) -> str`` for the few that need the printer);
* structural (:data:`STRUCTURAL`): the printers lower it with a rule of their own, because it is
  not elementwise arithmetic on its arguments (Iverson brackets are strong zeros, one-hots are
  sparse, ``ReduceMax`` is a reduction, ``floor`` of integers is floor division);
* canonical: ``Op`` rewrites it into spelled primitives and brackets when it is declared
  (``Max``, ``Min``, ``Heaviside``, ``Piecewise``, ``sign``): one lowering, for every target;
* a macro (``relu``): a name in the user grammar for a formula over other primitives.

Anything else in a formula is refused when the op is registered (:func:`unsupported`), naming the
function, never at generation time for one target only.

Conventions at kinks and ties (PyTorch's, checked against ``torch.autograd`` in the tests):

* ``Abs(z)' = sign(z)``, 0 at 0 (``torch.abs``); ``sign' = floor' = ceiling' = Heaviside' = 0``
  (``torch.sign``, ``torch.floor``, ``torch.ceil``), ``Iverson' = 0``;
* ``Max(a, c)`` / ``Min(a, c)`` with ``c`` free of tensors (a number, a param, a dim): at the tie
  the gradient goes to the constant, so ``a`` gets ``[a > c]`` (``[a < c]`` for ``Min``): as
  ``torch.relu``, ``F.relu6``, ``F.hardtanh`` and ``F.hardswish`` do (``torch.clamp`` alone passes
  the gradient at its bounds);
* ``Max(a, b)`` / ``Min(a, b)`` where both read tensors: a tie splits the gradient evenly
  (``torch.maximum``, ``torch.minimum``); ``ReduceMax`` splits it evenly among the maxima
  (``torch.amax``); more than two arguments are folded pairwise in SymPy's argument order;
* ``Heaviside(z, h0)`` is ``[z > 0] + h0*[z == 0]`` (SymPy's default ``h0`` is 1/2;
  ``torch.heaviside`` takes it as ``values``);
* ``Piecewise((e1, c1), ..., (en, True))`` is ``e1*[c1] + e2*[~c1 & c2] + ...``: the first
  condition that holds wins, as in SymPy; one without a final ``True`` branch is undefined somewhere
  and is refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

__all__ = [
    "Primitive", "Grammar", "TABLE", "STRUCTURAL", "of", "by_name", "canonicalize", "unsupported",
    "triton_helpers", "Iverson", "sigmoid", "softplus", "Floor", "Ceiling", "ReduceMax", "log1p",
    "expm1", "relu", "onehot", "sq",
]

class _LazyNumPy:
    """NumPy, imported on first use: the parser (``symgrad derive "EXPR"``) reads this table and
    must start fast; only the references (symgrad.evaluate) compute with NumPy."""

    def __getattr__(self, name):
        import numpy

        return getattr(numpy, name)


np = _LazyNumPy()

#: The spelling of a node the printers lower with a rule of their own (``_print_<Class>``).
STRUCTURAL = "structural"

Spelling = Union[str, Callable[..., str], None]


@dataclass(frozen=True)
class Grammar:
    """How a user types the function in ``symgrad derive "EXPR"`` (:mod:`symgrad.parse`)."""

    name: str
    arity: int
    build: Callable[..., sp.Expr]
    # SymPy may evaluate these as powers (exp(c*log(b)) becomes b**c): (base, exponent) of the args,
    # so the parser checks them as it checks ``**``.
    as_power: Callable[..., tuple] | None = None
    exponential: bool = False  # grows like exp(|z|): a numeric argument must stay moderate


@dataclass(frozen=True)
class Primitive:
    name: str
    cls: type | None  # the SymPy node class; None for a macro
    doc: str  # what it is, and its convention at kinks and ties
    # d/dz f(z) for a function of one argument: what SymPy's ``diff`` gives (SymPy's own rule for
    # SymPy's classes, the class's ``fdiff`` for symgrad's; the tests hold them to this), or None
    # where the rule is in ``doc`` (several arguments, or rewritten by ``canonical`` first).
    derivative: Callable[[sp.Expr], sp.Expr] | None = None
    numpy: Spelling = None  # arrays: "np.exp({0})", a function (printer, expr) -> str, or STRUCTURAL
    numpy_scalar: str | None = None  # params only (math module: NumPy scalars would promote float32)
    triton: Spelling = None  # "tl.exp({0})", a function (printer, expr) -> str, or STRUCTURAL
    helpers: tuple[str, ...] = ()  # ``sg_*`` device helpers of symgrad.runtime.triton_support it calls
    reference: Callable | STRUCTURAL | None = None  # float64 NumPy, elementwise, for symgrad.evaluate
    mpmath: Callable | None = None  # (mpmath context, *args) -> value, for the parser's checks
    latex: Callable | None = None  # (LaTeX printer, expr, exp) -> str where SymPy's is not what we write
    grammar: Grammar | None = None
    canonical: Callable | None = None  # (expr, is_constant) -> the same value in other primitives
    build: Callable | None = None  # a macro's definition

    @property
    def lowers(self) -> bool:
        """Both targets have a rule for it (a spelling or a printer rule of their own)."""
        return self.numpy is not None and self.triton is not None


TABLE: list[Primitive] = []


def define(p: Primitive) -> Primitive:
    TABLE.append(p)
    return p


def _format(template: str, *args) -> str:
    return template.format(*args)


# =================================================================================================
# Iverson bracket


class Iverson(sp.Function):
    """The Iverson bracket ``[cond]``: 1 where the condition holds, else 0.

    Its derivative is 0 (almost everywhere), which is the convention for relu at 0. SymPy folds
    a ``Piecewise`` into any ``Sum`` around it; a bracket stays a plain factor, so index
    guards and masks survive the sum rewrites.
    """

    nargs = 1

    @classmethod
    def eval(cls, cond):
        if cond is sp.true:
            return sp.Integer(1)
        if cond is sp.false:
            return sp.Integer(0)

    def fdiff(self, argindex=1):
        return sp.Integer(0)

    def _eval_derivative(self, s):
        return sp.Integer(0)

    def _eval_is_real(self):
        return True

    def _eval_is_nonnegative(self):
        return True


def _iverson_latex(printer, expr, exp=None):
    tex = r"\left[%s\right]" % printer._print(expr.args[0])
    return f"{tex}^{{{exp}}}" if exp else tex


def bracket_false(bracket):
    """Where the bracket is surely 0, or None when that is simply ``not cond``.

    A bracket compares values: where one side is NaN the comparison is unordered, and the bracket is
    NaN, not 0 (``relu(nan) = nan*[nan > 0]`` is NaN, as torch gives it). So a target prints
    ``[c]*v`` as ``where(c, v, where(bracket_false, 0, nan))``. Brackets over integers (index
    guards, labels, one-hots) and ``!=`` (true when unordered) are never NaN: None."""
    if isinstance(bracket, sp.KroneckerDelta):
        return None
    rel = bracket.args[0]
    if not isinstance(rel, sp.core.relational.Relational) or isinstance(rel, sp.Ne):
        return None
    a, b = rel.lhs, rel.rhs
    if a.is_integer and b.is_integer:
        return None
    if isinstance(rel, sp.Eq):
        return sp.Or(sp.StrictLessThan(a, b, evaluate=False), sp.StrictGreaterThan(a, b, evaluate=False), evaluate=False)
    return rel.negated


def saturating_first(factors):
    """A product's factors, each ``sigmoid(z)`` moved to the front next to a factor ``z``: the
    saturated zero meets its own argument first, as torch's ``silu(z)*g`` does (at ``z = g =
    -1e30`` that is ``(0*z)*g = 0``, where ``z*g*sigmoid(z)`` is ``inf*0 = nan``)."""
    factors = list(factors)
    front = []
    for f in list(factors):
        if isinstance(f, sigmoid) and f in factors:
            front.append(f)
            factors.remove(f)
            if f.args[0] in factors:
                front.append(f.args[0])
                factors.remove(f.args[0])
    return front + factors


def shift_first(terms, maxes=None):
    """``(pair, rest)``: a sum's terms with the max shift ``x[..] - ReduceMax(x[..k..], k)`` (either
    sign) taken out, to be added first, as torch's ``(x - max) - log(sum)`` is; else ``([], terms)``.
    ``x - max`` is exact near the max, while ``x - (max + log(sum))`` rounds at ``ulp(max)``, which
    ``exp`` then amplifies (log_softmax at +-1e4), or loses ``log(sum)`` outright (at +-1e30).
    ``maxes`` maps a symbol that a target computed a row max into (or the name of a plan buffer
    holding one) to the entry it is the max of."""
    terms = list(terms)
    maxes = maxes or {}
    for t in terms:
        c, m = t.as_coeff_Mul()
        body = m.args[0] if isinstance(m, ReduceMax) else maxes.get(m)
        if body is None and isinstance(m, sp.Indexed):  # a row max the plan computed once (row_max0[b])
            body = maxes.get(str(m.base))
        if not (isinstance(body, sp.Indexed) and abs(c) == 1):
            continue
        for u in terms:
            cu, xu = u.as_coeff_Mul()
            if u is not t and cu == -c and isinstance(xu, sp.Indexed) and xu.base == body.base:
                return [u, t], [w for w in terms if w is not u and w is not t]
    return [], terms


def _brackets_free(t):
    return t.replace(lambda n: isinstance(n, (Iverson, sp.KroneckerDelta)), lambda n: sp.Integer(1))


def exact_group(terms):
    """``(data, exact)``: a sum's terms split into those that read tensor data and those built of
    params, dims and brackets alone (a smoothed one-hot target ``-(1 - eps)*[i == y] - eps/C``),
    which a target adds together first. The gradient ``p - t`` is then exactly 0 where p == t
    (one class: p = 1, t = 1), where ``(-1 + eps) + p - eps/C`` leaves a rounding error."""
    terms = list(terms)
    exact = [t for t in terms if not _brackets_free(t).atoms(sp.Indexed)]
    if len(exact) < 2 or len(exact) == len(terms):
        return terms, []
    return [t for t in terms if t not in exact], exact


IVERSON = define(Primitive(
    "Iverson", Iverson,
    "[cond]: 1 where cond holds, else 0; a strong zero in every target ([c]*inf is 0 where c is false),"
    " NaN where cond compares a NaN (see bracket_false); derivative 0",
    derivative=lambda z: sp.Integer(0),
    numpy=STRUCTURAL,  # np.where(cond, v, 0) around the product it multiplies
    triton=STRUCTURAL,  # tl.where(cond, v, 0.0) around the product it multiplies
    reference=STRUCTURAL,
    mpmath=None,
    latex=_iverson_latex,
))

ONEHOT = define(Primitive(
    "KroneckerDelta", sp.KroneckerDelta,
    "1 where its two integer arguments are equal (a one-hot of a label): a bracket, lowered sparsely",
    numpy=STRUCTURAL, triton=STRUCTURAL, reference=STRUCTURAL,
))


def onehot(label, index):
    """1 where ``index`` equals the integer ``label``, else 0: a Kronecker delta."""
    return sp.KroneckerDelta(label, index)


# =================================================================================================
# exp, log, powers


EXP = define(Primitive(
    "exp", sp.exp, "e**z",
    derivative=sp.exp,
    numpy="np.exp({0})", numpy_scalar="math.exp({0})",
    triton="tl.exp({0})",
    reference=lambda z: np.exp(z),
    mpmath=lambda mp, z: mp.exp(z),
    grammar=Grammar("exp", 1, sp.exp, as_power=lambda z: (sp.E, z)),
))

LOG = define(Primitive(
    "log", sp.log, "natural logarithm",
    derivative=lambda z: 1 / z,
    numpy="np.log({0})", numpy_scalar="math.log({0})",
    triton="tl.log({0})",
    reference=lambda z: np.log(z),
    mpmath=lambda mp, z: mp.log(z),
    grammar=Grammar("log", 1, sp.log),
))


def _pow_numpy(p, e) -> str:
    from .targets.numpy_printer import wrap

    ax = p.axes(e)
    base, exp = e.args
    b = p.aligned(base, ax)
    sqrt = "math.sqrt" if not p.has_data(e) else "np.sqrt"
    if exp == sp.S.Half:
        return f"{sqrt}({b})"
    if exp == -sp.S.Half:
        return f"1/{sqrt}({b})"
    if exp == -1:
        if not p.has_data(base) and any(str(s) in p.env.dims for s in base.free_symbols):
            return f"1/_m.divisor({b})"  # a dim may be 0 (an empty batch): 1/0 as IEEE
        return f"1/{wrap(b)}"
    if exp.is_Integer and exp < 0:
        return f"1/{wrap(b)}**{-int(exp)}"
    return f"{wrap(b)}**{wrap(p.aligned(exp, ax))}"


def _pow_triton(p, e) -> str:
    base, x = e.base, e.exp
    b = p._print(base)
    if x == sp.Rational(1, 2):
        return f"tl.sqrt({b})"
    if x == sp.Rational(-1, 2):
        return f"(1.0 / tl.sqrt({b}))"
    if x.is_Integer and 0 < x <= 4:
        return "(" + " * ".join([b] * int(x)) + ")"
    if x.is_Integer and -4 <= x < 0:
        return "(1.0 / (" + " * ".join([b] * int(-x)) + "))"
    if base == sp.E:
        return f"tl.exp({p._print(x)})"
    return f"sg_pow({b}, {p._print(x)})"


POW = define(Primitive(
    "Pow", sp.Pow,
    "b**e for real b and e (sqrt is b**(1/2)); a negative base only with an integer exponent "
    "(else nan, as in real arithmetic); derivative e*b**(e - 1) in b, b**e*log(b) in e",
    numpy=_pow_numpy,
    triton=_pow_triton, helpers=("sg_pow",),
    reference=lambda b, e: np.power(b, e),
    mpmath=lambda mp, b, e: mp.power(b, e),
    grammar=Grammar("sqrt", 1, sp.sqrt, as_power=lambda z: (z, sp.S.Half)),
))

LOG1P = define(Primitive(
    "log1p", log1p, "log(1 + z), exact for small z (the stabilize stage writes it)",
    derivative=lambda z: 1 / (z + 1),
    numpy="np.log1p({0})", numpy_scalar="math.log1p({0})",
    triton="sg_log1p({0})", helpers=("sg_log1p",),
    reference=lambda z: np.log1p(z),
    mpmath=lambda mp, z: mp.log1p(z),
    grammar=Grammar("log1p", 1, log1p),
))

EXPM1 = define(Primitive(
    "expm1", expm1, "exp(z) - 1, exact for small z (the stabilize stage writes it)",
    derivative=sp.exp,
    numpy="np.expm1({0})", numpy_scalar="math.expm1({0})",
    triton="sg_expm1({0})", helpers=("sg_expm1",),
    reference=lambda z: np.expm1(z),
    mpmath=lambda mp, z: mp.expm1(z),
    grammar=Grammar("expm1", 1, expm1, as_power=lambda z: (sp.E, z)),
))


# =================================================================================================
# trigonometric and hyperbolic functions


SIN = define(Primitive(
    "sin", sp.sin, "sine", derivative=sp.cos,
    numpy="np.sin({0})", numpy_scalar="math.sin({0})", triton="tl.sin({0})",
    reference=lambda z: np.sin(z), mpmath=lambda mp, z: mp.sin(z), grammar=Grammar("sin", 1, sp.sin),
))

COS = define(Primitive(
    "cos", sp.cos, "cosine", derivative=lambda z: -sp.sin(z),
    numpy="np.cos({0})", numpy_scalar="math.cos({0})", triton="tl.cos({0})",
    reference=lambda z: np.cos(z), mpmath=lambda mp, z: mp.cos(z), grammar=Grammar("cos", 1, sp.cos),
))

TAN = define(Primitive(
    "tan", sp.tan, "tangent", derivative=lambda z: sp.tan(z) ** 2 + 1,
    numpy="np.tan({0})", numpy_scalar="math.tan({0})", triton="(tl.sin({0}) / tl.cos({0}))",
    reference=lambda z: np.tan(z), mpmath=lambda mp, z: mp.tan(z), grammar=Grammar("tan", 1, sp.tan),
))

TANH = define(Primitive(
    "tanh", sp.tanh, "hyperbolic tangent; Triton: sign(z)*(1 - e)/(1 + e), e = exp(-2|z|), never overflows",
    derivative=lambda z: 1 - sp.tanh(z) ** 2,
    numpy="np.tanh({0})", numpy_scalar="math.tanh({0})",
    triton="sg_tanh({0})", helpers=("sg_tanh",),
    reference=lambda z: np.tanh(z), mpmath=lambda mp, z: mp.tanh(z), grammar=Grammar("tanh", 1, sp.tanh),
))

SINH = define(Primitive(
    "sinh", sp.sinh, "hyperbolic sine; Triton: (expm1(z) - expm1(-z))/2, exact near 0",
    derivative=sp.cosh,
    numpy="np.sinh({0})", numpy_scalar="math.sinh({0})",
    triton="(0.5 * (sg_expm1({0}) - sg_expm1(-({0}))))", helpers=("sg_expm1",),
    reference=lambda z: np.sinh(z), mpmath=lambda mp, z: mp.sinh(z),
    grammar=Grammar("sinh", 1, sp.sinh, exponential=True),
))

COSH = define(Primitive(
    "cosh", sp.cosh, "hyperbolic cosine",
    derivative=sp.sinh,
    numpy="np.cosh({0})", numpy_scalar="math.cosh({0})",
    triton="(0.5 * (tl.exp({0}) + tl.exp(-({0}))))",
    reference=lambda z: np.cosh(z), mpmath=lambda mp, z: mp.cosh(z),
    grammar=Grammar("cosh", 1, sp.cosh, exponential=True),
))


# =================================================================================================
# sq: a square SymPy keeps whole


class sq(sp.Function):
    """``z**2``, kept as one node: SymPy distributes ``(x/s)**2`` into ``x**2/s**2``, which is what
    a scaled sum of squares must not compute (``x**2`` overflows where ``(x/s)**2`` does not)."""

    nargs = 1

    def fdiff(self, argindex=1):
        return 2 * self.args[0]

    def _eval_rewrite_as_Pow(self, z, **kwargs):
        return z**2

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_nonnegative(self):
        return True if self.args[0].is_real else None


def _sq_latex(printer, expr, exp=None):
    tex = r"\left(%s\right)^{2}" % printer._print(expr.args[0])
    return f"{{{tex}}}^{{{exp}}}" if exp else tex


SQ = define(Primitive(
    "sq", sq, "z**2 as one node (the stabilize stage writes it for a scaled sum of squares)",
    derivative=lambda z: 2 * z,
    numpy="np.square({0})", numpy_scalar="({0})**2",
    # the operand is printed twice; the compiler computes it once
    triton="(({0}) * ({0}))",
    reference=lambda z: np.square(z),
    mpmath=lambda mp, z: z * z,
    latex=_sq_latex,
))


# =================================================================================================
# erf, sigmoid, softplus



ERF = define(Primitive(
    "erf", sp.erf, "the error function; NumPy: Cody's rational approximation (runtime.numpy_math.erf)",
    derivative=lambda z: 2 * sp.exp(-z**2) / sp.sqrt(sp.pi),
    numpy="_m.erf({0})", numpy_scalar="math.erf({0})",
    triton="tl.math.erf({0})",  # libdevice erf on CUDA, numpy's in the interpreter
    reference=lambda z: np.vectorize(math.erf, otypes=[np.float64])(np.asarray(z, dtype=np.float64)),
    mpmath=lambda mp, z: mp.erf(z),
    grammar=Grammar("erf", 1, sp.erf),
))


class sigmoid(sp.Function):
    """The logistic function 1/(1 + exp(-z))."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        if z.is_zero:
            return sp.S.Half

    def fdiff(self, argindex=1):
        return self * (1 - self)

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return 1 / (1 + sp.exp(-z))

    def _eval_is_real(self):
        return self.args[0].is_real


def _sigmoid64(z):
    e = np.exp(-np.abs(z))  # never overflows
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _named_latex(head):
    def latex(printer, expr, exp=None):
        h = head + (f"^{{{exp}}}" if exp else "")
        return r"%s\left(%s\right)" % (h, printer._print(expr.args[0]))

    return latex


SIGMOID = define(Primitive(
    "sigmoid", sigmoid, "1/(1 + exp(-z)); every spelling branches on the sign, so exp never overflows",
    derivative=lambda z: sigmoid(z) * (1 - sigmoid(z)),
    numpy="_m.sigmoid({0})", numpy_scalar="float(_m.sigmoid({0}))",
    triton="sg_sigmoid({0})", helpers=("sg_sigmoid",),
    reference=_sigmoid64,
    mpmath=lambda mp, z: 1 / (1 + mp.exp(-z)),
    latex=lambda printer, expr, exp=None: r"%s\left(%s\right)" % (r"\sigma" if not exp else r"\sigma^{%s}" % exp,
                                                                  printer._print(expr.args[0])),
    grammar=Grammar("sigmoid", 1, sigmoid),
))


class softplus(sp.Function):
    """log(1 + exp(z)), which a kernel must compute without overflowing exp."""

    nargs = 1

    @classmethod
    def eval(cls, z):
        if z.is_zero:
            return sp.log(2)

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_rewrite_as_exp(self, z, **kwargs):
        return sp.log(1 + sp.exp(z))

    def _eval_is_real(self):
        return self.args[0].is_real


SOFTPLUS = define(Primitive(
    "softplus", softplus, "log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)): exact for large z, never overflows",
    derivative=sigmoid,
    # log(1 + exp(z)) = logaddexp(0, z): exact for large z (softplus(1000) == 1000), no overflow.
    numpy="np.logaddexp(0, {0})", numpy_scalar="float(np.logaddexp(0, {0}))",
    triton="sg_softplus({0})", helpers=("sg_softplus",),
    reference=lambda z: np.logaddexp(0.0, z),
    mpmath=lambda mp, z: max(z, 0) + mp.log1p(mp.exp(-abs(z))),
    latex=_named_latex(r"\operatorname{softplus}"),
    grammar=Grammar("softplus", 1, softplus),
))


# =================================================================================================
# kinks: Abs, sign, floor, ceiling


ABS = define(Primitive(
    "Abs", sp.Abs, "|z|; derivative sign(z), 0 at 0 (torch.abs)",
    derivative=sp.sign,
    numpy="np.abs({0})", numpy_scalar="abs({0})",
    triton="tl.abs({0})",
    reference=lambda z: np.abs(z),
    mpmath=lambda mp, z: abs(z),
    grammar=Grammar("abs", 1, sp.Abs),
))


def _sign_canonical(e, constant):
    (z,) = e.args
    return Iverson(z > 0) - Iverson(z < 0)


SIGN = define(Primitive(
    "sign", sp.sign,
    "-1, 0 or 1; derivative 0 (torch.sign). Declared as [z > 0] - [z < 0]; spelled for the "
    "gradient of Abs, where it appears after differentiation",
    numpy="np.sign({0})", numpy_scalar="float(np.sign({0}))",
    triton="tl.where(({0}) > 0.0, 1.0, tl.where(({0}) < 0.0, -1.0, 0.0))",
    reference=lambda z: np.sign(z),
    mpmath=lambda mp, z: mp.sign(z),
    canonical=_sign_canonical,
))


class _RealRounding(sp.Function):
    """Rounding of a real value to an integer: piecewise constant, so its derivative is 0. SymPy's
    own ``floor``/``ceiling`` stay for integer index arithmetic; numbers evaluate through them."""

    nargs = 1
    integer_form = None  # SymPy's function for numbers

    @classmethod
    def eval(cls, z):
        if z.is_Number:
            return cls.integer_form(z)

    def fdiff(self, argindex=1):
        return sp.Integer(0)

    def _eval_is_real(self):
        return self.args[0].is_real

    def _eval_is_integer(self):
        return self.args[0].is_real


class Floor(_RealRounding):
    """floor of a real value; derivative 0."""

    integer_form = sp.floor


class Ceiling(_RealRounding):
    """ceiling of a real value; derivative 0."""

    integer_form = sp.ceiling


FLOOR = define(Primitive(
    "Floor", Floor, "floor of a real value; derivative 0 (torch.floor)",
    derivative=lambda z: sp.Integer(0),
    numpy="np.floor({0})", numpy_scalar="math.floor({0})",
    triton="tl.floor({0})",
    reference=lambda z: np.floor(z),
    mpmath=lambda mp, z: mp.floor(z),
    latex=lambda printer, expr, exp=None: r"\left\lfloor{%s}\right\rfloor%s" % (
        printer._print(expr.args[0]), f"^{{{exp}}}" if exp else ""),
))

CEILING = define(Primitive(
    "Ceiling", Ceiling, "ceiling of a real value; derivative 0 (torch.ceil)",
    derivative=lambda z: sp.Integer(0),
    numpy="np.ceil({0})", numpy_scalar="math.ceil({0})",
    triton="tl.ceil({0})",
    reference=lambda z: np.ceil(z),
    mpmath=lambda mp, z: mp.ceil(z),
    latex=lambda printer, expr, exp=None: r"\left\lceil{%s}\right\rceil%s" % (
        printer._print(expr.args[0]), f"^{{{exp}}}" if exp else ""),
))


def _reads_reals(z) -> bool:
    """Does ``z`` read a real (non-integer) value: a float tensor entry or a real symbol?"""
    for a in z.atoms(sp.Indexed):
        if not a.base.is_integer and not a.base.label.is_integer:
            return True
    return any(not s.is_integer for s in z.free_symbols if isinstance(s, sp.Symbol) and not isinstance(s, sp.Indexed))


def _round_canonical(value_cls):
    def canonical(e, constant):
        (z,) = e.args
        return value_cls(z) if _reads_reals(z) else e

    return canonical


INT_FLOOR = define(Primitive(
    "floor", sp.floor,
    "floor in integer index arithmetic (a stride, a derived dim): floor division in every target; "
    "the floor of a real value is declared as Floor",
    numpy=STRUCTURAL, triton=STRUCTURAL, reference=lambda z: np.floor(z),
    canonical=_round_canonical(Floor),
))

INT_CEILING = define(Primitive(
    "ceiling", sp.ceiling,
    "ceiling in integer index arithmetic; the ceiling of a real value is declared as Ceiling",
    numpy=STRUCTURAL, triton=STRUCTURAL, reference=lambda z: np.ceil(z),
    canonical=_round_canonical(Ceiling),
))


# =================================================================================================
# Max, Min, Heaviside, Piecewise: declared as brackets


def _pick(a, b, greater: bool, constant):
    """Max (``greater``) or Min of two canonical arguments, as brackets (see the module doc)."""
    win = (lambda u, v: u > v) if greater else (lambda u, v: u < v)
    if constant(b) and not constant(a):
        a, b = b, a
    if constant(a):  # the tie goes to the constant a: b gets [b > a] (Max)
        return b * Iverson(win(b, a)) + a * Iverson(sp.Not(win(b, a)))
    return a * Iverson(win(a, b)) + b * Iverson(win(b, a)) + (a + b) / 2 * Iverson(sp.Eq(a, b))


def _minmax_canonical(greater: bool):
    def canonical(e, constant):
        args = list(e.args)
        fixed = [a for a in args if constant(a)]
        vary = [a for a in args if not constant(a)]
        out = None
        for a in vary + fixed:  # varying ones first: each constant then takes its ties from them
            out = a if out is None else _pick(out, a, greater, constant)
        return out

    return canonical


def _reduce(f):
    def ref(*args):
        out = args[0]
        for a in args[1:]:
            out = f(out, a)
        return out

    return ref


MAX = define(Primitive(
    "Max", sp.Max,
    "the largest argument. Declared as brackets: Max(a, c) = a*[a > c] + c*[a <= c] for c free of "
    "tensors (the tie's gradient goes to c, as torch.relu, F.relu6, F.hardswish); for two "
    "tensor arguments a tie splits the gradient evenly (torch.maximum)",
    reference=_reduce(lambda a, b: np.maximum(a, b)),
    mpmath=lambda mp, *a: max(a),
    grammar=Grammar("max", 2, sp.Max),
    canonical=_minmax_canonical(True),
))

MIN = define(Primitive(
    "Min", sp.Min,
    "the smallest argument; declared as brackets, ties as for Max (torch.minimum, F.hardtanh)",
    reference=_reduce(lambda a, b: np.minimum(a, b)),
    mpmath=lambda mp, *a: min(a),
    grammar=Grammar("min", 2, sp.Min),
    canonical=_minmax_canonical(False),
))


def _heaviside_canonical(e, constant):
    z = e.args[0]
    h0 = e.args[1] if len(e.args) > 1 else sp.S.Half
    if h0 == 0:
        return Iverson(z > 0)
    if h0 == 1:
        return Iverson(z >= 0)
    return Iverson(z > 0) + h0 * Iverson(sp.Eq(z, 0))


HEAVISIDE = define(Primitive(
    "Heaviside", sp.Heaviside,
    "the step: [z > 0] + h0*[z == 0] (SymPy's h0 defaults to 1/2; torch.heaviside's values); derivative 0",
    reference=lambda z, h0=0.5: np.heaviside(z, h0),
    canonical=_heaviside_canonical,
))


def _piecewise_canonical(e, constant):
    if e.args[-1].cond is not sp.true:
        return e  # undefined where no condition holds: refused at registration
    terms, earlier = [], []
    for value, cond in e.args:
        taken = sp.And(cond, *[sp.Not(c) for c in earlier]) if cond is not sp.true else sp.And(*[sp.Not(c) for c in earlier])
        terms.append(value * Iverson(taken))
        earlier.append(cond)
    return sp.Add(*terms)


PIECEWISE = define(Primitive(
    "Piecewise", sp.Piecewise,
    "Piecewise((e1, c1), ..., (en, True)) = e1*[c1] + e2*[~c1 & c2] + ...: the first branch whose "
    "condition holds (needs a final True branch); derivative of each branch inside its bracket",
    reference=STRUCTURAL,
    canonical=_piecewise_canonical,
))


# =================================================================================================
# ReduceMax


class ReduceMax(sp.Function):
    """``ReduceMax(body, k, lo, hi)``: the maximum of ``body`` over the integer ``k`` in [lo, hi].

    Tie rule: the derivative splits the upstream gradient evenly among the entries that attain
    the maximum (as ``torch.amax`` does), so it is a valid subgradient and is exact where the
    maximum is unique.
    """

    nargs = 4

    @property
    def body(self):
        return self.args[0]

    @property
    def variable(self):
        return self.args[1]

    @property
    def limits(self):
        return (self.args[1], self.args[2], self.args[3])

    @property
    def free_symbols(self):
        body, k, lo, hi = self.args
        return (body.free_symbols - {k}) | lo.free_symbols | hi.free_symbols

    @property
    def bound_symbols(self):
        return [self.args[1]]

    def _eval_derivative(self, s):
        body, k, lo, hi = self.args
        # A fresh dummy keeps the substitution k -> a (delta elimination) out of this max itself.
        j = sp.Symbol(f"{k}_tie", integer=True)
        at_max = Iverson(sp.Eq(body.xreplace({k: j}), self))
        return sp.Sum(at_max * sp.diff(body.xreplace({k: j}), s), (j, lo, hi)) / sp.Sum(at_max, (j, lo, hi))

    def _eval_is_real(self):
        return self.args[0].is_real


def _reduce_max_latex(printer, expr, exp=None):
    body, k, lo, hi = expr.args
    tex = r"\max_{%s=%s}^{%s} %s" % (printer._print(k), printer._print(lo), printer._print(hi), printer.parenthesize(body, 1000))
    return r"\left(%s\right)^{%s}" % (tex, exp) if exp else tex


REDUCE_MAX = define(Primitive(
    "ReduceMax", ReduceMax,
    "the maximum of body over k in [lo, hi]: a row reduction (np.max, tl.max); ties split the "
    "gradient evenly among the maxima (torch.amax)",
    numpy=STRUCTURAL, triton=STRUCTURAL, reference=STRUCTURAL,
    latex=_reduce_max_latex,
))


# =================================================================================================
# macros: names in the user grammar for formulas over the primitives above


def relu(z):
    """max(z, 0) as z*[z > 0], so its derivative is [z > 0], with the value 0 at z = 0."""
    return z * Iverson(z > 0)


RELU = define(Primitive(
    "relu", None, "max(z, 0) = z*[z > 0]; derivative [z > 0], 0 at 0 (torch.relu)",
    grammar=Grammar("relu", 1, relu),
    build=relu,
))


# =================================================================================================
# lookups


_BY_CLASS: dict[type, Primitive] = {p.cls: p for p in TABLE if p.cls is not None}
_BY_NAME: dict[str, Primitive] = {p.name: p for p in TABLE}


def of(node) -> Primitive | None:
    """The table entry of ``node``'s class (exactly its class: a subclass is another function)."""
    return _BY_CLASS.get(type(node))


def by_name(name: str) -> Primitive:
    return _BY_NAME[name]


def classes() -> dict[str, type]:
    """Every primitive's SymPy class by its name (what ``sympify`` needs to read a formula back)."""
    return {p.cls.__name__: p.cls for p in TABLE if p.cls is not None}


def triton_helpers() -> tuple[str, ...]:
    """The ``sg_*`` device helpers the Triton spellings call: what a generated module imports."""
    seen: list[str] = []
    for p in TABLE:
        for h in p.helpers:
            if h not in seen:
                seen.append(h)
    return tuple(seen)


# =================================================================================================
# declaration-time canonical forms and checks


def canonicalize(expr: sp.Basic, constant: Callable[[sp.Basic], bool] | None = None) -> sp.Basic:
    """``expr`` with every ``canonical`` primitive rewritten (bottom-up) into spelled ones.

    ``constant(e)`` says whether ``e`` is free of tensors (decides Max/Min's tie convention); by
    default, only numbers are. Index positions (tensor subscripts, summation and ReduceMax bounds,
    one-hot arguments) are integer arithmetic and are left as they are."""
    if constant is None:
        constant = lambda e: bool(e.is_number)  # noqa: E731
    memo: dict = {}

    def go(e):
        if not isinstance(e, sp.Basic) or e.is_Atom or isinstance(e, (sp.Indexed, sp.KroneckerDelta)):
            return e
        hit = memo.get(e)
        if hit is not None:
            return hit
        if isinstance(e, sp.Sum):
            new = sp.Sum(go(e.function), *e.limits)
        elif isinstance(e, ReduceMax):
            new = ReduceMax(go(e.args[0]), *e.args[1:])
        else:
            args = [go(a) for a in e.args]
            new = e.func(*args) if any(x is not y for x, y in zip(args, e.args)) else e
            p = of(new)
            if p is not None and p.canonical is not None:
                new = p.canonical(new, constant)
        memo[e] = new
        return new

    return go(expr)


def unsupported(expr: sp.Basic) -> list[tuple[sp.Basic, str]]:
    """(node, why) for each function in ``expr`` (outside index positions) that some target
    cannot lower: not in the table, or in it without a lowering and not rewritten at declaration."""
    out: list = []
    seen: set = set()

    def go(e):
        if not isinstance(e, sp.Basic) or e.is_Atom or isinstance(e, (sp.Indexed, sp.KroneckerDelta)) or e in seen:
            return
        seen.add(e)
        if isinstance(e, sp.Sum):
            return go(e.function)
        if isinstance(e, (sp.Function, sp.Piecewise)):
            p = of(e)
            if p is None:
                out.append((e, f"{type(e).__name__} is not a symgrad primitive (symgrad.primitives lists them: "
                               f"{', '.join(sorted(_BY_NAME))})"))
                return
            if isinstance(e, sp.Piecewise) and e.args[-1].cond is not sp.true:
                out.append((e, "a Piecewise needs a final (value, True) branch: it is undefined where no condition holds"))
                return
            if not p.lowers:
                out.append((e, f"{p.name} has no lowering in every target"))
                return
        if isinstance(e, ReduceMax):
            return go(e.args[0])
        for a in e.args:
            go(a)

    go(expr)
    return out
