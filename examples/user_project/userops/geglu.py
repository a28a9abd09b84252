"""GEGLU's gated unit: gelu(a) * g, with the exact (erf) GELU, gelu(a) = a*(1 + erf(a/sqrt(2)))/2."""
import sympy as sp

from symgrad.declare import Dim, Op, Tensor, idx, output, register

N, D = Dim("N", "n"), Dim("D", "d")
n, d = idx("n d")
a, g = Tensor("a", (N, D), domain=(-4.0, 4.0)), Tensor("g", (N, D), domain=(-2.0, 2.0))

geglu = register(Op(
    name="geglu",
    doc="gelu(a)*g with the exact erf GELU, the gated unit of GEGLU feed-forward layers",
    inputs=(a, g),
    outputs=(output("out", (n, d), a[n, d] * (1 + sp.erf(a[n, d] / sp.sqrt(2))) / 2 * g[n, d], (N, D)),),
    test_sizes=({"N": 1, "D": 1}, {"N": 3, "D": 5}, {"N": 2, "D": 41}),
    tolerances={"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)},
))
