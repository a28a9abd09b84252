"""Every function symgrad may meet is defined once (symgrad.primitives) and lowers for BOTH targets,
or is refused when its op is registered, naming the function: never a failure at generation time
for one target only.

Walked: every function reachable from the registered library ops (their forward forms and their
derived gradients), and a list of SymPy functions a user will write. Each of the latter becomes a
tiny elementwise op ``out[b, i] = f(x[b, i])``, declared in a registry of this module's own; if it
registers, it is derived, lowered and rendered for NumPy and Triton (into temporary files, imported
as a user's project would), and

* the NumPy module's forward matches the float64 reference interpreter, and its vjp matches
  central finite differences of ``sum(dout * forward(x))`` in float64;
* the Triton module (the interpreter on CPU) matches the NumPy module, forward and vjp.

Also: the table itself (spellings, helpers, derivatives against SymPy's, the parser's grammar),
the tie and kink conventions against torch.autograd, and declaration errors (undeclared symbols,
functions no target can lower).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import zlib

import mpmath
import numpy as np
import pytest
import sympy as sp

import symgrad.ops  # noqa: F401  (registers the library)
from symgrad import primitives
from symgrad.declare import REGISTRY, DeclarationError, Dim, Op, Param, Registry, Tensor, idx, output
from symgrad.derive import derive
from symgrad.evaluate import evaluate, evaluate_forward
from symgrad.primitives import STRUCTURAL, TABLE, Iverson
from symgrad.targets.numpy_printer import NumPyPrinter
from symgrad.targets.triton_expr import HELPERS, TritonPrinter

pytestmark = pytest.mark.filterwarnings(  # the Triton interpreter evaluates masked-off lanes too
    "ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")

B, C = Dim("B", "b"), Dim("C", "i")
b, i = idx("b i")
SIZES = {"B": 2, "C": 3}
z = sp.Symbol("z", real=True)


def _seed(*parts) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


# ---------------------------------------------------------------------------------------------
# the table


def test_every_entry_lowers_for_both_targets_or_is_rewritten_at_declaration():
    for p in TABLE:
        kinds = [p.lowers, p.canonical is not None, p.build is not None]
        assert any(kinds), f"{p.name}: no lowering for some target, no canonical form, not a macro"
        if p.numpy == STRUCTURAL:
            assert hasattr(NumPyPrinter, f"_print_{p.cls.__name__}"), p.name
        if p.triton == STRUCTURAL:
            assert hasattr(TritonPrinter, f"_print_{p.cls.__name__}"), p.name
        assert (p.numpy is None) == (p.triton is None), f"{p.name}: spelled for one target only"


def test_triton_helpers_exist_in_the_runtime():
    pytest.importorskip("triton")
    from symgrad.runtime import triton_support

    assert set(HELPERS) == {h for p in TABLE for h in p.helpers}
    for h in HELPERS:
        assert callable(getattr(triton_support, h, None)), h


def test_parser_grammar_is_the_tables():
    from symgrad.parse import FUNCTIONS

    assert set(FUNCTIONS) == {p.grammar.name for p in TABLE if p.grammar is not None}


@pytest.mark.parametrize("p", [p for p in TABLE if p.derivative is not None and p.cls is not None], ids=lambda p: p.name)
def test_derivative_is_what_sympy_differentiates_to(p):
    """The table's derivative is the rule diff applies (SymPy's own, or the class's fdiff)."""
    arg = z > 0 if p.cls is Iverson else z
    got = sp.diff(p.cls(arg), z)
    assert sp.simplify(got - p.derivative(arg)) == 0, (p.name, got)


@pytest.mark.parametrize("p", [p for p in TABLE if callable(p.reference) and p.mpmath is not None and p.cls is not None],
                         ids=lambda p: p.name)
