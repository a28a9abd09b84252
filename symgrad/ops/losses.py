"""Losses: mean squared error, sigmoid + binary cross-entropy, softmax + cross-entropy."""
import sympy as sp

from ..declare import LabelRange, Op, Param, Role, Tensor, output, register, idx
from ..functions import Iverson, onehot, sigmoid
from .dims import B, C

b, i, k = idx("b i k")
Bs, Cs = B.size, C.size
SIZES = ({"B": 1, "C": 1}, {"B": 3, "C": 5}, {"B": 4, "C": 41})
TOL = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)}


def total(expr):
    return sp.Sum(expr, (b, 0, Bs - 1), (i, 0, Cs - 1))


X, Y = Tensor("X", (B, C)), Tensor("Y", (B, C), Role.CONST)
sq = (X[b, i] - Y[b, i]) ** 2
register(Op("mse", "sum((X - Y)**2)/2, whose gradient is X - Y", (X, Y),
            (output("loss", (), total(sq) / 2, ()),), test_sizes=SIZES, tolerances=TOL))
# torch's MSELoss(reduction=...): mean, sum, none (elementwise)
register(Op("mse_mean", "mean((X - Y)**2) over all B*C entries (MSELoss())", (X, Y),
            (output("loss", (), total(sq) / (Bs * Cs), ()),), test_sizes=SIZES, tolerances=TOL))
register(Op("mse_sum", "sum((X - Y)**2) over all entries (MSELoss(reduction='sum'))", (X, Y),
            (output("loss", (), total(sq), ()),), test_sizes=SIZES, tolerances=TOL))
register(Op("mse_none", "(X - Y)**2 elementwise (MSELoss(reduction='none'))", (X, Y),
            (output("loss", (b, i), sq, (B, C)),), test_sizes=SIZES, tolerances=TOL))

x, y = Tensor("x", (B, C), domain=(-4.0, 4.0)), Tensor("y", (B, C), Role.CONST, domain=(0.0, 1.0))
s = sigmoid(x[b, i])
bce = -(y[b, i] * sp.log(s) + (1 - y[b, i]) * sp.log(1 - s))
# torch's BCEWithLogitsLoss(reduction=...): mean, sum, none (elementwise)
register(Op(
    "sigmoid_bce", "binary cross-entropy of sigmoid(x) against targets y in [0, 1], averaged over all N = B*C entries",
    (x, y), (output("loss", (), total(bce) / (Bs * Cs), ()),), test_sizes=SIZES, tolerances=TOL,
))
register(Op(
    "sigmoid_bce_sum", "binary cross-entropy of sigmoid(x) against targets y in [0, 1], summed over all entries",
    (x, y), (output("loss", (), total(bce), ()),), test_sizes=SIZES, tolerances=TOL,
))
register(Op(
    "sigmoid_bce_none", "binary cross-entropy of sigmoid(x) against targets y in [0, 1], elementwise",
    (x, y), (output("loss", (b, i), bce, (B, C)),), test_sizes=SIZES, tolerances=TOL,
))

# softmax + cross-entropy over integer labels, as F.cross_entropy, declared as a small family (one
# block, looped): class weights (torch's weight[C]), logit softcapping (Gemma's softcap*tanh(x/softcap),
# a variant because softcap = 0 cannot switch it off inside the formula), and the reduction
# (mean | sum | none). Every member takes label smoothing eps, ignore_index and z_loss (Liger's
# lse_square_scale: z_loss*lse**2 added per counted row; 0 switches it off).
#   row loss  l[b] = valid[b]*Sum_i weight[i]*t[b, i]*(lse[b] - z[b, i]),  t = (1 - eps)*onehot(y[b], i) + eps/C
#   mean      Sum_b l[b]/Sum_b valid[b]*weight[y[b]] + z_loss*Sum_b valid[b]*lse[b]**2/n_valid
#             (torch's weighted mean: divided by the summed weights of the counted rows' labels,
#             smoothing term included; z-loss averages over the counted rows, as Liger's)
#   sum       Sum_b l[b] + z_loss*Sum_b valid[b]*lse[b]**2
#   none      l[b] + z_loss*valid[b]*lse[b]**2  per row: 0 for ignored rows, as torch
# classes may be empty, as torch's: then every row's label must be ignore_index (the label check
# refuses any other as out of bounds, as torch does), and the mean over no counted rows is NaN
logits, labels = Tensor("x", (B, C), domain=(-4.0, 4.0)), Tensor("y", (B,), Role.LABEL)
class_weight = Tensor("weight", (C,), Role.CONST, domain=(0.2, 2.0))
eps = Param("eps", 0.0, doc="label smoothing", domain="[0, 1]")  # torch: label_smoothing in [0.0, 1.0]
ignore = Param("ignore_index", -100, integer=True, doc="label of rows to skip", domain="finite")  # any integer
z_loss = Param("z_loss", 0.0, doc="z-loss scale: z_loss*lse**2 added per counted row (Liger's lse_square_scale)", domain="finite")
softcap = Param("softcap", 30.0, doc="logit softcapping: x becomes softcap*tanh(x/softcap)", domain="(0, inf)")
valid = Iverson(sp.Ne(labels[b], ignore))
z, lse, w, wy = (sp.IndexedBase(n, real=True) for n in ("z", "lse", "w", "wy"))
count, wsum = sp.Symbol("n_valid", real=True), sp.Symbol("w_sum", real=True)
target = (1 - eps) * onehot(labels[b], i) + eps / Cs


