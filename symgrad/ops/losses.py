"""Losses: mean squared error, sigmoid + binary cross-entropy, softmax + cross-entropy."""
import sympy as sp

from ..declare import Dim, LabelRange, Op, Param, Role, Tensor, output, register, idx
from ..functions import Iverson, onehot, sigmoid
from .dims import B, C

b, i, k = idx("b i k")
Bs, Cs = B.size, C.size
SIZES = ({"B": 1, "C": 1}, {"B": 3, "C": 5}, {"B": 4, "C": 41})
TOL = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)}


def total(expr):
    return sp.Sum(expr, (b, 0, Bs - 1), (i, 0, Cs - 1))


X, Y = Tensor("X", (B, C)), Tensor("Y", (B, C), Role.CONST)
register(Op("mse", "sum((X - Y)**2)/2, whose gradient is X - Y", (X, Y),
            (output("loss", (), total((X[b, i] - Y[b, i]) ** 2) / 2, ()),), test_sizes=SIZES, tolerances=TOL))
register(Op("mse_mean", "mean((X - Y)**2) over all B*C entries", (X, Y),
            (output("loss", (), total((X[b, i] - Y[b, i]) ** 2) / (Bs * Cs), ()),), test_sizes=SIZES, tolerances=TOL))

x, y = Tensor("x", (B, C), domain=(-4.0, 4.0)), Tensor("y", (B, C), Role.CONST, domain=(0.0, 1.0))
s = sigmoid(x[b, i])
register(Op(
    "sigmoid_bce", "binary cross-entropy of sigmoid(x) against targets y in [0, 1], averaged over all N = B*C entries",
    (x, y), (output("loss", (), -total(y[b, i] * sp.log(s) + (1 - y[b, i]) * sp.log(1 - s)) / (Bs * Cs), ()),),
    test_sizes=SIZES, tolerances=TOL,
))

# softmax + cross-entropy over integer labels, with ignore_index and label smoothing eps:
# target t[b, i] = (1 - eps)*onehot(y[b], i) + eps/C; rows whose label is ignore_index weigh 0,
# and the loss is averaged over the rows that count.
# classes may not be empty (min_size=1): with rows, torch refuses every label as out of bounds
logits, labels = Tensor("x", (B, Dim(C.name, C.index, min_size=1)), domain=(-4.0, 4.0)), Tensor("y", (B,), Role.LABEL)
eps = Param("eps", 0.0, doc="label smoothing", domain="[0, 1]")  # torch: label_smoothing in [0.0, 1.0]
ignore = Param("ignore_index", -100, integer=True, doc="label of rows to skip", domain="finite")  # any integer
valid = Iverson(sp.Ne(labels[b], ignore))
lse = sp.IndexedBase("lse", real=True)
w = sp.IndexedBase("w", real=True)
count = sp.Symbol("n_valid", real=True)
target = (1 - eps) * onehot(labels[b], i) + eps / Cs
register(Op(
    "softmax_cross_entropy",
    "mean over counted rows of -sum(t*log_softmax(x)), t the label-smoothed one-hot of y",
    (logits, labels),
    intermediates=(
        output("lse", b, sp.log(sp.Sum(sp.exp(logits[b, k]), (k, 0, Cs - 1))), B),
        output("p", (b, i), sp.exp(logits[b, i] - lse[b]), (B, C)),
        output("w", b, valid, B),
        output("n_valid", (), sp.Sum(w[b], (b, 0, Bs - 1)), ()),
    ),
    outputs=(output("loss", (), sp.Sum(w[b] * sp.Sum(target * (lse[b] - logits[b, i]), (i, 0, Cs - 1)), (b, 0, Bs - 1)) / count, ()),),
    params=(eps, ignore),
    facts=(LabelRange("y", C),),
    test_sizes=SIZES, tolerances=TOL,
))
