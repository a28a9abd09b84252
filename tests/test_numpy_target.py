"""The generated NumPy modules (``generated.numpy.<op>``), parametrized over the whole registry.

For every op (a new op needs no new test, only its one-line PyTorch reference in
``tests/torch_reference.py``):

* forward and vjp against ``torch.autograd`` of the same forward written in PyTorch, in float64,
  at each declared test size, at odd sizes (1, 41 and 1023 columns), with one row, and at the
  extra params of ``PARAM_CASES``;
* the module contract: constants, banner, formulas, ``forward_with_saved``/``backward`` == ``vjp``,
  ``saved`` holds exactly KernelPlan.saved plus params, dims and folded leading axes, float32 stays float32, strided inputs,
  inputs never written, results never aliasing an argument;
* clear errors for bad input (wrong rank, mismatched dims, unknown params, bad cotangents);

then numerically extreme inputs (logits of +-1e4, rows with -inf, softplus(+-large)) and unit tests
of the printer (strictness) and of the runtime's erf.
"""
from __future__ import annotations

import functools
import importlib
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

torch = pytest.importorskip("torch")

import symgrad.ops  # noqa: E402,F401  (registers the op library)
from symgrad.declare import REGISTRY, Dim, Role, idx  # noqa: E402
from symgrad.derive import derive  # noqa: E402
from symgrad.evaluate import instantiate, param_values, sample_inputs  # noqa: E402
from symgrad.plan import lower  # noqa: E402
from symgrad.runtime import numpy_math  # noqa: E402
from symgrad.targets.numpy_printer import Env, NumPyPrinter  # noqa: E402
from symgrad.targets.statements import LoweringError, prepare  # noqa: E402
from torch_reference import PARAM_CASES, REFERENCES  # noqa: E402

RTOL64, ATOL64 = 1e-9, 1e-11  # float64 against PyTorch: only summation order differs
GENERATED = Path(__file__).resolve().parents[1] / "generated" / "numpy"


def module(name: str):
    return importlib.import_module(f"generated.numpy.{name}")


@functools.cache
def program(name: str):
    return lower(derive(REGISTRY.get(name), trace=False))


