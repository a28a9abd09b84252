"""A user's own ops, end to end: the example project's declarations (examples/user_project:
huber with Abs, hardswish with Min/Max, geglu, multi-head attention with a causal mask) derived,
lowered once, printed for NumPy and Triton, and checked against torch forward and backward, in
float32 at large magnitudes (attention scores around +-60) and in bf16."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from symgrad import declare
from symgrad.derive import derive
from tests.rendered import render_module

PROJECT = Path(__file__).resolve().parents[1] / "examples" / "user_project"


def _user_registry() -> declare.Registry:
    """The example project's ops, registered into a registry of their own: the library's
    registry, ``sys.modules`` and ``sys.path`` are left as they were for the other tests."""
    saved, declare.REGISTRY = declare.REGISTRY, declare.Registry()
    modules = set(sys.modules)
    sys.path.insert(0, str(PROJECT))
    try:
        importlib.import_module("userops")
        return declare.REGISTRY
    finally:
        declare.REGISTRY = saved
        sys.path.remove(str(PROJECT))
        for name in set(sys.modules) - modules:
            if name == "userops" or name.startswith("userops."):
                del sys.modules[name]


REGISTRY = _user_registry()

_MODULES: dict = {}


def module(name: str, target: str, tmp_path_factory):
    """The generated module of a user op (rendered once per session: Triton modules register
    torch custom ops by name)."""
    key = (name, target)
    if key not in _MODULES:
        folder = tmp_path_factory.mktemp("userops")
        _MODULES[key] = render_module(REGISTRY.get(name), target, folder, f"user_{target}_{name}")
    return _MODULES[key]


def grads_of(fn, inputs, cot):
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, cot.double())


def close(got, want, rtol, atol, what):
    got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got).double()
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= atol * scale + rtol * scale, f"{what}: max error {err:.3g} (values up to {scale:.3g})"


# op -> (torch forward, inputs maker(dtype), params)
def _huber(dtype):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(7, 41, generator=g) * 3, torch.randn(7, 41, generator=g) * 3
    pred[0, :4] = target[0, :4] + torch.tensor([1.0, -1.0, 0.0, 1.5])  # at the kink and beyond
    return (pred.to(dtype), target.to(dtype))


def _hardswish(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 41, generator=g) * 4
    x[0, :6] = torch.tensor([-3.0, 3.0, 0.0, -5.0, 5.0, 2.9])
    return (x.to(dtype),)


def _geglu(dtype):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(6, 41, generator=g).to(dtype) * 3, torch.randn(6, 41, generator=g).to(dtype))


def _attention(dtype, big=True):
    g = torch.Generator().manual_seed(3)
    B, H, T, E = 2, 3, 9, 8
    sigma = math.sqrt(60 / math.sqrt(E)) if big else 1.0  # q.k/sqrt(E) has a spread of about +-60
    return tuple((torch.randn(B, H, T, E, generator=g) * s).to(dtype) for s in (sigma, sigma, 1.0))


CASES = {
    "huber": (lambda p, t, delta=1.0: F.huber_loss(p, t, reduction="mean", delta=delta), _huber, {"delta": 1.0}),
    "hardswish": (F.hardswish, _hardswish, {}),
    "geglu": (lambda a, g: F.gelu(a) * g, _geglu, {}),
    "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), _attention, {"causal": 0}),
    "attention_causal": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), _attention, {"causal": 1}),
}


def op_name(case):
    return "attention" if case.startswith("attention") else case


def differentiable(case):
    return [t.name for t in REGISTRY.get(op_name(case)).inputs if t.role.name == "DIFF"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("target", ["numpy", "triton"])
def test_user_op_float32_against_torch(case, target, tmp_path_factory):
    fn, make, params = CASES[case]
    inputs = make(torch.float32)
    out64, grads64 = grads_of(lambda *a: fn(*a), inputs, cot := torch.randn(fn(*inputs).shape, generator=torch.Generator().manual_seed(9)))
    mod = module(op_name(case), target, tmp_path_factory)
    if target == "numpy":
        args = [t.numpy() for t in inputs]
        out = mod.forward(*args, **params)
        grads = mod.vjp(*args, cot.float().numpy(), **params)
    else:
        out = mod.forward(*inputs, **params)
        grads = mod.vjp(*inputs, cot.float(), **params)
    close(out, out64, 1e-5, 1e-6, f"{case} {target} forward")
    names = [t.name for t in REGISTRY.get(op_name(case)).inputs]
    for name, g, w in zip(names, grads, grads64):
        if name in differentiable(case):
            close(g, w, 2e-5, 2e-6, f"{case} {target} d{name}")


@pytest.mark.parametrize("case", CASES)
def test_user_op_bf16_triton_against_torch(case, tmp_path_factory):
    fn, make, params = CASES[case]
    inputs = make(torch.bfloat16) if not case.startswith("attention") else _attention(torch.bfloat16, big=False)
    cot = torch.randn(fn(*inputs).shape, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    out64, grads64 = grads_of(lambda *a: fn(*a), inputs, cot)
    mod = module(op_name(case), "triton", tmp_path_factory)
    out = mod.forward(*inputs, **params)
    assert out.dtype == torch.bfloat16
    close(out, out64, 2e-2, 2e-2, f"{case} bf16 forward")
    names = [t.name for t in REGISTRY.get(op_name(case)).inputs]
    for name, g, w in zip(names, mod.vjp(*inputs, cot, **params), grads64):
        if name in differentiable(case):
            close(g, w, 3e-2, 3e-2, f"{case} bf16 d{name}")


def test_attention_gradients_read_p_not_raw_scores():
    d = derive(REGISTRY.get("attention"), trace=False)
    for name in ("Q", "K", "V"):
        expr = d.gradients[name].expr
        assert "p" in {str(a.base) for a in expr.atoms(__import__("sympy").Indexed)}, name
        assert not any(str(a.base) == "score" for f in expr.atoms(__import__("sympy").exp) for a in f.atoms(__import__("sympy").Indexed)), name


def test_user_op_whose_gradient_is_identically_zero(tmp_path):
    """A step (Heaviside) has the gradient 0 everywhere it has one: the backward kernel stores a
    number and reads nothing (a Python float, which has no ``.to``, until the store wrapped it)."""
    from symgrad.declare import Dim, Op, Tensor, idx, output

    n, = idx("n")
    N = Dim("N", "n")
    x = Tensor("x", (N,))
    op = Op(name="user_step", doc="[x > 0] as a number", inputs=(x,),
            outputs=(output("out", (n,), sp.Heaviside(x[n], 0), (N,)),))
    xs = torch.tensor([1.5, -2.0, 0.0, 3.0, -0.5])
    cot = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    for target in ("numpy", "triton"):
        mod = render_module(op, target, tmp_path, f"user_step_{target}")
        args = (xs.numpy(),) if target == "numpy" else (xs,)
        out = mod.forward(*args)
        (dx,) = mod.vjp(*args, cot.numpy() if target == "numpy" else cot)
        np.testing.assert_array_equal(np.asarray(out), (xs > 0).float().numpy())
        np.testing.assert_array_equal(np.asarray(dx), np.zeros(5, np.float32))
