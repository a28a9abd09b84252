"""Numerical checks of every derived gradient, parametrized over the whole registry.

For each op in ``REGISTRY`` and each of its ``test_sizes`` (a new op needs no new test):
(a) the simplified symbolic gradient against central finite differences of the declared forward,
    in float64, at a random point of the declared domain;
(b) the simplified gradient against the raw (unsimplified) derivative at random points;
(c) the stabilized forward against the declared forward.
Then op-specific edge cases (label smoothing and ignored rows, ties of max, relu at 0), a check of
the reference interpreter itself against PyTorch, and a few unit tests of the interpreter.
"""
from __future__ import annotations

import functools
import zlib

import numpy as np
import pytest
import sympy as sp

import symgrad.ops  # noqa: F401  (registers the op library)
from symgrad.declare import REGISTRY, Role, idx
from symgrad.derive import derive
from symgrad.evaluate import (
    EvaluationError,
    evaluate,
    evaluate_forward,
    evaluate_gradient,
    evaluate_over,
    finite_differences,
    instantiate,
    param_values,
    sample_inputs,
    shape_of,
)
from symgrad.functions import Iverson, ReduceMax, sigmoid, softplus

CASES = [
    pytest.param(op.name, n, id=f"{op.name}-{'-'.join(f'{k}{v}' for k, v in sizes.items())}")
    for op in REGISTRY
    for n, sizes in enumerate(op.test_sizes)
]


@functools.cache
def derivation(name: str):
    return derive(REGISTRY.get(name))


