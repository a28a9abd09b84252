"""The generated Triton update rules (one multi-tensor launch per group) against torch.optim.

Under TRITON_INTERPRET=1 (tests/conftest.py), on small tensors of odd sizes, 100 steps in float32,
to 1e-6 relative to each tensor's largest entry. The kernel computes every scalar (the bias
corrections ``1 - beta**t``, ``lr/(1 - beta1**t)``) once per program in float64 from a float64
param table, as torch computes its step sizes on the host; in fp32, ``1 - 0.999**t`` alone would
be off by ~6e-5.
"""
from __future__ import annotations

import pytest
import torch

import symgrad.optim as so
from symgrad.optim.rules import generated_module

from test_optim import assert_tracks

SHAPES = [(3, 5), (41,), (1,), (130,)]
STEPS = 100
CONFIGS = [
    ("SGD", {"lr": 0.05, "weight_decay": 0.1}, 1e-6),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "dampening": 0.5}, 1e-6),
    ("SGD", {"lr": 0.05, "momentum": 0.8, "nesterov": True}, 1e-6),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}, 1e-6),
    ("AdamW", {"lr": 0.01}, 1e-6),
    ("AdamW", {"lr": 0.01, "amsgrad": True}, 1e-6),
    ("RMSprop", {"lr": 0.01, "centered": True, "momentum": 0.5}, 1e-6),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}, 1e-6),
]


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


@pytest.mark.parametrize("name, opts, tol", CONFIGS, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for n, o, _ in CONFIGS])
def test_triton_optimizer_matches_torch(name, opts, tol):
    params, grads = _grads(5)
    ps = [p.clone().requires_grad_(True) for p in params]
    qs = [p.clone().requires_grad_(True) for p in params]
    ref = getattr(torch.optim, name)(ps, foreach=False, **opts)
    opt = getattr(so, name)(qs, backend="triton", **opts)
    for gs in grads:
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        opt.step()
    assert_tracks([q.detach() for q in qs], [p.detach() for p in ps], tol, f"triton {name}({opts})")
    for p, q in zip(ps, qs):
        for key, v in ref.state[p].items():
            assert_tracks([opt.state[q][key].cpu()], [v], tol, f"triton {name}: state {key}")


def test_one_launch_updates_every_tensor_in_place():
    """One call: every tensor of the list is updated where it lies (same storage); the gradient is
    not written; lr and t may be tensors (a schedule's values), one t per tensor too."""
    mod = generated_module("adamw", "triton")
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(n, generator=g) for n in (1, 65, 200)]
    gs = [torch.randn(n, generator=g) for n in (1, 65, 200)]
    ms = [torch.zeros(n) for n in (1, 65, 200)]
    vs = [torch.zeros(n) for n in (1, 65, 200)]
    ptrs = [p.data_ptr() for p in ps]
    before = [x.clone() for x in gs]
    want = [p.clone().requires_grad_(True) for p in ps]
    ref = torch.optim.AdamW(want, lr=0.01, foreach=False)
    for w, x in zip(want, gs):
        w.grad = x.clone()
    ref.step()
    mod.update(ps, gs, ms, vs, torch.tensor([0.01]), torch.tensor([1.0, 1.0, 1.0]))
    assert [p.data_ptr() for p in ps] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(gs, before))
    assert_tracks(ps, [w.detach() for w in want], 1e-6, "one launch")
    assert_tracks(ms, [ref.state[w]["exp_avg"] for w in want], 1e-6, "exp_avg")


def test_bf16_master_weights_in_the_kernel():
    """bf16 parameters, fp32 masters updated in the same pass: the master tracks the fp32 run
    within 2e-2 relative after 100 steps (the gradients are bf16-rounded), the parameter is the
    master's bf16 rounding."""
    params, grads = _grads(6)
    fp32 = [p.clone().requires_grad_(True) for p in params]
    low = [p.to(torch.bfloat16).requires_grad_(True) for p in params]
    a = so.AdamW(fp32, lr=1e-3, backend="triton")
    b = so.AdamW(low, lr=1e-3, backend="triton", master_weights=True)
    for gs in grads:
        for p, q, x in zip(fp32, low, gs):
            p.grad, q.grad = x.clone(), x.to(torch.bfloat16)
        a.step()
        b.step()
    masters = [b.state[q]["master_param"] for q in low]
    assert all(m.dtype == torch.float32 for m in masters)
    assert_tracks(masters, [p.detach() for p in fp32], 2e-2, "bf16 + master vs fp32")
    for q, m in zip(low, masters):
        # the kernel asks for round-to-nearest-even (exact on a GPU); Triton's interpreter truncates
        # instead, so on CPU the parameter is within one bf16 ulp (2**-7 relative) of its master
        ulp = 2.0 ** -7 * m.abs()
        assert torch.all((q.detach().float() - m).abs() <= ulp), "the parameter is not its master's bf16 rounding"


def test_triton_errors_name_the_tensor():
    mod = generated_module("sgd", "triton")
    with pytest.raises(ValueError, match="g has 1 tensors but p has 2"):
        mod.update([torch.zeros(2), torch.zeros(3)], [torch.zeros(2)], 0.1)
    with pytest.raises(ValueError, match=r"g\[0\] has 3 entries but p\[0\] has 2"):
        mod.update([torch.zeros(2)], [torch.zeros(3)], 0.1)
    with pytest.raises(ValueError, match="must be contiguous"):
        mod.update([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        mod.update([torch.zeros(2)], [torch.zeros(2)], 0.1, weight_decay=-1.0)
