"""2-D convolution (cross-correlation, as in PyTorch) with stride and zero padding.

Y[n, o, h, w] = sum over c, r, s of X[n, c, h*stride + r - pad, w*stride + s - pad] * Wt[o, c, r, s];
reads of X outside its extent are the zero padding.
"""
import sympy as sp

from ..declare import Dim, Op, Param, Tensor, output, register, idx

stride = Param("stride", 1, integer=True, domain="[1, inf)", doc="as torch: a non-positive stride is refused")
pad = Param("pad", 0, integer=True, domain="[0, inf)", doc="zero padding on each side; as torch, not negative")
# As torch: a batch (N) or input channels (Cin) may be empty; output channels and the kernel may
# not; nor may the input's height and width, unless the batch or the channels are empty too
# (torch: "Only zero batch or zero channel inputs are supported").
Nb, Ci, Co = Dim("N", "n"), Dim("Cin", "c"), Dim("Cout", "o", min_size=1)
H, Wd = Dim("H", "h", min_size=1, empty_with=("N", "Cin")), Dim("W", "w", min_size=1, empty_with=("N", "Cin"))
R, S = Dim("R", "r", min_size=1), Dim("S", "s", min_size=1)
Ho = Dim("Ho", "h", sp.floor((H.symbol + 2 * pad - R.symbol) / stride) + 1)
Wo = Dim("Wo", "w", sp.floor((Wd.symbol + 2 * pad - S.symbol) / stride) + 1)

n, o, h, w, c, r, s = idx("n o h w c r s")
X, Wt = Tensor("X", (Nb, Ci, H, Wd)), Tensor("Wt", (Co, Ci, R, S))
body = X[n, c, h * stride + r - pad, w * stride + s - pad] * Wt[o, c, r, s]

register(Op(
    "conv2d", "2-D cross-correlation of X with filters Wt, with stride and zero padding", (X, Wt),
    (output("Y", (n, o, h, w), sp.Sum(body, (c, 0, Ci.size - 1), (r, 0, R.size - 1), (s, 0, S.size - 1)), (Nb, Co, Ho, Wo)),),
    params=(stride, pad),
    test_sizes=(
        {"N": 1, "Cin": 1, "Cout": 1, "H": 3, "W": 3, "R": 1, "S": 1, "stride": 1, "pad": 0},
        {"N": 2, "Cin": 3, "Cout": 2, "H": 5, "W": 6, "R": 3, "S": 3, "stride": 1, "pad": 1},
        {"N": 1, "Cin": 2, "Cout": 3, "H": 7, "W": 5, "R": 3, "S": 2, "stride": 2, "pad": 1},
    ),
    tolerances={"float32": (1e-4, 1e-5), "bfloat16": (3e-2, 3e-2)},
))
