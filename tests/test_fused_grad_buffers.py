"""Fused losses hand out the gradient buffer forward wrote (issue 9, part B): backward scales it in
place (no second buffer, nothing moved at a cotangent of 1), runs once per forward, and an opt-in
``inplace=True`` writes the gradient into the logits' own buffer. Checked against torch on every
fused loss the plan finds (not by op name), in one block and in several."""
import importlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
import torch.nn.functional as F  # noqa: E402

import symgrad.ops  # noqa: E402,F401
from symgrad.declare import REGISTRY  # noqa: E402
from symgrad.derive import derive  # noqa: E402
from symgrad.plan import lower  # noqa: E402
from symgrad.runtime import triton_support as rt  # noqa: E402

REF = {
    "softmax_cross_entropy": lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1),
    "mse": lambda X, Y: ((X - Y) ** 2).sum() / 2,
    "sigmoid_bce": lambda x, y: F.binary_cross_entropy_with_logits(x, y),
}
PARAMS = {"softmax_cross_entropy": {"eps": 0.1}}


def _inputs(name, C):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, C, generator=g, dtype=torch.float64).float()
    if name == "softmax_cross_entropy":
        y = torch.randint(0, C, (5,), generator=g)
        y[1] = -100
    else:
        y = torch.rand(5, C, generator=g, dtype=torch.float64).float()
    return x, y


def _torch_grad(name, x, y, dl):
    x64 = x.double().requires_grad_()
    y64 = y if y.dtype == torch.int64 else y.double()
    (REF[name](x64, y64) * dl).backward()
    return x64.grad


@pytest.mark.parametrize("name", sorted(REF))
def test_plan_scales_every_fused_gradient_in_place(name):
    plan = lower(derive(REGISTRY.get(name)))
    assert plan.fused and [l.kind for l in plan.backward.launches] == ["scale"] * len(plan.fused)
    assert set(plan.overwritable) == set(plan.fused)


@pytest.mark.parametrize("cap", [None, "16"])  # the row in one block; in blocks of 16 columns
@pytest.mark.parametrize("dl", [1.0, 0.37])
@pytest.mark.parametrize("name", sorted(REF))
def test_backward_returns_the_saved_buffer_scaled(name, dl, cap, monkeypatch):
    if cap:
        monkeypatch.setenv("SYMGRAD_TRITON_MAX_BLOCK", cap)
    mod = importlib.import_module(f"generated.triton.{name}")
    x, y = _inputs(name, 67)
    x0 = x.clone()
    _, saved = mod.forward_with_saved(x, y, **PARAMS.get(name, {}))
    buf = saved["d" + mod.DIFFERENTIABLE[0] + "_fused"]
    g = mod.backward(saved, torch.tensor(dl))[0]
    assert g.data_ptr() == buf.data_ptr()  # no second buffer of the logits' size
    torch.testing.assert_close(g.double(), _torch_grad(name, x, y, dl), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, x0)  # the default never writes an input
    with pytest.raises(RuntimeError, match="backward already ran on these saved values"):
        mod.backward(saved, torch.tensor(dl))


@pytest.mark.parametrize("cap", [None, "16"])
@pytest.mark.parametrize("name", sorted(REF))
def test_inplace_writes_the_gradient_into_the_input(name, cap, monkeypatch):
    if cap:
        monkeypatch.setenv("SYMGRAD_TRITON_MAX_BLOCK", cap)
    mod = importlib.import_module(f"generated.triton.{name}")
    x, y = _inputs(name, 67)
    h = x.clone().requires_grad_()
    logits = h * 1.0  # a dead intermediate, as logits = linear(...) are
    loss = mod.apply(logits, y, inplace=True, **PARAMS.get(name, {}))
    torch.testing.assert_close(loss.double(), REF[name](x.double(), y if y.dtype == torch.int64 else y.double()), rtol=1e-5, atol=1e-6)
    (loss * 0.37).backward()
    want = _torch_grad(name, x, y, 0.37)
    torch.testing.assert_close(h.grad.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.detach().double(), want, rtol=1e-5, atol=1e-6)  # the buffer holds it


