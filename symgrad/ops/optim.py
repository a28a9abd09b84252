"""Optimizer update rules, as torch.optim documents its algorithms (one block each).

An update rule is an op whose outputs are the new values of some of its inputs (``update(p, ...)``
declares ``p_new``, written over ``p`` in place): the parameter ``p`` and the optimizer's state
tensors. It reads the gradient ``g`` and two scalars that change from step to step, ``lr`` and the
step count ``t`` (counted from 1, after torch's ``state["step"] += 1``), as tensors, so a schedule
that changes them never recompiles a kernel. Hyperparameters that stay fixed are params. Nothing
here is differentiated: the generated module is one fused, multi-tensor update (``symgrad.optim``
drives it with torch's ``param_groups`` and ``state_dict``).

Every tensor is flattened to one dim ``N``: an update is a map over entries, so a parameter of any
shape is its ``N = numel`` entries.

State that torch creates lazily (``momentum_buffer = g`` on the first step) starts at zeros here, and
the first step is told apart by ``t`` (``[t > 1]``), which gives the same values: ``mu*0 + g = g``.
"""
import sympy as sp

from ..declare import Dim, Op, Param, Role, Tensor, idx, register, update
from ..functions import Iverson

N = Dim("N", "i")
(i,) = idx("i")


def _tensor(name: str, domain=(-2.0, 2.0)) -> Tensor:
    """A flat tensor the rule reads; ``domain`` is where tests sample it (running averages of
    squares are positive, as an optimizer's state is)."""
    return Tensor(name, (N,), Role.CONST, domain=domain)


p, g = _tensor("p"), _tensor("g")
lr, t = Tensor("lr", (), Role.CONST, domain=(0.001, 0.1)), Tensor("t", (), Role.CONST, domain=(1.0, 10.0))
LR, T = sp.Symbol("lr", real=True), sp.Symbol("t", real=True)
SIZES = ({"N": 1}, {"N": 7}, {"N": 41})
TOL = {"float32": (1e-6, 1e-7), "bfloat16": (2e-2, 2e-2)}

weight_decay = Param("weight_decay", 0.0, domain="[0, inf)", doc="L2 penalty: adds weight_decay*p to the gradient (torch)")
beta1 = Param("beta1", 0.9, domain="[0, 1)", doc="decay of the gradient's running average (torch's betas[0])")
beta2 = Param("beta2", 0.999, domain="[0, 1)", doc="decay of the squared gradient's running average (betas[1])")
adam_eps = Param("eps", 1e-8, domain="[0, inf)", doc="added to the denominator, after the square root")


def _l2(grad):
    return grad + weight_decay * p[i]


# --- SGD, with L2 (torch's weight_decay) and L1 penalties --------------------------------------
l1 = Param("l1", 0.0, domain="[0, inf)", doc="L1 penalty: adds l1*sign(p) to the gradient (not in torch.optim)")
register(Op(
    "sgd", "p <- p - lr*(g + weight_decay*p + l1*sign(p)): gradient descent with L2 and L1 penalties",
    (p, g, lr),
    (update(p, i, p[i] - LR * (g[i] + weight_decay * p[i] + l1 * sp.sign(p[i]))),),
    params=(weight_decay, l1), test_sizes=SIZES, tolerances=TOL,
))

# --- momentum: torch's v = mu*v + (1 - dampening)*g; dampening = mu is the exponential average --
momentum = Param("momentum", 0.9, domain="[0, inf)", doc="mu: the velocity's decay")
dampening = Param("dampening", 0.0, domain="[0, 1]",
                  doc="scales the new gradient by 1 - dampening after the first step; dampening = momentum "
                      "makes the velocity an exponential average v = beta*v + (1 - beta)*g")
buf = _tensor("momentum_buffer")
velocity = momentum * buf[i] + (1 - dampening * Iverson(T > 1)) * _l2(g[i])
register(Op(
    "sgd_momentum", "v <- mu*v + (1 - dampening)*g (v = g on the first step), p <- p - lr*v: torch's SGD with momentum",
    (p, g, buf, lr, t),
    (update(buf, i, velocity), update(p, i, p[i] - LR * sp.IndexedBase("momentum_buffer_new", real=True)[i])),
    params=(momentum, dampening, weight_decay), test_sizes=SIZES, tolerances=TOL,
))
register(Op(
    "nesterov", "v <- mu*v + (1 - dampening)*g, p <- p - lr*(g + mu*v): torch's SGD with nesterov=True",
    (p, g, buf, lr, t),
    (update(buf, i, velocity),
     update(p, i, p[i] - LR * (_l2(g[i]) + momentum * sp.IndexedBase("momentum_buffer_new", real=True)[i]))),
    params=(momentum, dampening, weight_decay), test_sizes=SIZES, tolerances=TOL,
))

