"""Gradient clipping, as torch.nn.utils computes it: the norm of each gradient, the norm of those
norms (a two-stage reduction: ``global = norm([norm(g) for g in grads])``), and the scale
``min(1, max_norm/(global + 1e-6))`` every gradient is multiplied by; and clipping by value.

Each gradient is one flat vector ``g[N]`` here: a norm does not care about shape, and the host side
(:mod:`symgrad.optim.clip`) passes every tensor as its flat view, the per-tensor norms as one more vector.
"""
import sympy as sp

from ..declare import Dim, Op, Param, Role, Tensor, output, register, idx
from ..functions import ReduceMax

n, = idx("n")
N = Dim("N", "n")
Ns = N.size
g = Tensor("g", (N,))
SIZES = ({"N": 1}, {"N": 7}, {"N": 41})
TOL = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)}

register(Op(
    "grad_norm2", "L2 norm of a flat gradient: sqrt(sum(g**2)) (torch.linalg.vector_norm, ord 2)",
    (g,), (output("norm", (), sp.sqrt(sp.Sum(g[n] ** 2, (n, 0, Ns - 1))), ()),),
    test_sizes=SIZES, tolerances=TOL,
))
# The max norm is a row reduction (the host passes a gradient as one row, shape (1, N)): a max's
# gradient splits among tied entries, a count both targets lower per row. torch's
# vector_norm(ord=inf) refuses an empty tensor, so a row needs one entry.
r, = idx("r")
R = Dim("R", "r", leading=True)
g1 = Tensor("g", (R, Dim("N", "n", min_size=1)))
register(Op(
    "grad_norm_inf", "max-abs norm of each row of gradients: max(|g|) (torch.linalg.vector_norm, ord inf)",
    (g1,), (output("norm", r, ReduceMax(sp.Abs(g1[r, n]), n, 0, Ns - 1), R),),
    test_sizes=({"R": 1, "N": 1}, {"R": 1, "N": 7}, {"R": 2, "N": 41}), tolerances=TOL,
))

total = Tensor("total_norm", (), Role.CONST, domain=(0.5, 4.0))
max_norm = Param("max_norm", 1.0, doc="the largest norm the gradients keep", domain="[0, inf)")
register(Op(
    "clip_by_norm",
    "g*min(1, max_norm/(total_norm + 1e-6)): the scale of torch.nn.utils.clip_grad_norm_ "
    "(NaN where total_norm is NaN, 0 where it is inf)",
    (g, total), (output("out", n, g[n] * sp.Min(1, max_norm / (total[()] + sp.Float("1e-6"))), N),),
    params=(max_norm,), test_sizes=SIZES, tolerances=TOL,
))

clip_value = Param("clip_value", 1.0, doc="gradients are clamped to [-clip_value, clip_value]", domain="[0, inf)")
register(Op(
    "clip_by_value", "clamp(g, -clip_value, clip_value) (torch.nn.utils.clip_grad_value_)",
    (g,), (output("out", n, sp.Min(sp.Max(g[n], -clip_value), clip_value), N),),
    params=(clip_value,), test_sizes=SIZES, tolerances=TOL,
))