def test_reference_matches_mpmath(p):
    points = {"log": [0.3, 2.0], "log1p": [-0.5, 3.0], "Pow": [(1.7, 2.5), (0.4, -1.5)], "Max": [(1.0, -2.0)],
              "Min": [(1.0, -2.0)]}.get(p.name, [-1.3, 0.4, 2.2])
    for pt in points:
        args = pt if isinstance(pt, tuple) else (pt,)
        want = float(p.mpmath(mpmath.mp, *[mpmath.mpf(a) for a in args]))
        got = float(p.reference(*[np.float64(a) for a in args]))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-14), (p.name, args)


# ---------------------------------------------------------------------------------------------
# what the library reaches


def _function_nodes(expr):
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (sp.Function, sp.Pow, sp.Piecewise)):
            yield node


@pytest.mark.parametrize("name", REGISTRY.names())
def test_library_functions_are_all_primitives_that_lower(name):
    op = REGISTRY.get(name)
    d = derive(op, trace=False)
    exprs = [q.expr for q in d.forward.values()] + [g.expr for g in d.gradients.values()]
    for e in exprs:
        for node in _function_nodes(e):
            p = primitives.of(node)
            assert p is not None, f"{name}: {type(node).__name__} ({node}) is not in symgrad.primitives"
            if p.cls in (sp.floor, sp.ceiling):
                continue  # integer index arithmetic
            assert p.lowers, f"{name}: {p.name} has no lowering for some target"


# ---------------------------------------------------------------------------------------------
# what users write: each lowers for both targets, or is refused at registration

k_param = Param("k", 2.5)
h0_half = sp.Rational(1, 2)

# (label, formula of z, sampling domain, params, refused: the name the error must carry, or None)
COMMON = [
    ("exp", sp.exp, (-2, 2), (), None),
    ("log", sp.log, (0.2, 3), (), None),
    ("sqrt", sp.sqrt, (0.2, 3), (), None),
    ("rsqrt", lambda u: 1 / sp.sqrt(u), (0.2, 3), (), None),
    ("pow_float", lambda u: u ** sp.Float(2.5), (0.2, 3), (), None),
    ("pow_int", lambda u: u**3 - u**-2, (0.2, 3), (), None),
    ("pow_param", lambda u: u**k_param, (0.2, 3), (k_param,), None),
    ("pow_symbolic", lambda u: u**u, (0.2, 3), (), None),
    ("tanh", sp.tanh, (-3, 3), (), None),
    ("sinh", sp.sinh, (-3, 3), (), None),
    ("cosh", sp.cosh, (-3, 3), (), None),
    ("sin", sp.sin, (-3, 3), (), None),
    ("cos", sp.cos, (-3, 3), (), None),
    ("tan", sp.tan, (-1.2, 1.2), (), None),
    ("erf", sp.erf, (-2, 2), (), None),
    ("sigmoid", primitives.sigmoid, (-4, 4), (), None),
    ("softplus", primitives.softplus, (-4, 4), (), None),
    ("log1p", primitives.log1p, (-0.5, 2), (), None),
    ("expm1", primitives.expm1, (-2, 2), (), None),
    ("relu", primitives.relu, (-2, 2), (), None),
    ("abs", sp.Abs, (-2, 2), (), None),
    ("sign", lambda u: u * sp.sign(u) + sp.sign(u), (-2, 2), (), None),
    ("max_const", lambda u: sp.Max(u, 0), (-2, 2), (), None),
    ("min_const", lambda u: sp.Min(u, sp.Rational(1, 2)), (-2, 2), (), None),
    ("max_two", lambda u: sp.Max(u, 2 * u**2 - 1), (-2, 2), (), None),
    ("min_three", lambda u: sp.Min(u, sp.sin(3 * u), 1), (-2, 2), (), None),
    ("clamp", lambda u: sp.Min(sp.Max(u, -1), 1), (-2, 2), (), None),
    ("hardswish", lambda u: u * sp.Min(sp.Max(u + 3, 0), 6) / 6, (-5, 5), (), None),
    ("heaviside", lambda u: u * sp.Heaviside(u) + sp.Heaviside(u - 1, 0), (-2, 2), (), None),
    ("floor", lambda u: u - sp.floor(u), (-3, 3), (), None),
    ("ceiling", lambda u: u * sp.ceiling(u), (-3, 3), (), None),
    ("piecewise", lambda u: sp.Piecewise((u**2, u > 0), (sp.exp(u) - 1, u > -1), (-u, True)), (-2, 2), (), None),
    ("re", sp.re, (-2, 2), (), None),  # of a real value: the value itself
    ("piecewise_partial", lambda u: sp.Piecewise((u, u > 0)), (-2, 2), (), "Piecewise"),
    ("atan", sp.atan, (-2, 2), (), "atan"),
    ("asinh", sp.asinh, (-2, 2), (), "asinh"),
    ("erfc", sp.erfc, (-2, 2), (), "erfc"),
    ("mod", lambda u: sp.Mod(u, 1), (-2, 2), (), "Mod"),
    ("gamma", sp.gamma, (0.5, 2), (), "gamma"),
    ("undefined", sp.Function("f"), (-2, 2), (), "f"),
]