def _seed(*parts) -> int:
    """A seed fixed by the test's name (not by the hash seed), so failures reproduce."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def at_point(name: str, sizes, seed: int, params=None, inputs=None):
    """A random point: inputs, the declared forward, random cotangents, and the gradient env."""
    op = REGISTRY.get(name)
    rng = np.random.default_rng(seed)
    inputs = inputs if inputs is not None else sample_inputs(op, sizes, rng, params)
    fwd = evaluate_forward(op, inputs, params, sizes)
    cot = {f"d{o.name}": rng.normal(size=np.shape(fwd[o.name])) for o in op.outputs}
    env = {**inputs, **param_values(op, sizes, params), **fwd, **cot}
    return op, inputs, fwd, cot, env


def assert_close(got, want, rtol, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values {got}"
    assert np.all(np.isfinite(want)), f"{what}: non-finite reference {want}"
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def check_against_fd(name, sizes, seed, params=None, inputs=None):
    op, inputs, fwd, cot, env = at_point(name, sizes, seed, params, inputs)
    d = derivation(name)
    assert set(d.gradients) == {t.name for t in op.inputs if t.role is Role.DIFF}
    for t in op.differentiable:
        sym = evaluate_gradient(d, t.name, env, sizes, "expr")
        fd = finite_differences(op, inputs, params, sizes, t.name, cot)
        assert_close(sym, fd, 1e-5, f"{name} d{t.name} at {sizes} {params or ''}: symbolic vs finite differences")
    return op, inputs, env


# --------------------------------------------------------------------------------------------------
# (a), (b), (c) over the registry


def test_every_op_has_test_sizes():
    assert [op.name for op in REGISTRY if not op.test_sizes] == []


@pytest.mark.parametrize("name, n", CASES)
def test_gradient_matches_finite_differences(name, n):
    sizes = REGISTRY.get(name).test_sizes[n]
    check_against_fd(name, sizes, _seed(name, n, "fd"))


@pytest.mark.parametrize("name, n", CASES)
def test_simplified_matches_raw(name, n):
    op = REGISTRY.get(name)
    sizes = op.test_sizes[n]
    d = derivation(name)
    for trial in range(3):
        *_, env = at_point(name, sizes, _seed(name, n, "raw", trial))
        for t in op.differentiable:
            expr = evaluate_gradient(d, t.name, env, sizes, "expr")
            raw = evaluate_gradient(d, t.name, env, sizes, "raw")
            assert_close(expr, raw, 1e-10, f"{name} d{t.name} at {sizes}: simplified vs raw")


@pytest.mark.parametrize("name, n", CASES)
def test_stabilized_forward_matches_declared(name, n):
    op = REGISTRY.get(name)
    sizes = op.test_sizes[n]
    inputs = sample_inputs(op, sizes, np.random.default_rng(_seed(name, n, "fwd")))
    declared = evaluate_forward(op, inputs, None, sizes)
    stable = evaluate_forward(derivation(name), inputs, None, sizes)
    assert list(stable) == list(declared)
    for k in declared:
        assert_close(stable[k], declared[k], 1e-12, f"{name}: stabilized {k} vs declared")


def _stabilized(op) -> bool:
    try:
        d = derivation(op.name)
    except Exception:  # noqa: BLE001 - the other tests report the failure; keep collection alive
        return False
    return any(d.forward[q.name].expr != q.expr for q in (*op.intermediates, *op.outputs))


STABILIZED = [pytest.param(op.name, id=op.name) for op in REGISTRY if _stabilized(op)]


@pytest.mark.parametrize("name", STABILIZED)
def test_stabilized_forms_stay_finite_at_extremes(name):
    """Where stabilization rewrote the forward, logits of +-1e4 give finite values and gradients."""
    op = REGISTRY.get(name)
    sizes = op.test_sizes[-1]
    rng = np.random.default_rng(_seed(name, "extremes"))
    inputs = sample_inputs(op, sizes, rng)
    for t in op.differentiable:
        inputs[t.name] = np.sign(inputs[t.name]) * 1e4 + inputs[t.name]
    d = derivation(name)
    fwd = evaluate_forward(d, inputs, None, sizes)
    cot = {f"d{o.name}": rng.normal(size=np.shape(fwd[o.name])) for o in op.outputs}
    env = {**inputs, **param_values(op, sizes), **fwd, **cot}
    for k, v in fwd.items():
        assert np.all(np.isfinite(v)), f"{name}: stabilized {k} overflows at +-1e4"
    for t in op.differentiable:
        assert np.all(np.isfinite(evaluate_gradient(d, t.name, env, sizes))), f"{name}: d{t.name} overflows at +-1e4"


# --------------------------------------------------------------------------------------------------
# op-specific cases


def _ce_reference(x, y, eps, ignore, dloss):
    """softmax cross-entropy with label smoothing and ignored rows, by hand in numpy."""
    C = x.shape[1]
    z = x - x.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    valid = (y != ignore).astype(float)
    onehot = np.zeros_like(x)
    rows = np.nonzero(valid)[0]
    onehot[rows, y[rows]] = 1.0
    t = (1 - eps) * onehot + eps / C
    n_valid = valid.sum()
    loss = float((valid * -(t * logp).sum(axis=1)).sum() / n_valid)
    dx = dloss * (np.exp(logp) - t) * valid[:, None] / n_valid
    return loss, dx


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("sizes", [{"B": 4, "C": 5}, {"B": 6, "C": 41}])
def test_cross_entropy_label_smoothing_and_ignored_rows(eps, sizes):
    params = {"eps": eps}
    op = REGISTRY.get("softmax_cross_entropy")
    inputs = sample_inputs(op, sizes, np.random.default_rng(7), params, ignore_fraction=0.34)
    ignored = inputs["y"] == -100
    assert ignored.any() and not ignored.all()
    op, inputs, env = check_against_fd("softmax_cross_entropy", sizes, 1, params, inputs)
    loss, dx = _ce_reference(inputs["x"], inputs["y"], eps, -100, float(env["dloss"]))
    assert_close(env["loss"], loss, 1e-12, "loss vs hand-written numpy")
    got = evaluate_gradient(derivation("softmax_cross_entropy"), "x", env, sizes)
    assert_close(got, dx, 1e-12, "dx vs hand-written numpy")
    assert np.all(got[ignored] == 0.0), "ignored rows must get exactly zero gradient"
    raw = evaluate_gradient(derivation("softmax_cross_entropy"), "x", env, sizes, "raw")
    assert_close(raw, dx, 1e-12, "raw dx vs hand-written numpy")


def test_max_splits_ties_evenly():
    sizes = {"B": 2, "C": 5}
    x = np.array([[1.0, 3.0, -2.0, 3.0, 0.5], [2.0, 2.0, 2.0, -1.0, 0.0]])
    op, inputs, fwd, cot, env = at_point("max", sizes, 0, inputs={"x": x})
    dout = cot["dout"]
    want = np.array([[0, 0.5, 0, 0.5, 0], [1 / 3, 1 / 3, 1 / 3, 0, 0]]) * dout[:, None]
    d = derivation("max")
    for which in ("expr", "raw"):
        assert_close(evaluate_gradient(d, "x", env, sizes, which), want, 1e-15, f"max ties ({which})")
    torch = pytest.importorskip("torch")
    xt = torch.tensor(x, requires_grad=True)
    torch.amax(xt, dim=1).backward(torch.tensor(dout))
    assert_close(xt.grad.numpy(), want, 1e-15, "torch.amax splits ties the same way")


@pytest.mark.parametrize("name, slope", [("relu", 0.0), ("leaky_relu", 0.01)])
def test_kink_gradient_at_zero(name, slope):
    sizes = {"B": 2, "C": 3}
    x = np.array([[0.0, 1.0, -1.0], [0.0, 0.0, 2.0]])
    *_, cot, env = at_point(name, sizes, 0, inputs={"x": x})
    want = np.where(x > 0, 1.0, slope) * cot["dout"]
    assert np.all(want[x == 0] == slope * cot["dout"][x == 0])
    for which in ("expr", "raw"):
        assert_close(evaluate_gradient(derivation(name), "x", env, sizes, which), want, 1e-15, f"{name} at 0 ({which})")


def test_conv2d_padding_and_stride_sizes():
    op = REGISTRY.get("conv2d")
    dims = instantiate(op, {"N": 1, "Cin": 2, "Cout": 3, "H": 7, "W": 5, "R": 3, "S": 2, "stride": 2, "pad": 1})
    assert (dims["Ho"], dims["Wo"]) == (4, 3)


# --------------------------------------------------------------------------------------------------
# the reference interpreter against PyTorch (forward values and autograd), where a twin is written


def _torch_twins():
    import torch
    import torch.nn.functional as F

    from tests.torch_reference import REFERENCES

    def ce(x, y, eps, ignore_index):
        return F.cross_entropy(x, y, ignore_index=ignore_index, label_smoothing=eps)

    return {
        "relu": lambda x: {"out": torch.relu(x)},
        "leaky_relu": lambda x, alpha: {"out": F.leaky_relu(x, alpha)},
        "sigmoid": lambda x: {"out": torch.sigmoid(x)},
        "tanh": lambda x: {"out": torch.tanh(x)},
        "exp": lambda x: {"out": torch.exp(x)},
        "log": lambda x: {"out": torch.log(x)},
        "power": lambda x, k: {"out": x**k},
        "softplus": lambda x: {"out": F.softplus(x)},
        "silu": lambda x: {"out": F.silu(x)},
        "gelu": lambda x: {"out": F.gelu(x)},
        "gelu_tanh": lambda x: {"out": F.gelu(x, approximate="tanh")},
        "mul": lambda p, q: {"out": p * q},
        "add": lambda p, q: {"out": p + q},
        "bias_add": lambda x, bias: {"out": x + bias},
        "swiglu": lambda a, g: {"out": F.silu(a) * g},
        "sum": lambda x: {"out": x.sum(1)},
        "mean": lambda x: {"out": x.mean(1)},
        "max": lambda x: {"out": torch.amax(x, 1)},
        "softmax": lambda x: {"p": torch.softmax(x, 1)},
        "log_softmax": lambda x: {"out": torch.log_softmax(x, 1)},
        "mse": lambda X, Y: {"loss": ((X - Y) ** 2).sum() / 2},
        "mse_mean": lambda X, Y: {"loss": F.mse_loss(X, Y)},
        "sigmoid_bce": lambda x, y: {"loss": F.binary_cross_entropy_with_logits(x, y)},
        "softmax_cross_entropy": lambda x, y, eps, ignore_index: {"loss": ce(x, y, eps, ignore_index)},
        "matmul": lambda X, W: {"Y": X @ W},
        "linear": lambda X, W, bias: {"Y": X @ W.T + bias},
        "linear_nobias": lambda X, W: {"Y": X @ W.T},
        "layer_norm": lambda x, w, bias, eps: {"y": F.layer_norm(x, (x.shape[1],), w, bias, eps)},
        "layer_norm_nobias": lambda x, w, eps: {"y": F.layer_norm(x, (x.shape[1],), w, None, eps)},
        "layer_norm_noaffine": lambda x, eps: {"y": F.layer_norm(x, (x.shape[1],), None, None, eps)},
        "rms_norm": lambda x, w, eps, offset: {"y": x * torch.rsqrt((x * x).mean(1, keepdim=True) + eps) * (w + offset)},
        "rms_norm_noaffine": lambda x, eps: {"y": x * torch.rsqrt((x * x).mean(1, keepdim=True) + eps)},
        "conv2d": lambda X, Wt, stride, pad: {"Y": F.conv2d(X, Wt, stride=stride, padding=pad)},
        "mse_sum": lambda X, Y: {"loss": ((X - Y) ** 2).sum()},
        "mse_none": lambda X, Y: {"loss": (X - Y) ** 2},
        "sigmoid_bce_sum": lambda x, y: {"loss": F.binary_cross_entropy_with_logits(x, y, reduction="sum")},
        "sigmoid_bce_none": lambda x, y: {"loss": F.binary_cross_entropy_with_logits(x, y, reduction="none")},
    } | {name: _loss(REFERENCES[name]) for name in REFERENCES if name.startswith("softmax_cross_entropy")}


def _loss(ref):
    return lambda *args, **kw: {"loss": ref(*args, **kw)}


TORCH_CASES = [
    pytest.param(op.name, n, id=f"{op.name}-{n}")
    for op in REGISTRY
    for n in range(len(op.test_sizes))
]


@pytest.mark.parametrize("name, n", TORCH_CASES)
def test_interpreter_and_gradient_match_torch(name, n):
    torch = pytest.importorskip("torch")
    twins = _torch_twins()
    if name not in twins:
        pytest.skip(f"no PyTorch twin written for {name}")
    op = REGISTRY.get(name)
    sizes = op.test_sizes[n]
    op, inputs, fwd, cot, env = at_point(name, sizes, _seed(name, n, "torch"))
    args = {k: torch.tensor(v, requires_grad=op.tensor(k).role is Role.DIFF) for k, v in inputs.items()}
    pv = param_values(op, sizes)
    # label smoothing is handled inexactly (float32 eps) inside torch, so compare at eps = 0 only
    outs = twins[name](**args, **pv)
    diff = [args[t.name] for t in op.differentiable]
    total = sum((torch.tensor(cot[f"d{o}"]) * v).sum() for o, v in outs.items())
    grads = torch.autograd.grad(total, diff)
    for o, v in outs.items():
        assert_close(fwd[o], v.detach().numpy(), 1e-10, f"{name}: interpreter forward {o} vs torch")
    d = derivation(name)
    for t, g in zip(op.differentiable, grads):
        assert_close(evaluate_gradient(d, t.name, env, sizes), g.numpy(), 1e-9, f"{name}: d{t.name} vs torch autograd")


def test_torch_twins_cover_the_registry():
    pytest.importorskip("torch")
    missing = [op.name for op in REGISTRY.of_kind("op") if op.name not in _torch_twins()]
    # Not a failure (a new op needs no new test), but the list is worth seeing in -rs output.
    if missing:
        pytest.skip(f"ops without a PyTorch twin: {missing}")


# --------------------------------------------------------------------------------------------------
# the interpreter itself

b, i, k = idx("b i k")
x = sp.IndexedBase("x", real=True)
lab = sp.IndexedBase("y", integer=True)


def test_interpreter_reads_zero_outside_extent_and_sums_bounds():
    X = np.arange(6.0).reshape(2, 3)
    env = {"x": X, "C": 3}
    assert evaluate(x[b, i + 1], env, {b: 1, i: 2}) == 0.0  # past the end
    assert evaluate(x[b, i - 1], env, {b: 0, i: 0}) == 0.0  # before the start
    assert evaluate(x[b, i], env, {b: 1, i: 2}) == 5.0
    C = sp.Symbol("C", integer=True, positive=True)
    assert evaluate(sp.Sum(x[b, k], (k, 0, C - 1)), env, {b: 1}) == 12.0
    # a bound that depends on an outer index: prefix sums
    got = evaluate_over(sp.Sum(x[b, k], (k, 0, i)), env, (b, i), (2, 3))
    np.testing.assert_array_equal(got, np.cumsum(X, axis=1))
    assert evaluate(sp.Sum(x[b, k], (k, 2, 1)), env, {b: 0}) == 0.0  # empty
    assert evaluate(ReduceMax(x[b, k], k, 0, C - 1), env, {b: 0}) == 2.0


def test_interpreter_functions_and_brackets():
    env = {"x": np.array([[-800.0, 0.0, 800.0]]), "y": np.array([2]), "ignore": -100}
    assert evaluate(softplus(x[0, i]), env, {i: 2}) == 800.0
    assert evaluate(softplus(x[0, i]), env, {i: 0}) == 0.0
    assert evaluate(sigmoid(x[0, i]), env, {i: 0}) == 0.0 and evaluate(sigmoid(x[0, i]), env, {i: 2}) == 1.0
    assert evaluate(sp.KroneckerDelta(i, lab[0]), env, {i: 2}) == 1.0
    assert evaluate(Iverson(sp.Ne(lab[0], sp.Symbol("ignore", integer=True))), env) == 1.0
    assert evaluate(Iverson(sp.And(x[0, i] > -1, x[0, i] < 1)), env, {i: 1}) == 1.0
    # strong zero: the bracket wins over a non-finite factor
    assert evaluate(Iverson(x[0, i] > 0) * sp.log(x[0, i]), env, {i: 0}) == 0.0
    assert evaluate(sp.floor(sp.Rational(7, 2)) + sp.pi, {}) == pytest.approx(3 + np.pi)


def test_interpreter_rejects_unknown_nodes_loudly():
    with pytest.raises(EvaluationError, match="zeta"):
        evaluate(sp.zeta(x[0, 0]), {"x": np.ones((1, 1))})
    with pytest.raises(EvaluationError, match="unknown symbol q"):
        evaluate(sp.Symbol("q") + 1, {})
    with pytest.raises(EvaluationError, match="unknown tensor z"):
        evaluate(sp.IndexedBase("z")[0], {})


def test_sample_inputs_respects_domains_and_labels():
    for op in REGISTRY:
        for sizes in op.test_sizes:
            dims = instantiate(op, sizes)
            inputs = sample_inputs(op, sizes, np.random.default_rng(0))
            for t in op.inputs:
                v = inputs[t.name]
                assert v.shape == shape_of(t, dims)
                if t.role is Role.LABEL:
                    C = dims[next(f.dim.name for f in op.facts if f.label == t.name)]
                    ignore = param_values(op, sizes).get("ignore_index")
                    ok = ((v >= 0) & (v < C)) | (v == ignore)
                    assert ok.all() and (v != ignore).any()
                else:
                    assert ((v >= t.domain[0]) & (v <= t.domain[1])).all()
