"""The engine is loud: what it cannot differentiate soundly raises an error naming the op and the
term, instead of returning a gradient that is silently wrong."""
import pytest
import sympy as sp

from symgrad.declare import DeclarationError, Op, Registry, Tensor, idx, output
from symgrad.derive import DerivationError, derive
from symgrad.ops.dims import B, C

b, i = idx("b i")
x = Tensor("x", (B, C))


def test_unsolvable_index_equation_is_an_error():
    # out[b, i] = x[b, 2*i]: the delta(a, 2*i) has no unit-slope solution, so no gradient is guessed
    op = Op("stride2", "every other column", (x,), (output("out", (b, i), x[b, 2 * i], (B, C)),))
    with pytest.raises(DerivationError, match=r"op stride2: gradient of x keeps an unsolved index equation KroneckerDelta"):
        derive(op)


def test_function_without_a_derivative_is_an_error():
    f = sp.Function("f")  # an undefined function: SymPy leaves Derivative(f(x), x)
    op = Op("opaque", "an undefined function", (x,), (output("out", (b, i), f(x[b, i]), (B, C)),))
    with pytest.raises(DerivationError, match=r"op opaque: cannot simplify the gradient of x: unsupported term"):
        derive(op)


@pytest.mark.parametrize("make, message", [
    (lambda: Op("bad name", "", (x,), (output("out", (b, i), x[b, i], (B, C)),)), "not an identifier"),
    (lambda: Op("reads_y", "", (x,), (output("out", (b, i), sp.IndexedBase("y")[b, i], (B, C)),)), "undeclared tensor y"),
    (lambda: Op("loose", "", (x,), (output("out", b, x[b, i], B),)), r"unbound indices \['i'\]"),
])
def test_malformed_declarations_are_rejected(make, message):
    with pytest.raises(DeclarationError, match=message):
        Registry().add(make())
