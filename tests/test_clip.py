"""Gradient clipping from generated code (symgrad.optim.clip) against torch.nn.utils.clip_grad_norm_ and
clip_grad_value_: several gradients of odd sizes, norm_type 2 and inf, clipping and not, non-finite
gradients, on the NumPy target (float64 and float32) and the Triton target (interpreter on CPU)."""
import math

import numpy as np
import pytest
import torch

from symgrad.optim import clip

SHAPES = [(3, 5), (7,), (2, 3, 4), (1,), (41,), (1, 1)]
NORMS = [2.0, math.inf]


def _grads(seed, dtype=np.float64, scale=1.0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(dtype) for s in shapes]


def _torch_params(grads, dtype=None):
    ps = []
    for g in grads:
        t = torch.tensor(g, dtype=dtype)
        p = torch.nn.Parameter(torch.zeros_like(t))
        p.grad = t.clone()
        ps.append(p)
    return ps


def _torch_clip(grads, max_norm, norm_type, dtype=None):
    ps = _torch_params(grads, dtype)
    total = torch.nn.utils.clip_grad_norm_(ps, max_norm, norm_type=norm_type)
    return total, [p.grad for p in ps]


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clips, and leaves the gradients as they are
def test_numpy_float64_equals_torch(norm_type, max_norm):
    grads = _grads(1)
    ref_total, ref = _torch_clip(grads, max_norm, norm_type)
    ours = [g.copy() for g in grads]
    total = clip.clip_grad_norm_arrays(ours, max_norm, norm_type)
    np.testing.assert_allclose(float(total), ref_total.item(), rtol=1e-12)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-12, atol=0)
    if max_norm == 0.5:  # it did clip: the new global norm is max_norm (less the 1e-6 torch adds)
        again = clip.clip_grad_norm_arrays([g.copy() for g in ours], 1e9, norm_type)
        assert float(again) == pytest.approx(0.5, rel=1e-5) and float(total) > 1.0
    else:
        assert all(np.array_equal(a, g) for a, g in zip(ours, grads))


@pytest.mark.parametrize("norm_type", NORMS)
def test_numpy_float32_equals_torch(norm_type):
    grads = _grads(2, np.float32, scale=3.0)
    ref_total, ref = _torch_clip(grads, 1.0, norm_type, torch.float32)
    ours = [g.copy() for g in grads]
    total = clip.clip_grad_norm_arrays(ours, 1.0, norm_type)
    assert np.asarray(total).dtype == np.float32
    np.testing.assert_allclose(float(total), ref_total.item(), rtol=1e-6)
    for a, b in zip(ours, ref):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("norm_type", NORMS)
def test_triton_equals_torch(norm_type):
    grads = _grads(3, np.float32, scale=2.0)
    ref_total, ref = _torch_clip(grads, 0.7, norm_type, torch.float32)
    ps = _torch_params(grads, torch.float32)
    total = clip.clip_grad_norm_(ps, 0.7, norm_type=norm_type)
    assert isinstance(total, torch.Tensor) and total.shape == () and total.dtype == torch.float32
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    for p, b in zip(ps, ref):
        torch.testing.assert_close(p.grad, b, rtol=1e-6, atol=1e-7)


def test_triton_strided_gradient_is_written_in_place():
    g = torch.randn(5, 3).t()  # a transposed view: not contiguous
    p = torch.nn.Parameter(torch.zeros(3, 5))
    p.grad = g
    ref = g.clone()
    total = clip.clip_grad_norm_([p], 0.1)
    assert p.grad is g  # the caller's gradient tensor, changed in place
    torch.testing.assert_close(g, ref * min(1.0, 0.1 / (ref.norm().item() + 1e-6)), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(total, ref.norm(), rtol=1e-6, atol=0)


def _with_nonfinite(value, dtype=np.float64):
    grads = _grads(4, dtype)
    grads[2][1, 0, 3] = value
    return grads


def _assert_same(ours, ref):
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))  # NaN exactly where torch has NaN
        np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=1e-12, atol=0)


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradients_as_torch(norm_type, value):
    """A NaN total norm makes every gradient NaN; an inf one scales by 0 (inf*0 is NaN), as torch."""
    grads = _with_nonfinite(value)
    ref_total, ref = _torch_clip(grads, 1.0, norm_type)
    ours = [g.copy() for g in grads]
    total = clip.clip_grad_norm_arrays(ours, 1.0, norm_type)
    np.testing.assert_array_equal(np.asarray(total), ref_total.numpy())
    _assert_same(ours, [r.numpy() for r in ref])
    if value != value:
        assert all(np.isnan(a).all() for a in ours)
    else:
        assert sum(np.isnan(a).sum() for a in ours) == 1 and all(np.all((a == 0) | np.isnan(a)) for a in ours)

    ps = _torch_params(grads, torch.float32)
    total32 = clip.clip_grad_norm_(ps, 1.0, norm_type)
    ref32_total, ref32 = _torch_clip(grads, 1.0, norm_type, torch.float32)
    np.testing.assert_array_equal(total32.numpy(), ref32_total.numpy())
    _assert_same([p.grad.numpy() for p in ps], [r.numpy() for r in ref32])


