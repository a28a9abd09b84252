"""Safe parsing of what users type: expressions, lists of names and ``name=value`` bindings.

Command-line text is untrusted, so it never reaches Python's evaluator, SymPy's string
conversion or its parser (all of which run Python code).  A tokenizer and a recursive-descent
parser accept a small whitelisted grammar and build SymPy objects directly.

SymPy evaluates eagerly: ``9**9**9`` or ``exp(x*log(3))**(10**30/x)`` would hang inside SymPy
while the object is being built.  So limits on exponents, exact numbers and approximate numeric
values are checked before SymPy is asked to build a node, and every node it returns is checked
again (undefined or complex values, size), so a bad value is caught at the operator that made
it.  A time limit on the whole parse backs this up for slow-but-finite SymPy work.
"""
from __future__ import annotations

import keyword
import re
import time
from typing import Callable, NamedTuple

import mpmath
import sympy as sp

from symgrad import primitives

__all__ = [
    "ParseError",
    "parse_expression",
    "parse_bindings",
    "parse_names",
    "validate_identifier",
    "FUNCTIONS",
    "CONSTANTS",
]

MAX_LENGTH = 2000
MAX_DEPTH = 64  # parentheses, calls, unary signs and exponents; far below Python's recursion limit
MAX_NAME = 64
MAX_DIGITS = 40
MAX_EXPONENT = 1000
MAX_BITS = 10_000  # largest exact rational SymPy may compute (about 3000 digits)
# SymPy factors a number put under a fractional power (and again when it merges sqrt(a)*sqrt(b)
# into sqrt(a*b)); that is cubic in its size, so the total size of such numbers is budgeted.
MAX_ROOT_BITS = 512
MAX_NODES = 20_000  # relu(z) repeats z, so nested calls can double the tree at every level
# Each single SymPy step is kept cheap by the checks here; this bounds what many of them add up
# to (SymPy proves a numeric difference like log(8) - 3*log(2) is zero only slowly, for example).
TIME_LIMIT_S = 0.5


class ParseError(ValueError):
    """User text is not an accepted expression, name list or binding list.

    The message is one line naming the problem and, where there is one, its column (1-based).
    """

    def __init__(self, message: str, column: int | None = None):
        super().__init__(message)
        self.column = column


class _Function(NamedTuple):
    func: Callable[..., sp.Expr]
    arity: int
    # SymPy may evaluate these as powers (exp(c*log(b)) becomes b**c), so they get the same
    # checks as ``**``: (base, exponent) for the arguments.
    as_power: Callable[..., tuple[sp.Expr, sp.Expr]] | None = None
    exponential: bool = False  # grows like exp(|z|): a numeric argument must stay moderate


# The grammar's functions are the primitives that have a user-facing name (``grammar``).
FUNCTIONS: dict[str, _Function] = {
    p.grammar.name: _Function(p.grammar.build, p.grammar.arity, p.grammar.as_power, p.grammar.exponential)
    for p in primitives.TABLE
    if p.grammar is not None
}
CONSTANTS: dict[str, sp.Expr] = {"pi": sp.pi, "E": sp.E}

_NUMBER = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_SIGNED_NUMBER = re.compile(r"[+-]?" + _NUMBER)
_TOKEN = re.compile(
    rf"(?P<space>[ \t]+)|(?P<number>{_NUMBER})|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>\*\*|[-+*/(),])"
)
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # tab is allowed as blank space
_CHAR_HINTS = {
    ".": "attribute access is not allowed; decimals need digits on both sides of '.'",
    "'": "strings are not allowed",
    '"': "strings are not allowed",
    "[": "subscripts are not allowed",
    "]": "subscripts are not allowed",
    ";": "only a single expression is allowed",
    "=": "assignments and keyword arguments are not allowed",
    "^": "use ** for powers",
}
_UNDEFINED = {sp.S.ComplexInfinity, sp.S.NaN, sp.S.Infinity, sp.S.NegativeInfinity}


