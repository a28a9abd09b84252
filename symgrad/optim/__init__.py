"""Optimizers whose update is a declared, generated update rule (symgrad/ops/optim.py).

``symgrad.optim.SGD/Adam/AdamW/RMSprop/Adagrad`` are ``torch.optim.Optimizer`` subclasses with
torch's options, ``param_groups`` and ``state_dict`` format; ``symgrad.optim.numpy`` has the same
optimizers over NumPy arrays. :mod:`symgrad.optim.rules` is the one table both read.
"""
from .torch_optim import SGD, Adam, AdamW, Adagrad, RMSprop, RuleOptimizer  # noqa: F401

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "RuleOptimizer"]
