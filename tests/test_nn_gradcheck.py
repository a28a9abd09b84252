"""``torch.autograd.gradcheck`` on symgrad.nn.functional in float64, through the generated Triton
modules (compiled on a GPU, interpreted on the CPU): each op's analytical gradient (the derived
backward kernels) against finite differences of its own forward kernels, at tiny shapes.

float64 is what makes this possible: the Triton kernels compute in fp64 for fp64 tensors (``ACC``
in every generated kernel), so central differences at gradcheck's eps=1e-6 resolve the gradient
to its default tolerances (rtol 1e-3, atol 1e-5) where fp32 would be rounding noise.
"""
from __future__ import annotations

import pytest
import torch

import symgrad.nn.functional as SF

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F64 = dict(dtype=torch.float64, device=DEVICE)


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(DEVICE)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


LABELS = torch.tensor([1, 4, -100, 0], device=DEVICE)
CLASS_W = (torch.rand(5, generator=torch.Generator().manual_seed(9), dtype=torch.float64) + 0.5).to(DEVICE)
TARGET = torch.rand(2, 3, generator=torch.Generator().manual_seed(22), dtype=torch.float64).to(DEVICE)

# name -> (function of the differentiable inputs, inputs). The losses run with reduction='none':
# with 'mean' or 'sum' backward hands out the gradient buffer forward wrote, scaled in place, so
# it runs once per forward, and gradcheck runs backward twice on one forward (its reentrancy
# check); those reductions are compared with torch's autograd in tests/test_nn.py.
CASES = {
    "cross_entropy(weight, smoothing, ignore_index)": (
        lambda x: SF.cross_entropy(x, LABELS, CLASS_W, ignore_index=-100, label_smoothing=0.1, reduction="none"),
        (rand(4, 5, scale=2.0),)),
    "cross_entropy(z_loss, softcap)": (
        lambda x: SF.cross_entropy(x, LABELS, reduction="none", label_smoothing=0.05, z_loss=0.01, softcap=3.0),
        (rand(4, 5, seed=1, scale=2.0),)),
    "cross_entropy([N, C, d])": (
        lambda x: SF.cross_entropy(x, LABELS.reshape(2, 2), reduction="none"), (rand(2, 5, 2, seed=2),)),
    "layer_norm": (lambda x, w, b: SF.layer_norm(x, (4,), w, b, 1e-5), (rand(3, 4, seed=3), rand(4, seed=4), rand(4, seed=5))),
    "layer_norm(no affine, [2, 2] normalized)": (lambda x: SF.layer_norm(x, (2, 2)), (rand(2, 2, 2, seed=6),)),
    "rms_norm(offset)": (lambda x, w: SF.rms_norm(x, (4,), w, 1e-6, offset=1.0), (rand(3, 4, seed=7), rand(4, seed=8))),
    "linear": (lambda x, w, b: SF.linear(x, w, b), (rand(2, 3, 4, seed=10), rand(2, 4, seed=11), rand(2, seed=12))),
    "conv2d(stride 2, padding 1)": (lambda x, w, b: SF.conv2d(x, w, b, stride=2, padding=1),
                                    (rand(1, 2, 4, 4, seed=13), rand(2, 2, 3, 3, seed=14), rand(2, seed=15))),
    "gelu": (lambda x: SF.gelu(x), (rand(2, 3, seed=16, scale=2.0),)),
    "gelu(tanh)": (lambda x: SF.gelu(x, approximate="tanh"), (rand(2, 3, seed=17, scale=2.0),)),
    "silu": (lambda x: SF.silu(x), (rand(2, 3, seed=18, scale=2.0),)),
    "softmax(dim=0)": (lambda x: SF.softmax(x, dim=0), (rand(3, 2, seed=19),)),
    "log_softmax": (lambda x: SF.log_softmax(x, dim=-1), (rand(2, 4, seed=20),)),
    "binary_cross_entropy_with_logits": (
        lambda x: SF.binary_cross_entropy_with_logits(x, TARGET, reduction="none"), (rand(2, 3, seed=21, scale=2.0),)),
    "mse_loss": (lambda x: SF.mse_loss(x, TARGET, reduction="none"), (rand(2, 3, seed=23),)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradcheck(name):
    fn, inputs = CASES[name]
    inputs = tuple(leaf(t) for t in inputs)
    out = fn(*inputs)
    assert out.dtype == torch.float64, "the kernels must keep float64 (not compute in or return float32)"
    # fast mode (one random projection of the Jacobian per input, against finite differences along
    # one random direction) where the inputs hold many entries: each entry costs two interpreted
    # forward runs otherwise
    fast = sum(t.numel() for t in inputs) > 12
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)


@pytest.mark.parametrize("call", [
    lambda x, t: SF.mse_loss(x, t), lambda x, t: SF.binary_cross_entropy_with_logits(x, t),
    lambda x, t: SF.cross_entropy(x, LABELS[:2] % 3, t[0]),
])
def test_a_constant_that_requires_grad_is_refused(call):
    """A loss's targets and cross-entropy's class weights get no gradient from symgrad: one that
    requires grad is an error, never left silently without its gradient (torch differentiates
    targets, and refuses class weights that require grad)."""
    x, t = leaf(rand(2, 3, seed=30)), leaf(TARGET)
    with pytest.raises(RuntimeError, match="requires grad, but .* takes it as a constant"):
        call(x, t)
    with torch.no_grad():
        call(x, t)  # nothing is recorded: no gradient is missing
    call(x, t.detach())


def test_float64_kernels_take_float_params_as_fp64_arguments():
    """Compiled, Triton passes a Python float as an fp32 argument; a float64 launch gets a variant
    of the kernel whose float params are fp64 arguments (``_rt.float_params``), the same kernel
    for every other dtype and under the interpreter (which passes Python floats unrounded).
    `python bench/compile_report.py --dtypes float64 --sizes B=64 --ops softmax_cross_entropy`
    compiles the variants for sm_90 (their PTX takes ``.param .f64``)."""
    import inspect

    from symgrad.nn._kernels import kernel
    from symgrad.runtime import triton_support as rt

    k = kernel("softmax_cross_entropy")._for1_rows
    names = ("p_eps", "p_z_loss", "f_C")
    assert rt.float_params(k, torch.float32, names) is k and rt.float_params(k, torch.bfloat16, names) is k
    if rt.interpreting():
        assert rt.float_params(k, torch.float64, names) is k
    v = rt._fp64_variant(k, names)
    assert v.fn.__name__ == k.fn.__name__ and v is rt._fp64_variant(k, names)
    annotations = {n: p.annotation for n, p in inspect.signature(v.fn).parameters.items()}
    assert {n: annotations[n] for n in names} == {n: "fp64" for n in names}
    assert all(a is inspect.Parameter.empty or "constexpr" in str(a) for n, a in annotations.items() if n not in names)
