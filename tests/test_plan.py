"""The kernel plan: one lowering, printed by every target.

Every op of the library lowers once; the NumPy and Triton modules save exactly what the plan says;
launches hold one kernel class each; a user's attention op (rank 4, batched contractions, nested
sums in its gradients) lowers into two-operand GEMMs, row kernels and maps, and its generated
NumPy module agrees with torch's scaled_dot_product_attention.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import sympy as sp
import torch

import symgrad.ops  # noqa: F401  (registers the library)
from symgrad.declare import REGISTRY, Dim, Op, Tensor, idx, output
from symgrad.derive import derive
from symgrad.plan import KernelClass, LoweringError, is_contraction, lower
from symgrad.targets import numpy as numpy_target
from symgrad.targets import triton as triton_target

LIBRARY = [op.name for op in REGISTRY.of_kind("op")]  # update rules' one launch: tests/test_optim.py


@pytest.fixture(scope="module")
def plans():
    return {}


def plan_of(name, plans):
    if name not in plans:
        plans[name] = lower(derive(REGISTRY.get(name), trace=False))
    return plans[name]


def load(source: str, name: str, tmp_path):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", LIBRARY)
def test_launches_hold_one_kernel_class(name, plans):
    plan = plan_of(name, plans)
    for kernel in (plan.forward, plan.backward):
        for launch in kernel.launches:
            kinds = {st.kind for st in launch.statements}
            if launch.kind == "gemm":
                assert len(launch.statements) == 1 and kinds <= {KernelClass.CONTRACTION, KernelClass.STENCIL}
            elif launch.kind == "map":
                assert kinds == {KernelClass.MAP}
            elif launch.kind == "scale":  # a fused loss's gradient, scaled in the buffer forward wrote
                assert kernel is plan.backward and kinds == {KernelClass.MAP} and launch.targets[0] in plan.fused
            else:
                assert launch.kind == "rows" and KernelClass.CONTRACTION not in kinds and KernelClass.STENCIL not in kinds
    assert set(plan.backward.returns) == {f"d{t}" for t in plan.differentiable}


@pytest.mark.parametrize("name", LIBRARY)
def test_both_targets_save_what_the_plan_says(name, plans, tmp_path):
    plan = plan_of(name, plans)
    np_src = numpy_target.render(plan, "cmd")
    tr_src = triton_target.render(plan, "cmd")
    # NumPy: the saved dict of forward_with_saved, less params and dims.
    mod = load(np_src, f"_plan_np_{name}", tmp_path)
    op = plan.op
    from symgrad.evaluate import sample_inputs

    sizes = op.test_sizes[-1]
    params = {p.name: sizes[p.name] for p in op.params if p.name in sizes}
    inputs = sample_inputs(op, sizes, np.random.default_rng(0), params)
    _, saved = mod.forward_with_saved(*[inputs[t.name] for t in op.inputs], **params)
    extra = {p.name for p in op.params} | {d.name for d in op.dims} | {"_lead"}  # _lead: folded leading axes
    assert tuple(k for k in saved if k not in extra) == plan.saved
    # Triton: its SAVED constant.
    line = next(ln for ln in tr_src.splitlines() if ln.startswith("SAVED = "))
    assert line == "SAVED = (" + "".join(f"{n!r}, " for n in plan.saved) + ")"


def test_fused_loss_is_decided_once(plans):
    plan = plan_of("softmax_cross_entropy", plans)
    assert plan.fused == {"dx": "dx_fused"} and plan.saved == ("dx_fused",)
    assert any(s.stage == "fuse losses" for s in plan.trace.steps)


def test_stencil_is_reindexed_by_the_plan_not_the_targets(plans):
    plan = plan_of("conv2d", plans)
    dX = next(st for st in plan.backward.statements if st.target == "dX")
    assert dX.kind is KernelClass.STENCIL and dX.expr.has(sp.Mod)  # the stride became a guard
    steps = [s for s in plan.trace.steps if s.stage == "re-index stencils"]
    # dWt reads X at +stride*j, the forward's own read: not re-indexed, so the padding's zeros never
    # meet an inf or NaN of X (tests/test_special_values.py)
    assert {str(s.after.lhs.base) for s in steps} == {"dX"}


def test_layer_norm_plan_recomputes_xhat(plans):
    plan = plan_of("layer_norm", plans)
    assert plan.saved == ("x", "w", "mean", "rstd") and plan.recomputed == ("xhat",)
    (launch,) = plan.backward.launches  # dx, dw, dbias in one pass over the rows
    assert launch.kind == "rows" and set(launch.targets) == {"dx", "dw", "dbias"}


# ------------------------------------------------------------------------------------------------
# a user's op of rank 4: multi-head attention, materialized


def attention_op(causal: bool) -> Op:
    Bd, Hd, Td, Ed = Dim("B", "b"), Dim("H", "h"), Dim("T", "t"), Dim("E", "e")
    b, h, t, s, e, k = idx("b h t s e k")
    Q, K, V = (Tensor(n, (Bd, Hd, Td, Ed)) for n in "QKV")
    S, lse, p = (sp.IndexedBase(n, real=True) for n in ("S", "lse", "p"))
    from symgrad.functions import Iverson

    keep = (lambda q, key: sp.Integer(1)) if not causal else (lambda q, key: Iverson(sp.Le(key, q)))
    T = Td.symbol
    return Op(
        "attention_probe_causal" if causal else "attention_probe", "softmax(Q K^T/sqrt(E)) V per head", (Q, K, V),
        intermediates=(
            output("S", (b, h, t, s), sp.Sum(Q[b, h, t, e] * K[b, h, s, e], (e, 0, Ed.symbol - 1)) / sp.sqrt(Ed.symbol), (Bd, Hd, Td, Td)),
            output("lse", (b, h, t), sp.log(sp.Sum(keep(t, k) * sp.exp(S[b, h, t, k]), (k, 0, T - 1))), (Bd, Hd, Td)),
            output("p", (b, h, t, s), keep(t, s) * sp.exp(S[b, h, t, s] - lse[b, h, t]), (Bd, Hd, Td, Td)),
        ),
        outputs=(output("O", (b, h, t, e), sp.Sum(p[b, h, t, s] * V[b, h, s, e], (s, 0, T - 1)), (Bd, Hd, Td, Ed)),),
    )


@pytest.fixture(scope="module")
def attention_plan():
    return lower(derive(attention_op(False), trace=False))


def test_attention_lowers_to_two_operand_gemms(attention_plan):
    plan = attention_plan
    gemms = [launch.statements[0] for k in (plan.forward, plan.backward) for launch in k.launches if launch.kind == "gemm"]
    assert len(gemms) >= 5  # S, O; and the products of dQ, dK, dV
    for st in gemms:
        (s,) = st.expr.atoms(sp.Sum)
        assert is_contraction(s) and sum(isinstance(f, sp.Indexed) for f in sp.Mul.make_args(s.function)) == 2, st.formula
    for launch in plan.backward.launches:
        if launch.kind == "rows":
            assert not any(is_contraction(s) for st in launch.statements for s in st.expr.atoms(sp.Sum))
    assert "p" not in plan.saved  # recomputed from the saved scores and row lse: one T x T buffer, not two
    assert any(s.stage == "split reductions" for s in plan.trace.steps)


def test_attention_numpy_matches_torch(attention_plan, tmp_path):
    mod = load(numpy_target.render(attention_plan, "cmd"), "_plan_attention_np", tmp_path)
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 3, 5, 4)) * 3 for _ in range(3))
    do = rng.normal(size=(2, 3, 5, 4))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    out.backward(torch.tensor(do))
    np.testing.assert_allclose(mod.forward(q, k, v), out.detach().numpy(), rtol=1e-10, atol=1e-12)
    for got, want in zip(mod.vjp(q, k, v, do), (tq, tk, tv)):
        np.testing.assert_allclose(got, want.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_causal_attention_numpy_matches_torch(tmp_path):
    plan = lower(derive(attention_op(True), trace=False))
    mod = load(numpy_target.render(plan, "cmd"), "_plan_attention_causal_np", tmp_path)
    rng = np.random.default_rng(2)
    q, k, v = (rng.normal(size=(1, 2, 6, 3)) for _ in range(3))
    do = rng.normal(size=(1, 2, 6, 3))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    out.backward(torch.tensor(do))
    np.testing.assert_allclose(mod.forward(q, k, v), out.detach().numpy(), rtol=1e-10, atol=1e-12)
    for got, want in zip(mod.vjp(q, k, v, do), (tq, tk, tv)):
        np.testing.assert_allclose(got, want.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_unplannable_statement_names_op_and_statement():
    Bd, Cd, Nd = Dim("B", "b"), Dim("C", "i"), Dim("N", "j")
    b, i, j, k = idx("b i j k")
    x, y, z = Tensor("x", (Bd, Cd)), Tensor("y", (Cd, Nd)), Tensor("z", (Cd, Nd))
    # a three-way product summed over one index: no GEMM reads three operands
    op = Op("three_way", "sum_k x[b,k] y[k,j] z[k,i]", (x, y, z),
            outputs=(output("out", (b, i, j), sp.Sum(x[b, k] * y[k, j] * z[k, i], (k, 0, Cd.symbol - 1)), (Bd, Cd, Nd)),))
    with pytest.raises(LoweringError, match="three_way.*not a product of two operands"):
        lower(derive(op, trace=False))


def test_cli_refuses_an_unplannable_op_in_one_line(tmp_path):
    import subprocess

    (tmp_path / "badops.py").write_text(
        "import sympy as sp\n"
        "from symgrad.declare import Dim, Op, Tensor, idx, output, register\n"
        "Bd, Cd, Nd = Dim('B', 'b'), Dim('C', 'i'), Dim('N', 'j')\n"
        "b, i, j, k = idx('b i j k')\n"
        "x, y, z = Tensor('x', (Bd, Cd)), Tensor('y', (Cd, Nd)), Tensor('z', (Cd, Nd))\n"
        "register(Op('three_way', 'x y z', (x, y, z), outputs=(output('out', (b, i, j),"
        " sp.Sum(x[b, k]*y[k, j]*z[k, i], (k, 0, Cd.symbol - 1)), (Bd, Cd, Nd)),)))\n"
    )
    r = subprocess.run([sys.executable, "-m", "symgrad", "derive", "three_way", "--ops", "badops"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0] and "Traceback" not in r.stderr
    assert lines[0].startswith("symgrad: error: op three_way: statement out[b, i, j] = ") and "not a product of two operands" in lines[0]


def test_derive_reports_which_targets_lower_the_plan(plans, monkeypatch):
    from symgrad import render
    from symgrad.targets import lowering_report

    plan = plan_of("layer_norm", plans)
    assert lowering_report(plan) == {"numpy": None, "triton": None}
    assert render.targets_line(plan) == "lowers for: numpy, triton"

    def refuse(plan, command):
        raise LoweringError("op layer_norm: ROW_REDUCTION statement dx[b, i] = ...: not today")

    monkeypatch.setattr(triton_target, "render", refuse)
    assert render.targets_line(plan).splitlines() == [
        "lowers for: numpy", "cannot lower for triton: op layer_norm: ROW_REDUCTION statement dx[b, i] = ...: not today"]
