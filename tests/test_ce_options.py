"""The cross-entropy family's options against torch, on both targets: class weights, label smoothing,
ignore_index, z-loss, softcapping and reduction (mean | sum | none); bad labels, all-ignored
batches, empty batches, one class with smoothing, positional params.

The reference is ``tests/torch_reference.cross_entropy`` (F.cross_entropy, with torch's own
weighted mean; z-loss and softcapping written out, as torch has neither). NumPy runs in float64
(tight tolerances), Triton in float32 and bfloat16 through the interpreter at small shapes.
"""
from __future__ import annotations

import importlib
import itertools
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if os.environ.get("TRITON_INTERPRET", "1") not in ("", "0"):
    os.environ.setdefault("SYMGRAD_TRITON_MAX_BLOCK", "16")  # rows of 19 columns span 2 blocks
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.torch_reference import cross_entropy  # noqa: E402

VARIANTS = [(w, c, r) for w in (False, True) for c in (False, True) for r in ("mean", "sum", "none")]


def op_name(weighted, capped, reduction):
    return "softmax_cross_entropy" + "_weighted" * weighted + "_softcap" * capped + ("" if reduction == "mean" else f"_{reduction}")


def mod(target, name):
    return importlib.import_module(f"generated.{target}.{name}")


def case(B, C, seed, ignore_index=-100, n_ignored=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, generator=g, dtype=torch.float64) * scale
    y = torch.randint(0, C, (B,), generator=g)
    y[:n_ignored] = ignore_index
    w = torch.rand(C, generator=g, dtype=torch.float64) * 1.5 + 0.25
    return x, y, w


def torch_loss_and_grad(variant, x, y, w, params, dloss):
    weighted, capped, reduction = variant
    xt = x.clone().requires_grad_(True)
    kw = dict(params)
    if not capped:
        kw.pop("softcap", None)
    loss = cross_entropy(reduction)(xt, y, w if weighted else None, **kw)
    (dx,) = torch.autograd.grad(loss, xt, dloss)
    return loss.detach(), dx


# eps x z_loss x softcap: every variant, with ignored rows in every case
OPTIONS = [
    {"eps": eps, "ignore_index": ign, "z_loss": z, "softcap": cap}
    for eps, ign, z, cap in itertools.product((0.0, 0.1), (-100, 2), (0.0, 0.01), (2.0, 30.0))
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: op_name(*v))
def test_numpy_matches_torch_over_options(variant):
    weighted, capped, reduction = variant
    m = mod("numpy", op_name(*variant))
    n = 0
    for k, params in enumerate(OPTIONS):
        if not capped and params["softcap"] != 2.0:
            continue  # softcap is no param of this variant: the other half repeats these cases
        x, y, w = case(7, 19, seed=k, ignore_index=params["ignore_index"])
        dloss = torch.randn(7, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
        want_loss, want_dx = torch_loss_and_grad(variant, x, y, w, params, dloss)
        p = {k2: v for k2, v in params.items() if capped or k2 != "softcap"}
        ins = (x.numpy(), y.numpy()) + ((w.numpy(),) if weighted else ())
        loss = m.forward(*ins, **p)
        dx = m.vjp(*ins, dloss.numpy(), **p)[0]
        np.testing.assert_allclose(loss, want_loss.numpy(), rtol=1e-12, atol=1e-12, err_msg=f"{params}")
        np.testing.assert_allclose(dx, want_dx.numpy(), rtol=1e-10, atol=1e-12, err_msg=f"{params}")
        n += 1
    assert n == (16 if capped else 8)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: op_name(*v))
def test_triton_matches_torch(variant):
    weighted, capped, reduction = variant
    m = mod("triton", op_name(*variant))
    for k, params in enumerate([{"eps": 0.1, "ignore_index": -100, "z_loss": 0.01, "softcap": 2.0},
                                {"eps": 0.0, "ignore_index": 1, "z_loss": 0.0, "softcap": 5.0}]):
        x, y, w = case(5, 19, seed=10 + k, ignore_index=params["ignore_index"])
        dloss = torch.randn(5, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
        want_loss, want_dx = torch_loss_and_grad(variant, x, y, w, params, dloss)
        p = {k2: v for k2, v in params.items() if capped or k2 != "softcap"}
        for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 3e-2)):
            xt = x.to(dtype).requires_grad_(True)
            ins = (xt, y) + ((w.to(dtype),) if weighted else ())
            loss = m.apply(*ins, **p)
            (dx,) = torch.autograd.grad(loss, xt, dloss.to(dtype))
            assert loss.dtype == dtype and dx.dtype == dtype
            torch.testing.assert_close(loss.double(), want_loss, rtol=tol, atol=tol)
            torch.testing.assert_close(dx.double(), want_dx, rtol=tol, atol=tol)


@pytest.mark.parametrize("target", ["numpy", "triton"])
@pytest.mark.parametrize("name", ["softmax_cross_entropy", "softmax_cross_entropy_weighted_none"])
def test_label_out_of_bounds_is_an_error_naming_it(target, name):
    x, y, w = case(4, 8, seed=3)
    y = torch.tensor([1, 9, 2, -100])  # 9: out of [0, 8); -100: ignored, allowed
    ins = (x.float(), y) + ((w.float(),) if "weighted" in name else ())
    m = mod(target, name)
    if target == "numpy":
        ins = tuple(t.numpy() for t in ins)
    with pytest.raises(ValueError, match=r"label y\[1\] = 9 is out of bounds: labels must lie in \[0, 8\)"):
        m.forward(*ins)
    neg = np.array([-1, 0, 0, 0]) if target == "numpy" else torch.tensor([-1, 0, 0, 0])
    with pytest.raises(ValueError, match=r"label y\[0\] = -1 is out of bounds"):  # negative, not the ignored one
        m.forward(ins[0], neg, *ins[2:])
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):  # torch refuses it too
        torch.nn.functional.cross_entropy(x.float(), y)


