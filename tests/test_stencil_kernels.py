"""Stencil (convolution) launches of the Triton target: what they specialize on and split-K.

The window sizes and integer index params of a stencil are constexpr, index math is int32 unless a
tensor passes 2^30 elements, and a plain-sum launch whose tiles leave SMs idle splits its K range
across programs. All of it is read from index structure, so a user's own stencil op (a 1-D
convolution declared here in a fresh registry) gets it as conv2d does; values against torch.
"""
from __future__ import annotations

import importlib.util
import itertools
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
import sympy as sp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import symgrad.ops  # noqa: E402,F401
from symgrad import declare  # noqa: E402
from symgrad.declare import Dim, Op, Param, Tensor, idx, output  # noqa: E402
from symgrad.derive import derive  # noqa: E402
from symgrad.plan import lower  # noqa: E402
from symgrad.runtime import triton_support as rt  # noqa: E402
from symgrad.targets import numpy as numpy_target  # noqa: E402
from symgrad.targets import triton as triton_target  # noqa: E402


def _conv1d_module(tmp_path, target="triton"):
    stride = Param("stride", 1, integer=True, domain="[1, inf)")
    pad = Param("pad", 0, integer=True, domain="[0, inf)")
    Nb, Ci, Co = Dim("N", "n"), Dim("Cin", "c"), Dim("Cout", "o", min_size=1)
    L, K = Dim("L", "t"), Dim("K", "k", min_size=1)
    Lo = Dim("Lo", "t", sp.floor((L.symbol + 2 * pad - K.symbol) / stride) + 1)
    n, o, t, c, k = idx("n o t c k")
    X, Wt = Tensor("X", (Nb, Ci, L)), Tensor("Wt", (Co, Ci, K))
    body = X[n, c, t * stride + k - pad] * Wt[o, c, k]
    saved, declare.REGISTRY = declare.REGISTRY, declare.Registry()
    try:
        op = declare.register(Op(
            "user_conv1d", "1-D cross-correlation with stride and zero padding", (X, Wt),
            (output("Y", (n, o, t), sp.Sum(body, (c, 0, Ci.size - 1), (k, 0, K.size - 1)), (Nb, Co, Lo)),),
            params=(stride, pad),
        ))
    finally:
        declare.REGISTRY = saved
    plan = lower(derive(op, trace=False))
    src = triton_target.render(plan) if target == "triton" else numpy_target.render(plan, "symgrad generate user_conv1d")
    path = tmp_path / f"user_{target}_conv1d.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return src, mod


def test_user_stencil_specializes_window_and_index_params(tmp_path):
    src, _ = _conv1d_module(tmp_path)
    for name in ("n_K", "p_stride", "p_pad", "IDX64", "SPLIT"):
        assert src.count(f"{name}: tl.constexpr") == 3, name  # forward, dX and dW kernels
    # sizes that vary per batch or image stay runtime arguments (no recompile per shape)
    assert "n_L: tl.constexpr" not in src and "n_N: tl.constexpr" not in src
    assert ".to(tl.int64) * BLOCK_M" not in src


@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 2)])
def test_user_stencil_split_k_against_torch(tmp_path, stride, pad):
    _, mod = _conv1d_module(tmp_path)
    g = torch.Generator().manual_seed(3)
    X, Wt = torch.randn(3, 2, 40, generator=g), torch.randn(3, 2, 3, generator=g)
    # the filter gradient sums over N * Lo entries for a 3 x 6 output: split under the interpreter
    lo = (40 + 2 * pad - 3) // stride + 1
    assert rt.split_k(3, 2 * 3, 3 * lo, torch.device("cpu"))[0] > 1
    Xr, Wr = X.double().requires_grad_(), Wt.double().requires_grad_()
    Yr = F.conv1d(Xr, Wr, stride=stride, padding=pad)
    dY = torch.randn(Yr.shape, generator=g)
    Yr.backward(dY.double())
    Y, saved = mod.forward_with_saved(X, Wt, stride=stride, pad=pad)
    dX, dW = mod.backward(saved, dY)
    torch.testing.assert_close(Y.double(), Yr.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dX.double(), Xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dW.double(), Wr.grad, rtol=1e-4, atol=1e-4)


