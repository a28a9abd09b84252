"""Multi-tensor forms of ops (symgrad.plan_multi): what the plan promises, and ``forward_multi`` on
both targets, for the library's ops and for a user's own ops declared here with symgrad.declare
(a map with a clamp and a scalar input, a self-combining reduction, and one refused)."""
from __future__ import annotations


import numpy as np
import pytest
import sympy as sp
import torch

import symgrad.ops  # noqa: F401  (registers the library's ops)
from symgrad import REGISTRY
from symgrad.compose import load_module
from symgrad.declare import Dim, Op, Param, Role, Tensor, idx, output
from symgrad.derive import derive
from symgrad.plan import lower
from tests.rendered import render_module

(n,) = idx("n")
N = Dim("N", "n")
x = Tensor("x", (N,))
scale = Tensor("scale", (), Role.CONST, domain=(0.5, 2.0))
lam = Param("lam", 0.5, domain="[0, inf)", doc="the shrinkage")
# a user's map: soft shrinkage times a scalar input (brackets: sign and max)
SHRINK = Op("multi_user_shrink", "scale*sign(x)*max(|x| - lam, 0)", (x, scale),
            (output("out", n, scale[()] * sp.sign(x[n]) * sp.Max(sp.Abs(x[n]) - lam, 0), N),), params=(lam,))
# a user's reduction that is its own combiner: the 4-norm of the 4-norms is the 4-norm
NORM4 = Op("multi_user_norm4", "(sum x**4)**(1/4)", (x,), (output("norm", (), sp.Sum(x[n] ** 4, (n, 0, N.size - 1)) ** sp.Rational(1, 4), ()),))
# and one that is not: a sum of squares over sums of squares is another number
SUMSQ = Op("multi_user_sumsq", "sum x**2", (x,), (output("total", (), sp.Sum(x[n] ** 2, (n, 0, N.size - 1)), ()),))

_MODULES: dict = {}


def _module(op: Op, target: str, tmp_path_factory):
    key = (op.name, target)
    if key not in _MODULES:
        _MODULES[key] = render_module(op, target, tmp_path_factory.mktemp("multi"), f"{op.name}_{target}")
    return _MODULES[key]


SHAPES = [(7,), (1,), (130,), (3, 5), (0,)]


def _arrays(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * 2).astype(np.float32) for s in shapes]


def _shrink(a, s, lam=0.5):
    return s * np.sign(a) * np.maximum(np.abs(a) - lam, 0)


def test_plan_multi_forms():
    plans = {op.name: lower(derive(op, trace=False)) for op in (SHRINK, NORM4, SUMSQ)}
    assert plans["multi_user_shrink"].multi.kind == "multi"
    assert plans["multi_user_norm4"].multi.kind == "multi_reduce"
    assert plans["multi_user_norm4"].combine.reduce == "sum"
    assert plans["multi_user_sumsq"].multi is None
    why = [s.doc for s in plans["multi_user_sumsq"].trace.steps if s.rule == "no_multi"]
    assert why and "not its own combiner" in why[0]
    lib = {op.name: lower(derive(op, trace=False)) for op in (REGISTRY.get("grad_norm2"), REGISTRY.get("mean"))}
    assert lib["grad_norm2"].multi.kind == "multi_reduce" and lib["mean"].multi is None


def test_refused_reduction_has_no_forward_multi(tmp_path_factory):
    for target in ("numpy", "triton"):
        mod = _module(SUMSQ, target, tmp_path_factory)
        assert not hasattr(mod, "forward_multi") and not hasattr(mod, "MULTI")


def test_user_map_numpy(tmp_path_factory):
    mod = _module(SHRINK, "numpy", tmp_path_factory)
    arrays = _arrays(0)
    arrays[0][2] = np.nan
    outs = mod.forward_multi(arrays, 1.5, lam=0.25)
    for a, o in zip(arrays, outs):
        assert o.shape == a.shape and o.dtype == np.float32
        np.testing.assert_allclose(o, mod.forward(a.reshape(-1), 1.5, lam=0.25).reshape(a.shape), rtol=1e-6)
        np.testing.assert_allclose(o, _shrink(a, 1.5, 0.25), rtol=1e-6)
    assert np.isnan(outs[0][2])  # NaN stays NaN, as forward's brackets give it
    work = [a.astype(np.float64) for a in arrays]  # in place, float64
    assert mod.forward_multi(work, 2.0, out=work)[1] is work[1]
    for a, w in zip(arrays, work):
        np.testing.assert_allclose(w, _shrink(a.astype(np.float64), 2.0), rtol=1e-12)
    with pytest.raises(ValueError, match="lam must be in"):
        mod.forward_multi(arrays, 1.0, lam=-1.0)