def _op(label, f, domain, params):
    x = Tensor("x", (B, C), domain=tuple(float(v) for v in domain))
    return Op(f"prim_{label}", f"f(x) for {label}", (x,), (output("out", (b, i), f(x[b, i]), (B, C)),),
              params=tuple(params), test_sizes=(SIZES,))


def _load(source: str, path, name: str):
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _render(op, target: str) -> str:
    from symgrad.plan import lower
    from symgrad.targets import load_renderer

    return load_renderer(target).render(lower(derive(op, trace=False)), f"(test_primitives {op.name})")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """label -> (op, NumPy module, Triton module or None), rendered once per label."""
    cache = {}

    def get(label):
        if label not in cache:
            entry = next(c for c in COMMON if c[0] == label)
            op = Registry().add(_op(*entry[:4]))
            folder = tmp_path_factory.mktemp(label)
            np_mod = _load(_render(op, "numpy"), folder / "np_mod.py", f"_prim_np_{label}")
            cache[label] = (op, np_mod, folder)
        return cache[label]

    return get


def _inputs(op, label):
    rng = np.random.default_rng(_seed(label))
    lo, hi = op.inputs[0].domain
    return rng.uniform(lo, hi, size=(SIZES["B"], SIZES["C"])), rng.standard_normal((SIZES["B"], SIZES["C"]))


@pytest.mark.parametrize("label, f, domain, params, refused", [c for c in COMMON if c[4]], ids=[c[0] for c in COMMON if c[4]])
def test_unsupported_functions_are_refused_at_registration(label, f, domain, params, refused):
    op = _op(label, f, domain, params)  # constructing the Op never fails for an unknown function
    with pytest.raises(DeclarationError) as info:
        Registry().add(op)
    message = str(info.value)
    assert refused in message and f"op prim_{label}" in message and "output out" in message, message


LOWERED = [c for c in COMMON if not c[4]]


