"""Tests for symgrad.parse: the accepted grammar, exact numbers, and fast rejection of hostile text."""
from __future__ import annotations

import builtins
import re
import time
from pathlib import Path

import pytest
import sympy as sp

import symgrad.parse as parse_module
from symgrad.functions import expm1, log1p, relu, sigmoid, softplus
from symgrad.parse import (
    FUNCTIONS,
    ParseError,
    parse_bindings,
    parse_expression,
    parse_names,
    validate_identifier,
)

x, y, z = sp.symbols("x y z", real=True)
FAST_S = 0.5  # every rejection must come back well within this


def real(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


def assert_rejected(call, text, fragment, needs_column=True):
    """``call(text)`` raises ParseError quickly, with a one-line message naming the problem."""
    start = time.perf_counter()
    with pytest.raises(ParseError) as info:
        call(text)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < FAST_S, f"{elapsed:.3f} s to reject {text[:40]!r}"
    assert "\n" not in message and "\r" not in message, message
    assert fragment in message, message
    if needs_column:
        assert "column" in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Accepted expressions, compared structurally with SymPy objects built here.

ACCEPTED = [
    # precedence and associativity
    ("x + y*z", x + y * z),
    ("(x + y)*z", (x + y) * z),
    ("x - y - z", (x - y) - z),
    ("x - (y - z)", x - y + z),
    ("x/y/z", (x / y) / z),
    ("x/(y/z)", x * z / y),
    ("x*y/z", x * y / z),
    ("2**3**2", sp.Integer(512)),
    ("x**y**z", x ** (y**z)),
    ("(x**y)**z", (x**y) ** z),
    # unary signs: ** binds tighter than unary minus, as in Python
    ("-x**2", -(x**2)),
    ("(-x)**2", x**2),
    ("-2**2", sp.Integer(-4)),
    ("2**-1", sp.Rational(1, 2)),
    ("x**-2", x**-2),
    ("2**-x**2", 2 ** (-(x**2))),
    ("--x", x),
    ("+x", x),
    ("-(x + y)", -x - y),
    ("x*-y", -x * y),
    ("x - -y", x + y),
    # exact numbers
    ("0.1", sp.Rational(1, 10)),
    ("0.1 + 0.2", sp.Rational(3, 10)),
    ("1e-3", sp.Rational(1, 1000)),
    ("2.5e2", sp.Integer(250)),
    ("1E3", sp.Integer(1000)),
    (".5", sp.Rational(1, 2)),
    ("007", sp.Integer(7)),
    ("1" * 40, sp.Integer(int("1" * 40))),
    ("2**1000", sp.Integer(2) ** 1000),
    ("x**1000 + x**-1000", x**1000 + x**-1000),
    ("1e1000", sp.Integer(10) ** 1000),
    # constants and names
    ("pi", sp.pi),
    ("E", sp.E),
    ("2*pi*x", 2 * sp.pi * x),
    ("E**x", sp.exp(x)),
    ("alpha_1 + I + e + oo", real("alpha_1") + real("I") + real("e") + real("oo")),
    ("\tx\t+ y ", x + y),
    # functions together
    ("x*sigmoid(x) + y**2", x * sigmoid(x) + y**2),
    ("sqrt(2)*sqrt(3)", sp.sqrt(6)),
    ("exp(-x**2/2)/sqrt(2*pi)", sp.exp(-(x**2) / 2) / sp.sqrt(2 * sp.pi)),
    ("max(x, min(y, 0))", sp.Max(x, sp.Min(y, 0))),
    ("log(exp(x))", x),
    ("exp(x*log(3))**(7/x)", sp.Integer(3) ** 7),
    # limits, just inside
    ("(" * 64 + "x" + ")" * 64, x),
    ("-" * 64 + "x", x),
    ("+".join(["x"] * 1000), 1000 * x),
]


@pytest.mark.parametrize("text, expected", ACCEPTED, ids=[t[:30] for t, _ in ACCEPTED])
def test_parses_to_expected_expression(text, expected):
    assert parse_expression(text) == expected


def test_names_become_real_symbols():
    result = parse_expression("x")
    assert result == real("x") and result != sp.Symbol("x")
    assert result.is_real is True


UNARY = [
    ("exp", sp.exp),
    ("log", sp.log),
    ("sqrt", sp.sqrt),
    ("sin", sp.sin),
    ("cos", sp.cos),
    ("tan", sp.tan),
    ("tanh", sp.tanh),
    ("sinh", sp.sinh),
    ("cosh", sp.cosh),
    ("abs", sp.Abs),
    ("erf", sp.erf),
    ("sigmoid", sigmoid),
    ("softplus", softplus),
    ("relu", relu),
    ("log1p", log1p),
    ("expm1", expm1),
]
BINARY = [("max", sp.Max), ("min", sp.Min)]


@pytest.mark.parametrize("name, func", UNARY)
def test_unary_function_table(name, func):
    assert parse_expression(f"{name}(x*y + 1)") == func(x * y + 1)


@pytest.mark.parametrize("name, func", BINARY)
def test_binary_function_table(name, func):
    assert parse_expression(f"{name}(x, y**2)") == func(x, y**2)


def test_function_table_is_exactly_the_whitelist():
    assert set(FUNCTIONS) == {name for name, _ in UNARY + BINARY}


# ---------------------------------------------------------------------------------------------
# Rejected expressions: (text, fragment the message must contain).

FORTY_DIGITS = ["1234567890123456789012345678901234567%03d" % k for k in (1, 3, 7, 9, 11)]

REJECTED = [
    # attempts at running code
    ("x.__class__", "'.'"),
    ("().__class__", "'.'"),
    ("x.__dict__", "attribute"),
    ("__import__('os')", "'__import__'"),
    ("__builtins__", "'__builtins__'"),
    ("import os", "'import'"),
    ("lambda: 1", "'lambda'"),
    ("'os'", "strings are not allowed"),
    ('"os"', "strings are not allowed"),
    ("x[0]", "'['"),
    ("x; y", "';'"),
    ("sin(x=1)", "'='"),
    ("x = 1", "'='"),
    ("open(x)", "unknown function 'open' at column 1 (allowed: abs, cos,"),
    ("eval(x)", "unknown function 'eval'"),
    ("f(x)", "unknown function 'f'"),
    ("x(1)", "unknown function 'x'"),
    ("pi(2)", "unknown function 'pi'"),
    # arity
    ("sin()", "sin() at column 1 takes 1 argument, got 0"),
    ("sin(x, y)", "got 2"),
    ("max(x)", "max() at column 1 takes 2 arguments, got 1"),
    ("min(x, y, z)", "got 3"),
    ("max(x,)", "found ')'"),
    # names
    ("sin + 1", "function 'sin'"),
    ("exp", "function 'exp'"),
    ("_x", "'_x'"),
    ("None", "'None'"),
    ("True + 1", "'True'"),
    ("x if y else z", "'if'"),
    ("a" * 65, "longer than 64"),
    # sizes and nesting
    ("x+" * 1000 + "x", "2001 characters"),
    ("(" * 999 + "x" + ")" * 999, "nested too deeply"),
    ("(" * 65 + "x" + ")" * 65, "nested too deeply"),
    ("-" * 1999 + "x", "nested too deeply"),
    ("2**" * 600 + "2", "nested too deeply"),
    ("sin(" * 399 + "x" + ")" * 399, "nested too deeply"),
    ("1" * 41, "longer than 40 digits"),
    ("0." + "1" * 40, "longer than 40 digits"),
    ("1e1001", "out of range"),
    ("1e" + "9" * 1500, "out of range"),
    # huge powers, refused before SymPy computes them
    ("9**9**9", "387420489"),
    ("10**10**10", "10000000000"),
    ("2**100000", "100000"),
    ("x**100000", "100000"),
    ("x**-1001", "-1001"),
    ("(2**1000)**1000", "larger than"),
    ("12345**1000", "larger than"),
    ("x**1000*x**1000", "exponent"),
    ("exp(2000*x)", "exponent"),
    ("exp(x*log(3))**(10**30/x)", "exponent"),
    ("((exp(x*log(3))**(1000*y/x))**(1000*z/y))**(1000/z)", "exponent"),
    ("exp(exp(exp(exp(exp(9)))))", "larger than"),
    ("cosh(cosh(cosh(cosh(cosh(9)))))", "cosh()"),
    ("sinh(sinh(sinh(sinh(sinh(9)))))", "sinh()"),
    ("sqrt(2**1000 + 1)", "fractional powers"),
    ("*".join(f"sqrt({n})" for n in FORTY_DIGITS), "fractional powers"),
    ("relu(" * 40 + "x" + ")" * 40, "nodes"),
    # non-ASCII, look-alikes included
    ("2*\u0445", "non-ASCII character '\u0445' (U+0445) at column 3"),
    ("c\u03bfs(x)", "(U+03BF) at column 2"),
    ("\uff11 + x", "U+FF11"),
    ("x\u00a0+ y", "U+00A0"),
    ("x\u200b", "U+200B"),
    ("x + y\u2028", "U+2028"),
    # syntax
    ("x y", "name 'y' at column 3"),
    ("1 +", "end of input"),
    ("()", "'()'"),
    ("(x", "expected ')'"),
    ("x)", "')'"),
    ("2x", "name 'x'"),
    ("x**", "end of input"),
    ("x +* y", "'*'"),
    ("x // y", "'/'"),
    ("x ^ 2", "use ** for powers"),
    ("1.", "'.'"),
    ("1.real", "'.'"),
    ("0x10", "'x10'"),
    ("x\n+ y", "'\\n'"),
    ("x , y", "','"),
    ("#x", "'#'"),
    # values that are undefined or not real
    ("x/0", "division by zero"),
    ("0**-1", "zoo"),
    ("log(0)", "zoo"),
    ("tan(pi/2)", "zoo"),
    ("sqrt(-2)", "not real"),
    ("log(-1)", "not real"),
    ("(-8)**(1/3)", "not real"),
    ("1/(log(8) - 3*log(2))", "undefined"),
]


@pytest.mark.parametrize("text, fragment", REJECTED, ids=[t[:30] for t, _ in REJECTED])
def test_rejects_quickly_with_one_line_message(text, fragment):
    assert_rejected(parse_expression, text, fragment, needs_column=len(text) <= 2000)


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_rejects_empty(text):
    assert_rejected(parse_expression, text, "empty", needs_column=False)


def test_rejects_non_strings():
    assert_rejected(parse_expression, b"x", "must be a string", needs_column=False)


def test_time_limit_is_a_backstop(monkeypatch):
    monkeypatch.setattr(parse_module, "TIME_LIMIT_S", -1.0)
    assert_rejected(parse_expression, "x + y", "too long")


def test_no_evaluator_is_called(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the parser called an evaluator")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, forbidden)
    monkeypatch.setattr(sp, "sympify", forbidden)
    monkeypatch.setattr(sp, "parse_expr", forbidden)
    assert parse_expression("x*sigmoid(x) + max(y, 2)**2") == x * sigmoid(x) + sp.Max(y, 2) ** 2
    for text, _ in REJECTED:
        with pytest.raises(ParseError):
            parse_expression(text)


def test_source_has_no_evaluator_calls():
    source = Path(parse_module.__file__).read_text()
    pattern = r"\b(eval|exec|sympify|parse_expr|__import__|S)\s*\(|(?<!re\.)\bcompile\s*\(|\bimport ast\b"
    assert not re.search(pattern, source)


# ---------------------------------------------------------------------------------------------
# Bindings, name lists and identifiers.

BINDINGS = [
    ("x=2", {"x": sp.Integer(2)}),
    ("x=2,y=-3.5,z=1e-3", {"x": sp.Integer(2), "y": sp.Rational(-7, 2), "z": sp.Rational(1, 1000)}),
    (" x = +4 ,\ty=0.1 ", {"x": sp.Integer(4), "y": sp.Rational(1, 10)}),
    ("a=1E3,b=.5,c=2.50,d=-0", {"a": 1000, "b": sp.Rational(1, 2), "c": sp.Rational(5, 2), "d": 0}),
    ("w=" + "9" * 40, {"w": sp.Integer(10**40 - 1)}),
    ("t=1e-1000", {"t": sp.Rational(1, 10**1000)}),
]


@pytest.mark.parametrize("text, expected", BINDINGS)
def test_parse_bindings(text, expected):
    result = parse_bindings(text)
    assert result == expected
    assert list(result) == list(expected)
    for value in result.values():
        assert isinstance(value, sp.Rational)  # exact: Integer is a Rational


def test_binding_integers_are_sympy_integers():
    assert isinstance(parse_bindings("n=12")["n"], sp.Integer)


BAD_BINDINGS = [
    ("x", "expected name=value at column 1"),
    ("x=", "not a number"),
    ("=2", "empty binding name"),
    ("x=2,", "empty binding at column 5"),
    ("x=2,,y=3", "empty binding at column 5"),
    ("x=2, x=3", "duplicate binding for 'x' at column 6"),
    ("x=y", "'y' for 'x' at column 3 is not a number"),
    ("x=2+3", "'2+3'"),
    ("x=--2", "not a number"),
    ("x=1e99999", "out of range"),
    ("x=" + "1" * 41, "40 digits"),
    ("_x=1", "'_x'"),
    ("1x=2", "starts with a digit"),
    ("lambda=1", "keyword"),
    ("exp=1", "function"),
    ("pi=3", "constant"),
    ("\u0445=1", "U+0445"),
    ("x=1;y=2", "not a number"),
    ("x=0x10", "not a number"),
    ("x=1.", "not a number"),
    ("x=nan", "not a number"),
    ("x=inf", "not a number"),
    ("x==2", "not a number"),
    ("x.y=1", "may contain only"),
    ("x=1\ny=2", "'\\n'"),
]


@pytest.mark.parametrize("text, fragment", BAD_BINDINGS)
def test_parse_bindings_rejects(text, fragment):
    assert_rejected(parse_bindings, text, fragment)


@pytest.mark.parametrize("text, fragment", [("", "empty"), ("x=1" + ",y=1" * 700, "characters long")])
def test_parse_bindings_rejects_empty_and_long(text, fragment):
    assert_rejected(parse_bindings, text, fragment, needs_column=False)


NAMES = [
    ("x", ["x"]),
    ("x,y,z", ["x", "y", "z"]),
    (" x , y ", ["x", "y"]),
    ("alpha_1,B2", ["alpha_1", "B2"]),
    ("a" * 64, ["a" * 64]),
]


@pytest.mark.parametrize("text, expected", NAMES)
def test_parse_names(text, expected):
    assert parse_names(text) == expected


BAD_NAMES = [
    ("x,", "empty name at column 3"),
    (",x", "empty name at column 1"),
    ("x,,y", "empty name at column 3"),
    ("x, x", "duplicate name 'x' at column 4"),
    ("1x", "starts with a digit"),
    ("_x", "'_x'"),
    ("x y", "may contain only"),
    ("x\ty", "may contain only"),
    ("for", "keyword"),
    ("sin", "function"),
    ("E", "constant"),
    ("x.y", "may contain only"),
    ("x-y", "may contain only"),
    ("\u0445y", "U+0445"),
    ("a" * 65, "longer than 64"),
]


@pytest.mark.parametrize("text, fragment", BAD_NAMES)
def test_parse_names_rejects(text, fragment):
    assert_rejected(parse_names, text, fragment)


def test_parse_names_rejects_empty():
    assert_rejected(parse_names, " ", "empty", needs_column=False)


@pytest.mark.parametrize("name", ["x", "X1", "a_b", "lambda_", "a" * 64])
def test_validate_identifier_accepts(name):
    assert validate_identifier(name) == name


BAD_IDENTIFIERS = [
    ("", "empty"),
    ("1a", "starts with a digit"),
    ("_a", "starts with '_'"),
    ("a-b", "may contain only"),
    ("a b", "may contain only"),
    ("class", "Python keyword"),
    ("a" * 65, "longer than 64"),
    ("\u0445", "U+0445"),
    ("a\u00e9", "U+00E9"),
    (None, "must be a string"),
]


@pytest.mark.parametrize("name, fragment", BAD_IDENTIFIERS)
def test_validate_identifier_rejects(name, fragment):
    assert_rejected(validate_identifier, name, fragment, needs_column=False)


def test_validate_identifier_names_what_was_checked():
    message = assert_rejected(
        lambda name: validate_identifier(name, "kernel name"), "1a", "kernel name", needs_column=False
    )
    assert message.startswith("kernel name '1a'")