def test_float32_overflow_gives_inf_as_torch():
    grads = [np.array([3e20, 4e20], np.float32), np.ones(3, np.float32)]  # the sum of squares overflows float32
    ref_total, ref = _torch_clip(grads, 1.0, 2.0, torch.float32)
    ours = [g.copy() for g in grads]
    assert float(clip.clip_grad_norm_arrays(ours, 1.0)) == ref_total.item() == math.inf
    _assert_same(ours, [r.numpy() for r in ref])


@pytest.mark.parametrize("norm_type", NORMS)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_error_if_nonfinite(norm_type, value):
    grads = _with_nonfinite(value)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(_torch_params(grads), 1.0, norm_type, error_if_nonfinite=True)
    ours = [g.copy() for g in grads]
    with pytest.raises(RuntimeError, match=r"The total norm of order .* is non-finite, so it cannot be clipped"):
        clip.clip_grad_norm_arrays(ours, 1.0, norm_type, error_if_nonfinite=True)
    assert all(np.array_equal(a, g, equal_nan=True) for a, g in zip(ours, grads))  # nothing was scaled
    with pytest.raises(RuntimeError, match="non-finite"):
        clip.clip_grad_norm_(_torch_params(grads, torch.float32), 1.0, norm_type, error_if_nonfinite=True)
    finite = _grads(5)  # finite gradients pass the check
    total = clip.clip_grad_norm_arrays(finite, 1.0, norm_type, error_if_nonfinite=True)
    assert math.isfinite(float(total))


def test_empty_and_missing_gradients_as_torch():
    assert float(clip.clip_grad_norm_arrays([], 1.0)) == torch.nn.utils.clip_grad_norm_([], 1.0).item() == 0.0
    ps = _torch_params(_grads(6, np.float32))
    ps.append(torch.nn.Parameter(torch.zeros(4)))  # no .grad: skipped, as torch skips it
    ref_total, _ = _torch_clip(_grads(6, np.float32), 1.0, 2.0, torch.float32)
    torch.testing.assert_close(clip.clip_grad_norm_(ps, 1.0), ref_total, rtol=1e-6, atol=0)
    grads = [np.zeros((0, 3)), np.array([3.0, 4.0])]
    assert float(clip.clip_grad_norm_arrays(grads, 1.0)) == 5.0  # an empty gradient adds nothing to a 2-norm
    with pytest.raises(ValueError, match="gradient 0 is empty"):  # torch: no inf-norm of an empty tensor
        clip.clip_grad_norm_arrays(grads, 1.0, math.inf)


def test_bad_arguments_are_clear_errors():
    grads = _grads(7)
    with pytest.raises(ValueError, match="norm_type 1.0 is not supported"):
        clip.clip_grad_norm_arrays(grads, 1.0, 1.0)
    with pytest.raises(ValueError, match="norm_type must be a number"):
        clip.clip_grad_norm_arrays(grads, 1.0, "two")
    with pytest.raises(ValueError, match="max_norm must be a finite number >= 0, got -1"):
        clip.clip_grad_norm_arrays(grads, -1.0)
    with pytest.raises(ValueError, match="read-only"):
        g = np.ones(3)
        g.flags.writeable = False
        clip.clip_grad_norm_arrays([g], 1.0)
    with pytest.raises(TypeError, match="not a NumPy array"):
        clip.clip_grad_norm_arrays([torch.ones(3)], 1.0)
    with pytest.raises(ValueError, match="clip_value must be in"):
        clip.clip_grad_value_arrays([np.ones(3)], -0.5)


@pytest.mark.parametrize("target", ["numpy", "triton"])
def test_clip_value_equals_torch(target):
    grads = _grads(8, np.float32, scale=2.0)
    grads[0][0, 0], grads[1][3], grads[4][0] = math.nan, math.inf, -math.inf
    ps = _torch_params(grads, torch.float32)
    torch.nn.utils.clip_grad_value_(ps, 0.75)
    if target == "numpy":
        ours = [g.copy() for g in grads]
        clip.clip_grad_value_arrays(ours, 0.75)
    else:
        qs = _torch_params(grads, torch.float32)
        clip.clip_grad_value_(qs, 0.75)
        ours = [q.grad.numpy() for q in qs]
    for a, p in zip(ours, ps):
        np.testing.assert_array_equal(a, p.grad.numpy())
    assert np.isnan(ours[0][0, 0]) and ours[1][3] == 0.75 and ours[4][0] == -0.75


