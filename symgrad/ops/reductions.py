"""Row reductions: out[b] = reduce over i of x[b, i]."""
import sympy as sp

from ..declare import Dim, Op, Tensor, output, register, idx
from ..functions import ReduceMax
from .dims import C, ROWS as B  # rows: any number of leading axes, as torch takes [*, C]

b, k = idx("b k")
Cs = C.size
x = Tensor("x", (B, C))
SIZES = ({"B": 1, "C": 1}, {"B": 3, "C": 5}, {"B": 2, "C": 41})
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 2e-2)}

register(Op("sum", "sum of each row", (x,), (output("out", b, sp.Sum(x[b, k], (k, 0, Cs - 1)), B),), test_sizes=SIZES, tolerances=TOL))
register(Op("mean", "mean of each row", (x,), (output("out", b, sp.Sum(x[b, k], (k, 0, Cs - 1)) / Cs, B),), test_sizes=SIZES, tolerances=TOL))
x_rows = Tensor("x", (B, Dim(C.name, C.index, min_size=1)))  # as torch.amax: no max of an empty row
register(Op(
    "max",
    "maximum of each row; ties split the gradient evenly among the maxima (as torch.amax does)",
    (x_rows,), (output("out", b, ReduceMax(x_rows[b, k], k, 0, Cs - 1), B),), test_sizes=SIZES, tolerances=TOL,
))