def test_second_backward_and_leaf_overwrite_are_refused():
    mod = importlib.import_module("generated.triton.softmax_cross_entropy")
    x, y = _inputs("softmax_cross_entropy", 41)
    xa = x.clone().requires_grad_()
    loss = mod.apply(xa, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward.*retain_graph"):
        loss.backward()
    with pytest.raises(ValueError, match="inplace=True would overwrite x, a leaf tensor that requires grad"):
        mod.apply(x.clone().requires_grad_(), y, inplace=True)
    with pytest.raises(ValueError, match="must then be contiguous"):
        mod.forward_with_saved(x.clone().t().contiguous().t(), y, inplace=True)


@pytest.mark.parametrize("cols,itemsize", [(32000, 2), (32000, 4), (128256, 2), (128256, 4)])
def test_rows_in_flight_fit_l2_for_the_second_pass(cols, itemsize):
    """A multi-block row read again by a later pass: programs (all resident) times the row's bytes
    stay within the L2 budget, down to one program per SM (fp32 rows of 128K columns then read twice)."""
    dev = torch.device("meta")
    with rt.planning_for(132):
        n_prog, rpp = rt.row_programs(8192, dev, True, cols * itemsize)
        plain, plain_rpp = rt.row_programs(8192, dev, True)
    assert n_prog * rpp >= 8192 and plain * plain_rpp >= 8192 and plain <= 4 * 132
    assert rpp <= -(-8192 // 132)  # at least one program per SM
    assert n_prog * cols * itemsize <= rt.l2_reread_bytes(dev) or n_prog <= 132


def test_a_users_fused_loss_gets_the_same_buffers(tmp_path):
    """Not by op name: a cross-entropy with a z-loss term, declared as a user would, is planned as
    a fused loss whose backward scales forward's buffer in place, with ``inplace=True`` available."""
    import importlib.util
    import sys

    import sympy as sp

    from symgrad import declare
    from symgrad.declare import Dim, LabelRange, Op, Param, Role, Tensor, idx, output
    from symgrad.targets import triton as triton_target

    b, i, k = idx("b i k")
    Bd, Cd = Dim("B", "b"), Dim("C", "i", min_size=1)
    x, y = Tensor("x", (Bd, Cd), domain=(-4.0, 4.0)), Tensor("y", (Bd,), Role.LABEL)
    z = Param("z", 0.01, doc="z-loss weight", domain="[0, inf)")
    lse = sp.IndexedBase("lse", real=True)
    saved, declare.REGISTRY = declare.REGISTRY, declare.Registry()
    try:
        op = declare.register(Op(
            "zloss_ce", "mean over rows of lse - x[y] + z*lse**2", (x, y),
            intermediates=(output("lse", b, sp.log(sp.Sum(sp.exp(x[b, k]), (k, 0, Cd.size - 1))), Bd),),
            outputs=(output("loss", (), sp.Sum(lse[b] - x[b, y[b]] + z * lse[b] ** 2, (b, 0, Bd.size - 1)) / Bd.size, ()),),
            params=(z,), facts=(LabelRange("y", Cd),),
        ))
    finally:
        declare.REGISTRY = saved
    plan = lower(derive(op, trace=False))
    assert [l.kind for l in plan.backward.launches] == ["scale"] and plan.overwritable == {"dx": "x"}
    path = tmp_path / "user_triton_zloss_ce.py"
    path.write_text(triton_target.render(plan))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)

    g = torch.Generator().manual_seed(1)
    xv, yv = torch.randn(4, 37, generator=g), torch.randint(0, 37, (4,), generator=g)
    x64 = xv.double().requires_grad_()
    l64 = torch.logsumexp(x64, 1)
    ((l64 - x64.gather(1, yv[:, None])[:, 0] + 0.01 * l64 ** 2).mean() * 0.5).backward()
    for inplace in (False, True):
        h = xv.clone().requires_grad_()
        (mod.apply(h * 1.0, yv, inplace=inplace) * 0.5).backward()
        torch.testing.assert_close(h.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
