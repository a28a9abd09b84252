"""The Triton target at any rank, against torch.autograd: row kernels over several row dims and a
column at any axis (layer_norm on x[B, T, D], softmax over the middle axis of x[B, C, T]), batched
contractions (Q K^T per batch and head) and multi-head attention on [B, H, T, E].

The ops are declared here, in a registry of this module's own (never the library's), rendered
with ``symgrad.targets.triton.render`` into a temporary file and imported, as a user's project
would. Under ``TRITON_INTERPRET=1`` (tests/conftest.py) the kernels run on CPU: sizes are tiny
and odd; ``SYMGRAD_TRITON_MAX_BLOCK=16`` makes a row of 19 columns span two blocks, so both row
paths (one block and several) run.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest

torch = pytest.importorskip("torch")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRET:
    os.environ.setdefault("SYMGRAD_TRITON_MAX_BLOCK", "16")
pytest.importorskip("triton")
import sympy as sp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from symgrad.declare import Dim, Op, Param, Registry, Tensor, idx, output  # noqa: E402
from symgrad.derive import derive  # noqa: E402
from symgrad.plan import lower  # noqa: E402
from symgrad.targets import triton as triton_target  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning",
                                        "ignore:overflow:RuntimeWarning")

REG = Registry()  # this module's ops only: the library's registry is left alone
B, T, D, C, H, E, S = (Dim(n, n.lower()) for n in "BTDCHES")
b, t, i, k, c, h, s, e, u = idx("b t i k c h s e u")

# (a) layer_norm over the last axis of x[B, T, D]
x3 = Tensor("x", (B, T, D))
w, bias = Tensor("w", (D,), domain=(0.5, 1.5)), Tensor("bias", (D,))
eps = Param("eps", 1e-5)
mean, rstd, xhat = (sp.IndexedBase(n, real=True) for n in ("mean", "rstd", "xhat"))
LAYER_NORM = REG.add(Op(
    "rank_test_layer_norm3", "layer norm of x[B, T, D] over D", (x3, w, bias),
    intermediates=(
        output("mean", (b, t), sp.Sum(x3[b, t, k], (k, 0, D.size - 1)) / D.size, (B, T)),
        output("rstd", (b, t), (sp.Sum((x3[b, t, k] - mean[b, t]) ** 2, (k, 0, D.size - 1)) / D.size + eps.symbol)
               ** sp.Rational(-1, 2), (B, T)),
        output("xhat", (b, t, i), (x3[b, t, i] - mean[b, t]) * rstd[b, t], (B, T, D)),
    ),
    outputs=(output("y", (b, t, i), xhat[b, t, i] * w[i] + bias[i], (B, T, D)),),
    params=(eps,),
))

# (b) softmax over the middle axis of x[B, C, T]
xs = Tensor("x", (B, C, T), domain=(-4.0, 4.0))
SOFTMAX_MID = REG.add(Op(
    "rank_test_softmax_mid", "softmax of x[B, C, T] over C", (xs,),
    outputs=(output("p", (b, c, t), sp.exp(xs[b, c, t]) / sp.Sum(sp.exp(xs[b, k, t]), (k, 0, C.size - 1)), (B, C, T)),),
))

# (c) batched matmul: Y[b, h, t, s] = sum_e Q[b, h, t, e] K[b, h, s, e]
Qb, Kb = Tensor("Q", (B, H, T, E)), Tensor("K", (B, H, S, E))
BMM = REG.add(Op(
    "rank_test_bmm", "Q K^T per batch and head", (Qb, Kb),
    outputs=(output("Y", (b, h, t, s), sp.Sum(Qb[b, h, t, e] * Kb[b, h, s, e], (e, 0, E.size - 1)), (B, H, T, S)),),
))


def _attention_plain():
    """Multi-head attention declared here, without a mask."""
    Qa, Ka, Va = (Tensor(n, (B, H, T, E)) for n in "QKV")
    score, lse, p = (sp.IndexedBase(n, real=True) for n in ("score", "lse", "p"))
    return REG.add(Op(
        "rank_test_attention", "softmax(Q K^T/sqrt(E)) V", (Qa, Ka, Va),
        intermediates=(
            output("score", (b, h, t, s), sp.Sum(Qa[b, h, t, e] * Ka[b, h, s, e], (e, 0, E.size - 1)) / sp.sqrt(E.size),
                   (B, H, T, T)),
            output("lse", (b, h, t), sp.log(sp.Sum(sp.exp(score[b, h, t, u]), (u, 0, T.size - 1))), (B, H, T)),
            output("p", (b, h, t, s), sp.exp(score[b, h, t, s] - lse[b, h, t]), (B, H, T, T)),
        ),
        outputs=(output("O", (b, h, t, e), sp.Sum(p[b, h, t, s] * Va[b, h, s, e], (s, 0, T.size - 1)), (B, H, T, E)),),
    ))


def _attention_project():
    """The user project's declaration (examples/user_project/userops/attention.py), with its
    causal mask, registered here under another name; None when the file is not there."""
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "user_project", "userops", "attention.py")
    if not os.path.exists(path):
        return None
    import dataclasses

    import symgrad.declare as declare

    saved = declare.REGISTRY
    declare.REGISTRY = Registry()  # its register() goes to a throwaway registry
    try:
        spec = importlib.util.spec_from_file_location("_rank_test_userops_attention", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        declare.REGISTRY = saved
    return REG.add(dataclasses.replace(mod.attention, name="rank_test_attention_causal"))


_MODULES: dict = {}


def module(op, tmp_path_factory):
    """The op's Triton module, rendered and imported once per session (it registers custom ops)."""
    if op.name not in _MODULES:
        src = triton_target.render(lower(derive(op)), f"tests/test_triton_rank.py {op.name}")
        path = tmp_path_factory.mktemp("rank") / f"{op.name}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"_symgrad_rank_{op.name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        _MODULES[op.name] = mod
    return _MODULES[op.name]


def spread(t, axis=-1):
    """The same values laid out non-contiguously: every other entry of ``axis`` of a wider buffer."""
    shape = list(t.shape)
    shape[axis] *= 2
    wide = torch.zeros(shape, dtype=t.dtype, device=t.device)
    sl = [slice(None)] * t.dim()
    sl[axis] = slice(None, None, 2)
    wide[tuple(sl)] = t
    return wide[tuple(sl)]


# (d) a sum over the first of three axes, the others kept: a row reduction along that axis
xf = Tensor("x", (B, T, C))
SUM_FIRST = REG.add(Op(
    "rank_test_sum_first", "sum of x[B, T, C] over B", (xf,),
    outputs=(output("out", (t, c), sp.Sum(xf[k, t, c], (k, 0, B.size - 1)), (T, C)),),
))


def check(mod, ref, inputs, params=None, rtol=1e-4, atol=1e-5):
    """Forward and every gradient of ``mod`` against ``ref`` in float64 autograd."""
    params = params or {}
    originals = [x.clone() for x in inputs]
    outs, saved = mod.forward_with_saved(*inputs, **params)
    outs = outs if isinstance(outs, tuple) else (outs,)
    ref_in = [x.detach().double().cpu().requires_grad_(True) for x in inputs]
    ref_out = ref(*ref_in)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref_out]
    ref_grads = torch.autograd.grad(ref_out, ref_in, cots)
    for o, r, name in zip(outs, ref_out, mod.OUTPUTS):
        assert o.shape == r.shape, name
        torch.testing.assert_close(o.double().cpu(), r.detach(), rtol=rtol, atol=atol, msg=lambda m: f"output {name}: {m}")
    grads = mod.backward(saved, *[cc.to(device=inputs[0].device, dtype=inputs[0].dtype) for cc in cots])
    for gr, r, name in zip(grads, ref_grads, mod.INPUTS):
        assert gr is not None and gr.shape == r.shape, name
        torch.testing.assert_close(gr.double().cpu(), r, rtol=rtol, atol=atol, msg=lambda m: f"gradient of {name}: {m}")
    for x, o in zip(inputs, originals):
        assert torch.equal(x, o), "an input was overwritten"
    # autograd.Function agrees with the functional entry points
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = mod.apply(*leaves, **params)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, [cc.to(device=inputs[0].device, dtype=inputs[0].dtype) for cc in cots])
    for leaf, gr in zip(leaves, grads):
        torch.testing.assert_close(leaf.grad, gr, rtol=1e-5, atol=1e-6)


