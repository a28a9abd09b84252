"""Row normalizations: layer_norm and rms_norm, with their saved row statistics."""
import sympy as sp

from ..declare import Op, Param, Tensor, output, register, idx
from .dims import D, ROWS as B  # rows: any number of leading axes, as torch takes [*, D]

b, i, k = idx("b i k")
Ds = D.size
x, w, bias = Tensor("x", (B, D)), Tensor("w", (D,), domain=(0.5, 1.5)), Tensor("bias", (D,))
mean, rstd, xhat = (sp.IndexedBase(n, real=True) for n in ("mean", "rstd", "xhat"))
SIZES = ({"B": 1, "D": 2}, {"B": 3, "D": 5}, {"B": 2, "D": 41})
TOL = {"float32": (1e-4, 1e-5), "bfloat16": (3e-2, 3e-2)}

eps = Param("eps", 1e-5, domain="(0, inf)", doc="added to the variance; positive")
register(Op(
    "layer_norm", "(x - mean)/sqrt(var + eps)*w + bias along each row", (x, w, bias),
    intermediates=(
        output("mean", b, sp.Sum(x[b, k], (k, 0, Ds - 1)) / Ds, B),
        output("rstd", b, (sp.Sum((x[b, k] - mean[b]) ** 2, (k, 0, Ds - 1)) / Ds + eps) ** sp.Rational(-1, 2), B),
        output("xhat", (b, i), (x[b, i] - mean[b]) * rstd[b], (B, D)),
    ),
    outputs=(output("y", (b, i), xhat[b, i] * w[i] + bias[i], (B, D)),),
    params=(eps,), test_sizes=SIZES, tolerances=TOL,
))
eps = Param("eps", 1e-6, domain="(0, inf)", doc="added to the mean square; positive")
register(Op(
    "rms_norm", "x/sqrt(mean(x**2) + eps)*w along each row", (x, w),
    intermediates=(
        output("rstd", b, (sp.Sum(x[b, k] ** 2, (k, 0, Ds - 1)) / Ds + eps) ** sp.Rational(-1, 2), B),
        output("xhat", (b, i), x[b, i] * rstd[b], (B, D)),
    ),
    outputs=(output("y", (b, i), xhat[b, i] * w[i], (B, D)),),
    params=(eps,), test_sizes=SIZES, tolerances=TOL,
))
