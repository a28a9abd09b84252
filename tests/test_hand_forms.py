"""The simplified gradients reach the forms a person writes by hand, structurally.

Each expected form is a SymPy expression built here; ``same`` compares up to the names of
summation dummies (which are bookkeeping) and nothing else, so ``dloss*(X - Y)`` does not pass for
``dloss*X - dloss*Y``. Where the hand form is only equal after expansion, the test says so and
asserts the structural properties that matter (what the gradient reads, what it does not compute).
Also: derivation never sees sizes, so its cost and its result do not depend on them.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import pytest
import sympy as sp

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad.declare import REGISTRY
from symgrad.derive import derive
from symgrad.functions import Iverson, ReduceMax, sigmoid


@functools.cache
def grad(op: str, inp: str) -> sp.Expr:
    return _derivation(op).gradients[inp].expr


@functools.cache
def _derivation(op: str):
    return derive(REGISTRY.get(op))


def canon(e: sp.Basic, depth: int = 0) -> sp.Basic:
    """Rename each bound variable after its nesting depth, so alpha-equivalent forms compare equal."""
    if isinstance(e, sp.Sum):
        ren = {lim[0]: sp.Symbol(f"_d{depth + n}", integer=True) for n, lim in enumerate(e.limits)}
        f = canon(e.function.xreplace(ren), depth + len(e.limits))
        return sp.Sum(f, *[(ren[k], canon(lo.xreplace(ren), depth), canon(hi.xreplace(ren), depth)) for k, lo, hi in e.limits])
    if isinstance(e, ReduceMax):
        body, v, lo, hi = e.args
        d = sp.Symbol(f"_d{depth}", integer=True)
        return ReduceMax(canon(body.xreplace({v: d}), depth + 1), d, canon(lo, depth), canon(hi, depth))
    if not e.args or isinstance(e, (sp.IndexedBase, sp.Symbol)):
        return e
    return e.func(*[canon(a, depth) for a in e.args])


def same(got: sp.Expr, want: sp.Expr) -> None:
    assert canon(got) == canon(want), f"\n  derived: {got}\n  by hand: {want}"


def ix(names):
    return tuple(sp.Symbol(n, integer=True) for n in names.split())


b, i, j, k, l = ix("b i j k l")


def reads(e: sp.Expr, indices=(b, i)) -> set[str]:
    """Names of the tensors and scalars an expression reads (its free indices and bound dummies excluded)."""
    scalars = {s for s in e.free_symbols if not isinstance(s, sp.Indexed)} - set(indices)
    return {str(a.base) for a in e.atoms(sp.Indexed)} | {str(s) for s in scalars}


def has_sqrt(e: sp.Expr) -> bool:
    return any(isinstance(p, sp.Pow) and p.exp.is_Rational and p.exp.q == 2 for p in e.atoms(sp.Pow))


def T(name, integer=False):
    return sp.IndexedBase(name, integer=True) if integer else sp.IndexedBase(name, real=True)


def R(name):
    return sp.Symbol(name, real=True)


def dim(name):
    return sp.Symbol(name, integer=True, positive=True)


B, C, D, K, N = (dim(n) for n in "B C D K N".split())
x, out, dout = T("x"), T("out"), T("dout")
dloss = R("dloss")




# --------------------------------------------------------------------------------------------------
# elementwise


@pytest.mark.parametrize(
    "op, want",
    [
        ("relu", dout[b, i] * Iverson(x[b, i] > 0)),
        ("sigmoid", dout[b, i] * out[b, i] * (1 - out[b, i])),
        ("tanh", dout[b, i] * (1 - out[b, i] ** 2)),
        ("exp", dout[b, i] * out[b, i]),
        ("log", dout[b, i] / x[b, i]),
        ("power", dout[b, i] * R("k") * x[b, i] ** (R("k") - 1)),
        ("softplus", dout[b, i] * sigmoid(x[b, i])),
    ],
)
def test_activation(op, want):
    same(grad(op, "x"), want)


def test_activations_reuse_their_output():
    for op in ("sigmoid", "tanh", "exp"):
        g = grad(op, "x")
        assert reads(g) == {"out", "dout"}, f"{op}: {g}"
        assert not g.has(sp.exp, sp.tanh, sigmoid)


def test_mul_and_bias_add():
    p, q = T("p"), T("q")
    same(grad("mul", "p"), dout[b, i] * q[b, i])
    same(grad("mul", "q"), dout[b, i] * p[b, i])
    same(grad("bias_add", "x"), dout[b, i])
    same(grad("bias_add", "bias"), sp.Sum(dout[k, i], (k, 0, B - 1)))


# --------------------------------------------------------------------------------------------------
# reductions


def test_sum_and_mean_broadcast():
    same(grad("sum", "x"), dout[b])
    same(grad("mean", "x"), dout[b] / C)


def test_max_indicator_form():
    at_max = lambda a: Iverson(sp.Eq(x[b, a], out[b]))  # noqa: E731
    same(grad("max", "x"), dout[b] * at_max(i) / sp.Sum(at_max(k), (k, 0, C - 1)))
    assert not grad("max", "x").has(ReduceMax), "the max is read from the saved output"


# --------------------------------------------------------------------------------------------------
# losses


def test_mse():
    X, Y = T("X"), T("Y")
    same(grad("mse", "X"), dloss * (X[b, i] - Y[b, i]))
    same(grad("mse_mean", "X"), 2 * dloss * (X[b, i] - Y[b, i]) / (B * C))


def test_sigmoid_bce():
    y = T("y")
    g = grad("sigmoid_bce", "x")
    same(g, dloss * (sigmoid(x[b, i]) - y[b, i]) / (B * C))
    assert not g.has(sp.log, sp.exp)


def test_softmax():
    p, dp = T("p"), T("dp")
    same(grad("softmax", "x"), p[b, i] * (dp[b, i] - sp.Sum(dp[b, k] * p[b, k], (k, 0, C - 1))))
    assert not grad("softmax", "x").has(sp.exp)


def test_log_softmax_reads_exp_out_and_sum_dout():
    g = grad("log_softmax", "x")
    same(g, dout[b, i] - sp.exp(out[b, i]) * sp.Sum(dout[b, k], (k, 0, C - 1)))
    assert reads(g) == {"out", "dout", "C"}
    assert not g.has(sp.log, ReduceMax)


def test_softmax_cross_entropy_is_p_minus_target():
    g = grad("softmax_cross_entropy", "x")
    p, w, y = T("p"), T("w"), T("y", integer=True)
    eps, n_valid = R("eps"), R("n_valid")
    onehot = sp.KroneckerDelta(i, y[b])
    # no exp, no log, no max: everything comes from the saved p, w and n_valid
    assert not g.has(sp.exp, sp.log, ReduceMax, sp.Sum)
    assert reads(g) == {"p", "y", "w", "n_valid", "eps", "C", "dloss", "z_loss", "lse"}
    assert onehot in g.atoms(sp.KroneckerDelta)
    # zero for ignored rows: the row weight w[b] is a factor of the whole gradient
    assert isinstance(g, sp.Mul) and w[b] in g.args
    # with eps: (p - (1 - eps)*onehot - eps/C)*w/n_valid*dloss; the engine writes (1 - eps)*onehot expanded;
    # z-loss adds d(z_loss*lse**2)/dx = 2*z_loss*lse*p
    lse, z_loss = T("lse"), R("z_loss")
    want = (p[b, i] - (1 - eps) * onehot - eps / C + 2 * z_loss * lse[b] * p[b, i]) * w[b] / n_valid * dloss
    assert sp.expand(g - want) == 0, f"\n  derived: {g}\n  by hand: {want}"
    # without label smoothing and z-loss it is exactly the textbook p - onehot
    same(g.subs({eps: 0, z_loss: 0}), dloss * (p[b, i] - onehot) * w[b] / n_valid)


def test_weighted_cross_entropy_is_weighted_p_minus_target():
    """torch's weighted mean: the row's gradient is w_y*p - weight*onehot (and, smoothed, the
    target's total weight), over the summed weights of the counted rows' labels."""
    g = grad("softmax_cross_entropy_weighted", "x")
    p, w, y, weight = T("p"), T("w"), T("y", integer=True), T("weight")
    eps, w_sum, total, z_loss, n_valid, lse = R("eps"), R("w_sum"), R("weight_total"), R("z_loss"), R("n_valid"), T("lse")
    onehot = sp.KroneckerDelta(i, y[b])
    assert not g.has(sp.exp, sp.log, ReduceMax, sp.Sum)
    t_weight = (1 - eps) * weight[y[b]] + eps * total / C  # sum_i weight[i]*t[b, i]
    want = (t_weight * p[b, i] - weight[i] * ((1 - eps) * onehot + eps / C)) / w_sum * w[b] * dloss
    want += 2 * z_loss * lse[b] * p[b, i] * w[b] / n_valid * dloss
    assert sp.expand(g - want) == 0, f"\n  derived: {g}\n  by hand: {want}"


# --------------------------------------------------------------------------------------------------
# contractions


def test_matmul_and_linear():
    X, W, dY, bias = T("X"), T("W"), T("dY"), T("bias")
    same(grad("matmul", "X"), sp.Sum(W[k, l] * dY[b, l], (l, 0, N - 1)))
    same(grad("matmul", "W"), sp.Sum(X[l, k] * dY[l, j], (l, 0, B - 1)))  # dW[k, j]
    for op in ("linear", "linear_nobias"):  # W[N, K], as F.linear: dX = dY W, dW = dYᵀ X
        same(grad(op, "X"), sp.Sum(W[l, k] * dY[b, l], (l, 0, N - 1)))
        same(grad(op, "W"), sp.Sum(X[l, k] * dY[l, j], (l, 0, B - 1)))  # dW[j, k]
    same(grad("linear", "bias"), sp.Sum(dY[l, j], (l, 0, B - 1)))


# --------------------------------------------------------------------------------------------------
# normalizations


def test_layer_norm():
    dy, w, rstd, xhat = T("dy"), T("w"), T("rstd"), T("xhat")
    dx = grad("layer_norm", "x")
    assert reads(dx) <= {"rstd", "xhat", "w", "dy", "D"}, f"layer_norm dx reads {reads(dx)}: {dx}"
    assert not has_sqrt(dx) and not dx.has(x)
    same(dx, rstd[b] * (dy[b, i] * w[i]
                        - sp.Sum(dy[b, k] * w[k], (k, 0, D - 1)) / D
                        - xhat[b, i] * sp.Sum(dy[b, k] * w[k] * xhat[b, k], (k, 0, D - 1)) / D))
    same(grad("layer_norm", "w"), sp.Sum(dy[k, i] * xhat[k, i], (k, 0, B - 1)))
    same(grad("layer_norm", "bias"), sp.Sum(dy[k, i], (k, 0, B - 1)))
    assert set(_derivation("layer_norm").reads) <= {"rstd", "xhat", "mean"}


def test_rms_norm():
    dy, w, rstd, xhat, y = T("dy"), T("w"), T("rstd"), T("xhat"), T("y")
    offset = R("offset")  # Gemma's: y = xhat*(w + offset)
    dx = grad("rms_norm", "x")
    assert reads(dx) <= {"rstd", "xhat", "w", "dy", "y", "D", "offset"}, f"rms_norm dx reads {reads(dx)}: {dx}"
    assert not has_sqrt(dx) and not dx.has(x)
    # the engine may read the saved y = (w + offset)*xhat; written out, it is the hand form
    written_out = dx.replace(lambda e: isinstance(e, sp.Indexed) and e.base == y, lambda e: (w[e.indices[1]] + offset) * xhat[e.indices])
    wo = lambda j: w[j] + offset  # noqa: E731
    same(written_out, rstd[b] * (dy[b, i] * wo(i) - xhat[b, i] * sp.Sum(dy[b, k] * wo(k) * xhat[b, k], (k, 0, D - 1)) / D))
    same(grad("rms_norm", "w"), sp.Sum(dy[k, i] * xhat[k, i], (k, 0, B - 1)))


# --------------------------------------------------------------------------------------------------
# convolution


def test_conv2d_gradients_are_correlations():
    n, o, c, h, w_, r, s = ix("n o c h w r s")
    X, Wt, dY = T("X"), T("Wt"), T("dY")
    stride, pad = sp.Symbol("stride", integer=True), sp.Symbol("pad", integer=True)
    Nd, Cin, Cout, H, W, Rd, Sd = (dim(v) for v in "N Cin Cout H W R S".split())
    last_h = sp.floor((H + 2 * pad - Rd) / stride)  # Ho - 1
    last_w = sp.floor((W + 2 * pad - Sd) / stride)  # Wo - 1
    dX, dWt = grad("conv2d", "X"), grad("conv2d", "Wt")
    for g in (dX, dWt):
        assert not g.has(sp.KroneckerDelta, sp.Piecewise, Iverson), g
    # dX: the filters read at h - j*stride + pad (out-of-range taps read as zero), a correlation with dY
    (wt,) = [a for a in dX.atoms(sp.Indexed) if a.base == Wt]
    bound = {lim[0] for lim in dX.limits}
    row_tap = wt.indices[2] - h - pad
    assert row_tap.is_Mul and stride in row_tap.args and (-row_tap / stride) in bound, wt
    same(dX, sp.Sum(Wt[o, c, h - j * stride + pad, w_ - l * stride + pad] * dY[n, o, j, l],
                    (o, 0, Cout - 1), (j, 0, last_h), (l, 0, last_w)))
    same(dWt, sp.Sum(X[n, c, j * stride - pad + r, l * stride - pad + s] * dY[n, o, j, l],
                     (n, 0, Nd - 1), (j, 0, last_h), (l, 0, last_w)))


# --------------------------------------------------------------------------------------------------
# derivation never sees sizes


def _numbers(d) -> set:
    exprs = [g.expr for g in d.gradients.values()] + [g.raw for g in d.gradients.values()]
    exprs += [q.expr for q in d.forward.values()]
    return {a for e in exprs for a in e.atoms(sp.Number)}


def test_layer_norm_derivation_is_size_independent():
    op = REGISTRY.get("layer_norm")
    t0 = time.perf_counter()
    d = derive(op)
    small = time.perf_counter() - t0
    assert small < 5.0, f"deriving layer_norm took {small:.2f} s"
    # the Derivation holds no concrete size: only the symbol D and small constants (1/2, -1, 2...)
    assert all(abs(v) <= 2 for v in _numbers(d)), _numbers(d)
    assert D in d.gradients["x"].expr.free_symbols
    # the same op declared for huge tensors derives to the same expressions in about the same time
    big = dataclasses.replace(op, test_sizes=({"B": 4096, "D": 65536},))
    t0 = time.perf_counter()
    d_big = derive(big)
    large = time.perf_counter() - t0
    assert large < 5.0
    for name in d.gradients:
        assert d_big.gradients[name].expr == d.gradients[name].expr
        assert d_big.gradients[name].raw == d.gradients[name].raw


@pytest.mark.parametrize("name", REGISTRY.names())
def test_every_op_derives_quickly(name):
    t0 = time.perf_counter()
    d = derive(REGISTRY.get(name))
    took = time.perf_counter() - t0
    assert took < 5.0, f"deriving {name} took {took:.2f} s"
    if d.op.kind == "update":  # an update rule is not differentiated
        assert not d.gradients, f"{name} is an update rule but has gradients"
    else:
        assert d.gradients, f"{name} has no gradients"
    # no test size leaks into the expressions (all sizes are symbols)
    sizes = {v for s in REGISTRY.get(name).test_sizes for v in s.values() if v >= 4}  # 2, 3 are also ordinary constants
    leaked = {v for v in _numbers(d) if v.is_Integer and int(v) in sizes}
    assert not leaked, f"{name}: concrete sizes {leaked} in the derivation"
