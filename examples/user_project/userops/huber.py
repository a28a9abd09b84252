"""Huber loss, as ``torch.nn.functional.huber_loss(pred, target, reduction="mean", delta=delta)``:
the mean over all entries of r**2/2 where |r| < delta, else delta*(|r| - delta/2), with r = pred - target.
Written with ``sp.Abs``; the gradient comes out as clip(r, -delta, delta)/(N*D)."""
import sympy as sp

from symgrad.declare import Dim, Op, Param, Role, Tensor, idx, output, register
from symgrad.functions import Iverson

N, D = Dim("N", "n"), Dim("D", "d")
n, d = idx("n d")
delta_param = Param("delta", 1.0, doc="where the loss turns from quadratic to linear", domain="(0, inf)")
delta = delta_param.symbol
pred, target = Tensor("pred", (N, D), domain=(-3.0, 3.0)), Tensor("target", (N, D), Role.CONST, domain=(-3.0, 3.0))
r = pred[n, d] - target[n, d]

huber = register(Op(
    name="huber",
    doc="mean Huber loss of pred against target (F.huber_loss, reduction='mean')",
    inputs=(pred, target),
    params=(delta_param,),
    outputs=(output(
        "loss", (),
        sp.Sum(Iverson(sp.Abs(r) < delta) * r**2 / 2 + Iverson(sp.Abs(r) >= delta) * delta * (sp.Abs(r) - delta / 2),
               (n, 0, N.size - 1), (d, 0, D.size - 1)) / (N.size * D.size),
        (),
    ),),
    test_sizes=({"N": 1, "D": 1}, {"N": 3, "D": 5}, {"N": 2, "D": 41}),
    tolerances={"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)},
))
