"""Hard swish, as ``torch.nn.functional.hardswish``: x * min(max(x + 3, 0), 6) / 6, written with
``sp.Min`` and ``sp.Max``."""
import sympy as sp

from symgrad.declare import Dim, Op, Tensor, idx, output, register

N, D = Dim("N", "n"), Dim("D", "d")
n, d = idx("n d")
x = Tensor("x", (N, D), domain=(-5.0, 5.0))

hardswish = register(Op(
    name="hardswish",
    doc="x*min(max(x + 3, 0), 6)/6 (F.hardswish)",
    inputs=(x,),
    outputs=(output("out", (n, d), x[n, d] * sp.Min(sp.Max(x[n, d] + 3, 0), 6) / 6, (N, D)),),
    test_sizes=({"N": 1, "D": 1}, {"N": 3, "D": 5}, {"N": 2, "D": 41}),
    tolerances={"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)},
))
