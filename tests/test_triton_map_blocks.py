"""Map kernels across block boundaries: whole blocks (the unmasked, flat-addressed path) and the
partial tail block, for contiguous and transposed inputs, against torch. The other Triton tests'
shapes fit one block under the interpreter, so only the tail path would run there."""
from __future__ import annotations

import importlib

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
F = torch.nn.functional

CASES = {
    "silu": (lambda x: F.silu(x), 1),
    "gelu": (lambda x: F.gelu(x), 1),
    "swiglu": (lambda a, g: F.silu(a) * g, 2),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("transposed", [False, True])
def test_map_full_blocks_and_tail(name, transposed):
    mod = importlib.import_module(f"generated.triton.{name}")
    ref, n_in = CASES[name]
    g = torch.Generator().manual_seed(1)
    shape = (37, 61)  # 2257 elements: two whole blocks of 1024 and a tail of 209, odd width
    xs = []
    for _ in range(n_in):
        x = torch.randn(shape[::-1], generator=g).t() if transposed else torch.randn(shape, generator=g)
        xs.append(x)
    out, saved = mod.forward_with_saved(*xs)
    dout = torch.randn(shape, generator=g)
    grads = mod.backward(saved, dout)
    leaves = [x.clone().requires_grad_() for x in xs]
    want = ref(*leaves)
    want.backward(dout)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-6)