def _cross_entropy(name, weighted, capped, reduction):
    inputs = (logits, labels) + ((class_weight,) if weighted else ())
    logit = z[b, i] if capped else logits[b, i]
    at = (lambda e: e.subs(i, k))  # the same logit at the summed index
    cap = (output("z", (b, i), softcap * sp.tanh(logits[b, i] / softcap), (B, C)),) if capped else ()
    wt = class_weight[i] if weighted else 1
    mids = cap + (
        output("lse", b, sp.log(sp.Sum(sp.exp(at(logit)), (k, 0, Cs - 1))), B),
        output("p", (b, i), sp.exp(logit - lse[b]), (B, C)),
        output("w", b, valid, B),
    )
    if weighted:  # the smoothed target's total weight, a value of its own so the fused gradient reads it
        mids += (output("weight_total", (), sp.Sum(class_weight[k], (k, 0, Cs - 1)), ()),)
    row = w[b] * sp.Sum(wt * target * (lse[b] - logit), (i, 0, Cs - 1))
    zrow = z_loss * w[b] * lse[b] ** 2
    if reduction == "none":
        out = output("loss", b, row + zrow, B)
    else:
        rows, zrows = sp.Sum(row, (b, 0, Bs - 1)), sp.Sum(zrow, (b, 0, Bs - 1))
        if reduction == "mean":
            mids += (output("n_valid", (), sp.Sum(w[b], (b, 0, Bs - 1)), ()),)
            if weighted:
                mids += (output("w_sum", (), sp.Sum(w[b] * class_weight[labels[b]], (b, 0, Bs - 1)), ()),)
                rows, zrows = rows / wsum, zrows / count
            else:
                rows, zrows = rows / count, zrows / count
        out = output("loss", (), rows + zrows, ())
    what = {"mean": "mean over counted rows", "sum": "sum over rows", "none": "per row (0 for ignored rows)"}[reduction]
    doc = (f"{what} of -sum(t*log_softmax(x)){', class-weighted as torch' if weighted else ''}"
           f"{', of softcapped logits softcap*tanh(x/softcap)' if capped else ''}, plus z_loss*lse**2; t the label-smoothed one-hot of y")
    register(Op(
        name, doc, inputs, intermediates=mids, outputs=(out,),
        params=(eps, ignore, z_loss) + ((softcap,) if capped else ()),
        facts=(LabelRange("y", C, ignore="ignore_index"),), test_sizes=SIZES, tolerances=TOL,
    ))


for _weighted in (False, True):
    for _capped in (False, True):
        for _reduction in ("mean", "sum", "none"):
            _name = "softmax_cross_entropy" + "_weighted" * _weighted + "_softcap" * _capped + ("" if _reduction == "mean" else f"_{_reduction}")
            _cross_entropy(_name, _weighted, _capped, _reduction)


# The z-loss term of the family above, alone, per row: PaLM's auxiliary loss z_loss*lse**2 of each
# counted row (0 for ignored rows), of the softcapped logits in the softcap variant. Liger's
# return_z_loss reports it beside the loss that includes it (symgrad.nn's cross_entropy(...,
# return_z_loss=True) sums these rows as the loss's reduction does: mean over the counted rows, class
# weights or not); as an op of its own it is also a differentiable loss term.
z_scale = Param("z_loss", 1e-4, doc="z-loss scale (Liger's lse_square_scale; PaLM's 1e-4)", domain="finite")


def _z_loss(name, capped):
    logit = z[b, i] if capped else logits[b, i]
    cap = (output("z", (b, i), softcap * sp.tanh(logits[b, i] / softcap), (B, C)),) if capped else ()
    mids = cap + (output("lse", b, sp.log(sp.Sum(sp.exp(logit.subs(i, k)), (k, 0, Cs - 1))), B), output("w", b, valid, B))
    register(Op(
        name, f"z_loss*lse**2 per row (0 for ignored rows), lse the logsumexp of the{' softcapped' if capped else ''} "
              "logits: the z-loss term of softmax_cross_entropy",
        (logits, labels), intermediates=mids, outputs=(output("loss", b, z_scale * w[b] * lse[b] ** 2, B),),
        params=(ignore, z_scale) + ((softcap,) if capped else ()),
        facts=(LabelRange("y", C, ignore="ignore_index"),), test_sizes=SIZES, tolerances=TOL,
    ))


_z_loss("softmax_z_loss_none", False)
_z_loss("softmax_z_loss_softcap_none", True)