def test_user_map_triton(tmp_path_factory):
    mod = _module(SHRINK, "triton", tmp_path_factory)
    arrays = _arrays(1)
    xs = [torch.tensor(a) for a in arrays]
    per = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.5])  # one scale per position, read on the device
    outs = mod.forward_multi(xs, per, lam=0.5)
    for a, o, s in zip(arrays, outs, per.tolist()):
        torch.testing.assert_close(o, torch.tensor(_shrink(a, s)), rtol=1e-6, atol=1e-7)
    mod.forward_multi(xs, torch.tensor(3.0), out=xs)  # one scale, in place
    for a, x_ in zip(arrays, xs):
        torch.testing.assert_close(x_, torch.tensor(_shrink(a, 3.0)), rtol=1e-6, atol=1e-7)


def test_user_reduction_both_targets(tmp_path_factory):
    arrays = _arrays(2, [(7,), (130,), (1,), (3, 5)])
    want = np.sum(np.concatenate([a.ravel().astype(np.float64) for a in arrays]) ** 4) ** 0.25
    got = _module(NORM4, "numpy", tmp_path_factory).forward_multi(arrays)
    assert got.shape == () and got.dtype == np.float32
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    got = _module(NORM4, "triton", tmp_path_factory).forward_multi([torch.tensor(a) for a in arrays])
    assert got.shape == () and got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), want, rtol=1e-6)


def _multi_ops():
    """The library ops whose generated modules have a multi form (``generate --check`` keeps them
    the plan's; importing them is cheaper than lowering every op at collection)."""
    return [op.name for op in REGISTRY.of_kind("op") if hasattr(load_module(op.name, "numpy"), "MULTI")]


@pytest.mark.parametrize("name", _multi_ops())
def test_library_forward_multi_equals_forward(name):
    """Every library op with a multi form (NumPy): each position as ``forward`` of that array (a
    map), or ``forward`` of all the arrays' entries together (a reduction)."""
    op = REGISTRY.get(name)
    mod = load_module(name, "numpy")
    rng = np.random.default_rng(3)
    tensors = [t for t in op.inputs if t.dims]
    shapes = [(2, 5), (1, 1), (1, 41)] if len(tensors[0].dims) == 2 else [(10,), (1,), (41,)]
    lists = {t.name: [rng.uniform(*t.domain, size=s) for s in shapes] for t in tensors}
    scalars = {t.name: float(rng.uniform(*t.domain)) for t in op.inputs if not t.dims}
    args = [lists[t.name] if t.dims else scalars[t.name] for t in op.inputs]
    got = mod.forward_multi(*args)
    if mod.MULTI == "reduce":
        flat = np.concatenate([a.ravel() for a in lists[tensors[0].name]])
        want = mod.forward(flat.reshape((1, -1) if len(tensors[0].dims) == 2 else (-1,)))
        np.testing.assert_allclose(np.ravel(got), np.ravel(want), rtol=1e-12)
        return
    got = got if len(op.outputs) > 1 else (got,)
    for k in range(len(shapes)):
        want = mod.forward(*[lists[t.name][k] if t.dims else scalars[t.name] for t in op.inputs])
        want = want if len(op.outputs) > 1 else (want,)
        for g_, w in zip(got, want):
            np.testing.assert_allclose(g_[k], w, rtol=1e-12, atol=1e-300)


def test_bytes_per_entry_from_the_plan():
    """Clipping in fp32 moves 12 bytes per gradient entry: stage one reads 4, the scale reads 4 and
    writes 4 (the least: the scale needs the global norm first); AdamW reads 16 and writes 12."""
    from symgrad.traffic import multi_bytes

    def per(name):
        plan = lower(derive(REGISTRY.get(name), trace=False))
        return multi_bytes(plan, {t.name: 4 for t in plan.op.inputs})

    assert per("grad_norm2") == {"read": 4, "written": 0, "minimum_read": 4, "minimum_written": 0}
    assert per("clip_by_norm") == {"read": 4, "written": 4, "minimum_read": 4, "minimum_written": 4}
    assert per("adamw") == {"read": 16, "written": 12, "minimum_read": 16, "minimum_written": 12}
