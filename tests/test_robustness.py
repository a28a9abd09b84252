"""Never silently wrong, never a hang (issue 11, items 6-8): ``derive "EXPR" --at`` evaluates within a
budget, generation's leftovers and hand edits do not fool ``--check``, and file-system failures are
one-line errors naming the path.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad import cli
from symgrad.cli import main

NESTED_SIGMOIDS = "sigmoid(" * 16 + "x" + ")" * 16


def run(*args: str, timeout: float = 60, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "symgrad", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return r, time.perf_counter() - start


def call(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("symgrad: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    return lines[0]


# ----------------------------------------------------------------------------------------------
# item 6: derive "EXPR" --at: fixed precision, a time and size budget


@pytest.mark.parametrize(
    "expr, wrt, at",
    [
        ("x**y", "x,y", "x=2,y=1e12"),
        ("x**y", "x,y", "x=-2,y=1e12"),
        ("x**x**x", "x", "x=9"),
        ("exp(exp(exp(x)))", "x", "x=100"),
        (NESTED_SIGMOIDS, "x", "x=1"),
    ],
    ids=["pow-1e12", "neg-pow-1e12", "tower-9", "exp3-100", "sigmoid16"],
)
def test_values_at_a_point_are_fast(expr, wrt, at):
    """Each of these hung (or took minutes and gigabytes) while SymPy computed exactly."""
    r, elapsed = run("derive", expr, "--wrt", wrt, "--at", at, "--format", "json", timeout=60)
    assert elapsed < 8.0, f"{elapsed:.1f} s"  # a subprocess: Python and SymPy start in about 1 s of it
    if r.returncode == 0:
        values = json.loads(r.stdout)["values"]
        for v in [values["expr"], *values["gradients"].values()]:
            assert isinstance(v, float) or v in ("inf", "-inf", "nan", "zoo"), v
    else:
        line = one_line_error(r)
        assert "evaluating" in line and at.split(",")[0] in line, line


def test_overflow_is_stated_as_inf():
    r, _ = run("derive", "x**y", "--wrt", "x,y", "--at", "x=2,y=1e12", "--format", "json")
    assert r.returncode == 0, r.stderr
    values = json.loads(r.stdout)["values"]
    assert values["expr"] == "inf" and values["gradients"] == {"x": "inf", "y": "inf"}


def test_nested_sigmoids_value_is_right(capsys):
    code, out, err = call(capsys, "derive", NESTED_SIGMOIDS, "--wrt", "x", "--at", "x=1", "--format", "json")
    assert code == 0, err
    v, d = 1.0, 1.0
    for _ in range(16):
        v = 1.0 / (1.0 + math.exp(-v))
        d *= v * (1.0 - v)
    values = json.loads(out)["values"]
    assert values["expr"] == pytest.approx(v, rel=1e-14)
    assert values["gradients"]["x"] == pytest.approx(d, rel=1e-13)


def test_undefined_after_overflow_is_an_error_naming_what_overflowed(capsys):
    # x**y/x**y is 1, but each power exceeds any fixed-precision range: no value rather than a wrong one
    code, out, err = call(capsys, "derive", "x**y - x**y*x/x + x", "--wrt", "x", "--at", "x=3,y=1e12")
    if code == 0:  # SymPy simplified the expression away: then the value must be right
        assert "f     = 3.0" in out
    else:
        assert code == 2 and out == "" and len(err.splitlines()) == 1


def test_inf_minus_inf_is_an_error_not_nan(capsys):
    code, out, err = call(capsys, "derive", "exp(x) - exp(2*x)/exp(x)*y", "--wrt", "y", "--at", "x=1e6,y=1")
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith("symgrad: error: evaluating the expression at x=1e6,y=1:") and "exceeds 2**4096" in err, err


def test_time_budget_for_values(capsys, monkeypatch):
    from symgrad import atpoint

    monkeypatch.setattr(atpoint, "TIME_LIMIT_S", 0.0)
    code, out, err = call(capsys, "derive", "x*sigmoid(x)", "--wrt", "x", "--at", "x=2")
    assert code == 2 and out == ""
    assert "evaluating the expression at x=2: took longer than 0 s" in err, err


@pytest.mark.parametrize(
    "expr, at, expected",
    [
        ("x*sigmoid(x)", "x=2", (2 / (1 + math.exp(-2)),)),
        ("exp(x)", "x=1000", (math.inf,)),
        ("exp(-x)", "x=1000", (0.0,)),
        ("softplus(x)", "x=-50", (math.log1p(math.exp(-50)),)),
        ("log1p(x)", "x=1e-20", (1e-20,)),
        ("x**0.5", "x=2", (math.sqrt(2),)),
        ("1/x", "x=0", ("zoo",)),
        ("sqrt(x)", "x=-4", ("2.0*I",)),
        ("relu(x)", "x=0", (0.0,)),
        ("max(x, 1)", "x=1", (1.0,)),
    ],
)
def test_ordinary_values_unchanged(capsys, expr, at, expected):
    code, out, err = call(capsys, "derive", expr, "--wrt", "x", "--at", at, "--format", "json")
    assert code == 0, err
    got = json.loads(out)["values"]["expr"]
    if isinstance(expected[0], str):
        assert got == expected[0]
    else:
        assert got == pytest.approx(expected[0], rel=1e-15, abs=0)


def test_max_tie_and_power_at_zero(capsys):
    code, out, _ = call(capsys, "derive", "max(x,y)", "--wrt", "x", "--at", "x=1,y=1", "--format", "json")
    assert code == 0 and json.loads(out)["values"]["gradients"]["x"] == 0.5  # Heaviside(0) = 1/2
    code, out, _ = call(capsys, "derive", "x**y", "--wrt", "x", "--at", "x=0,y=0", "--format", "json")
    assert code == 0 and json.loads(out)["values"] == {"expr": 1.0, "gradients": {"x": "nan"}}


def test_too_many_wrt_variables_is_refused_fast():
    n = 200
    expr = "*".join(f"x{i}" for i in range(n))
    r, elapsed = run("derive", expr, "--wrt", ",".join(f"x{i}" for i in range(n)))
    line = one_line_error(r)
    assert f"--wrt names {n} variables; at most {cli.MAX_WRT}" in line
    assert elapsed < 8.0, f"{elapsed:.1f} s"


def test_derivative_size_is_bounded(capsys, monkeypatch):
    monkeypatch.setattr(cli, "MAX_DERIVATIVE_NODES", 50)
    code, out, err = call(capsys, "derive", NESTED_SIGMOIDS, "--wrt", "x")
    assert code == 2 and out == ""
    assert "d/dx is too large: more than 50 nodes when written out" in err, err


def test_derivation_time_is_bounded(capsys, monkeypatch):
    monkeypatch.setattr(cli, "DERIVE_TIME_LIMIT_S", 0.001)
    start = time.perf_counter()
    code, out, err = call(capsys, "derive", "*".join(f"x{i}" for i in range(30)), "--wrt", ",".join(f"x{i}" for i in range(30)))
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "took longer than 0.001 s" in err, err
    assert time.perf_counter() - start < 5
