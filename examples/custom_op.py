"""Declare your own op in one block, derive its gradient, and print the derivation.

    python examples/custom_op.py

The op is the Huber loss, averaged over a batch of B rows of F features:

    r = pred - target,  loss = mean of  r**2/2            where |r| <= delta
                                        delta*(|r| - delta/2)  elsewhere

Everything symgrad needs is in the ``register(Op(...))`` block: the inputs with their (symbolic)
dimensions and roles, the scalar param ``delta`` with its default, and the forward expression in
index notation. Sizes never appear: ``B`` and ``F`` are symbols, so deriving costs the same for a
batch of 2 or of 2 million. The gradient comes out as ``clip(r, -delta, delta)/(B*F)``, written with
Iverson brackets ``[cond]`` (1 where cond holds, else 0).
"""
import sympy as sp

from symgrad.declare import Dim, Op, Param, Role, Tensor, idx, output, register
from symgrad.derive import derive
from symgrad.functions import Iverson
from symgrad.ops.dims import B  # the library's batch dim; F is our own
from symgrad.render import derivation_text

# --- the declaration: one block ----------------------------------------------------------------
F = Dim("F", "f")  # a feature dim; gradients index it with f
b, f = idx("b f")
delta = Param("delta", 1.0, domain="(0, inf)", doc="where the loss turns from quadratic to linear")  # used in the formula as it is
pred, target = Tensor("pred", (B, F)), Tensor("target", (B, F), Role.CONST, domain=(-2.0, 2.0))
r = pred[b, f] - target[b, f]
huber = register(Op(
    name="huber",
    doc="mean Huber loss of pred against target: quadratic within delta, linear beyond",
    inputs=(pred, target),
    params=(delta,),
    outputs=(output(
        "loss", (),
        sp.Sum(Iverson(sp.Abs(r) <= delta) * r**2 / 2 + Iverson(sp.Abs(r) > delta) * delta * (sp.Abs(r) - delta / 2),
               (b, 0, B.size - 1), (f, 0, F.size - 1)) / (B.size * F.size),
        (),
    ),),
    test_sizes=({"B": 3, "F": 5},),
))
# -------------------------------------------------------------------------------------------------

d = derive(huber)
grad = d.gradients["pred"]
print(f"derived in {d.seconds * 1e3:.0f} ms\n")
print(f"{grad.target} = {grad.expr}\n")

# The whole derivation, as `symgrad derive OP --steps` prints it for a built-in op.
print(derivation_text(d, steps=True))

# A spot check at one entry: r = 0.3 lies inside delta = 1 (gradient r/(B*F)), r = -2.5 outside
# (gradient -delta/(B*F)).
P, T = sp.IndexedBase("pred", real=True), sp.IndexedBase("target", real=True)
bi, fi = grad.indices
for p_val, t_val, want in ((0.8, 0.5, 0.3), (-1.5, 1.0, -1.0)):
    value = grad.expr.subs({sp.Symbol("dloss", real=True): 1, B.symbol: 1, F.symbol: 1, delta.symbol: 1})
    value = value.subs({P[bi, fi]: p_val, T[bi, fi]: t_val})
    print(f"pred = {p_val}, target = {t_val}:  dpred = {float(value):+.3f}  (expected {want:+.3f})")
    assert abs(float(value) - want) < 1e-12
