"""softmax and log_softmax along rows; p is the softmax a person writes gradients with."""
import sympy as sp

from ..declare import Op, Tensor, output, register, idx
from .dims import C, ROWS as B  # rows: any number of leading axes, as torch takes [*, C]

b, i, k = idx("b i k")
Cs = C.size
x = Tensor("x", (B, C), domain=(-4.0, 4.0))
SIZES = ({"B": 1, "C": 1}, {"B": 3, "C": 5}, {"B": 2, "C": 41})
TOL = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)}
row_sum = sp.Sum(sp.exp(x[b, k]), (k, 0, Cs - 1))

register(Op("softmax", "exp(x)/sum(exp(x)) along each row", (x,),
            (output("p", (b, i), sp.exp(x[b, i]) / row_sum, (B, C)),), test_sizes=SIZES, tolerances=TOL))

register(Op(
    "log_softmax", "x - log(sum(exp(x))) along each row", (x,),
    # The gradient's softmax comes back as exp(out), read from the saved output.
    outputs=(output("out", (b, i), x[b, i] - sp.log(row_sum), (B, C)),),
    test_sizes=SIZES, tolerances=TOL,
))
