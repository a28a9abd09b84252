"""The ``symgrad`` command line, end to end (a subprocess per call, as a user runs it) and in-process
(``symgrad.cli.main([...])``, fast enough to parametrize over the whole registry).

Covers ``symgrad list``, ``symgrad derive OP`` in every format for every registered op (the JSON
expression strings must read back to the very same SymPy expressions), ad-hoc expressions with
values checked against numbers computed by hand, and hostile input: each is refused with exit
status 2 and one line on stderr, quickly.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import sympy as sp

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad.cli import main
from symgrad.declare import REGISTRY
from symgrad.derive import derive
from symgrad.plan import lower
from symgrad.render import sympy_locals

OPS = REGISTRY.names()
DERIVE_KEYS = {"op", "inputs", "params", "outputs", "saved", "gradients", "steps"}


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "symgrad", *args], capture_output=True, text=True, timeout=timeout)


def call(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str) -> None:
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("symgrad: error: "), err
    assert "Traceback" not in err and out == ""


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ----------------------------------------------------------------------------------------------
# end to end


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    assert "list" in r.stdout and "derive" in r.stdout


def test_list_text_end_to_end():
    r = run("list")
    assert r.returncode == 0, r.stderr
    for op in REGISTRY:
        assert op.name in r.stdout and op.doc in r.stdout
    assert f"{len(OPS)} ops" in r.stdout


def test_derive_steps_end_to_end():
    r = run("derive", "softmax_cross_entropy", "--steps")
    assert r.returncode == 0, r.stderr
    for stage in ("[chain rule]", "[canonicalize]", "[eliminate deltas]", "[apply facts]", "[reuse forward]"):
        assert stage in r.stdout
    assert "guard_by_label_fact" in r.stdout and "declared fact" in r.stdout
    # backward keeps the row lse, not the B x C softmax, which it recomputes
    assert "saved for backward (every target): dx_fused; fused loss: forward writes dx_fused (= dx per unit dloss)" in r.stdout
    assert "lowering (one kernel plan, printed by every target)" in r.stdout and "[fuse losses]" in r.stdout


def test_expression_end_to_end():
    r = run("derive", "x*sigmoid(x)", "--wrt", "x", "--at", "x=2", "--format", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    s = sigmoid(2.0)
    assert data["values"]["expr"] == pytest.approx(2 * s, rel=1e-14)
    assert data["values"]["gradients"]["x"] == pytest.approx(s + 2 * s * (1 - s), rel=1e-14)


def test_console_script_main_returns_status():
    # The console script is `symgrad = symgrad.cli:main`: its wrapper exits with what main returns.
    assert main(["list", "--format", "json"]) == 0


# ----------------------------------------------------------------------------------------------
# symgrad list


def test_list_json(capsys):
    code, out, err = call(capsys, "list", "--format", "json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert set(data) == {"ops"}
    assert [o["name"] for o in data["ops"]] == OPS
    for o in data["ops"]:
        op = REGISTRY.get(o["name"])
        assert o["doc"] == op.doc
        assert [(i["name"], i["dims"], i["role"]) for i in o["inputs"]] == [
            (t.name, [d.name for d in t.dims], t.role.value) for t in op.inputs
        ]
        assert [(p["name"], p["default"]) for p in o["params"]] == [(p.name, p.default) for p in op.params]
        assert [(q["name"], q["dims"]) for q in o["outputs"]] == [(q.name, [d.name for d in q.dims]) for q in op.outputs]
        assert o["modules"] == {"numpy": f"generated.numpy.{op.name}", "triton": f"generated.triton.{op.name}"}


def test_list_text_shows_params_and_roles(capsys):
    code, out, _ = call(capsys, "list")
    assert code == 0
    assert "eps=0.0" in out and "ignore_index=-100" in out
    assert "y[B] (label)" in out


# ----------------------------------------------------------------------------------------------
# symgrad derive OP


def _rebuilt(e: sp.Basic) -> sp.Basic:
    """The expression with every node rebuilt (evaluated), as a parser would build it."""
    if not e.args:
        return e
    return e.func(*(_rebuilt(a) for a in e.args))


def _reads_back(s: str, expected: sp.Basic, op) -> bool:
    back = sp.sympify(s, locals=sympy_locals(op=op, text=s))
    if back == expected:
        return True
    # A forward value the stabilizer left unevaluated (-(a + b)) reads back evaluated.
    return back == _rebuilt(expected) or sp.expand(back - expected) == 0


@pytest.mark.parametrize("name", OPS)
def test_derive_json_every_op(capsys, name):
    op = REGISTRY.get(name)
    code, out, err = call(capsys, "derive", name, "--format", "json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert DERIVE_KEYS <= set(data)
    assert data["op"] == name and data["steps"] == []
    assert [i["name"] for i in data["inputs"]] == [t.name for t in op.inputs]
    assert [p["name"] for p in data["params"]] == [p.name for p in op.params]
    assert list(data["outputs"]) == [q.name for q in op.outputs]
    d = derive(op)
    assert data["reads"] == list(d.reads)
    plan = lower(d)
    assert data["saved"] == list(plan.saved) and data["recomputed"] == list(plan.recomputed)
    if not plan.fused:  # a fused loss saves its gradient per unit loss instead of what the gradient reads
        assert set(data["reads"]) <= set(data["saved"]) | set(data["recomputed"]) | set(data["outputs"])
    assert set(data["gradients"]) == set(d.gradients) == {t.name for t in op.differentiable}
    for inp, s in data["gradients"].items():
        # Exactly the same SymPy expression, from the string and the op alone.
        back = sp.sympify(s, locals=sympy_locals(op=op, text=s))
        assert back == d.gradients[inp].expr, (inp, s)
        # And with the locals built from the expression itself.
        assert sp.sympify(s, locals=sympy_locals(d.gradients[inp].expr)) == d.gradients[inp].expr
    for name_, s in {**data["outputs"], **data.get("intermediates", {})}.items():
        assert _reads_back(s, d.forward[name_].expr, op), (name_, s)


@pytest.mark.parametrize("name", ["layer_norm", "softmax_cross_entropy", "conv2d", "max"])
def test_derive_json_steps(capsys, name):
    code, out, _ = call(capsys, "derive", name, "--format", "json", "--steps")
    assert code == 0
    data = json.loads(out)
    steps = data["steps"]
    assert steps and all({"stage", "rule", "doc", "expr"} <= set(s) for s in steps)
    d = derive(REGISTRY.get(name))
    for inp, g in d.gradients.items():
        mine = [s for s in steps if s["input"] == inp]
        assert [s["stage"] for s in mine[:2]] == ["chain rule", "chain rule"]
        assert len(mine) == 2 + sum(1 for s in g.trace.steps if not s.quiet)
        # The last step is the simplified gradient.
        assert mine[-1]["expr"] == data["gradients"][inp]
    assert all(s["rule"] != "rename_dummies" for s in steps)  # quiet steps are skipped


def test_derive_text(capsys):
    code, out, err = call(capsys, "derive", "layer_norm")
    assert code == 0 and err == ""
    assert "forward" in out and "mean[b]" in out and "(intermediate)" in out
    assert "dx[b, i] = (dy[b, i]*w[i]" in out
    assert "dw[i]" in out and "dbias[i]" in out
    assert "saved for backward (every target): x, w, mean, rstd; recomputed in backward: xhat" in out
    assert "[canonicalize]" not in out  # no steps without --steps


def test_derive_text_steps_every_stage(capsys):
    code, out, _ = call(capsys, "derive", "layer_norm", "--steps")
    assert code == 0
    for stage in ("chain rule", "canonicalize", "eliminate deltas", "reuse forward", "tidy"):
        assert f"[{stage}]" in out
    assert "reuse_forward" in out and "rewrite in terms of a value the forward pass already computed" in out


def test_derive_latex(capsys):
    code, out, _ = call(capsys, "derive", "softmax", "--format", "latex", "--steps")
    assert code == 0
    assert r"\begin{align*}" in out and r"\end{align*}" in out
    assert r"\sum_{k=0}^{C - 1}" in out
    assert r"\text{reuse\_forward}" in out
    assert out.count(r"\begin{align*}") == out.count(r"\end{align*}")


@pytest.mark.parametrize("name", OPS)
def test_derive_latex_and_text_every_op(capsys, name):
    for fmt in ("text", "latex"):
        code, out, err = call(capsys, "derive", name, "--format", fmt, "--steps")
        assert code == 0 and err == "" and out


# ----------------------------------------------------------------------------------------------
# symgrad derive EXPR


def test_expression_values(capsys):
    code, out, _ = call(capsys, "derive", "x*sigmoid(x)", "--wrt", "x", "--at", "x=2", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert "op" not in data and data["expr"] == "x*sigmoid(x)"
    assert {"expr", "inputs", "params", "outputs", "saved", "gradients", "steps", "values"} <= set(data)
    s = sigmoid(2.0)  # 0.8807970779778823
    assert data["values"]["expr"] == pytest.approx(1.7615941559557646, rel=1e-15)
    assert data["values"]["gradients"]["x"] == pytest.approx(s + 2 * s * (1 - s), rel=1e-15)  # 1.0907842...
    x = sp.Symbol("x", real=True)
    g = sp.sympify(data["gradients"]["x"], locals=sympy_locals(x))
    assert sp.simplify((g - sp.diff(x / (1 + sp.exp(-x)), x)).rewrite(sp.exp)) == 0


def test_expression_two_variables(capsys):
    code, out, _ = call(capsys, "derive", "log(exp(x) + exp(y))", "--wrt", "x,y", "--at", "x=1,y=3", "--format", "json")
    assert code == 0
    data = json.loads(out)
    e1, e3 = math.exp(1), math.exp(3)
    assert data["values"]["expr"] == pytest.approx(math.log(e1 + e3), rel=1e-14)
    assert data["values"]["gradients"]["x"] == pytest.approx(e1 / (e1 + e3), rel=1e-14)
    assert data["values"]["gradients"]["y"] == pytest.approx(e3 / (e1 + e3), rel=1e-14)
    assert [i["name"] for i in data["inputs"]] == ["x", "y"]


def test_expression_partial_wrt(capsys):
    # d/dx of x**2*y at (3, 5) is 2*x*y = 30; y is held constant.
    code, out, _ = call(capsys, "derive", "x**2*y", "--wrt", "x", "--at", "x=3,y=5", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["values"] == {"expr": 45.0, "gradients": {"x": 30.0}}
    roles = {i["name"]: i["role"] for i in data["inputs"]}
    assert roles == {"x": "differentiable", "y": "constant"}


def test_expression_text_and_steps(capsys):
    code, out, _ = call(capsys, "derive", "x*sigmoid(x)", "--wrt", "x", "--at", "x=2", "--steps")
    assert code == 0
    assert "[chain rule]" in out and "df/dx" in out
    assert "1.76159415595576" in out and "1.09078424" in out
    code, out, _ = call(capsys, "derive", "tanh(x)**2", "--wrt", "x", "--format", "latex")
    assert code == 0 and r"\tanh" in out and r"\frac{\partial f}{\partial x}" in out


def test_expression_steps_json(capsys):
    code, out, _ = call(capsys, "derive", "log(1 + exp(x))*y", "--wrt", "y", "--steps", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["gradients"]["y"] == "softplus(x)"
    assert [s["rule"] for s in data["steps"]] == ["differentiate", "softplus"]


# ----------------------------------------------------------------------------------------------
# user errors: one line, exit 2, never a traceback


@pytest.mark.parametrize(
    "args, needle",
    [
        (["derive", "x"], "unknown op 'x'; `symgrad list` shows"),
        (["derive", "softmx"], "did you mean 'softmax'"),
        (["derive", "x*y"], "--wrt"),
        (["derive", "x*y", "--wrt", "z"], "'z'"),
        (["derive", "x*y", "--wrt", "x,x"], "duplicate"),
        (["derive", "x*y", "--wrt", "x", "--at", "x=1"], "no value for 'y'"),
        (["derive", "x*y", "--wrt", "x", "--at", "x=1,y=2,z=3"], "'z'"),
        (["derive", "x*y", "--wrt", "x", "--at", "x=banana"], "--at"),
        (["derive", "x*y", "--wrt", "1x"], "--wrt"),
        (["derive", "layer_norm", "--wrt", "x"], "expressions"),
        (["derive", "relu", "--format", "xml"], "invalid choice"),
        (["derive"], "required"),
        (["frobnicate"], "invalid choice"),
        (["derive", "x +* y", "--wrt", "x"], ""),
    ],
)
def test_user_errors(capsys, args, needle):
    code, out, err = call(capsys, *args)
    assert_user_error(code, out, err)
    assert needle in err


HOSTILE = [
    "__import__('os').system('echo hi')",
    "x.__class__",
    "9**9**9",
    "(" * 5000 + "x" + ")" * 5000,
    "ѕigmoid(x)",  # Cyrillic 'ѕ' (U+0455)
    "ѕoftmax",  # a bare look-alike name: an unknown op
    "lambda: 0",
    "x; import os",
    "exec('1')",
    "x" * 100_000,
]


@pytest.mark.parametrize("text", HOSTILE, ids=["import", "dunder", "power-tower", "parens", "cyrillic-expr", "cyrillic-op", "lambda",
                                               "statement", "exec", "long"])
def test_hostile_input_end_to_end(text):
    start = time.perf_counter()
    r = run("derive", text, "--wrt", "x")
    elapsed = time.perf_counter() - start
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr[-2000:])
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("symgrad: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert "hi" not in r.stdout
    assert len(lines[0]) < 500
    assert elapsed < 2.0, f"{elapsed:.2f} s"


def test_hostile_at_values(capsys):
    for at in ("x=__import__('os')", "x=9**9**9", "x=" + "(" * 5000 + "1" + ")" * 5000):
        code, out, err = call(capsys, "derive", "x*2", "--wrt", "x", "--at", at)
        assert_user_error(code, out, err)