class _Counting:
    """A generated kernel that counts its launches (``kernel[grid](...)``) and still runs them."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    """Every kernel of the clipping modules, counted: ``launches()`` -> {(op, kernel): count}."""
    from symgrad.compose import load_module

    counters = {}
    for op in ("grad_norm2", "grad_norm_inf", "clip_by_norm", "clip_by_value"):
        module = load_module(op, "triton")
        for name in dir(module):
            if name.startswith("_") and hasattr(getattr(module, name), "run"):  # a @triton.jit kernel
                counters[(op, name)] = _Counting(getattr(module, name))
                monkeypatch.setattr(module, name, counters[(op, name)])
    return lambda: {k: len(c.grids) for k, c in counters.items() if c.grids}


@pytest.mark.parametrize("count", [3, 12])
@pytest.mark.parametrize("norm_type", NORMS)
def test_triton_launches_do_not_grow_with_the_gradients(launches, count, norm_type):
    """Stage one is one launch, stage two one, the scale one, for 3 gradients as for 12 (of sizes
    up to 1000 entries: several programs per tensor, whose partial norms stage two combines)."""
    shapes = [(1000,), (3, 5), (130,), (1,)] * (count // 3)
    grads = _grads(9, np.float32, shapes=shapes[:count])
    ref_total, ref = _torch_clip(grads, 0.5, norm_type, torch.float32)
    ps = _torch_params(grads, torch.float32)
    total = clip.clip_grad_norm_(ps, 0.5, norm_type)
    op = "grad_norm2" if norm_type == 2.0 else "grad_norm_inf"
    assert launches() == {(op, "_multi_reduce"): 2, ("clip_by_norm", "_multi_map"): 1}
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=0)
    for p, b in zip(ps, ref):
        torch.testing.assert_close(p.grad, b, rtol=1e-6, atol=1e-7)


def test_triton_clip_value_is_one_launch(launches):
    grads = _grads(10, np.float32, scale=2.0) * 2
    ps = _torch_params(grads, torch.float32)
    clip.clip_grad_value_(ps, 0.5)
    assert launches() == {("clip_by_value", "_multi_map"): 1}
    for p, g in zip(ps, grads):
        np.testing.assert_array_equal(p.grad.numpy(), np.clip(g, -0.5, 0.5))


@pytest.mark.parametrize("norm_type", NORMS)
def test_triton_mixed_dtypes_group_as_torch_foreach(launches, norm_type):
    """bf16 and fp32 gradients: one stage-one launch and one scale launch per dtype (torch's foreach
    groups), one stage two; the total in the promoted dtype (fp32), as torch's stack of norms."""
    grads = _grads(11, np.float32, scale=2.0)
    dtypes = [torch.bfloat16 if k % 2 == 0 else torch.float32 for k in range(len(grads))]
    ps = [_torch_params([g], dt)[0] for g, dt in zip(grads, dtypes)]
    qs = [_torch_params([g], dt)[0] for g, dt in zip(grads, dtypes)]
    ref_total = torch.nn.utils.clip_grad_norm_(qs, 0.5, norm_type)
    total = clip.clip_grad_norm_(ps, 0.5, norm_type)
    op = "grad_norm2" if norm_type == 2.0 else "grad_norm_inf"
    assert launches() == {(op, "_multi_reduce"): 3, ("clip_by_norm", "_multi_map"): 2}
    assert total.dtype == ref_total.dtype == torch.float32
    # torch rounds each bf16 gradient's norm to bf16 before the norm of norms; symgrad keeps fp32
    torch.testing.assert_close(total, ref_total, rtol=1e-2, atol=0)
    scale = torch.tensor(min(1.0, 0.5 / (total.item() + 1e-6)), dtype=torch.float32)  # in float64, rounded once
    for p, q, g, dt in zip(ps, qs, grads, dtypes):
        assert p.grad.dtype == q.grad.dtype == dt
        torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=1e-2, atol=1e-6)  # torch's, to bf16
        exact = torch.tensor(g).to(dt).float() * scale  # symgrad's own total, the product in fp32
        # one bf16 ulp: Triton's interpreter rounds fp32 -> bf16 toward zero (a GPU to nearest)
        torch.testing.assert_close(p.grad, exact.to(dt), rtol=0 if dt == torch.float32 else 2**-7, atol=0)
