"""Row normalizations: layer_norm and rms_norm, with their saved row statistics.

Each comes in the forms torch's modules take: ``layer_norm`` (weight and bias), ``layer_norm_nobias``
(``LayerNorm(bias=False)``), ``layer_norm_noaffine`` (``elementwise_affine=False``); ``rms_norm``
(weight, with Gemma's ``offset``: y = xhat*(w + offset)) and ``rms_norm_noaffine``.
"""
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
ln_stats = (
    output("mean", b, sp.Sum(x[b, k], (k, 0, Ds - 1)) / Ds, B),
    output("rstd", b, (sp.Sum((x[b, k] - mean[b]) ** 2, (k, 0, Ds - 1)) / Ds + eps) ** sp.Rational(-1, 2), B),
    output("xhat", (b, i), (x[b, i] - mean[b]) * rstd[b], (B, D)),
)
# name: (doc, affine inputs, y from xhat)
LAYER_NORMS = {
    "layer_norm": ("(x - mean)/sqrt(var + eps)*w + bias along each row", (w, bias), lambda h: h * w[i] + bias[i]),
    "layer_norm_nobias": ("(x - mean)/sqrt(var + eps)*w along each row (torch's LayerNorm(bias=False))", (w,), lambda h: h * w[i]),
    "layer_norm_noaffine": ("(x - mean)/sqrt(var + eps) along each row (torch's elementwise_affine=False)", (), lambda h: h),
}
for _name, (_doc, _affine, _y) in LAYER_NORMS.items():
    register(Op(
        _name, _doc, (x, *_affine), intermediates=ln_stats,
        outputs=(output("y", (b, i), _y(xhat[b, i]), (B, D)),),
        params=(eps,), test_sizes=SIZES, tolerances=TOL,
    ))

eps = Param("eps", 1e-6, domain="(0, inf)", doc="added to the mean square; positive")
offset = Param("offset", 0.0, doc="added to the weight: y = xhat*(w + offset); Gemma uses 1 (weights stored as w - 1)")
rms_stats = (
    output("rstd", b, (sp.Sum(x[b, k] ** 2, (k, 0, Ds - 1)) / Ds + eps) ** sp.Rational(-1, 2), B),
    output("xhat", (b, i), x[b, i] * rstd[b], (B, D)),
)
register(Op(
    "rms_norm", "x/sqrt(mean(x**2) + eps)*(w + offset) along each row", (x, w), intermediates=rms_stats,
    outputs=(output("y", (b, i), xhat[b, i] * (w[i] + offset), (B, D)),),
    params=(eps, offset), test_sizes=SIZES, tolerances=TOL,
))
register(Op(
    "rms_norm_noaffine", "x/sqrt(mean(x**2) + eps) along each row (torch's RMSNorm(elementwise_affine=False))", (x,),
    intermediates=rms_stats, outputs=(output("y", (b, i), xhat[b, i], (B, D)),),
    params=(eps,), test_sizes=SIZES, tolerances=TOL,
))
