"""Elementwise activations: out[b, i] = f(x[b, i]). A new one is one line in the table."""
import sympy as sp

from ..declare import Op, Param, Tensor, output, register, idx
from ..functions import Iverson, relu, sigmoid, softplus
from .dims import C, ROWS as B  # rows: any number of leading axes, as torch takes [*, C]

b, i = idx("b i")
_x = sp.IndexedBase("x", real=True)[b, i]
alpha, k = Param("alpha", 0.01, domain="finite"), Param("k", 3.0, domain="finite")  # params are the symbols their formulas use

# name: (forward of z, params, sampling domain of x, doc)
TABLE = {
    "relu": (relu, (), (-2.0, 2.0), "max(x, 0); gradient 0 at x = 0"),
    "leaky_relu": (lambda z: z * Iverson(z > 0) + alpha * z * Iverson(z <= 0), (alpha,), (-2.0, 2.0), "x if x > 0 else alpha*x"),
    "sigmoid": (sigmoid, (), (-4.0, 4.0), "1/(1 + exp(-x))"),
    "tanh": (sp.tanh, (), (-3.0, 3.0), "hyperbolic tangent"),
    "exp": (sp.exp, (), (-2.0, 2.0), "exp(x)"),
    "log": (sp.log, (), (0.2, 3.0), "natural log, for x > 0"),
    "power": (lambda z: z**k, (k,), (0.2, 3.0), "x**k, for x > 0"),
    "softplus": (softplus, (), (-4.0, 4.0), "log(1 + exp(x)), computed without overflow"),
    "silu": (lambda z: z * sigmoid(z), (), (-4.0, 4.0), "x*sigmoid(x)"),
    "gelu": (lambda z: z * (1 + sp.erf(z / sp.sqrt(2))) / 2, (), (-4.0, 4.0), "x*Phi(x), the exact GELU"),
    "gelu_tanh": (
        lambda z: z * (1 + sp.tanh(sp.sqrt(2 / sp.pi) * (z + sp.Float("0.044715") * z**3))) / 2,
        (), (-4.0, 4.0), "the tanh approximation of GELU",
    ),
}

SIZES = ({"B": 1, "C": 1}, {"B": 3, "C": 5}, {"B": 2, "C": 41})

for _name, (_f, _params, _domain, _doc) in TABLE.items():
    register(Op(
        name=_name,
        doc=_doc,
        inputs=(Tensor("x", (B, C), domain=_domain),),
        outputs=(output("out", (b, i), _f(_x), (B, C)),),
        params=_params,
        test_sizes=SIZES,
        tolerances={"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)},
    ))
