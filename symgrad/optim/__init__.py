"""Optimizers whose update is a declared, generated update rule (symgrad/ops/optim.py).

``symgrad.optim.SGD/Adam/AdamW/RMSprop/Adagrad`` are ``torch.optim.Optimizer`` subclasses with
torch's options, ``param_groups`` and ``state_dict`` format; ``symgrad.optim.numpy`` has the same
optimizers over NumPy arrays. :mod:`symgrad.optim.rules` is the one table both read.

The torch-facing classes load on first use: the NumPy optimizers (``symgrad.optim.numpy``) must
import on an install without torch (``pip install symgrad[examples]``).
"""
__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "RuleOptimizer"]


def __getattr__(name: str):
    if name in __all__:
        from . import torch_optim

        return getattr(torch_optim, name)
    raise AttributeError(f"module 'symgrad.optim' has no attribute {name!r}")
