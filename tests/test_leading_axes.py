"""Leading axes: ops whose first dim is declared ``leading`` take torch's ``[*, D]`` shapes on
both targets (folded into that dim, unfolded on the way out), forward and backward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import importlib

import symgrad.ops  # noqa: F401  (registers the library)
from symgrad.declare import REGISTRY

# op -> (torch forward over its inputs, input makers given the leading shape)
D = 6
CASES = {
    "layer_norm": (lambda x, w, b: F.layer_norm(x, (D,), w, b, 1e-5),
                   lambda lead: (torch.randn(*lead, D), torch.rand(D) + 0.5, torch.randn(D))),
    "rms_norm": (lambda x, w: F.rms_norm(x, (D,), w, 1e-6),
                 lambda lead: (torch.randn(*lead, D), torch.rand(D) + 0.5)),
    "softmax": (lambda x: torch.softmax(x, -1), lambda lead: (torch.randn(*lead, D),)),
    "log_softmax": (lambda x: torch.log_softmax(x, -1), lambda lead: (torch.randn(*lead, D),)),
    "gelu": (F.gelu, lambda lead: (torch.randn(*lead, D),)),
    "silu": (F.silu, lambda lead: (torch.randn(*lead, D),)),
    "linear": (lambda x, w, b: x @ w.T + b, lambda lead: (torch.randn(*lead, 5), torch.randn(D, 5), torch.randn(D))),
    "sum": (lambda x: x.sum(-1), lambda lead: (torch.randn(*lead, D),)),
}
LEADS = [(), (3,), (2, 3), (2, 1, 3)]


def test_the_library_declares_leading_rows_where_torch_takes_them():
    for name in CASES:
        first = REGISTRY.get(name).inputs[0].dims[0]
        assert first.leading, name
    assert not REGISTRY.get("softmax_cross_entropy").inputs[0].dims[0].leading  # torch's CE takes [N, C]


def _reference(name, inputs, cot):
    fn, _ = CASES[name]
    leaves = [t.double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, cot.double())
    return out.detach(), grads


@pytest.mark.parametrize("lead", LEADS, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_numpy_takes_leading_axes(name, lead):
    torch.manual_seed(0)
    inputs = CASES[name][1](lead)
    cot = torch.randn(CASES[name][0](*inputs).shape)
    want, want_grads = _reference(name, inputs, cot)
    mod = importlib.import_module(f"generated.numpy.{name}")
    arrays = [t.double().numpy() for t in inputs]
    got = mod.forward(*arrays)
    assert got.shape == tuple(want.shape)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-9, atol=1e-10)
    for g, w in zip(mod.vjp(*arrays, cot.double().numpy()), want_grads):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("lead", [(), (2, 3)], ids=str)
@pytest.mark.parametrize("name", CASES)
def test_triton_takes_leading_axes(name, lead):
    torch.manual_seed(1)
    inputs = CASES[name][1](lead)
    out_shape = CASES[name][0](*inputs).shape
    cot = torch.randn(out_shape)
    want, want_grads = _reference(name, inputs, cot)
    mod = importlib.import_module(f"generated.triton.{name}")
    leaves = [t.clone().requires_grad_() for t in inputs]
    got = mod.apply(*leaves)
    assert got.shape == out_shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got, leaves, cot)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)
    # the functional contract too: vjp returns gradients in the inputs' shapes
    for g, w in zip(mod.vjp(*inputs, cot), want_grads):
        assert g.shape == w.shape


def test_mismatched_leading_axes_are_a_clear_error():
    mul_np = importlib.import_module("generated.numpy.mul")
    with pytest.raises(ValueError, match="input q has leading axes \\(6,\\) but input p has \\(2, 3\\)"):
        mul_np.forward(np.ones((2, 3, 4)), np.ones((6, 4)))
    ln_tr = importlib.import_module("generated.triton.layer_norm")
    with pytest.raises(ValueError, match=r"cotangent dy must have shape \(2, 3, 6\) \(its output's\), got \(6, 6\)"):
        ln_tr.vjp(torch.ones(2, 3, D), torch.ones(D), torch.zeros(D), torch.ones(6, D))
