"""Learning-rate schedules from their declarations (``symgrad/ops/schedules.py``), evaluated by the
generated modules: no formula is written here, and nothing is read from a string.

``Schedule`` holds a step counter and the learning rate it gives. On the NumPy target both are
host floats; on the Triton target both are one-element device tensors, and ``step()`` advances the
counter and rewrites the learning rate on the device, in place: an optimizer that reads its
learning rate from ``schedule.lr`` sees each step's value without a recompile or a host sync.

    sched = warmup_cosine(lr=0.1, warmup=100, total_steps=1000, eta_min=1e-4)
    for step in range(1000):
        ...  # the optimizer step reads sched.lr
        sched.step()
    sched.values(range(1000))  # every step at once: one call of the generated module

Values equal torch.optim.lr_scheduler's (SequentialLR of LinearLR and CosineAnnealingLR; StepLR) at
every step; torch steps them recursively, the declarations are closed forms (tests/test_schedules.py).
"""
from __future__ import annotations

import numpy as np

from ..compose import load_module


class Schedule:
    """A declared schedule (``op``, one of symgrad/ops/schedules.py or a user's op of the same
    shape: input ``t[S]``, output the learning rate at each step) with its params bound."""

    def __init__(self, op: str, target: str = "numpy", device=None, **params):
        if target not in ("numpy", "triton"):
            raise ValueError(f"target must be 'numpy' or 'triton', got {target!r}")
        self.op, self.target, self.params = op, target, dict(params)
        self.module = load_module(op, target)
        if tuple(self.module.INPUTS) != ("t",) or len(self.module.OUTPUTS) != 1:
            raise ValueError(f"op {op!r} is not a schedule: a schedule takes one input t[S] (the steps) and gives one output")
        if target == "triton":
            import torch

            dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
            self.t = torch.zeros(1, dtype=torch.float32, device=dev)  # fp32 counts steps exactly up to 2**24
        else:
            self.t = np.zeros(1, dtype=np.float64)
        self.lr = self.module.forward(self.t, **self.params)  # checks the params against their domains once, here

    @property
    def step_count(self) -> int:
        """The current step (a host sync on the Triton target)."""
        return int(self.t[0])

    def step(self) -> None:
        """Advance one step and write that step's learning rate into ``self.lr`` (in place)."""
        self.t += 1
        new = self.module.forward(self.t, **self.params)
        if self.target == "triton":
            self.lr.copy_(new)
        else:
            self.lr[...] = new

    def get_last_lr(self) -> float:
        """The current learning rate as a Python float (torch's name; a host sync on Triton)."""
        return float(self.lr[0])

    def values(self, steps) -> np.ndarray:
        """The learning rate at each of ``steps`` (any integers), in one call: float64 on NumPy."""
        steps = np.asarray(list(steps) if not isinstance(steps, np.ndarray) else steps, dtype=np.float64).reshape(-1)
        if self.target == "triton":
            import torch

            t = torch.from_numpy(steps.astype(np.float32)).to(self.t.device)
            return self.module.forward(t, **self.params).cpu().numpy().astype(np.float64)
        return np.asarray(self.module.forward(steps, **self.params))


def warmup_cosine(lr: float, warmup: int, total_steps: int, start_factor: float = 1 / 3, eta_min: float = 0.0,
                  target: str = "numpy", device=None) -> Schedule:
    """Linear warmup from ``lr*start_factor`` to ``lr`` over ``warmup`` steps, then cosine decay to
    ``eta_min`` at ``total_steps``: torch's ``SequentialLR([LinearLR(opt, start_factor, 1.0, warmup),
    CosineAnnealingLR(opt, total_steps - warmup, eta_min)], milestones=[warmup])``. Past
    ``total_steps`` the cosine rises again, as torch's does."""
    if total_steps <= warmup:
        raise ValueError(f"warmup_cosine: total_steps ({total_steps}) must exceed warmup ({warmup}): the cosine needs a step")
    return Schedule("warmup_cosine", target, device, lr=lr, warmup=warmup, cosine_steps=total_steps - warmup,
                    start_factor=start_factor, eta_min=eta_min)


def step_decay(lr: float, step_size: int, gamma: float = 0.1, warmup: int = 0, start_factor: float = 1 / 3,
               target: str = "numpy", device=None) -> Schedule:
    """``lr*gamma**(t // step_size)``: torch's ``StepLR(opt, step_size, gamma)``. With ``warmup`` W > 0,
    a linear warmup from ``lr*start_factor`` first and the decays counted from W: torch's
    ``SequentialLR([LinearLR(opt, start_factor, 1.0, W), StepLR(opt, step_size, gamma)], milestones=[W])``."""
    return Schedule("step_decay", target, device, lr=lr, step_size=step_size, gamma=gamma, warmup=warmup,
                    start_factor=start_factor)