def _short(text: object, limit: int = 24) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def _non_ascii(text: str) -> str | None:
    match = _NON_ASCII.search(text)
    if match is None:
        return None
    ch = match.group()
    return f"non-ASCII character {ch!r} (U+{ord(ch):04X}) at column {match.start() + 1}"


def _identifier_problem(name: object, what: str) -> str | None:
    if not isinstance(name, str):
        return f"{what} must be a string, not {type(name).__name__}"
    if not name:
        return f"empty {what}"
    if len(name) > MAX_NAME:
        return f"{what} {_short(name)!r} is longer than {MAX_NAME} characters"
    bad = _non_ascii(name)
    if bad:
        return f"{bad} of {what} {name!r}"
    if not _IDENTIFIER.fullmatch(name):
        if name[0] == "_":
            return f"{what} {name!r} starts with '_'"
        if name[0].isdigit():
            return f"{what} {name!r} starts with a digit"
        return f"{what} {name!r} may contain only ASCII letters, digits and '_'"
    if keyword.iskeyword(name):
        return f"{what} {name!r} is a Python keyword"
    return None


def validate_identifier(name: str, what: str = "name") -> str:
    """Return ``name`` if it is an ASCII identifier of at most 64 characters and no keyword."""
    problem = _identifier_problem(name, what)
    if problem:
        raise ParseError(problem)
    return name


def _check_text(text: object, what: str) -> None:
    """Checks that do not need tokens, so hostile text is turned away before any real work."""
    if not isinstance(text, str):
        raise ParseError(f"{what} must be a string, not {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise ParseError(
            f"{what} is {len(text)} characters long (limit {MAX_LENGTH})", MAX_LENGTH + 1
        )
    bad = _non_ascii(text)
    if bad:
        raise ParseError(bad, _NON_ASCII.search(text).start() + 1)
    if not text.strip():
        raise ParseError(f"empty {what}")


def _number(text: str, col: int) -> sp.Rational:
    """An unsigned literal as an exact Integer/Rational (0.1 is 1/10, not a binary float)."""
    mantissa, _, exponent = text.lower().partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    if len(digits) > MAX_DIGITS:
        raise ParseError(
            f"number literal {_short(text)} at column {col} is longer than {MAX_DIGITS} digits", col
        )
    # Length first: int() of a 2000-digit exponent is itself slow work.
    if len(exponent.lstrip("+-")) > 4 or abs(int(exponent or 0)) > MAX_EXPONENT:
        raise ParseError(
            f"exponent of number literal {_short(text)} at column {col} is out of range "
            f"(limit {MAX_EXPONENT})",
            col,
        )
    shift = int(exponent or 0) - len(fraction)
    if shift >= 0:
        return sp.Integer(int(digits) * 10**shift)
    return sp.Rational(int(digits), 10**-shift)


def _bits(expr: sp.Basic) -> int:
    return sum(max(abs(r.p).bit_length(), r.q.bit_length()) for r in expr.atoms(sp.Rational))


def _magnitude(expr: sp.Basic) -> sp.Rational:
    """Largest |rational| scaling ``expr``, at least 1, not looking inside function arguments.

    SymPy merges (b**e1)**e2 into b**(e1*e2) and exp(c*log(b)) into b**c, so bounding this on
    both sides of a power bounds every exponent SymPy can make out of them.
    """
    best = sp.S.One
    stack = [expr]
    while stack:
        node = stack.pop()
        if node.is_Rational:
            best = max(best, abs(node))
        elif not isinstance(node, sp.Function):
            stack.extend(node.args)
    return best


def _exponents(expr: sp.Basic):
    # Direct arguments too: a power of a product is distributed over its factors.
    for part in (expr, *expr.args):
        if isinstance(part, (sp.Pow, sp.exp)):
            yield part.as_base_exp()[1]


def _has_root(expr: sp.Basic) -> bool:
    return any(p.exp.is_Rational and not p.exp.is_Integer for p in expr.atoms(sp.Pow))


