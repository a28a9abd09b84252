"""Contractions: matmul Y = X W and the linear layer Y = X W + bias."""
import sympy as sp

from ..declare import Op, Tensor, output, register, idx
from .dims import K, N, ROWS as B  # rows: any number of leading axes, as F.linear takes [*, K]

b, j, k = idx("b j k")
X, W, bias = Tensor("X", (B, K)), Tensor("W", (K, N)), Tensor("bias", (N,))
SIZES = ({"B": 1, "K": 1, "N": 1}, {"B": 3, "K": 5, "N": 4}, {"B": 2, "K": 41, "N": 3})
TOL = {"float32": (1e-4, 1e-5), "bfloat16": (3e-2, 3e-2)}
XW = sp.Sum(X[b, k] * W[k, j], (k, 0, K.size - 1))

register(Op("matmul", "Y = X W", (X, W), (output("Y", (b, j), XW, (B, N)),), test_sizes=SIZES, tolerances=TOL))
register(Op("linear", "Y = X W + bias", (X, W, bias), (output("Y", (b, j), XW + bias[j], (B, N)),), test_sizes=SIZES, tolerances=TOL))