def _seed(*parts) -> int:
    """Fixed by the case's name, not by the hash seed, so a failure reproduces."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def _valid(op, sizes) -> bool:
    try:
        return all(v >= 1 for v in instantiate(op, sizes).values())
    except Exception:
        return False


def _cases():
    """(op, label, sizes, params) for every op: declared sizes, odd column counts, one row, and
    the extra params of PARAM_CASES. Columns are the last dim of the first input, rows its first."""
    out = []
    for op in REGISTRY.of_kind("op"):  # update rules: tests/test_optim.py
        for n, sizes in enumerate(op.test_sizes):
            out.append((op.name, f"size{n}", dict(sizes), {}))
        base = dict(op.test_sizes[-1])
        first = op.inputs[0]
        if first.dims:
            for cols in (1, 41, 1023):
                sizes = {**base, first.dims[-1].name: cols}
                if _valid(op, sizes):
                    out.append((op.name, f"cols{cols}", sizes, {}))
            sizes = {**base, first.dims[0].name: 1}
            if _valid(op, sizes):
                out.append((op.name, "one_row", sizes, {}))
        for k, params in enumerate(PARAM_CASES.get(op.name, ())):
            out.append((op.name, f"params{k}", dict(op.test_sizes[1 % len(op.test_sizes)]), dict(params)))
    return out


CASES = [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in _cases()]
OPS = [pytest.param(op.name, id=op.name) for op in REGISTRY.of_kind("op")]  # update rules: tests/test_optim.py


def _point(name, sizes, params, seed):
    op = REGISTRY.get(name)
    rng = np.random.default_rng(seed)
    inputs = sample_inputs(op, sizes, rng, params)
    pv = param_values(op, sizes, params)
    return op, rng, [inputs[t.name] for t in op.inputs], pv


def _torch_inputs(op, args):
    out = []
    for t, a in zip(op.inputs, args):
        if t.role is Role.LABEL:
            out.append(torch.tensor(a, dtype=torch.int64))
        else:
            out.append(torch.tensor(a, dtype=torch.float64, requires_grad=t.role is Role.DIFF))
    return out


def _as_tuple(v):
    return tuple(v) if isinstance(v, tuple) else (v,)


# ------------------------------------------------------------------------------------------------
# agreement with torch.autograd


def test_every_op_has_a_reference():
    missing = [op.name for op in REGISTRY.of_kind("op") if op.name not in REFERENCES]
    assert not missing, f"add a one-line PyTorch forward to tests/torch_reference.py for: {missing}"


@pytest.mark.parametrize("name,label,sizes,params", CASES)
def test_forward_and_vjp_match_torch(name, label, sizes, params):
    op, rng, args, pv = _point(name, sizes, params, _seed(name, label))
    mod = module(name)
    outs = _as_tuple(mod.forward(*args, **pv))
    targs = _torch_inputs(op, args)
    touts = _as_tuple(REFERENCES[name](*targs, **pv))
    assert len(outs) == len(touts) == len(op.outputs)
    for o, got, want in zip(op.outputs, outs, touts):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=RTOL64, atol=ATOL64, err_msg=f"{name}: output {o.name}")
    cots = [rng.normal(size=np.shape(o)) for o in outs]
    torch.autograd.backward(touts, [torch.tensor(c) for c in cots])
    grads = mod.vjp(*args, *cots, **pv)
    assert len(grads) == len(op.inputs)
    for t, g, ta in zip(op.inputs, grads, targs):
        if t.role is not Role.DIFF:
            assert g is None, f"{name}: {t.name} is not differentiable, got a gradient"
            continue
        assert g.shape == np.shape(args[op.inputs.index(t)])
        np.testing.assert_allclose(g, ta.grad.numpy(), rtol=RTOL64, atol=ATOL64, err_msg=f"{name}: gradient of {t.name}")


# ------------------------------------------------------------------------------------------------
# the module contract


@pytest.mark.parametrize("name", OPS)
def test_module_constants_and_banner(name):
    op, mod, prog = REGISTRY.get(name), module(name), program(name)
    assert mod.OP == name
    assert mod.INPUTS == tuple(t.name for t in op.inputs)
    assert mod.DIFFERENTIABLE == tuple(t.name for t in op.inputs if t.role is Role.DIFF)
    assert mod.OUTPUTS == tuple(o.name for o in op.outputs)
    assert mod.PARAMS == {p.name: p.default for p in op.params}
    text = (GENERATED / f"{name}.py").read_text()
    first, second = text.splitlines()[:2]
    assert first.startswith("# @generated by symgrad") and f"`{name}`" in first and "symgrad/ops/" in first and "do not edit" in first
    assert second == f"# Regenerate with: symgrad generate {name} --target numpy"
    comments = "".join(line.strip().lstrip("#").strip() for line in text.splitlines() if line.strip().startswith("#"))
    for st in prog.forward.statements + prog.backward.statements:
        assert st.formula.replace(" ", "") in comments.replace(" ", ""), f"{name}: formula of {st.target} missing"


@pytest.mark.parametrize("name", OPS)
def test_forward_with_saved_then_backward_is_vjp(name):
    op, rng, args, pv = _point(name, op_sizes(name), {}, _seed(name, "saved"))
    mod, prog = module(name), program(name)
    outs, saved = mod.forward_with_saved(*args, **pv)
    lead = {"_lead"} if op.inputs[0].dims and op.inputs[0].dims[0].leading else set()  # the folded leading axes
    assert set(saved) == set(prog.saved) | {p.name for p in op.params} | {d.name for d in op.dims} | lead
    for o, a in zip(_as_tuple(outs), _as_tuple(mod.forward(*args, **pv))):
        np.testing.assert_array_equal(o, a)
    cots = [rng.normal(size=np.shape(o)) for o in _as_tuple(outs)]
    by_backward = mod.backward(saved, *cots)
    by_vjp = mod.vjp(*args, *cots, **pv)
    for a, b in zip(by_backward, by_vjp):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(a, b)


def op_sizes(name):
    sizes = REGISTRY.get(name).test_sizes
    return dict(sizes[1 % len(sizes)])


@pytest.mark.parametrize("name", OPS)
def test_float32_stays_float32(name):
    op, rng, args, pv = _point(name, op_sizes(name), {}, _seed(name, "f32"))
    mod = module(name)
    args32 = [a.astype(np.float32) if t.role is not Role.LABEL else a for t, a in zip(op.inputs, args)]
    args64 = [a.astype(np.float64) if t.role is not Role.LABEL else a for t, a in zip(op.inputs, args32)]
    outs32, outs64 = _as_tuple(mod.forward(*args32, **pv)), _as_tuple(mod.forward(*args64, **pv))
    rtol, atol = op.tolerances.get("float32", (1e-5, 1e-6))
    for o32, o64 in zip(outs32, outs64):
        assert o32.dtype == np.float32 and o64.dtype == np.float64
        np.testing.assert_allclose(o32, o64, rtol=rtol, atol=atol)
    cots = [rng.normal(size=np.shape(o)) for o in outs64]
    g32 = mod.vjp(*args32, *[c.astype(np.float32) for c in cots], **pv)
    g64 = mod.vjp(*args64, *cots, **pv)
    for t, a, b in zip(op.inputs, g32, g64):
        if a is not None:
            assert a.dtype == np.float32, f"{name}: gradient of {t.name} is {a.dtype}"
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{name}: {t.name}")
    # A Python float cotangent (dloss=1.0) is weak: it does not promote the backward to float64.
    scalar_cots = [1.0 if np.ndim(o) == 0 else o.astype(np.float32) for o in outs32]
    for g in mod.vjp(*args32, *scalar_cots, **pv):
        assert g is None or g.dtype == np.float32


@pytest.mark.parametrize("name", OPS)
def test_strided_inputs_unchanged_and_results_fresh(name):
    op, rng, args, pv = _point(name, op_sizes(name), {}, _seed(name, "strided"))
    mod = module(name)
    outs = _as_tuple(mod.forward(*args, **pv))
    cots = [rng.normal(size=np.shape(o)) for o in outs]
    grads = mod.vjp(*args, *cots, **pv)

    def strided(a):  # the same values, every other element of a bigger buffer
        big = np.zeros(np.shape(a) + (2,), dtype=a.dtype)
        big[..., 0] = a
        return big[..., 0]

    s_args, s_cots = [strided(a) for a in args], [strided(np.asarray(c)) for c in cots]
    before = [a.copy() for a in s_args + s_cots]
    s_outs = _as_tuple(mod.forward(*s_args, **pv))
    s_grads = mod.vjp(*s_args, *s_cots, **pv)
    for a, b in zip(outs + tuple(g for g in grads if g is not None), s_outs + tuple(g for g in s_grads if g is not None)):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
    for a, b in zip(s_args + s_cots, before):
        np.testing.assert_array_equal(a, b)  # inputs are never written
    for g in s_grads:
        if g is not None:
            assert g.flags.writeable
            assert not any(np.shares_memory(g, a) for a in s_args + s_cots), f"{name}: a gradient aliases an argument"


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("name", OPS)
def test_wrong_rank_names_the_input(name):
    op, rng, args, pv = _point(name, op_sizes(name), {}, _seed(name, "rank"))
    mod = module(name)
    for k, t in enumerate(op.inputs):
        bad = list(args)
        if t.dims and t.dims[0].leading:  # any leading axes are fine; too few trailing ones are not
            bad[k] = np.asarray(args[k])[(0,) * len(t.dims)]
            want = rf"input {t.name} must have at least {len(t.dims) - 1} dims after its leading axes"
        else:
            bad[k] = np.asarray(args[k])[..., None]
            want = rf"input {t.name} must have {len(t.dims)} dims"
        with pytest.raises(ValueError, match=want):
            mod.forward(*bad, **pv)


@pytest.mark.parametrize("name", OPS)
def test_unknown_param_is_a_type_error(name):
    op, rng, args, pv = _point(name, op_sizes(name), {}, _seed(name, "param"))
    with pytest.raises(TypeError, match="'no_such_param'"):
        module(name).forward(*args, no_such_param=1.0)


def test_mismatched_dims_name_both_inputs():
    with pytest.raises(ValueError, match=r"input bias has C = 4 \(axis 0\) but input x \(axis 1\) gives C = 3"):
        module("bias_add").forward(np.zeros((2, 3)), np.zeros(4))
    with pytest.raises(ValueError, match=r"input W has K = 5"):
        module("matmul").forward(np.zeros((2, 3)), np.zeros((5, 4)))


def test_bad_params_labels_cotangents_and_derived_dims():
    x = np.zeros((2, 3))
    with pytest.raises(TypeError, match="stride"):
        module("conv2d").forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), stride=1.5)
    with pytest.raises(ValueError, match=r"dim Ho .* is 0"):
        module("conv2d").forward(np.zeros((1, 1, 2, 4)), np.zeros((1, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"conv2d: param stride must be an integer >= 1, got 0"):
        module("conv2d").forward(np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 3, 3)), stride=0)
    with pytest.raises(ValueError, match="input y holds integer labels"):
        module("softmax_cross_entropy").forward(x, np.zeros(2))
    _, saved = module("softmax").forward_with_saved(x)
    with pytest.raises(ValueError, match=r"cotangent dp must have shape \(2, 3\)"):
        module("softmax").backward(saved, np.zeros((3, 2)))
    assert module("softmax").forward(np.zeros((0, 3))).shape == (0, 3)  # an empty batch, as torch (issue 11)
    with pytest.raises(ValueError, match=r"max: dim C is 0; it must be at least 1"):
        module("max").forward(np.zeros((2, 0)))  # torch.amax refuses an empty row too
    with pytest.raises(TypeError):
        module("mul").forward(x)  # a missing input is Python's own TypeError


# ------------------------------------------------------------------------------------------------
# numerically extreme inputs


EXTREME = np.array([[1e4, -1e4, 0.0, 3.0], [-np.inf, 1.0, 2.0, -np.inf], [-1e4, -1e4, 1e4, 1e4], [-np.inf, -1e4, 1e4, -np.inf]])


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "softmax_cross_entropy"])
def test_extreme_logits_give_finite_losses_and_gradients(name):
    mod = module(name)
    labels = np.array([0, 2, 3, 1])
    args = (EXTREME, labels) if name == "softmax_cross_entropy" else (EXTREME,)
    out = mod.forward(*args)
    rng = np.random.default_rng(0)
    cot = rng.normal(size=np.shape(out))
    grads = [g for g in mod.vjp(*args, cot) if g is not None]
    targs = [torch.tensor(EXTREME, requires_grad=True)] + ([torch.tensor(labels)] if len(args) == 2 else [])
    want = REFERENCES[name](*targs, **param_values(REGISTRY.get(name)))
    want.backward(torch.tensor(cot))
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-12)  # log_softmax is -inf where x is
    assert np.all(np.isfinite(out) | (np.isneginf(out) & np.isneginf(EXTREME) if name == "log_softmax" else np.isfinite(out)))
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, targs[0].grad.numpy(), rtol=1e-12, atol=1e-300)


def test_log_sum_exp_of_equal_large_logits():
    x = np.array([[1000.0, 1000.0, 1000.0]])
    # exactly 1000 + log(3) = 1001.098612288668110, whose nearest double is ...6682 (torch agrees)
    lse = x - module("log_softmax").forward(x)
    assert lse[0, 0] == pytest.approx(1001.0986122886681, rel=1e-15, abs=0)
    assert lse[0, 0] == torch.logsumexp(torch.tensor(x), 1).item()
    loss, saved = module("softmax_cross_entropy").forward_with_saved(x, np.array([1]))
    assert float(loss) == pytest.approx(math.log(3), rel=1e-12)
    # the fused gradient per unit loss is softmax - onehot, exact at equal logits
    assert saved["dx_fused"][0] == pytest.approx([1 / 3, -2 / 3, 1 / 3], rel=1e-15)


def test_softplus_extremes():
    mod = module("softplus")
    x = np.array([[1000.0, -100.0, -1000.0]])
    out = mod.forward(x)
    assert out[0, 0] == 1000.0
    assert out[0, 1] == 3.720075976020836e-44
    assert out[0, 2] == 0.0
    (g,) = mod.vjp(x, np.ones_like(x))
    assert g[0, 0] == 1.0 and g[0, 2] == 0.0 and np.all(np.isfinite(g))


@pytest.mark.parametrize("name", ["sigmoid", "silu", "swiglu", "sigmoid_bce", "relu", "leaky_relu", "gelu", "tanh"])
def test_saturating_inputs_stay_finite(name):
    op = REGISTRY.get(name)
    x = np.array([[1e3, -1e3, 50.0, -50.0, 0.5]])
    args = [x if t.role is Role.DIFF else np.full_like(x, 0.5) for t in op.inputs]
    out = np.asarray(module(name).forward(*args))
    grads = module(name).vjp(*args, np.ones_like(out))
    assert np.all(np.isfinite(out))
    assert all(np.all(np.isfinite(g)) for g in grads if g is not None)


def test_masked_infinities_are_strong_zeros():
    # relu(-inf) = 0 (not 0*-inf = nan), and its gradient there is 0.
    x = np.array([[-np.inf, 2.0]])
    assert module("relu").forward(x).tolist() == [[0.0, 2.0]]
    assert module("relu").vjp(x, np.ones_like(x))[0].tolist() == [[0.0, 1.0]]
    # ignored rows never reach the loss, whatever their logits
    logits = np.array([[np.inf, np.nan, 0.0], [1.0, 2.0, 3.0]])
    loss = module("softmax_cross_entropy").forward(logits, np.array([-100, 2]))
    assert np.isfinite(loss)


# ------------------------------------------------------------------------------------------------
# the printer and the runtime


def _printer(expr, indices, dims):
    D = {d.name: d for d in dims}
    x = Dim("C", "i")
    env = Env({"x": (D["B"], x), "out": tuple(dims)}, set(), set(), {"B", "C"}, {}, "op test")
    prepared = prepare(expr, indices, dims, {"x", "out", "B", "C"}, env.tensors, "op test")
    return NumPyPrinter(env, prepared, "op test"), prepared


def test_printer_is_strict_about_unknown_nodes():
    b, i = idx("b i")
    B, C = Dim("B", "b"), Dim("C", "i")
    expr = sp.atan(sp.IndexedBase("x", real=True)[b, i])
    printer, prepared = _printer(expr, (b, i), (B, C))
    with pytest.raises(LoweringError, match="atan"):
        printer.doprint(prepared.expr)


def test_triangular_sums_are_refused_at_generation():
    b, i, k = idx("b i k")
    B, C = Dim("B", "b"), Dim("C", "i")
    expr = sp.Sum(sp.IndexedBase("x", real=True)[b, k], (k, 0, i))
    with pytest.raises(LoweringError, match="triangular"):
        _printer(expr, (b, i), (B, C))


def test_runtime_erf_is_accurate():
    xs = np.concatenate([np.linspace(-7, 7, 20001), [0.0, -0.0, 1e-300, 0.46875, 4.0, 26.6, np.inf, -np.inf]])
    got = numpy_math.erf(xs)
    want = np.array([math.erf(v) for v in xs])
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-300)) < 1e-15
    assert np.isnan(numpy_math.erf(np.array([np.nan])))[0]
    assert numpy_math.erf(np.float32([0.5])).dtype == np.float32


def _load(op):
    """Render an (unregistered) op's NumPy module and execute it in memory."""
    import types

    from symgrad.targets import numpy as numpy_target

    source = numpy_target.render(lower(derive(op, trace=False)), f"symgrad generate {op.name} --target numpy")
    mod = types.ModuleType(op.name)
    exec(compile(source, op.name, "exec"), mod.__dict__)
    return mod