# Numeric subexpressions are shadowed by a 53-bit approximation, computed here rather than by
# SymPy's evalf: SymPy evaluates numbers to decide signs, and for a tower like
# cosh(cosh(cosh(cosh(cosh(9))))) that means digits beyond any memory.  Knowing magnitudes
# first lets the parser refuse such a node before SymPy builds it.  A private context keeps
# mpmath's global precision untouched.
_MP = mpmath.MPContext()
_LOG2_E = 1 / _MP.ln2
_MAX_VALUE = _MP.mpf(2) ** MAX_BITS
_NUMBER_TYPES = (_MP.mpf, _MP.mpc)  # this context's own classes, not mpmath.mpf
_TINY = _MP.mpf(2) ** -44  # relative size below which an imaginary part is rounding noise


def mirror_table(mp) -> dict[type, Callable]:
    """SymPy node class -> its mpmath value in context ``mp`` (also :mod:`symgrad.atpoint`'s)."""
    return {
        sp.Add: lambda *a: mp.fsum(a),
        sp.Mul: lambda *a: mp.fprod(a),
        sp.cot: mp.cot,  # SymPy writes 1/tan as cot
        # the grammar's functions, with their mpmath values from the primitives table
        **{
            p.cls: (lambda f: lambda *a: f(mp, *a))(p.mpmath)
            for p in primitives.TABLE
            if p.grammar is not None and p.cls is not None and p.mpmath is not None
        },
    }


_MIRROR: dict[type, Callable] = mirror_table(_MP)
_MIRROR_CONSTANTS = {sp.pi: +_MP.pi, sp.E: +_MP.e, sp.I: _MP.mpc(0, 1)}


def _mirror(node: sp.Basic, values: list):
    """Approximate value of ``node`` from its arguments' values; None where it has symbols.

    Booleans and condition pairs (relu's bracket, Piecewise) are kept as SymPy objects."""
    if node.is_Symbol:
        return None
    if node.is_Rational:
        return _MP.mpf(node.p) / node.q
    if node in _MIRROR_CONSTANTS:
        return _MIRROR_CONSTANTS[node]
    if node.is_Boolean and not node.args:
        return node
    if any(v is None for v in values):
        return None
    try:
        mirror = _MIRROR.get(type(node))
        if mirror is not None:
            return mirror(*values)
        # Anything else SymPy produced: rebuild it on Floats, which it can decide cheaply.
        result = node.func(*(v if isinstance(v, sp.Basic) else sp.Float(v) for v in values))
        if isinstance(result, sp.Expr):
            result = result.evalf(15)
            return _MP.mpmathify(complex(result)) if result.is_number else None
        return result
    except (ArithmeticError, ValueError, TypeError):
        return _MP.nan


class _Info(NamedTuple):
    value: object  # mpf/mpc, a SymPy boolean or pair, or None (not a number)
    size: int  # node count of the expression written out as a tree


class _Token(NamedTuple):
    kind: str  # "number", "name", "end", or the operator / punctuation itself
    text: str
    col: int