def rand(*shape, seed=0, lo=-1.0, hi=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)).float().to(DEVICE)


# (B, T, D): D = 19 spans two blocks of 16 in the interpreter; D = 5 fits one.
@pytest.mark.parametrize("sizes", [(2, 3, 5), (3, 1, 19)], ids=["one-block", "two-blocks"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_layer_norm_3d(sizes, strided, tmp_path_factory):
    mod = module(LAYER_NORM, tmp_path_factory)
    nb, nt, nd = sizes
    x, wt, bs = rand(nb, nt, nd, seed=0, lo=-2, hi=2), rand(nd, seed=1, lo=0.5, hi=1.5), rand(nd, seed=2)
    if strided:  # x with its batch axes transposed in memory and every other column; w strided too
        x = spread(x.transpose(0, 1).contiguous().transpose(0, 1), 2)
        wt = spread(wt, 0)
        assert not x.is_contiguous() and not wt.is_contiguous()
    check(mod, lambda x_, w_, b_: F.layer_norm(x_, (nd,), w_, b_, 1e-5), [x, wt, bs], {"eps": 1e-5})


@pytest.mark.parametrize("sizes", [(2, 5, 3), (1, 19, 2)], ids=["one-block", "two-blocks"])
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_softmax_middle_axis(sizes, strided, tmp_path_factory):
    mod = module(SOFTMAX_MID, tmp_path_factory)
    x = rand(*sizes, seed=3, lo=-4, hi=4)
    if strided:
        x = spread(x, 1)
    check(mod, lambda x_: torch.softmax(x_, dim=1), [x])


@pytest.mark.parametrize("sizes", [(5, 2, 3), (19, 1, 2)], ids=["one-block", "two-blocks"])
def test_sum_over_first_of_three_axes(sizes, tmp_path_factory):
    mod = module(SUM_FIRST, tmp_path_factory)
    check(mod, lambda x_: x_.sum(0), [spread(rand(*sizes, seed=6), 0)])


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_batched_matmul(strided, tmp_path_factory):
    mod = module(BMM, tmp_path_factory)
    q, kk = rand(2, 3, 5, 3, seed=4), rand(2, 3, 7, 3, seed=5)
    if strided:
        q, kk = spread(q, 1), kk.transpose(1, 2).contiguous().transpose(1, 2)
    check(mod, lambda q_, k_: torch.einsum("bhte,bhse->bhts", q_, k_), [q, kk])


ATTENTION = _attention_plain()
ATTENTION_CAUSAL = _attention_project()


def _sdpa(causal):
    def ref(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=bool(causal), scale=1 / math.sqrt(q_.shape[-1]))
    return ref


def _qkv(nt=5):
    return rand(2, 2, nt, 3, seed=6, lo=-2, hi=2), rand(2, 2, nt, 3, seed=7, lo=-2, hi=2), rand(2, 2, nt, 3, seed=8)


@pytest.mark.parametrize("nt", [5, 19], ids=["one-block", "two-blocks"])
def test_attention(nt, tmp_path_factory):
    check(module(ATTENTION, tmp_path_factory), _sdpa(False), list(_qkv(nt)))


@pytest.mark.skipif(ATTENTION_CAUSAL is None, reason="examples/user_project/userops/attention.py is not there")
@pytest.mark.parametrize("causal", [0, 1], ids=["full", "causal"])
def test_attention_user_project(causal, tmp_path_factory):
    check(module(ATTENTION_CAUSAL, tmp_path_factory), _sdpa(causal), list(_qkv()), {"causal": causal})
