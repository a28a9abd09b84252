"""Learning-rate schedules: the learning rate as a function of the step count ``t``, in closed
form, equal to torch.optim.lr_scheduler's (which steps recursively) at every step.

``t`` is a vector of steps (one step, or every step of a run at once), so the generated Triton
module writes the learning rate into a device tensor from a device step counter: a changing
schedule neither recompiles a kernel nor synchronizes with the host.
"""
import sympy as sp

from ..declare import Dim, Op, Param, Tensor, output, register, idx
from ..functions import Floor, Iverson

s, = idx("s")
S = Dim("S", "s")  # the steps asked for
t = Tensor("t", (S,), domain=(0.0, 60.0))
SIZES = ({"S": 1}, {"S": 5})
TOL = {"float32": (1e-5, 1e-6), "bfloat16": (2e-2, 2e-2)}

lr = Param("lr", 0.1, doc="the base learning rate (the optimizer's lr)", domain="[0, inf)")
warmup = Param("warmup", 5, integer=True, doc="warmup steps (LinearLR's total_iters, SequentialLR's milestone)", domain="[1, inf)")
cosine_steps = Param("cosine_steps", 20, integer=True, doc="cosine steps after warmup (CosineAnnealingLR's T_max)", domain="[1, inf)")
start_factor = Param("start_factor", 1 / 3, doc="lr*start_factor at step 0 (LinearLR's start_factor)", domain="(0, 1]")
eta_min = Param("eta_min", 0.0, doc="the floor the cosine decays to (CosineAnnealingLR's eta_min)", domain="finite")
tt = t[s]
register(Op(
    "warmup_cosine",
    "linear warmup from lr*start_factor to lr over `warmup` steps, then cosine decay to eta_min over "
    "`cosine_steps` (SequentialLR of LinearLR and CosineAnnealingLR, milestone warmup)",
    (t,),
    (output("lr_t", s,
            Iverson(tt < warmup) * lr * (start_factor + (1 - start_factor) * tt / warmup)
            + Iverson(tt >= warmup) * (eta_min + (lr - eta_min) * (1 + sp.cos(sp.pi * (tt - warmup) / cosine_steps)) / 2), S),),
    params=(lr, warmup, cosine_steps, start_factor, eta_min), test_sizes=SIZES, tolerances=TOL,
))

step_size = Param("step_size", 10, integer=True, doc="steps between decays (StepLR's step_size)", domain="[1, inf)")
gamma = Param("gamma", 0.1, doc="the factor of each decay (StepLR's gamma)", domain="(0, inf)")
step_warmup = Param("warmup", 0, integer=True, doc="warmup steps before the decays start (0: none, StepLR alone)", domain="[0, inf)")
register(Op(
    "step_decay",
    "lr*gamma**floor(t/step_size) (StepLR); with warmup W > 0, a linear warmup first and the decays "
    "counted from W (SequentialLR of LinearLR and StepLR, milestone W)",
    (t,),
    (output("lr_t", s,
            # Max(W, 1): with no warmup (W = 0) the bracket is 0 and the slope must stay finite
            Iverson(tt < step_warmup) * lr * (start_factor + (1 - start_factor) * tt / sp.Max(step_warmup, 1))
            + Iverson(tt >= step_warmup) * lr * gamma ** Floor((tt - step_warmup) / step_size), S),),
    params=(lr, step_size, gamma, step_warmup, start_factor), test_sizes=SIZES, tolerances=TOL,
))