# --- RMSprop: plain or centered, with or without momentum (torch's four cases) -----------------
alpha = Param("alpha", 0.99, domain="[0, 1]", doc="decay of the squared gradient's running average")
rms_eps = Param("eps", 1e-8, domain="[0, inf)", doc="added to the root mean square")
# sampled where a centered variance square_avg - grad_avg**2 stays positive, as a real run keeps it
square_avg, grad_avg = _tensor("square_avg", (1.0, 2.0)), _tensor("grad_avg", (-0.5, 0.5))
for centered in (False, True):
    for with_momentum in (False, True):
        name = "rmsprop" + ("_centered" if centered else "") + ("_momentum" if with_momentum else "")
        gw = _l2(g[i])
        sq_new = sp.IndexedBase("square_avg_new", real=True)[i]
        outs = [update(square_avg, i, alpha * square_avg[i] + (1 - alpha) * gw**2)]
        state = [square_avg]
        mean_square = sq_new
        if centered:  # the variance: the mean square less the squared running mean
            # alpha*grad_avg + (1 - alpha)*g, in the order torch's lerp_ rounds it
            outs.append(update(grad_avg, i, grad_avg[i] + (1 - alpha) * (gw - grad_avg[i])))
            state.append(grad_avg)
            mean_square = sq_new - sp.IndexedBase("grad_avg_new", real=True)[i] ** 2
        step = gw / (sp.sqrt(mean_square) + rms_eps)
        params = [alpha, rms_eps, weight_decay]
        if with_momentum:
            outs.append(update(buf, i, momentum * buf[i] + step))
            state.append(buf)
            params.insert(2, momentum)
            step = sp.IndexedBase("momentum_buffer_new", real=True)[i]
        outs.append(update(p, i, p[i] - LR * step))
        register(Op(
            name, "torch's RMSprop" + (", centered (divides by the gradient's running standard deviation)" if centered else "")
            + (", with momentum on the scaled step" if with_momentum else ""),
            (p, g, *state, lr), tuple(outs), params=tuple(params), test_sizes=SIZES, tolerances=TOL,
        ))

# --- Adam and AdamW ------------------------------------------------------------------------------
exp_avg, exp_avg_sq, max_exp_avg_sq = _tensor("exp_avg"), _tensor("exp_avg_sq", (0.0, 2.0)), _tensor("max_exp_avg_sq", (0.0, 2.0))
m_new = sp.IndexedBase("exp_avg_new", real=True)[i]
v_new = sp.IndexedBase("exp_avg_sq_new", real=True)[i]


def _adam(decoupled: bool, amsgrad: bool):
    """Adam's outputs. The running averages start at 0, so after t steps they weigh the gradients by
    1 - beta**t in all, not 1: dividing by 1 - beta**t (``--steps`` shows why) unbiases them."""
    grad = g[i] if decoupled else _l2(g[i])
    # m + (1 - beta1)*(g - m) = beta1*m + (1 - beta1)*g, in the order torch's lerp_ rounds it
    outs = [update(exp_avg, i, exp_avg[i] + (1 - beta1) * (grad - exp_avg[i])),
            update(exp_avg_sq, i, beta2 * exp_avg_sq[i] + (1 - beta2) * grad**2)]
    second = v_new
    if amsgrad:
        outs.append(update(max_exp_avg_sq, i, sp.Max(max_exp_avg_sq[i], v_new)))
        second = sp.IndexedBase("max_exp_avg_sq_new", real=True)[i]
    step = LR / (1 - beta1**T) * m_new / (sp.sqrt(second) / sp.sqrt(1 - beta2**T) + adam_eps)
    decay = p[i] * (1 - LR * weight_decay) if decoupled else p[i]
    outs.append(update(p, i, decay - step))
    return tuple(outs)


for _decoupled in (False, True):
    for _amsgrad in (False, True):
        register(Op(
            ("adamw" if _decoupled else "adam") + ("_amsgrad" if _amsgrad else ""),
            ("torch's AdamW: decoupled weight decay p*(1 - lr*weight_decay), then the Adam step"
             if _decoupled else "torch's Adam: bias-corrected running averages of g and g**2 (weight_decay is L2)")
            + ("; amsgrad: the denominator uses the largest exp_avg_sq so far" if _amsgrad else ""),
            (p, g, exp_avg, exp_avg_sq, *((max_exp_avg_sq,) if _amsgrad else ()), lr, t),
            _adam(_decoupled, _amsgrad),
            params=(beta1, beta2, adam_eps,
                    Param("weight_decay", 0.01 if _decoupled else 0.0, domain="[0, inf)",
                          doc="decoupled: p <- p*(1 - lr*weight_decay)" if _decoupled else weight_decay.doc)),
            test_sizes=SIZES, tolerances=TOL,
        ))

# --- Adagrad -------------------------------------------------------------------------------------
lr_decay = Param("lr_decay", 0.0, domain="[0, inf)", doc="the step is lr/(1 + (t - 1)*lr_decay)")
state_sum = _tensor("sum", (0.0, 2.0))
adagrad_eps = Param("eps", 1e-10, domain="[0, inf)", doc="added to the root of the sum")
register(Op(
    "adagrad", "sum <- sum + g**2, p <- p - lr/(1 + (t - 1)*lr_decay)*g/(sqrt(sum) + eps): torch's Adagrad",
    (p, g, state_sum, lr, t),
    (update(state_sum, i, state_sum[i] + _l2(g[i]) ** 2),
     update(p, i, p[i] - LR / (1 + (T - 1) * lr_decay) * _l2(g[i]) / (sp.sqrt(sp.IndexedBase("sum_new", real=True)[i]) + adagrad_eps))),
    params=(lr_decay, weight_decay, adagrad_eps),
    test_sizes=SIZES, tolerances=TOL,
))