def test_several_outputs_and_cotangents():
    from symgrad.declare import Op, Tensor, output

    b, i, k = idx("b i k")
    B, C = Dim("B", "b"), Dim("C", "i")
    x = Tensor("x", (B, C))
    op = Op("exp_and_row_sum", "exp(x) and the row sums of x", (x,),
            (output("e", (b, i), sp.exp(x[b, i]), (B, C)), output("s", b, sp.Sum(x[b, k], (k, 0, C.size - 1)), B)))
    mod = _load(op)
    assert mod.OUTPUTS == ("e", "s")
    xv = np.random.default_rng(0).normal(size=(3, 4))
    e, s = mod.forward(xv)
    np.testing.assert_allclose(e, np.exp(xv))
    np.testing.assert_allclose(s, xv.sum(1))
    de, ds = np.ones((3, 4)), np.arange(3.0)
    (dx,) = mod.vjp(xv, de, ds)
    np.testing.assert_allclose(dx, np.exp(xv) + ds[:, None])
    with pytest.raises(ValueError, match="cotangent ds"):
        mod.vjp(xv, de, np.zeros(4))


def test_names_the_generated_code_needs_are_refused():
    from symgrad.declare import Op, Tensor, output

    b, i = idx("b i")
    B, C = Dim("B", "b"), Dim("C", "i")
    x = Tensor("np", (B, C))
    op = Op("bad_name", "an input called np", (x,), (output("out", (b, i), 2 * x[b, i], (B, C)),))
    with pytest.raises(LoweringError, match="'np'"):
        _load(op)


