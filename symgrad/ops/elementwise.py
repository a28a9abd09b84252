"""Binary elementwise ops and the bias add: out[b, i] = f(p[b, i], q[b, i])."""
from ..declare import Op, Tensor, output, register, idx
from ..functions import sigmoid
from .dims import C, ROWS as B  # rows: any number of leading axes, as torch takes [*, C]

b, i = idx("b i")
SIZES = ({"B": 1, "C": 1}, {"B": 3, "C": 5}, {"B": 2, "C": 41})
TOL = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)}

p, q = Tensor("p", (B, C)), Tensor("q", (B, C))
a, g = Tensor("a", (B, C), domain=(-4.0, 4.0)), Tensor("g", (B, C))
x, bias = Tensor("x", (B, C)), Tensor("bias", (C,))

register(Op("mul", "p*q, elementwise", (p, q), (output("out", (b, i), p[b, i] * q[b, i], (B, C)),), test_sizes=SIZES, tolerances=TOL))
register(Op("add", "p + q, elementwise", (p, q), (output("out", (b, i), p[b, i] + q[b, i], (B, C)),), test_sizes=SIZES, tolerances=TOL))
register(Op("bias_add", "x + bias, the bias broadcast over rows", (x, bias),
            (output("out", (b, i), x[b, i] + bias[i], (B, C)),), test_sizes=SIZES, tolerances=TOL))
register(Op("swiglu", "silu(a)*g, the gated unit of SwiGLU feed-forward layers", (a, g),
            (output("out", (b, i), a[b, i] * sigmoid(a[b, i]) * g[b, i], (B, C)),), test_sizes=SIZES, tolerances=TOL))