@pytest.mark.parametrize("label", [c[0] for c in LOWERED])
def test_numpy_forward_and_gradient(label, built):
    op, mod, _ = built(label)
    x, dout = _inputs(op, label)
    params = {p.name: p.default for p in op.params}
    out = mod.forward(x, **params)
    want = evaluate_forward(op, {"x": x}, params=params, sizes=SIZES)["out"]
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    (dx,) = mod.vjp(x, dout, **params)
    h, fd = 1e-6, np.zeros_like(x)
    for idx_ in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx_] = h
        fd[idx_] = (np.sum(dout * mod.forward(x + e, **params)) - np.sum(dout * mod.forward(x - e, **params))) / (2 * h)
    np.testing.assert_allclose(dx, fd, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("label", [c[0] for c in LOWERED])
def test_triton_matches_numpy(label, built):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") else "cpu"
    op, np_mod, folder = built(label)
    tr_mod = _load(_render(op, "triton"), folder / "tr_mod.py", f"_prim_tr_{label}")
    x, dout = _inputs(op, label)
    params = {p.name: p.default for p in op.params}
    x32, d32 = x.astype(np.float32), dout.astype(np.float32)
    want_out = np_mod.forward(x32, **params)
    (want_dx,) = np_mod.vjp(x32, d32, **params)
    xt, dt = torch.tensor(x32, device=device), torch.tensor(d32, device=device)
    out = tr_mod.forward(xt, **params).cpu().numpy()
    (dx,) = tr_mod.vjp(xt, dt, **params)
    np.testing.assert_allclose(out, want_out, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(dx.cpu().numpy(), want_dx, rtol=2e-5, atol=2e-6)


def test_readme_huber_lowers_for_both_targets_and_matches_torch(tmp_path):
    """The README's custom op (Huber, written with Abs): its gradient reads sign(r)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("runs the Triton interpreter")
    F_ = Dim("F", "f")
    f = idx("f")[0]
    delta = Param("delta", 1.0)
    pred, target = Tensor("pred", (B, F_), domain=(-3.0, 3.0)), Tensor("target", (B, F_), domain=(-2.0, 2.0))
    r = pred[b, f] - target[b, f]
    body = Iverson(sp.Abs(r) <= delta) * r**2 / 2 + Iverson(sp.Abs(r) > delta) * delta * (sp.Abs(r) - delta / 2)
    op = Registry().add(Op("prim_huber", "mean Huber loss", (pred, target), params=(delta,),
                           outputs=(output("loss", (), sp.Sum(body, (b, 0, B.size - 1), (f, 0, F_.size - 1)) / (B.size * F_.size), ()),)))
    np_mod = _load(_render(op, "numpy"), tmp_path / "huber_np.py", "_prim_np_huber")
    tr_mod = _load(_render(op, "triton"), tmp_path / "huber_tr.py", "_prim_tr_huber")
    rng = np.random.default_rng(_seed("huber"))
    p, t = rng.uniform(-3, 3, (4, 5)), rng.uniform(-2, 2, (4, 5))
    tp = torch.tensor(p, requires_grad=True)
    torch.nn.functional.huber_loss(tp, torch.tensor(t), delta=1.0).backward()
    want = torch.nn.functional.huber_loss(torch.tensor(p), torch.tensor(t), delta=1.0).item()
    assert float(np_mod.forward(p, t)) == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(np_mod.vjp(p, t, 1.0)[0], tp.grad.numpy(), rtol=1e-12, atol=1e-14)
    p32, t32 = torch.tensor(p, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)
    assert float(tr_mod.forward(p32, t32)) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(tr_mod.vjp(p32, t32, torch.tensor(1.0))[0].numpy(), tp.grad.numpy(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# conventions at kinks and ties, against torch.autograd


def _grad_at(label_f, points, params=()):
    """d/dz of f at each point, through the derivation (float64 reference interpreter)."""
    op = Registry().add(_op(f"kink_{zlib.crc32(str(label_f).encode())}", label_f, (-1, 1), params))
    g = derive(op, trace=False).gradients["x"]
    out = []
    for v in points:
        env = {"x": np.array([[v]]), "dout": np.array([[1.0]]), "B": 1, "C": 1, **{p.name: p.default for p in params}}
        out.append(evaluate(g.expr, env, {b: 0, i: 0}))
    return out


def test_kink_conventions_match_torch():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    def tgrad(f, v):
        t = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        f(t).backward()
        return t.grad.item()

    cases = [
        (sp.Abs, torch.abs, [0.0, -1.0, 2.0]),
        (lambda u: sp.Max(u, 0), torch.relu, [0.0, 1.0, -1.0]),
        (lambda u: sp.Min(sp.Max(u, 0), 6), F.relu6, [0.0, 6.0, 3.0]),
        (lambda u: sp.Min(sp.Max(u, -1), 1), F.hardtanh, [-1.0, 1.0, 0.5]),
        (lambda u: u * sp.Min(sp.Max(u + 3, 0), 6) / 6, F.hardswish, [-3.0, 3.0, 1.0, -4.0, 4.0]),
        (sp.floor, torch.floor, [0.5, 1.0]),
        (sp.ceiling, torch.ceil, [0.5]),
        (sp.sign, torch.sign, [0.0, 0.5]),
    ]
    for f, tf, pts in cases:
        got = _grad_at(f, pts)
        want = [tgrad(tf, v) for v in pts]
        assert got == pytest.approx(want), (f, pts, got, want)


def test_max_of_two_tensors_splits_a_tie_evenly_as_torch_maximum():
    # d/dx Max(x, 2x - 1) at x = 1 (a tie): torch.maximum gives 0.5*1 + 0.5*2
    torch = pytest.importorskip("torch")
    t = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    torch.maximum(t, 2 * t - 1).backward()
    assert _grad_at(lambda u: sp.Max(u, 2 * u - 1), [1.0]) == pytest.approx([t.grad.item()])


def test_heaviside_value_at_zero_and_zero_derivative():
    op = Registry().add(_op("heaviside_at_0", lambda u: sp.Heaviside(u) + sp.Heaviside(u, 1) * 10, (-1, 1), ()))
    x = np.array([[0.0, -1.0, 2.0]])
    out = evaluate_forward(op, {"x": x}, sizes={"B": 1, "C": 3})["out"]
    np.testing.assert_allclose(out, [[10.5, 0.0, 11.0]])
    assert derive(op, trace=False).gradients["x"].expr == 0


# ---------------------------------------------------------------------------------------------
# symbols: Param is the formula's symbol; anything undeclared is refused


def test_param_is_its_own_symbol():
    eps = Param("eps", 1e-5)
    x = Tensor("x", (B, C))
    op = Registry().add(Op("with_param", "x + eps", (x,), (output("out", (b, i), x[b, i] + eps, (B, C)),), params=(eps,)))
    assert op.outputs[0].expr == x[b, i] + eps.symbol
    assert sp.sympify(eps) == eps.symbol and (2 * eps) == 2 * eps.symbol and (1 - eps) == 1 - eps.symbol
    ignore = Param("ignore_index", -100, integer=True)
    assert sp.sympify(ignore).is_integer


def test_undeclared_symbol_is_refused_naming_op_output_and_symbol():
    eps = Param("eps", 1e-5)
    x = Tensor("x", (B, C))
    typo = sp.Symbol("epsilon", real=True)
    op = Op("typo", "x + epsilon", (x,), (output("out", (b, i), x[b, i] + typo, (B, C)),), params=(eps,))
    with pytest.raises(DeclarationError, match=r"op typo: output out uses undeclared symbol epsilon"):
        Registry().add(op)


def test_symbol_with_other_assumptions_than_its_param_is_refused():
    eps = Param("eps", 1e-5)
    x = Tensor("x", (B, C))
    op = Op("assume", "x + eps", (x,), (output("out", (b, i), x[b, i] + sp.Symbol("eps"), (B, C)),), params=(eps,))
    with pytest.raises(DeclarationError, match=r"op assume: output out uses undeclared symbol eps; it has other assumptions"):
        Registry().add(op)


def test_dims_scalar_inputs_and_earlier_values_are_allowed_symbols():
    x, s = Tensor("x", (B, C)), Tensor("s", ())
    tot = sp.Symbol("tot", real=True)
    op = Op("allowed", "uses dims and scalars", (x, s),
            intermediates=(output("tot", (), sp.Sum(x[b, i], (b, 0, B.size - 1), (i, 0, C.size - 1)), ()),),
            outputs=(output("out", (b, i), x[b, i] * s[()] / (B.size * C.size) + tot, (B, C)),))
    Registry().add(op)