def test_nested_sums_sharing_a_range_with_a_free_index():
    from symgrad.declare import Op, Tensor, output

    b, i, k, j = idx("b i k j")
    B, C = Dim("B", "b"), Dim("C", "i")
    x = Tensor("x", (B, C))
    inner = sp.Sum(x[b, j] * x[b, k] * (j + 1), (j, 0, C.size - 1))  # reads k, binds j
    op = Op("nested", "x times a double row sum", (x,),
            (output("out", (b, i), x[b, i] * sp.Sum(inner * k, (k, 0, C.size - 1)), (B, C)),))
    xv = np.random.default_rng(1).normal(size=(2, 5))
    c = np.arange(5)
    want = xv * (((xv * (c + 1)).sum(1)) * (xv * c).sum(1))[:, None]
    np.testing.assert_allclose(_load(op).forward(xv), want, rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# one-hots, row masks and in-place evaluation (numpy_printer.lower_row_form_lines)


def _ce_reference(x, y, dloss, eps, ignore_index):
    """dx of softmax + cross-entropy written densely in float64: a label outside [0, C) has an
    all-zero one-hot, an ignored row a zero gradient (whatever its logits)."""
    B, C = x.shape
    w = (y != ignore_index).astype(np.float64)
    ok = w != 0
    p = np.zeros_like(x)
    z = x[ok] - x[ok].max(axis=1, keepdims=True)
    p[ok] = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = (np.arange(C)[None, :] == y[:, None]).astype(np.float64)
    return (dloss * w / w.sum())[:, None] * ((1 - eps) * -onehot + p - eps / C)


def test_softmax_cross_entropy_backward_has_no_dense_onehot():
    import inspect

    mod = module("softmax_cross_entropy")
    # the fused loss: forward writes the gradient per unit loss (one-hots as sparse row updates),
    # backward only scales it
    source = inspect.getsource(mod._forward_with_saved)
    assert "== y[:, None]" not in source and "y[:, None] ==" not in source, source
    assert "_m.add_onehot(" in source and "_m.zero_unless(" in source
    assert "np.where((w[:, None] != 0)" not in source  # no full-size mask pass
    backward = inspect.getsource(mod.backward)
    assert "dx = dloss*dx_fused" in backward and "np.exp" not in backward

    rng = np.random.default_rng(7)
    B, C = 9, 6
    x = rng.normal(size=(B, C)) * 3
    x[2] = np.inf  # an ignored row whose softmax is nan: its gradient must still be exactly 0
    x[5, 1] = -np.inf
    y = np.array([0, 5, -100, 3, 4, 2, 0, 1, 5])  # one ignored row
    with pytest.raises(ValueError, match=r"label y\[4\] = 9 is out of bounds"):  # as torch: never a loss
        mod.vjp(x, np.array([0, 5, -100, 3, 9, 2, -7, 1, 5]), 1.0)
    for eps in (0.0, 0.1, 1.0):
        for dloss in (1.0, -2.5):
            (dx, dy) = mod.vjp(x, y, dloss, eps=eps)
            assert dy is None
            want = _ce_reference(x, y, dloss, eps, -100)
            assert np.all(dx[2] == 0) and np.all(np.isfinite(dx))
            np.testing.assert_allclose(dx, want, rtol=1e-12, atol=1e-15, err_msg=f"eps={eps}, dloss={dloss}")
    # every row ignored: n_valid = 0, and the gradient is 0, not 0/0
    (dx, _) = mod.vjp(x, np.full(B, -100), 1.0, eps=0.1)
    assert np.all(dx == 0)
    # float32 stays float32, and the saved values are never written (dx takes p's buffer, not x's)
    x32 = rng.normal(size=(B, C)).astype(np.float32)
    loss, saved = mod.forward_with_saved(x32, y)
    before = {k: np.copy(v) for k, v in saved.items()}
    (dx32, _) = mod.backward(saved, np.float32(1.0))
    assert dx32.dtype == np.float32
    for k, v in saved.items():
        np.testing.assert_array_equal(v, before[k])
    np.testing.assert_allclose(dx32, _ce_reference(x32.astype(np.float64), y, 1.0, 0.0, -100), rtol=1e-5, atol=1e-6)


def test_onehot_along_the_first_axis_is_written_per_column():
    # out[i] = x[y[i], i]: the gradient dout[i]*KroneckerDelta(b, y[i]) is one entry per column,
    # the one-hot on axis 0 and the scale dout over axis 1; a label outside [0, B) picks nothing.
    from symgrad.declare import Op, Tensor, output

    b, i = idx("b i")
    B, C = Dim("B", "b"), Dim("C", "i")
    x, y = Tensor("x", (B, C)), Tensor("y", (C,), Role.LABEL)
    op = Op("pick_rows", "x at the row each column's label names", (x, y), (output("out", i, x[y[i], i], C),))
    mod = _load(op)
    xv = np.random.default_rng(3).normal(size=(4, 5))
    yv = np.array([0, 3, 7, -1, 2])
    np.testing.assert_allclose(mod.forward(xv, yv), [xv[0, 0], xv[3, 1], 0.0, 0.0, xv[2, 4]])
    dout = np.arange(1.0, 6.0)
    (dx, _) = mod.vjp(xv, yv, dout)
    want = np.zeros_like(xv)
    want[[0, 3, 2], [0, 1, 4]] = dout[[0, 1, 4]]
    np.testing.assert_array_equal(dx, want)


def test_row_mask_is_a_strong_zero_without_a_full_pass():
    # m[b] = [y[b] != 0] multiplies the whole statement: it scales rows, and a masked row is 0 even
    # where the rest is inf or nan.
    from symgrad.declare import Op, Tensor, output
    from symgrad.functions import Iverson

    b, i = idx("b i")
    B, C = Dim("B", "b"), Dim("C", "i")
    x, y = Tensor("x", (B, C)), Tensor("y", (B,), Role.LABEL)
    m = sp.IndexedBase("m", real=True)
    op = Op("masked_square", "x**2 on the rows whose label is not 0", (x, y),
            (output("out", (b, i), m[b] * x[b, i] ** 2, (B, C)),),
            intermediates=(output("m", b, Iverson(sp.Ne(y[b], 0)), B),))
    mod = _load(op)
    xv = np.array([[1.0, -2.0], [np.inf, np.nan], [3.0, 0.5]])
    yv = np.array([1, 0, 4])
    out = mod.forward(xv, yv)
    np.testing.assert_array_equal(out, [[1.0, 4.0], [0.0, 0.0], [9.0, 0.25]])
    (dx, _) = mod.vjp(xv, yv, np.ones_like(xv))
    np.testing.assert_array_equal(dx, [[2.0, -4.0], [0.0, 0.0], [6.0, 1.0]])


def test_runtime_onehot_and_zero_unless():
    out = np.zeros((3, 4))
    numpy_math.add_onehot(out, 1, np.array([1, -100, 4]), np.array([2.0, 3.0, 5.0]))
    np.testing.assert_array_equal(out, [[0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    numpy_math.add_onehot(out, 0, np.array([2, 0, 3, -1]), 1.5)  # labels per column, a scalar value
    np.testing.assert_array_equal(out, [[0, 3.5, 0, 0], [0, 0, 0, 0], [1.5, 0, 0, 0]])
    vec = np.zeros(3)
    numpy_math.add_onehot(vec, 0, 2, 7.0)
    numpy_math.add_onehot(vec, 0, 3, 7.0)
    np.testing.assert_array_equal(vec, [0, 0, 7.0])

    a = np.full((3, 2), np.nan)
    assert numpy_math.zero_unless(a, np.array([[True], [True], [True]])) is a and np.isnan(a).all()
    numpy_math.zero_unless(a, np.array([[True], [False], [True]]))  # rows, by index
    assert np.isnan(a[[0, 2]]).all() and np.all(a[1] == 0)
    numpy_math.zero_unless(a, np.array([[False, True]]))  # a column mask: one masked pass
    assert np.all(a[:, 0] == 0) and np.isnan(a[[0, 2], 1]).all()
    numpy_math.zero_unless(a, False)
    assert np.all(a == 0)