def _describe(tok: _Token) -> str:
    if tok.kind == "end":
        return "end of input"
    if tok.kind in ("name", "number"):
        return f"{tok.kind} {_short(tok.text)!r}"
    return repr(tok.text)


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        col = pos + 1
        if match is None:
            ch = text[pos]
            hint = _CHAR_HINTS.get(ch)
            raise ParseError(
                f"unexpected character {ch!r} at column {col}" + (f" ({hint})" if hint else ""),
                col,
            )
        kind = match.lastgroup
        if kind == "name":
            # Checked while scanning, so a dunder name is reported for itself rather than for
            # the quote or dot that follows it.
            problem = _identifier_problem(match.group(), "name")
            if problem:
                raise ParseError(f"{problem} at column {col}", col)
        if kind != "space":
            tokens.append(_Token(match.group() if kind == "op" else kind, match.group(), col))
        pos = match.end()
    tokens.append(_Token("end", "", len(text) + 1))
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)*     term := unary (('*'|'/') unary)*
    unary := ('+'|'-') unary | power      power := atom ('**' unary)?
    atom := number | name | function '(' expr (',' expr)* ')' | '(' expr ')'
    """

    def __init__(self, tokens: list[_Token]):
        self.tokens = tokens
        self.pos = 0
        self.depth = 0
        self.root_bits = 0
        self.infos: dict[sp.Basic, _Info] = {}
        self.deadline = time.monotonic() + TIME_LIMIT_S

    def parse(self) -> sp.Expr:
        expr = self._sum()
        tok = self._peek()
        if tok.kind != "end":
            raise ParseError(
                f"unexpected {_describe(tok)} at column {tok.col} after a complete expression",
                tok.col,
            )
        return expr

    def _peek(self) -> _Token:
        return self.tokens[self.pos]

    def _next(self) -> _Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def _enter(self, col: int) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ParseError(
                f"expression nested too deeply at column {col} (limit {MAX_DEPTH} levels)", col
            )

    def _sum(self) -> sp.Expr:
        col = self._peek().col
        terms = [self._product()]
        while self._peek().kind in ("+", "-"):
            op = self._next()
            term = self._product()
            terms.append(term if op.kind == "+" else -term)
        # One Add of all terms: adding them pairwise would re-flatten the sum each time.
        return terms[0] if len(terms) == 1 else self._build(col, sp.Add, *terms)

    def _product(self) -> sp.Expr:
        col = self._peek().col
        factors = [self._unary()]
        while self._peek().kind in ("*", "/"):
            op = self._next()
            factor = self._unary()
            factors.append(factor if op.kind == "*" else self._power(factor, sp.S.NegativeOne, op.col))
        return factors[0] if len(factors) == 1 else self._build(col, sp.Mul, *factors)

    def _unary(self) -> sp.Expr:
        tok = self._peek()
        if tok.kind not in ("+", "-"):
            return self._power_expr()
        self._next()
        self._enter(tok.col)
        operand = self._unary()
        self.depth -= 1
        return operand if tok.kind == "+" else -operand

    def _power_expr(self) -> sp.Expr:
        base = self._atom()
        if self._peek().kind != "**":
            return base
        op = self._next()
        self._enter(op.col)
        exponent = self._unary()  # right-associative, and '2**-1' is allowed, as in Python
        self.depth -= 1
        return self._power(base, exponent, op.col)

    def _atom(self) -> sp.Expr:
        tok = self._next()
        if tok.kind == "number":
            return _number(tok.text, tok.col)
        if tok.kind == "name":
            if self._peek().kind == "(":
                return self._call(tok)
            if tok.text in FUNCTIONS:
                raise ParseError(
                    f"function {tok.text!r} at column {tok.col} is used without arguments", tok.col
                )
            if tok.text in CONSTANTS:
                return CONSTANTS[tok.text]
            return sp.Symbol(tok.text, real=True)
        if tok.kind == "(":
            if self._peek().kind == ")":
                raise ParseError(f"empty parentheses '()' at column {tok.col}", tok.col)
            self._enter(tok.col)
            inner = self._sum()
            self._close(tok)
            self.depth -= 1
            return inner
        raise ParseError(f"expected an expression at column {tok.col}, found {_describe(tok)}", tok.col)

    def _close(self, opener: _Token) -> None:
        tok = self._next()
        if tok.kind != ")":
            raise ParseError(
                f"expected ')' at column {tok.col} to close '(' from column {opener.col}, "
                f"found {_describe(tok)}",
                tok.col,
            )

    def _call(self, name: _Token) -> sp.Expr:
        entry = FUNCTIONS.get(name.text)
        if entry is None:
            raise ParseError(
                f"unknown function {name.text!r} at column {name.col} "
                f"(allowed: {', '.join(sorted(FUNCTIONS))})",
                name.col,
            )
        opener = self._next()
        self._enter(opener.col)
        args = []
        if self._peek().kind != ")":
            args.append(self._sum())
            while self._peek().kind == ",":
                self._next()
                args.append(self._sum())
        self._close(opener)
        self.depth -= 1
        if len(args) != entry.arity:
            plural = "s" if entry.arity != 1 else ""
            raise ParseError(
                f"{name.text}() at column {name.col} takes {entry.arity} argument{plural}, "
                f"got {len(args)}",
                name.col,
            )
        if entry.as_power:
            self._check_power(*entry.as_power(*args), name.col)
        if entry.exponential:
            value = self._info(args[0]).value
            if isinstance(value, _NUMBER_TYPES) and abs(value) * _LOG2_E > MAX_BITS:
                raise ParseError(
                    f"argument of {name.text}() at column {name.col} is too large "
                    f"(the result would exceed {MAX_BITS} bits)",
                    name.col,
                )
        return self._build(name.col, entry.func, *args)

    def _check_power(self, base: sp.Expr, exponent: sp.Expr, col: int) -> None:
        """Refuse a power SymPy could not build quickly, before it tries to."""
        magnitude = _magnitude(exponent) * max(map(_magnitude, _exponents(base)), default=1)
        if magnitude > MAX_EXPONENT:
            raise ParseError(
                f"exponent {_short(exponent)} at column {col} is too large "
                f"(limit {MAX_EXPONENT} in magnitude, including exponents it multiplies)",
                col,
            )
        # For exp(...) the numbers SymPy may raise to a power are the arguments of logs.
        if base is sp.E:
            bits = sum(_bits(f.args[0]) for f in exponent.atoms(sp.log))
        else:
            bits = _bits(base)
        if bits * magnitude > MAX_BITS:
            raise ParseError(
                f"power at column {col} would make a number larger than {MAX_BITS} bits", col
            )
        # Numeric bases that are not plain rationals (pi**50, exp(exp(8))**3) by their value.
        base_value, exponent_value = self._info(base).value, self._info(exponent).value
        if (
            isinstance(base_value, _NUMBER_TYPES)
            and isinstance(exponent_value, _NUMBER_TYPES)
            and base_value != 0
            and abs(exponent_value) * abs(_MP.log(abs(base_value), 2)) > MAX_BITS
        ):
            raise ParseError(
                f"power at column {col} would make a number larger than 2**{MAX_BITS}", col
            )
        if bits and (base is sp.E or not exponent.is_Integer or _has_root(base)):
            self.root_bits += bits
            if self.root_bits > MAX_ROOT_BITS:
                raise ParseError(
                    f"numbers under fractional powers are too large at column {col} "
                    f"(limit {MAX_ROOT_BITS} bits in all)",
                    col,
                )

    def _power(self, base: sp.Expr, exponent: sp.Expr, col: int) -> sp.Expr:
        self._check_power(base, exponent, col)
        return self._build(col, sp.Pow, base, exponent)

    def _build(self, col: int, func: Callable[..., sp.Expr], *args: sp.Expr) -> sp.Expr:
        try:
            node = func(*args)
        except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. max() of a complex number
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ParseError(f"invalid operation at column {col}: {_short(detail, 80)}", col) from None
        # Whatever SymPy made of the arguments shows up in the node or its direct arguments.
        for part in (node, *node.args):
            if part in _UNDEFINED:
                raise ParseError(
                    f"undefined value {part} at column {col} (division by zero or a pole)", col
                )
            if part.is_Rational and _bits(part) > MAX_BITS:
                raise ParseError(f"number at column {col} is larger than {MAX_BITS} bits", col)
            if isinstance(part, (sp.Pow, sp.exp)) and _magnitude(part.as_base_exp()[1]) > MAX_EXPONENT:
                raise ParseError(
                    f"exponent at column {col} grows beyond {MAX_EXPONENT} in magnitude", col
                )
        info = self._info(node)
        if info.size > MAX_NODES:
            raise ParseError(
                f"expression is too large at column {col} (more than {MAX_NODES} nodes "
                "when written out)",
                col,
            )
        value = info.value
        if isinstance(value, _NUMBER_TYPES):
            if not _MP.isfinite(value):
                raise ParseError(f"numeric value at column {col} is undefined or infinite", col)
            if abs(_MP.im(value)) > _TINY * abs(value):
                raise ParseError(
                    f"numeric value at column {col} is not real "
                    "(a root or log of a negative number?)",
                    col,
                )
            if abs(value) > _MAX_VALUE:
                raise ParseError(f"numeric value at column {col} exceeds 2**{MAX_BITS}", col)
        if time.monotonic() > self.deadline:
            raise ParseError(
                f"expression takes too long to build (over {TIME_LIMIT_S} s, at column {col})", col
            )
        return node

    def _info(self, node: sp.Basic) -> _Info:
        """Value and written-out size of ``node``, memoized: shared subtrees are visited once."""
        info = self.infos.get(node)
        if info is None:
            parts = [self._info(arg) for arg in node.args]
            info = _Info(
                _mirror(node, [p.value for p in parts]), 1 + sum(p.size for p in parts)
            )
            self.infos[node] = info
        return info


def parse_expression(text: str) -> sp.Expr:
    """Parse ``text`` into a SymPy expression; other names become real Symbols."""
    _check_text(text, "expression")
    return _Parser(_tokenize(text)).parse()


def _entries(text: str, what: str):
    """Yield (entry, column) for each comma-separated entry, stripped of surrounding blanks."""
    bad = _CONTROL.search(text)
    if bad:
        raise ParseError(f"unexpected character {bad.group()!r} at column {bad.start() + 1}")
    start = 0
    for raw in text.split(","):
        col = start + len(raw) - len(raw.lstrip()) + 1
        if not raw.strip():
            raise ParseError(f"empty {what} at column {col}", col)
        yield raw.strip(), col
        start += len(raw) + 1


def _variable(name: str, col: int, what: str) -> str:
    problem = _identifier_problem(name, what)
    if problem:
        raise ParseError(f"{problem} at column {col}", col)
    # parse_expression can never produce a Symbol with these names.
    if name in FUNCTIONS or name in CONSTANTS:
        kind = "function" if name in FUNCTIONS else "constant"
        raise ParseError(f"{what} {name!r} at column {col} is the name of a {kind}", col)
    return name


def parse_names(text: str) -> list[str]:
    """Parse ``x,y,z`` into ``["x", "y", "z"]``."""
    _check_text(text, "list of names")
    names: list[str] = []
    for name, col in _entries(text, "name"):
        _variable(name, col, "name")
        if name in names:
            raise ParseError(f"duplicate name {name!r} at column {col}", col)
        names.append(name)
    return names


def parse_bindings(text: str) -> dict[str, sp.Expr]:
    """Parse ``x=2,y=-3.5,z=1e-3`` into exact SymPy numbers (Integer or Rational)."""
    _check_text(text, "list of bindings")
    bindings: dict[str, sp.Expr] = {}
    for entry, col in _entries(text, "binding"):
        name_part, equals, value_part = entry.partition("=")
        if not equals:
            raise ParseError(f"expected name=value at column {col}, found {_short(entry)!r}", col)
        name = _variable(name_part.strip(), col, "binding name")
        value_col = col + len(name_part) + 1 + len(value_part) - len(value_part.lstrip())
        value = value_part.strip()
        if not _SIGNED_NUMBER.fullmatch(value):
            raise ParseError(
                f"value {_short(value)!r} for {name!r} at column {value_col} is not a number "
                "(expected e.g. 2, -3.5 or 1e-3)",
                value_col,
            )
        if name in bindings:
            raise ParseError(f"duplicate binding for {name!r} at column {col}", col)
        number = _number(value.lstrip("+-"), value_col)
        bindings[name] = -number if value.startswith("-") else number
    return bindings