@pytest.mark.parametrize("target", ["numpy", "triton"])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v[1]], ids=lambda v: op_name(*v))
def test_all_rows_ignored(target, variant):
    """torch: NaN for mean (0/0), 0 for sum, zeros for none; the gradient is all zeros."""
    weighted, _, reduction = variant
    x, y, w = case(4, 6, seed=5, n_ignored=4)
    dloss = torch.ones(4) if reduction == "none" else torch.tensor(1.0)
    want_loss, want_dx = torch_loss_and_grad(variant, x, y, w, {"eps": 0.1}, dloss.double())
    m = mod(target, op_name(*variant))
    ins = (x.float(), y) + ((w.float(),) if weighted else ())
    if target == "numpy":
        ins = tuple(t.numpy() for t in ins)
        loss, dx = m.forward(*ins, eps=0.1), m.vjp(*ins, dloss.numpy(), eps=0.1)[0]
    else:
        loss, dx = m.forward(*ins, eps=0.1), m.vjp(*ins, dloss, eps=0.1)[0]
    loss, dx = np.asarray(loss, np.float64), np.asarray(dx, np.float64)
    np.testing.assert_array_equal(loss, want_loss.numpy())  # NaN where torch gives NaN
    assert (dx == 0).all() and (want_dx == 0).all()


@pytest.mark.parametrize("target", ["numpy", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(target, reduction):
    want = cross_entropy(reduction)(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64))
    m = mod(target, op_name(False, False, reduction))
    x, y = torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64)
    got = m.forward(x.numpy(), y.numpy()) if target == "numpy" else m.forward(x, y)
    got = np.asarray(got, np.float64)
    assert got.shape == tuple(want.shape)
    np.testing.assert_array_equal(got, want.double().numpy())


@pytest.mark.parametrize("target", ["numpy", "triton"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_no_classes(target, weighted, reduction):
    """C = 0, as torch: no rows (mean NaN, sum 0, none empty), rows all ignored (the same, with
    none's rows 0), and a label that names no class refused as out of bounds (torch: "Target 0 is
    out of bounds"). The row kernels meet rows of no columns: their max is -inf, their sum 0."""
    m = mod(target, op_name(weighted, False, reduction))
    for labels in ([], [-100, -100]):
        x, y = torch.zeros(len(labels), 0), torch.tensor(labels, dtype=torch.int64)
        ins = (x, y) + ((torch.zeros(0),) if weighted else ())
        xr = x.clone().requires_grad_()
        want = cross_entropy(reduction)(xr, y, *ins[2:])
        (want_dx,) = torch.autograd.grad(want.sum(), [xr])
        if target == "numpy":
            got, dx = m.forward(*[t.numpy() for t in ins]), m.vjp(*[t.numpy() for t in ins], np.ones(tuple(want.shape), np.float32))[0]
        else:
            got, dx = m.forward(*ins), m.vjp(*ins, torch.ones(tuple(want.shape)))[0]
        np.testing.assert_array_equal(np.asarray(got, np.float64), want.detach().double().numpy())
        assert tuple(dx.shape) == tuple(want_dx.shape) == (len(labels), 0)
    ins = (torch.zeros(2, 0), torch.tensor([-100, 0])) + ((torch.zeros(0),) if weighted else ())
    with pytest.raises(IndexError, match="Target 0 is out of bounds"):
        cross_entropy(reduction)(*ins)
    with pytest.raises(ValueError, match=r"label y\[1\] = 0 is out of bounds: labels must lie in \[0, 0\)"):
        m.forward(*[t.numpy() for t in ins]) if target == "numpy" else m.forward(*ins)


@pytest.mark.parametrize("target", ["numpy", "triton"])
@pytest.mark.parametrize("eps", [0.1, 0.3, 0.7])
def test_one_class_with_smoothing_has_an_exactly_zero_gradient(target, eps):
    """p = 1 and t = 1 for a single class: the fused gradient p - t is 0, not a rounding error."""
    x = torch.randn(5, 1) * 3
    y = torch.zeros(5, dtype=torch.int64)
    m = mod(target, "softmax_cross_entropy")
    if target == "numpy":
        dx = m.vjp(x.numpy(), y.numpy(), 1.0, eps=eps)[0]
    else:
        dx = m.vjp(x, y, torch.tensor(1.0), eps=eps)[0].numpy()
    assert (dx == 0).all(), dx


@pytest.mark.parametrize("target", ["numpy", "triton"])
def test_params_positionally_in_declaration_order(target):
    x, y, w = case(6, 7, seed=8)
    m = mod(target, "softmax_cross_entropy_weighted_softcap")
    ins = (x.float(), y, w.float())
    if target == "numpy":
        ins = tuple(t.numpy() for t in ins)
    assert list(m.PARAMS) == ["eps", "ignore_index", "z_loss", "softcap"]
    by_name = m.forward(*ins, eps=0.1, ignore_index=-100, z_loss=0.01, softcap=3.0)
    by_position = m.forward(*ins, 0.1, -100, 0.01, 3.0)
    assert float(by_name) == float(by_position)
    want = cross_entropy("mean")(x, y, w, eps=0.1, z_loss=0.01, softcap=3.0)
    assert abs(float(by_name) - float(want)) < 1e-5
    if target == "numpy":
        with pytest.raises(TypeError, match="given positionally and by name"):
            m.forward(*ins, 0.1, eps=0.2)
