"""Contractions: matmul Y = X W (W[K, N]) and torch's linear Y = X Wᵀ + bias (W[N, K]).

The two take their weight in different layouts on purpose: ``matmul`` is the algebra's X W,
``linear`` follows ``F.linear`` and ``nn.Linear.weight``, whose weight is ``[out, in]``.
"""
import sympy as sp

from ..declare import Op, Tensor, output, register, idx
from .dims import K, N, ROWS as B  # rows: any number of leading axes, as F.linear takes [*, K]

b, j, k = idx("b j k")
X, bias = Tensor("X", (B, K)), Tensor("bias", (N,))
W_kn, W_nk = Tensor("W", (K, N)), Tensor("W", (N, K))
SIZES = ({"B": 1, "K": 1, "N": 1}, {"B": 3, "K": 5, "N": 4}, {"B": 2, "K": 41, "N": 3})
TOL = {"float32": (1e-4, 1e-5), "bfloat16": (3e-2, 3e-2)}
XW = sp.Sum(X[b, k] * W_kn[k, j], (k, 0, K.size - 1))
XWt = sp.Sum(X[b, k] * W_nk[j, k], (k, 0, K.size - 1))

register(Op("matmul", "Y = X W with W[K, N] (not torch's linear layout: see linear)", (X, W_kn),
            (output("Y", (b, j), XW, (B, N)),), test_sizes=SIZES, tolerances=TOL))
register(Op("linear", "Y = X Wᵀ + bias with W[N, K] = [out, in], as F.linear and nn.Linear.weight", (X, W_nk, bias),
            (output("Y", (b, j), XWt + bias[j], (B, N)),), test_sizes=SIZES, tolerances=TOL))
register(Op("linear_nobias", "Y = X Wᵀ with W[N, K] = [out, in], as F.linear(X, W) (nn.Linear(bias=False))", (X, W_nk),
            (output("Y", (b, j), XWt, (B, N)),), test_sizes=SIZES, tolerances=TOL))