def test_conv2d_filter_gradient_split_k_against_torch():
    conv = importlib.import_module("generated.triton.conv2d")
    g = torch.Generator().manual_seed(5)
    X, Wt = torch.randn(2, 3, 9, 10, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    assert rt.split_k(4, 3 * 9, 2 * 5 * 5, torch.device("cpu"))[0] > 1  # stride 2, pad 1: Ho = 5, Wo = 5
    Xr, Wr = X.double().requires_grad_(), Wt.double().requires_grad_()
    Yr = F.conv2d(Xr, Wr, stride=2, padding=1)
    dY = torch.randn(Yr.shape, generator=g)
    Yr.backward(dY.double())
    _, saved = conv.forward_with_saved(X, Wt, stride=2, pad=1)
    dX, dW = conv.backward(saved, dY)
    torch.testing.assert_close(dW.double(), Wr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dX.double(), Xr.grad, rtol=1e-4, atol=1e-4)


def test_split_k_fills_the_sms_and_sums_every_k():
    with rt.planning_for(132):
        splits, per = rt.split_k(128, 576, 100352, torch.device("meta"))  # conv2d dW at the benchmark shape
        assert splits * per >= 100352 > (splits - 1) * per
        # programs are counted at the interpreter's 16 x 16 tiles under TRITON_INTERPRET, 128 x 128 otherwise
        tile = 16 if rt.interpreting() else 128
        tiles = -(-128 // tile) * -(-576 // tile)
        assert tiles * splits >= min(132, tiles * (100352 // (16 if rt.interpreting() else 512)))
        assert rt.split_k(100352, 128, 576, torch.device("meta"))[0] == 1  # the forward: tiles fill the SMs


def test_wide_index_only_past_two_to_the_thirty():
    small = torch.empty((32, 64, 56, 56), device="meta")
    assert not rt.wide_index(100352, 128, 576, small)
    big = torch.empty((2**15, 2**15 + 1), device="meta")
    assert rt.wide_index(big) and rt.wide_index(2**30)
    # a strided view spans its whole extent, not its element count
    assert rt.wide_index(torch.empty((2, 2**31), device="meta")[:, ::2**20])


def test_conv2d_forward_and_input_gradient_split_k_against_torch():
    """Few output tiles over a long K (one small image, many channels): forward and dX split K too,
    and their partials come back through the permutation from (M, N) to the NCHW layout."""
    conv = importlib.import_module("generated.triton.conv2d")
    g = torch.Generator().manual_seed(7)
    X, Wt = torch.randn(1, 16, 3, 4, generator=g), torch.randn(5, 16, 3, 3, generator=g)
    cpu = torch.device("cpu")
    assert rt.split_k(1 * 3 * 4, 5, 16 * 9, cpu)[0] > 1 and rt.split_k(1 * 3 * 4, 16, 5 * 9, cpu)[0] > 1
    Xr, Wr = X.double().requires_grad_(), Wt.double().requires_grad_()
    Yr = F.conv2d(Xr, Wr, padding=1)
    dY = torch.randn(Yr.shape, generator=g)
    Yr.backward(dY.double())
    Y, saved = conv.forward_with_saved(X, Wt, pad=1)
    dX, dW = conv.backward(saved, dY)
    torch.testing.assert_close(Y.double(), Yr.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dX.double(), Xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dW.double(), Wr.grad, rtol=1e-4, atol=1e-4)


def _conv1d_padding_skipped(X, W, dY, stride, pad):
    """Y, dX, dW of a 1-D convolution by loops, each read outside X contributing nothing (float64)."""
    N, C, L = X.shape
    O, _, K = W.shape
    Y, dX, dW = np.zeros(dY.shape), np.zeros(X.shape), np.zeros(W.shape)
    for n, o, t, c, k in itertools.product(range(N), range(O), range(dY.shape[2]), range(C), range(K)):
        i = t * stride + k - pad
        if 0 <= i < L:
            Y[n, o, t] += X[n, c, i] * W[o, c, k]
            dX[n, c, i] += dY[n, o, t] * W[o, c, k]
            dW[o, c, k] += dY[n, o, t] * X[n, c, i]
    return Y, dX, dW


@pytest.mark.parametrize("target", ["numpy", "triton"])
@pytest.mark.parametrize("where", ["Wt", "dY"])
def test_user_stencil_padding_contributes_nothing(tmp_path, target, where):
    """A user's stencil, as conv2d: an inf in the filter (forward, dX) or in dY (dW, whose filter
    gradient splits K under the interpreter) meets the padding's zeros, and they contribute nothing
    (0*inf was NaN). NumPy: _m.contract; Triton: the NaN tile's exact re-sum (stencil.j2)."""
    _, mod = _conv1d_module(tmp_path, target)
    rng = np.random.default_rng(4)
    stride, pad = 2, 2
    X, W = rng.standard_normal((3, 2, 40)).astype(np.float32), rng.standard_normal((3, 2, 3)).astype(np.float32)
    dY = rng.standard_normal((3, 3, (40 + 2 * pad - 3) // stride + 1)).astype(np.float32)
    (W if where == "Wt" else dY)[1, 0, 0] = np.inf
    with np.errstate(invalid="ignore"):
        want = _conv1d_padding_skipped(*(a.astype(np.float64) for a in (X, W, dY)), stride, pad)
    if target == "numpy":
        Y, saved = mod.forward_with_saved(X, W, stride=stride, pad=pad)
        got = (Y, *mod.backward(saved, dY))
    else:
        Y, saved = mod.forward_with_saved(torch.tensor(X), torch.tensor(W), stride=stride, pad=pad)
        got = [t.numpy() for t in (Y, *mod.backward(saved, torch.tensor(dY)))]
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-4, atol=1e-4)
    assert np.isinf(want[2 if where == "dY" else 0]).any()  # the inf is there, where windows read it
